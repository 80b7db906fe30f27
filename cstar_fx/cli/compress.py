"""``cstar-fx compress``: the whole pipeline in one command, written to one run folder.

model -> robust teacher (trained or loaded) -> for each ratio and method: compress + adversarial
fine-tune -> robust evaluation -> ONNX export -> onnxruntime benchmark -> report.md, results.json,
plots. Every option has a default; ``--config run/config.json`` repeats a run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import UsageError

__all__ = ["register", "run", "parse_eps"]

METHODS = ("cstar", "decompose", "prune")
DATASETS = ("digits", "cifar10", "cifar10-jpeg", "folder")
MODELS = ("small_cnn", "resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2")
COMPLETE = "COMPLETE"


def parse_eps(text: str) -> float:
    """An attack radius given as a number or a fraction such as ``8/255``.

    Example:
        >>> round(parse_eps("8/255"), 5)
        0.03137
    """
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (inputs are in [0, 1]), got {text!r}")
    return value


def _positive_ratio(text: str) -> float:
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"ratios must be > 1, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compress`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("compress", help="run the whole pipeline and write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small_cnn", choices=MODELS, help="architecture (random init)")
    g.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="torchvision input stem")
    g.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                   help="your own nn.Module class, built with no arguments (overrides --model)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="state_dict for the model (loaded with weights_only=True), used as the teacher")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="training/evaluation data")
    g.add_argument("--data", type=Path, default=None,
                   help="cifar10: torchvision root; cifar10-jpeg: the .tar.xz archive; folder: root with train/ test/")
    g.add_argument("--limit", type=int, default=None, help="use only the first N training and N//4 test images")
    g = p.add_argument_group("compression")
    g.add_argument("--ratios", type=_positive_ratio, nargs="+", default=[8.0], help="compression ratios")
    g.add_argument("--methods", nargs="+", default=["cstar", "decompose"], choices=METHODS,
                   help="cstar: ADMM joint training + fine-tune; decompose: transform + fine-tune; prune: Torch-Pruning")
    g.add_argument("--budget", default="params", choices=("params", "flops"), help="what the ratio counts")
    g.add_argument("--round-to", type=int, default=8, help="ranks/channels are multiples of this")
    g.add_argument("--skip", nargs="*", default=[], help="layer names or globs kept dense")
    g = p.add_argument_group("training")
    g.add_argument("--teacher-epochs", type=int, default=10, help="robust teacher epochs (ignored with --checkpoint)")
    g.add_argument("--joint-epochs", type=int, default=5, help="CSTAR ADMM joint-training epochs")
    g.add_argument("--finetune-epochs", type=int, default=5, help="adversarial fine-tune epochs (same for all methods)")
    g.add_argument("--loss", default="pgd", choices=("pgd", "trades", "fast", "clean"), help="training loss")
    g.add_argument("--lr", type=float, default=0.05, help="teacher learning rate (compression phases use lr/5)")
    g.add_argument("--batch-size", type=int, default=128, help="training batch size")
    g.add_argument("--rho", type=float, default=1.0, help="ADMM proximity weight")
    g = p.add_argument_group("attack")
    g.add_argument("--eps", type=parse_eps, default=None, help="L_inf radius (default: 8/255, digits 0.1)")
    g.add_argument("--alpha", type=parse_eps, default=None, help="PGD step (default: eps/4)")
    g.add_argument("--train-steps", type=int, default=7, help="PGD steps during training")
    g.add_argument("--eval-steps", type=int, default=20, help="PGD steps for evaluation")
    g.add_argument("--eval-n", type=int, default=1000, help="test images for clean/PGD accuracy")
    g.add_argument("--autoattack-n", type=int, default=0, help="test images for AutoAttack (0: skip; needs [robust])")
    g = p.add_argument_group("deployment")
    g.add_argument("--no-export", action="store_true", help="skip ONNX export and benchmark")
    g.add_argument("--bench-batch", type=int, nargs="+", default=[1, 64], help="onnxruntime batch sizes")
    g.add_argument("--providers", nargs="+", default=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   help="onnxruntime providers (an unusable one is reported, not faked)")
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None, help="run folder (default runs/<date-time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--config", type=Path, default=None, help="repeat a run from its config.json (flags override)")
    p.set_defaults(func=run)


_NOT_CONFIG = {"func", "command", "config", "overwrite", "out", "argv"}


def _apply_config(args: argparse.Namespace, argv_flags: set[str]) -> None:
    try:
        saved = json.loads(args.config.read_text())["options"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"--config {args.config}: not a cstar-fx config.json ({exc}); pass the one a run wrote") from None
    for key, value in saved.items():
        if key in _NOT_CONFIG or not hasattr(args, key) or f"--{key.replace('_', '-')}" in argv_flags:
            continue
        setattr(args, key, Path(value) if key in ("data", "checkpoint") and value is not None else value)


def _check(args: argparse.Namespace) -> None:
    """Every input error, before anything is written."""
    if args.dataset in ("cifar10", "folder") and args.data is None:
        raise UsageError(f"--dataset {args.dataset} needs --data PATH (the dataset root)")
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist; pass the dataset root (or archive for cifar10-jpeg)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a file")
    if args.dataset == "digits" and args.model not in ("small_cnn",) and args.model_class is None:
        raise UsageError(f"--model {args.model} needs 3-channel images; use --model small_cnn with --dataset digits")
    for name in ("teacher_epochs", "joint_epochs", "finetune_epochs", "eval_steps", "train_steps", "eval_n",
                 "autoattack_n", "batch_size", "round_to"):
        if getattr(args, name) < (1 if name in ("batch_size", "round_to", "eval_n") else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 1' if name in ('batch_size', 'round_to', 'eval_n') else '>= 0'}")
    if args.lr <= 0:
        raise UsageError("--lr must be > 0")
    if args.limit is not None and args.limit < 8:
        raise UsageError("--limit must be >= 8")
    if any(b < 1 for b in args.bench_batch):
        raise UsageError("--bench-batch sizes must be >= 1")
    if args.model_class is not None and ":" not in args.model_class:
        raise UsageError("--model-class must look like package.module:ClassName")


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return dev


def _load_data(args: argparse.Namespace) -> tuple[Any, Any]:
    from cstar_fx import data as D

    try:
        if args.dataset == "digits":
            train, test = D.digits(seed=args.seed)
        elif args.dataset == "cifar10":
            train, test = D.cifar10(args.data)
        elif args.dataset == "cifar10-jpeg":
            train, test = D.cifar10_jpeg(args.data)
        else:
            train = D.image_folder(args.data / "train").with_augment("crop_flip")
            test = D.image_folder(args.data / "test")
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise UsageError(f"could not load --dataset {args.dataset}: {exc}") from None
    if args.limit:
        train, test = train.subset(args.limit), test.subset(max(args.limit // 4, 8))
    return train, test


def _build_model(args: argparse.Namespace, train: Any) -> Any:
    import torch

    from cstar_fx.models import build_model, small_cnn

    channels = train.input_shape[0]
    if args.model_class:
        module_name, _, cls_name = args.model_class.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"--model-class {args.model_class}: {exc}") from None
        model = cls()
    elif args.model == "small_cnn":
        model = small_cnn(in_channels=channels, num_classes=train.num_classes)
    else:
        model = build_model(args.model, num_classes=train.num_classes, stem=args.stem)
    if args.checkpoint is not None:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            model.load_state_dict(state)
        except Exception as exc:  # weights_only refuses pickled code; shapes may not match
            raise UsageError(f"--checkpoint {args.checkpoint} does not load into the model: {exc}") from None
    return model


def _configs(args: argparse.Namespace, eps: float) -> dict[str, Any]:
    from cstar_fx.robust import AttackConfig, JointConfig, LossConfig, TrainConfig
    from cstar_fx.robust.config import AdmmConfig

    alpha = args.alpha if args.alpha is not None else eps / 4
    train_attack = AttackConfig(eps=eps, alpha=alpha, steps=args.train_steps)
    loss = LossConfig(args.loss, attack=train_attack)
    teacher = TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr, loss=loss, seed=args.seed)
    tune = teacher.replace(epochs=args.finetune_epochs, lr=args.lr / 5)
    joint = JointConfig(joint=teacher.replace(epochs=args.joint_epochs, lr=args.lr / 5), finetune=tune,
                        admm=AdmmConfig(rho=args.rho, rho_max=max(10.0, args.rho)))
    return {"teacher": teacher, "tune": tune, "joint": joint,
            "eval": AttackConfig(eps=eps, alpha=alpha, steps=args.eval_steps)}


def _ranks(plan: Any) -> dict[str, list[int]]:
    """Per layer ``[full rank, kept rank]`` of the output mode (the bar plot's data)."""
    out = {}
    for name, lp in plan.layers.items():
        full = min(lp.weight_shape[0], math.prod(lp.weight_shape[1:]))
        out[name] = [full, lp.ranks[0] if lp.factorized else full]
    return out


def _evaluate(model: Any, test: Any, cfg: dict[str, Any], args: argparse.Namespace, device: Any) -> Any:
    from cstar_fx.robust import evaluate

    attacks = ("pgd", "autoattack") if args.autoattack_n else ("pgd",)
    return evaluate(model, test, attacks, attack=cfg["eval"], n=args.eval_n, autoattack_n=args.autoattack_n or None,
                    device=device, seed=args.seed)


# --- torchrun: every rank runs the stages (training and evaluation are distributed), rank 0 writes ---

def _rank0() -> bool:
    """True on the process that writes the run folder: rank 0 under torchrun, the only process otherwise."""
    from cstar_fx.robust.distributed import is_main_process

    return is_main_process()


def _check_world(args: argparse.Namespace) -> None:
    from cstar_fx.robust.distributed import world

    w = world()
    if w.active and args.batch_size % w.size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch, split over {w.size} processes, so it "
                         f"must be divisible by {w.size}; use a multiple of {w.size}")


def run(args: argparse.Namespace) -> int:
    """Validate everything, then run the stages and write the run folder.

    Under ``torchrun --nproc-per-node N -m cstar_fx compress ...`` every rank runs the stages
    (``--batch-size`` is the global batch) and only rank 0 writes the run folder, exports and benchmarks.
    """
    from cstar_fx.robust.distributed import process_group

    with process_group():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from cstar_fx.robust.distributed import barrier, broadcast_object, local_device, rank0_first

    flags = {a.split("=")[0] for a in getattr(args, "argv", sys.argv[1:]) if a.startswith("--")}
    if args.config is not None:
        _apply_config(args, flags)
    _check(args)
    _check_world(args)
    device = local_device(_device(args.device))
    out = broadcast_object(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"run folder {out} exists and is not empty; pass --overwrite or another --out")
    barrier()  # every rank has checked the folder before rank 0 fills it
    if _rank0():
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write the run folder {out}: {exc}; pass a writable --out") from None

    import torch

    import cstar_fx
    from cstar_fx.runreport import RESULTS_FORMAT, plot_all, validate_results, write_report
    from cstar_fx.sysinfo import describe

    torch.manual_seed(args.seed)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _NOT_CONFIG}
    if _rank0():
        (out / "config.json").write_text(json.dumps({"format": "cstar-fx/config/1", "version": cstar_fx.__version__,
                                                     "options": options}, indent=2))
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        if _rank0():
            print(f"[cstar-fx] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    with stage("data"):
        with rank0_first():  # rank 0 extracts and caches a dataset once; the others then read the cache
            train, test = _load_data(args)
        eps = args.eps if args.eps is not None else (0.1 if args.dataset == "digits" else 8 / 255)
        cfg = _configs(args, eps)
        example = torch.rand(1, *train.input_shape)

    with stage("teacher"):
        model = _build_model(args, train).to(device)
        if args.checkpoint is None and args.teacher_epochs > 0:
            from cstar_fx.robust import finetune

            finetune(model, train, cfg["teacher"], run_dir=out / "teacher", device=device)
        if _rank0():
            torch.save(model.state_dict(), out / "teacher.pt")

    with stage("evaluate dense"):
        dense_eval = _evaluate(model, test, cfg, args, device)
        dense = {"params": sum(p.numel() for p in model.parameters()), "flops": cstar_fx.count_flops(model.cpu(), example),
                 "clean": dense_eval.clean, "pgd": dense_eval.pgd, "autoattack": dense_eval.robust.get("autoattack")}
        model.to(device)

    runs, models = [], {"dense": model}
    plan_options = {"budget": args.budget, "round_to": args.round_to, "skip": tuple(args.skip)}
    for ratio in args.ratios:
        for method in args.methods:
            label = f"{method}_{ratio:g}x"
            with stage(f"compress {label}"):
                gm, plan = _compress(method, model, train, ratio, cfg, plan_options, example, out / label, device, args)
                result = _evaluate(gm, test, cfg, args, device)
                gm_cpu = gm.cpu()
                params = sum(p.numel() for p in gm_cpu.parameters())
                flops = cstar_fx.count_flops(gm_cpu, example)
                plan_file = None
                if plan is not None and _rank0():
                    plan_file = f"plans/{label}.json"
                    (out / "plans").mkdir(exist_ok=True)
                    (out / plan_file).write_text(plan.to_json())
                runs.append({"method": method, "ratio": ratio, "params": params, "ratio_params": dense["params"] / params,
                             "ratio_flops": dense["flops"] / flops if flops else None, "clean": result.clean,
                             "pgd": result.pgd, "autoattack": result.robust.get("autoattack"),
                             "sanity_ok": result.sanity.ok if result.sanity is not None else None,
                             "plan": plan_file, "onnx": None, "ranks": _ranks(plan) if plan is not None else {}})
                models[label] = gm_cpu
                gm.to(device)

    if not _rank0():
        return 0  # export, benchmark and report are rank 0's; the other ranks are done
    bench_rows: list[dict[str, Any]] = []
    if not args.no_export:
        with stage("export onnx"):
            from cstar_fx.export import benchmark, to_onnx

            (out / "onnx").mkdir(exist_ok=True)
            paths = {}
            for label, m in models.items():
                paths[label] = to_onnx(m.cpu(), example, out / "onnx" / f"{label}.onnx")
            for r in runs:
                r["onnx"] = f"onnx/{r['method']}_{r['ratio']:g}x.onnx"
        with stage("benchmark"):
            res = benchmark(paths, providers=tuple(args.providers), batch_sizes=tuple(args.bench_batch),
                            baseline="dense", intra_op_threads=args.threads)
            bench_rows = [{"model": b.model, "provider": b.ran_on, "batch": b.batch, "median_ms": b.median_ms,
                           "p90_ms": b.p90_ms, "speedup": b.speedup} for b in res.rows]
            (out / "bench.md").write_text(res.to_markdown() + "\n")
            for label, why in res.unavailable.items():
                print(f"[cstar-fx] {label} not measured: {why}")

    with stage("report"):
        results = {"format": RESULTS_FORMAT, "config": {**options, "eval_attack": f"PGD-{args.eval_steps} linf eps={eps:.4g}"},
                   "created": dt.datetime.now().isoformat(timespec="seconds"), "machine": describe(),
                   "dense": dense, "runs": runs, "bench": bench_rows, "timings": timings}
        validate_results(results)
        plots = plot_all(results, out / "plots")
        report = write_report(results, out, plots)
    (out / "results.json").write_text(json.dumps(results, indent=2))  # after the stage, so its time is in it
    print(_summary(results))
    print(f"\nreport: {report}")
    (out / COMPLETE).write_text(dt.datetime.now().isoformat(timespec="seconds") + "\n")
    return 0


def _compress(method: str, model: Any, train: Any, ratio: float, cfg: dict[str, Any], plan_options: dict[str, Any],
              example: Any, run_dir: Path, device: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    import cstar_fx
    from cstar_fx.robust import cstar, decompose_finetune, finetune

    ex = example.to(device)
    try:
        if method == "cstar":
            gm = cstar(model, train, ratio, cfg["joint"], example_inputs=ex, run_dir=run_dir, device=device, **plan_options)
            return gm, cstar_fx.get_plan(gm)
        if method == "decompose":
            gm = decompose_finetune(model, train, ratio, cfg["tune"], example_inputs=ex, run_dir=run_dir, device=device,
                                    **plan_options)
            return gm, cstar_fx.get_plan(gm)
        from cstar_fx.passes.prune import prune_to_ratio

        pruned = prune_to_ratio(model, ratio, ex, round_to=args.round_to, budget=args.budget)
        finetune(pruned, train, cfg["tune"], run_dir=run_dir / "finetune", device=device)
        return pruned, None
    except cstar_fx.UnreachableBudgetError as exc:
        raise UsageError(f"{method} at {ratio:g}x: {str(exc).splitlines()[0]}") from None


def _summary(results: dict[str, Any]) -> str:
    d = results["dense"]
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"{'model':<18} {'params':>10} {'ratio':>7} {'clean%':>7} {'PGD%':>7}",
             f"{'dense':<18} {d['params']:>10,} {'1.00x':>7} {pct(d['clean']):>7} {pct(d['pgd']):>7}"]
    for r in results["runs"]:
        lines.append(f"{r['method'] + ' ' + format(r['ratio'], 'g') + 'x':<18} {r['params']:>10,} "
                     f"{r['ratio_params']:>6.2f}x {pct(r['clean']):>7} {pct(r['pgd']):>7}")
    return "\n".join(lines)
