"""onnxruntime speed of CIFAR ResNet-18, dense vs cstar_fx.transform at 8x, measured side by side in one run.

Models (random init, torch.manual_seed(0); speed does not depend on the weight values):
  dense            the model as built
  cstar params     transform(ratio, budget="params")  - the global allocator under a parameter budget
  cstar flops      transform(ratio, budget="flops")   - the same allocator under a FLOP budget
  uniform tucker2  a reference, not our method: every 3x3 conv Tucker-2 (1x1 convs SVD) at the same
                   per-layer parameter ratio, the "naive uniform Tucker-2" of the design notes

    python bench/onnx_speed.py                 # CPU EP, batch 1 and 64, 2 intra-op threads
    python bench/onnx_speed.py --gpu           # CUDA EP, fp32 and fp16, batch 1/256/1024, with/without CUDA graphs
    python bench/onnx_speed.py --smoke         # tiny run (CI): batch 1, 3 iterations
    python bench/onnx_speed.py --profile       # also: CPU time per ResNet stage (onnxruntime profiler)

Writes bench/out/onnx_speed_{cpu,gpu}.{json,md}. The goal column checks speedup >= 0.8 x FLOP ratio.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import cstar_fx
from cstar_fx.export import CPU, CUDA, BenchResult, benchmark, export_onnx
from cstar_fx.models import cifar_resnet18
from cstar_fx.plan import RankPlan
from cstar_fx.sysinfo import describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT  # noqa: E402

GOAL = 0.8  # speedup must reach this fraction of the FLOP ratio


def _uniform_rank(c_out: int, c_in: int, k: int, ratio: float, round_to: int) -> int:
    """Rank r with r*c_in + r*r*k*k + r*c_out ~= c_out*c_in*k*k / ratio (Tucker-2, r_in = r_out = r)."""
    target = c_out * c_in * k * k / ratio
    if k == 1:  # SVD of a 1x1 conv: r * (c_in + c_out)
        r = target / (c_in + c_out)
    else:
        a, b = k * k, c_in + c_out
        r = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    return max(round_to, int(round(r / round_to)) * round_to)


def uniform_plan(model: torch.nn.Module, ratio: float, x: torch.Tensor, round_to: int = 8) -> RankPlan:
    """Every conv except the 3-channel stem factorized at ``ratio`` on its own; linear layers dense."""
    plan = cstar_fx.plan_ranks(model, ratio, example_inputs=x, round_to=round_to)
    for name, lp in plan.layers.items():
        if lp.kind != "conv" or lp.weight_shape[1] <= 3:
            plan = plan.with_layer(name, scheme="dense", ranks=())
            continue
        c_out, c_in, k, _ = lp.weight_shape
        r = _uniform_rank(c_out, c_in, k, ratio, round_to)
        if k == 1:
            plan = plan.with_layer(name, scheme="svd", ranks=(min(r, c_out, c_in),))
        else:
            plan = plan.with_layer(name, scheme="tucker2", ranks=(min(r, c_out), min(r, c_in)))
    return plan


def build(ratio: float) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, Any]], torch.Tensor]:
    torch.manual_seed(0)
    dense = cifar_resnet18().eval()
    x = torch.rand(1, 3, 32, 32)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    info: dict[str, dict[str, Any]] = {"dense": {"params_ratio": 1.0, "flop_ratio": 1.0}}
    variants = {
        f"cstar {ratio:g}x params": dict(budget="params"),
        f"cstar {ratio:g}x flops": dict(budget="flops"),
        f"uniform tucker2 {ratio:g}x": dict(plan=uniform_plan(dense, ratio, x)),
    }
    for name, opts in variants.items():
        gm = cstar_fx.transform(dense, None if "plan" in opts else ratio, example_inputs=x, **opts).eval()
        report = cstar_fx.get_report(gm)
        models[name] = gm
        info[name] = {"params_ratio": report.ratio_params, "flop_ratio": report.ratio_flops,
                      "factorized": len(report.factorized), "ranks": report.factorized}
    return models, info, x


def export_all(models: dict[str, torch.nn.Module], x: torch.Tensor, out: Path, dtype: str,
               info: dict[str, dict[str, Any]]) -> dict[str, Path]:
    paths = {}
    for i, (name, model) in enumerate(models.items()):
        result = export_onnx(model, torch.cat([x, x]), out / f"{i}_{dtype}.onnx", dtype=dtype)
        print(f"{name} ({dtype}): {result.verification}")
        info[name][f"verification_{dtype}"] = result.verification.max_rel
        paths[name] = result.path
    return paths


def ratio_columns(info: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per-model extra columns for the speed table."""
    return {name: {"params ratio": f"{d['params_ratio']:.2f}x", "FLOP ratio": f"{d['flop_ratio']:.2f}x"}
            for name, d in info.items()}


def goal_rows(result: BenchResult, info: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in result.rows:
        if r.model == result.baseline or r.speedup is None:
            continue
        flop = info[r.model]["flop_ratio"]
        rows.append({"model": r.model, "provider": r.ran_on, "cuda_graph": r.cuda_graph, "batch": r.batch,
                     "speedup": r.speedup, "flop_ratio": flop, "speedup_over_flop_ratio": r.speedup / flop,
                     "goal_met": r.speedup >= GOAL * flop})
    return rows


def goal_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | provider | CUDA graph | batch | speedup | FLOP ratio | speedup / FLOP ratio | "
             f"goal (>= {GOAL}) |", "|---|---|---|---|---|---|---|---|"]
    for g in rows:
        lines.append(f"| {g['model']} | {g['provider'].replace('ExecutionProvider', '')} | "
                     f"{'yes' if g['cuda_graph'] else 'no'} | {g['batch']} | {g['speedup']:.2f}x | "
                     f"{g['flop_ratio']:.2f}x | {g['speedup_over_flop_ratio']:.2f} | "
                     f"{'met' if g['goal_met'] else 'not met'} |")
    return "\n".join(lines)


def _stage_of(module_path: str) -> str:
    parts = module_path.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[1].startswith("layer") else "other"


def _stages(path: Path) -> dict[str, str]:
    """ONNX node names and output names -> ResNet stage ("net.layer3", or "other" for stem, pool, head)."""
    import onnx

    table = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        module = max((s for s in scopes[:-1] if s), key=len, default="")  # the last scope is the op itself
        stage = _stage_of(module)
        for key in (node.name, *node.output):
            table[key] = stage
    return table


def profile_stages(paths: dict[str, Path], batch: int, threads: int, iters: int,
                   tmp: Path) -> dict[str, dict[str, float]]:
    """Kernel time (ms) per run, per stage and model, from onnxruntime's profiler (CPU EP; median per node)."""
    import numpy as np
    import onnxruntime as ort

    out: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        stages = _stages(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp / "profile")
        session = ort.InferenceSession(str(path), options, providers=[CPU])
        x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
        for _ in range(iters):
            session.run(None, {session.get_inputs()[0].name: x})
        trace = Path(session.end_profiling())
        per_node: dict[str, list[float]] = {}
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_node.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] / 1e3)
        totals: dict[str, float] = {}
        for key, durations in per_node.items():
            node = key
            while node not in stages and "_" in node:  # onnxruntime suffixes fused/re-laid-out nodes (_nchwc, ...)
                node = node.rsplit("_", 1)[0]
            stage = stages.get(node, "layout/other")
            totals[stage] = totals.get(stage, 0.0) + float(np.median(durations))
        os.unlink(trace)
        out[name] = totals
    return out


def stage_flops(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Conv/linear FLOPs per stage and model for one image (torch.utils.flop_counter, per leaf layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        counts = counter.get_flop_counts()
        root = type(model).__name__
        per: dict[str, float] = {}
        for path, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                stage = _stage_of(path)
                per[stage] = per.get(stage, 0.0) + float(sum(counts.get(f"{root}.{path}", {}).values()))
        out[name] = per
    return out


def profile_markdown(times: dict[int, dict[str, dict[str, float]]], flops: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(times.values())))
    stages = sorted({s for per_batch in times.values() for per in per_batch.values() for s in per}
                    | {s for per in flops.values() for s in per})
    lines = []
    for batch, per_model in times.items():
        head = ["stage"] + [f"{n} ms (GFLOP)" for n in names]
        lines += [f"Batch {batch}: kernel time per run (onnxruntime profiler, median per node), and "
                  "conv/linear GFLOP per image (torch.utils.flop_counter)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for stage in stages + ["total"]:
            cells = [stage]
            for n in names:
                t = sum(per_model[n].values()) if stage == "total" else per_model[n].get(stage, 0.0)
                f = sum(flops.get(n, {}).values()) if stage == "total" else flops.get(n, {}).get(stage)
                cells.append(f"{t:.2f}" + (f" ({f / 1e9:.3f})" if f else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA EP, fp32 + fp16, with and without CUDA graphs")
    parser.add_argument("--ratio", type=float, default=8.0, help="compression ratio")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 1 64 (CPU), 1 256 1024 (GPU)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (CPU EP)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="tiny run: batch 1, 1 warm-up, 3 iterations")
    parser.add_argument("--allow-spinning", action="store_true", help="onnxruntime spin-waiting threads (CPU)")
    parser.add_argument("--name", default=None, help="output file stem (default: onnx_speed_cpu / onnx_speed_gpu)")
    parser.add_argument("--profile", action="store_true", help="CPU: also time each ResNet stage (profiler)")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.warmup, args.iters = [1], 1, 3
    stem = args.name or ("onnx_speed_gpu" if args.gpu else "onnx_speed_cpu")
    batch_sizes = tuple(args.batch_sizes or ((1, 256, 1024) if args.gpu else (1, 64)))
    models, info, x = build(args.ratio)
    results: dict[str, BenchResult] = {}
    profile: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="onnx_speed_") as tmp:
        for dtype in (("float32", "float16") if args.gpu else ("float32",)):
            paths = export_all(models, x, Path(tmp), dtype, info)
            results[dtype] = benchmark(
                paths, providers=(CUDA,) if args.gpu else (CPU,), batch_sizes=batch_sizes, warmup=args.warmup,
                iters=args.iters, cuda_graph="both" if args.gpu else False, baseline="dense",
                intra_op_threads=None if args.gpu else args.threads, allow_spinning=args.allow_spinning)
            if args.profile and not args.gpu:
                profile = {b: profile_stages(paths, b, args.threads, max(3, args.iters // 4), Path(tmp))
                           for b in batch_sizes}
    OUT.mkdir(parents=True, exist_ok=True)
    command = "python bench/onnx_speed.py " + " ".join(sys.argv[1:])
    sections, payload = [], {"command": command.strip(), "machine": describe(), "models": info, "results": {}}
    for dtype, result in results.items():
        goals = goal_rows(result, info)
        payload["results"][dtype] = {**result.to_dict(), "goal": goals}
        meta = result.meta
        sections.append(
            f"### {'CUDA EP' if args.gpu else 'CPU EP'}, {dtype}\n\n"
            f"- command: `{command.strip()}`\n- machine: {describe()}\n- date: {meta['date']}, load average at "
            f"start {', '.join(f'{v:.2f}' for v in meta['load_average'] or [])}\n- onnxruntime {meta['onnxruntime']}, "
            f"intra-op threads {meta['intra_op_threads']}, {meta['warmup']} warm-up + {meta['iters']} timed runs per "
            f"model and batch size, models interleaved, spin-waiting {'on' if meta['allow_spinning'] else 'off'}\n\n"
            f"{result.to_markdown(ratio_columns(info))}\n\n"
            + (f"{goal_markdown(goals)}\n" if goals else ""))
    if profile:
        flops = stage_flops(models, x)
        payload["profile_ms"] = {str(b): p for b, p in profile.items()}
        payload["stage_flops"] = flops
        sections.append("### Where the time goes (CPU EP, float32)\n\n" + profile_markdown(profile, flops))
    (OUT / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    text = "\n".join(sections)
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    print(f"written: {OUT / f'{stem}.json'}, {OUT / f'{stem}.md'}")


if __name__ == "__main__":
    main()
