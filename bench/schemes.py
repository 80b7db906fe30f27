"""Spatial SVD vs Tucker-2 vs SVD for the kxk convs of CIFAR ResNet-18: kept energy at equal parameters, and
onnxruntime CPU speed at equal FLOPs. Each row is ``transform(model, ratio, conv_scheme=...)``: linear layers and
1x1 convs are SVD in every row, so only the 3x3 convs' form differs; ``auto`` picks per layer.

Energy: the trained width-16 teacher of bench/run_cpu_table.sh (bench/out/runs/robust_cpu/seed0/teacher; random
init when it is absent, and the output says which), ``budget="params"``. The kept energy of the 3x3 convs is
measured on the factorized weights (``1 - relative error^2`` from the transform report; 1 for a 3x3 conv left
dense), so Tucker-2's is its real value; ``planned`` is what the allocator scored (exact for SVD and spatial SVD,
an estimate for Tucker-2). ``pooled`` weighs each layer by ``||W||^2``, ``mean`` counts every 3x3 conv alike.

Speed: width-64 random init (speed does not depend on the values), ``budget="flops"``, exported with
``export_onnx``, timed by ``cstar_fx.export.benchmark`` on the CPU provider with one intra-op thread, in rounds
whose order alternates (the median over rounds is reported), so drift on a shared machine hits every model alike.

    nice -n 10 python bench/schemes.py           # a few minutes on a 2-core box
    python bench/schemes.py --smoke              # under a minute: 2x only, width 16, 3 iterations

Writes bench/out/schemes_energy.{json,md} and bench/out/schemes_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import cstar_fx
from cstar_fx.export import CPU, benchmark, export_onnx
from cstar_fx.models import cifar_resnet18

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, write  # noqa: E402

SCHEMES = ("svd", "tucker2", "spatial_svd", "auto")
TEACHER = OUT / "runs" / "robust_cpu" / "seed0" / "teacher" / "checkpoint.pt"


def _teacher() -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = cifar_resnet18(width=16)
    if not TEACHER.exists():
        return model, "cifar_resnet18(width=16), random init (no trained teacher found)"
    model.load_state_dict(torch.load(TEACHER, weights_only=True)["model"])
    return model, f"cifar_resnet18(width=16), trained teacher {TEACHER.relative_to(OUT.parent.parent)}"


def _kxk(plan: cstar_fx.RankPlan) -> list[cstar_fx.LayerPlan]:
    return [lp for lp in plan.layers.values() if lp.kind == "conv" and lp.weight_shape[2:] != (1, 1)]


def energy_rows(ratios: list[float]) -> tuple[list[dict[str, Any]], str]:
    model, source = _teacher()
    norms = {n: float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters()}
    rows = []
    for ratio in ratios:
        for scheme in SCHEMES:
            gm = cstar_fx.transform(model, ratio, conv_scheme=scheme)
            plan, report = cstar_fx.get_plan(gm), cstar_fx.get_report(gm)
            layers = _kxk(plan)
            kept = {lp.name: 1.0 - report.errors.get(lp.name, 0.0) ** 2 for lp in layers}  # dense: all of it
            total = sum(norms[lp.param] for lp in layers)
            rows.append({
                "ratio": f"{ratio:g}x", "conv_scheme": scheme, "params ratio": report.ratio_params,
                "3x3 kept (pooled)": sum(kept[lp.name] * norms[lp.param] for lp in layers) / total,
                "3x3 kept (mean)": statistics.fmean(kept.values()),
                "3x3 planned (mean)": statistics.fmean(lp.energy for lp in layers),
                "3x3 forms": ", ".join(f"{n} {c}" for n, c in sorted(Counter(lp.scheme for lp in layers).items())),
            })
    return rows, source


def speed_rows(ratios: list[float], width: int, iters: int, rounds: int, batches: tuple[int, ...]
               ) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dense = cifar_resnet18(width=width).eval()
    x = torch.randn(1, 3, 32, 32)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    info: dict[str, dict[str, Any]] = {"dense": {"ratio": "-", "conv_scheme": "dense", "FLOP ratio": 1.0}}
    for ratio in ratios:
        for scheme in SCHEMES:
            gm = cstar_fx.transform(dense, ratio, budget="flops", conv_scheme=scheme, example_inputs=x).eval()
            name = f"{scheme} {ratio:g}x"
            models[name] = gm
            info[name] = {"ratio": f"{ratio:g}x", "conv_scheme": scheme,
                          "FLOP ratio": cstar_fx.get_report(gm).ratio_flops}
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            export_onnx(m, x, paths[name])
        for r in range(rounds):
            order = dict(reversed(list(paths.items()))) if r % 2 else paths
            res = benchmark(order, providers=(CPU,), batch_sizes=batches, iters=iters, warmup=max(3, iters // 10),
                            intra_op_threads=1, baseline="dense", progress=False)
            for name in paths:
                for b in batches:
                    times.setdefault((name, b), []).append(res.row(name, CPU, b).median_ms)
    rows = []
    for name in models:
        row = dict(info[name])
        for b in batches:
            ms = statistics.median(times[(name, b)])
            row[f"b{b} ms"] = ms
            row[f"b{b} speedup"] = statistics.median(times[("dense", b)]) / ms
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny run (2x only, width 16, 3 iterations)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ratios = [2.0] if args.smoke else [4.0, 8.0]
    width, iters, rounds, batches = (16, 3, 1, (1,)) if args.smoke else (64, 60, 3, (1, 8))
    energy, source = energy_rows(ratios)
    speed = speed_rows(ratios, width, iters, rounds, batches)
    e_cols = ["ratio", "conv_scheme", "params ratio", "3x3 kept (pooled)", "3x3 kept (mean)", "3x3 planned (mean)",
              "3x3 forms"]
    s_cols = ["ratio", "conv_scheme", "FLOP ratio"] + [f"b{b} {k}" for b in batches for k in ("ms", "speedup")]
    md = write("schemes_energy", energy, e_cols, {"model": source, "budget": "params", "torch threads": 1})
    md += "\n" + write("schemes_speed", speed, s_cols, {
        "model": f"cifar_resnet18(width={width}), random init", "budget": "flops",
        "runtime": f"onnxruntime {CPU}, 1 intra-op thread, {rounds} alternating rounds x {iters} iterations, median"})
    print(md)


if __name__ == "__main__":
    main()
