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
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import UsageError
from .options import config_values, explicit_dests, fraction, integer, number
from .runfolder import RunFolder
from ..robust.config import RECOMMENDED

__all__ = ["register", "run", "parse_eps"]

METHODS = ("cstar", "decompose", "prune")
DATASETS = ("digits", "cifar10", "cifar10-jpeg", "folder")
MODELS = ("small_cnn", "resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2")
COMPLETE = "COMPLETE"
_NOT_CONFIG = {"func", "command", "config", "overwrite", "out", "argv", "parser"}
"""Namespace entries that are not options of a run (never read from, nor written to, config.json)."""
_RESUME_IGNORES = ("device",)
"""Options a run folder may be resumed with a different value of (they do not change the results)."""


def parse_eps(text: str) -> float:
    """An attack radius given as a number or a fraction such as ``8/255``, in [0, 1).

    Example:
        >>> round(parse_eps("8/255"), 5)
        0.03137
    """
    return fraction()(text)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compress`` sub-command.

    Every option's value check is its ``type=`` (see :mod:`cstar_fx.cli.options`), so the command line and
    ``--config`` files are validated by the same code; checks that relate several options are in ``_check``.

    Example:
        >>> from cstar_fx.cli import Parser
        >>> p = Parser(); register(p.add_subparsers())
    """
    p = sub.add_parser("compress", help="run the whole pipeline and write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    count, positive = integer(at_least=0), integer(at_least=1)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small_cnn", choices=MODELS, help="architecture (random init)")
    g.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="torchvision input stem")
    g.add_argument("--model-class", default=None, metavar="MODULE:CLASS",
                   help="your own nn.Module class, built with no arguments (overrides --model); only taken from the "
                        "command line, never from --config, since it imports and runs code")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="state_dict for the model (loaded with weights_only=True), used as the teacher")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS, help="training/evaluation data")
    g.add_argument("--data", type=Path, default=None,
                   help="cifar10: torchvision root; cifar10-jpeg: the .tar.xz archive; folder: root with train/ test/")
    g.add_argument("--limit", type=integer(at_least=8), default=None,
                   help="use only the first N training and N//4 test images")
    g = p.add_argument_group("compression")
    g.add_argument("--ratios", type=number(above=1), nargs="+", default=[8.0], help="compression ratios")
    g.add_argument("--methods", nargs="+", default=["cstar", "decompose"], choices=METHODS,
                   help="cstar: ADMM joint training + fine-tune; decompose: transform + fine-tune; prune: Torch-Pruning")
    g.add_argument("--budget", default="params", choices=("params", "flops"), help="what the ratio counts")
    g.add_argument("--round-to", type=positive, default=8,
                   help="ranks/channels are multiples of this (pruning goes finer where it cannot reach a ratio)")
    g.add_argument("--skip", nargs="*", default=[], help="layer names or globs kept dense")
    g.add_argument("--calibrate", type=count, default=RECOMMENDED.calibrate,
                   help="data-aware factorization on this many training images and their adversarial examples "
                        "(cstar and decompose; 0: factors from the weights alone)")
    g.add_argument("--distill", type=fraction(), default=RECOMMENDED.distill,
                   help="weight of robust distillation from the teacher in every method's fine-tune, pruning "
                        "included (0: plain adversarial fine-tune)")
    g = p.add_argument_group("training")
    g.add_argument("--teacher-epochs", type=count, default=10, help="robust teacher epochs (ignored with --checkpoint)")
    g.add_argument("--joint-epochs", type=count, default=5, help="CSTAR ADMM joint-training epochs")
    g.add_argument("--finetune-epochs", type=count, default=5, help="adversarial fine-tune epochs (same for all methods)")
    g.add_argument("--loss", default="pgd", choices=("pgd", "trades", "fast", "clean"), help="training loss")
    g.add_argument("--lr", type=number(above=0), default=0.05, help="teacher learning rate (compression phases use lr/5)")
    g.add_argument("--batch-size", type=positive, default=128, help="training batch size")
    g.add_argument("--rho", type=number(above=0), default=None,
                   help="ADMM proximity weight (default: auto, from the joint learning rate; see AdmmConfig)")
    g = p.add_argument_group("attack")
    g.add_argument("--eps", type=fraction(), default=None, help="L_inf radius (default: 8/255, digits 0.1)")
    g.add_argument("--alpha", type=number(above=0, below=1, fractions=True), default=None,
                   help="PGD step (default: eps/4)")
    g.add_argument("--train-steps", type=count, default=7, help="PGD steps during training")
    g.add_argument("--eval-steps", type=count, default=20, help="PGD steps for evaluation")
    g.add_argument("--eval-n", type=positive, default=1000, help="test images for clean/PGD accuracy")
    g.add_argument("--autoattack-n", type=count, default=0, help="test images for AutoAttack (0: skip; needs [robust])")
    g = p.add_argument_group("deployment")
    g.add_argument("--no-export", action="store_true", help="skip ONNX export and benchmark")
    g.add_argument("--bench-batch", type=positive, nargs="+", default=[1, 64], help="onnxruntime batch sizes")
    g.add_argument("--providers", nargs="+", default=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   help="onnxruntime providers (an unusable one is reported, not faked)")
    g.add_argument("--threads", type=positive, default=None, help="onnxruntime intra-op threads")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<date-time>); a run folder with the same options is resumed")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (a cstar-fx run folder) with a new one once the new one has finished")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=count, default=0, help="random seed")
    g.add_argument("--config", type=Path, default=None,
                   help="repeat a run from its config.json (flags override; --model-class is never taken from it)")
    p.set_defaults(func=run, parser=p)


def _apply_config(args: argparse.Namespace) -> None:
    """Fill in the options the command line left out from ``--config``, parsed by the same parser."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    tokens = argv[argv.index(args.command) + 1:] if args.command in argv else []
    explicit = explicit_dests(args.parser, tokens)
    values = config_values(args.parser, args.config, skip=explicit, not_options=_NOT_CONFIG)
    if values.get("model_class") is not None:
        raise UsageError(f"--config {args.config} names model_class {values['model_class']!r}; a config file never "
                         f"imports code, so pass --model-class {values['model_class']} on the command line to use it")
    for key, value in values.items():
        setattr(args, key, value)


def _check(args: argparse.Namespace) -> None:
    """The input errors that involve several options (each option's own range is checked by its type)."""
    if args.dataset in ("cifar10", "folder") and args.data is None:
        raise UsageError(f"--dataset {args.dataset} needs --data PATH (the dataset root)")
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data {args.data} does not exist; pass the dataset root (or archive for cifar10-jpeg)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a file")
    if args.dataset == "digits" and args.model not in ("small_cnn",) and args.model_class is None:
        raise UsageError(f"--model {args.model} needs 3-channel images; use --model small_cnn with --dataset digits")
    if args.model_class is not None:
        module, _, cls = args.model_class.partition(":")
        if not (module and cls and all(part.isidentifier() for part in module.split(".") + [cls])):
            raise UsageError(f"--model-class must look like package.module:ClassName, got {args.model_class!r}")
    if len(set(args.ratios)) < len(args.ratios) or len(set(args.methods)) < len(args.methods):
        raise UsageError("--ratios and --methods must not repeat a value")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a folder")
    if args.distill > 0 and args.loss == "trades":
        raise UsageError("--distill works with --loss pgd, fast or clean (TRADES has its own KL term); "
                         "pass --distill 0 with --loss trades")


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
            model = cls()
        except Exception as exc:  # the user's own code: whatever it raises is a problem with the option
            raise UsageError(f"--model-class {args.model_class}: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model-class {args.model_class} built a {type(model).__name__}, not a torch.nn.Module")
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
    tune = teacher.replace(epochs=args.finetune_epochs, lr=args.lr / 5, loss=loss.replace(distill=args.distill))
    joint = JointConfig(joint=teacher.replace(epochs=args.joint_epochs, lr=args.lr / 5, schedule="constant"),
                        finetune=tune, admm=AdmmConfig(rho=args.rho, rho_max=max(10.0, args.rho or 0.0)))
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

    Example:
        >>> from cstar_fx.cli import main
        >>> main(["compress", "--rho", "0"])  # doctest: +SKIP
        2
    """
    from cstar_fx.robust.distributed import process_group

    with process_group():
        return _run(args)


def _reachable(model: Any, example: Any, args: argparse.Namespace) -> dict[float, int]:
    """Refuse a (method, ratio) that cannot be reached, before any training; the pruning granularity per ratio.

    Reachability depends on the layer shapes only, so the untrained model answers for the trained one.
    """
    import cstar_fx
    from cstar_fx.passes.prune import prune_to_ratio_finer

    granularity = {}
    lowrank = [m for m in args.methods if m != "prune"]
    for ratio in args.ratios:
        if lowrank:
            try:
                cstar_fx.plan_ranks(model, ratio, budget=args.budget, round_to=args.round_to, skip=tuple(args.skip),
                                    example_inputs=example)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"{'/'.join(lowrank)} at {ratio:g}x: {exc}") from None
        if "prune" in args.methods:
            try:
                _, granularity[ratio] = prune_to_ratio_finer(model, ratio, example, round_to=args.round_to,
                                                             budget=args.budget)
            except ImportError as exc:
                raise UsageError(f"--methods prune needs Torch-Pruning: pip install 'cstar-fx[pruning]' ({exc})") from None
            except (ValueError, TypeError) as exc:
                raise UsageError(f"prune at {ratio:g}x: {exc}") from None
            if granularity[ratio] != args.round_to and _rank0():
                print(f"[cstar-fx] prune at {ratio:g}x: whole multiples of {args.round_to} channels cannot get within "
                      f"3% of it; pruning in multiples of {granularity[ratio]}", flush=True)
    return granularity


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, Any, Any, dict[float, int]]:
    """Every check that needs no run folder: options, configs, device, data, model, reachability."""
    from cstar_fx.robust.distributed import local_device, rank0_first

    if args.config is not None:
        _apply_config(args)
    _check(args)
    _check_world(args)
    eps = args.eps if args.eps is not None else (0.1 if args.dataset == "digits" else 8 / 255)
    try:
        cfg = _configs(args, eps)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    cfg["eps"] = eps
    device = local_device(_device(args.device))

    import torch

    with rank0_first():  # rank 0 extracts and caches a dataset once; the others then read the cache
        train, test = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args, train)
    example = torch.rand(1, *train.input_shape)
    return cfg, device, (train, test), model, example, _reachable(model, example, args)


def _label(method: str, ratio: float) -> str:
    return f"{method}_{ratio:g}x"


def _run(args: argparse.Namespace) -> int:
    from cstar_fx.robust.distributed import barrier, broadcast_object

    cfg, device, (train, test), model, example, granularity = _resolve(args)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _NOT_CONFIG}
    out = broadcast_object(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    labels = [_label(m, r) for r in args.ratios for m in args.methods]
    folder = None
    state: dict[str, Any] = {}
    if _rank0():  # nothing was written or deleted before this point
        folder = RunFolder.claim(out, options, overwrite=args.overwrite, ignore=_RESUME_IGNORES,
                                 entries=["config.json", "results.json", "report.md", "teacher.pt", COMPLETE, "bench.md",
                                          "plots", "onnx", "plans", "teacher", *labels])
        state = _saved_state(folder)
        if folder.resumed:
            done = [r["label"] for r in state.get("runs", [])]
            print(f"[cstar-fx] resuming {folder.path}: {len(done)} of {len(labels)} compressed model(s) done"
                  + (f" ({', '.join(done)})" if done else ""), flush=True)
    state = broadcast_object(state)
    path = broadcast_object(folder.path if folder is not None else None)
    barrier()
    if state.get("complete"):
        root = folder.finish() if folder is not None else out
        if _rank0():
            print(_summary(state["results"]))
            print(f"\nnothing to do: every run is done; report: {root / 'report.md'}")
        return 0
    return _stages(args, cfg, device, train, test, model, example, granularity, folder, path, state)


def _saved_state(folder: RunFolder) -> dict[str, Any]:
    """What an earlier, interrupted run in this folder finished (empty for a new folder)."""
    from cstar_fx.runreport import validate_results

    if not folder.resumed:
        return {}
    state: dict[str, Any] = {"teacher": "teacher.pt" in folder.files and (folder.path / "teacher.pt").is_file()}
    try:
        results = json.loads((folder.path / "results.json").read_text()) if "results.json" in folder.files else None
        if results is not None:
            validate_results(results)
    except (OSError, ValueError):
        results = None  # written atomically, so only a hand-edited file lands here: redo what it held
    if results is not None:
        state["results"] = results
        state["runs"] = [{**r, "label": _label(r["method"], r["ratio"])} for r in results["runs"]]
        state["complete"] = COMPLETE in folder.files and (folder.path / COMPLETE).is_file()
    return state


def _stages(args: argparse.Namespace, cfg: dict[str, Any], device: Any, train: Any, test: Any, model: Any, example: Any,
            granularity: dict[float, int], folder: RunFolder | None, out: Path, state: dict[str, Any]) -> int:
    import torch

    import cstar_fx
    from cstar_fx.fileutil import atomic_path
    from cstar_fx.runreport import RESULTS_FORMAT, plot_all, validate_results, write_report
    from cstar_fx.sysinfo import describe

    eps = cfg["eps"]
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _NOT_CONFIG}
    previous = state.get("results") or {}
    timings: dict[str, float] = dict(previous.get("timings", {}))
    if folder is not None:
        folder.remove(COMPLETE)

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        if _rank0():
            print(f"[cstar-fx] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    results = {"format": RESULTS_FORMAT, "config": {**options, "eval_attack": f"PGD-{args.eval_steps} linf eps={eps:.4g}"},
               "created": previous.get("created", dt.datetime.now().isoformat(timespec="seconds")),
               "machine": describe(), "dense": previous.get("dense"), "runs": [], "bench": [], "timings": timings}

    def save(plots: list[Path] = ()) -> None:  # results.json and report.md, as they stand, after every result
        if folder is None:
            return
        validate_results(results)
        folder.write_text("results.json", json.dumps(results, indent=2))
        write_report(results, out, list(plots))
        folder.record("report.md")

    model = model.to(device)
    if state.get("teacher"):  # trained by the interrupted run
        model.load_state_dict(torch.load(out / "teacher.pt", map_location=device, weights_only=True))
    else:
        with stage("teacher"):
            if args.checkpoint is None and args.teacher_epochs > 0:
                from cstar_fx.robust import finetune

                try:
                    finetune(model, train, cfg["teacher"], run_dir=out / "teacher", device=device)
                finally:
                    if folder is not None:
                        folder.record("teacher")
            if folder is not None:
                folder.files.add("teacher.pt")
                folder.record()
                with atomic_path(out / "teacher.pt") as tmp:
                    torch.save(model.state_dict(), tmp)

    if results["dense"] is None:
        with stage("evaluate dense"):
            dense_eval = _evaluate(model, test, cfg, args, device)
            results["dense"] = {"params": sum(p.numel() for p in model.parameters()),
                                "flops": cstar_fx.count_flops(model.cpu(), example), "clean": dense_eval.clean,
                                "pgd": dense_eval.pgd, "autoattack": dense_eval.robust.get("autoattack")}
            model.to(device)
    dense = results["dense"]
    onnx = {"dense": out / "onnx" / "dense.onnx"}
    if not args.no_export and folder is not None and "onnx/dense.onnx" not in folder.files:
        _export(folder, model, example, "dense")
    model.to(device)
    save()

    finished = {r["label"]: r for r in state.get("runs", [])}
    plan_options = {"budget": args.budget, "round_to": args.round_to, "skip": tuple(args.skip)}
    for ratio in args.ratios:
        for method in args.methods:
            label = _label(method, ratio)
            if label in finished:  # done in an earlier, interrupted run of the same options
                results["runs"].append({k: v for k, v in finished[label].items() if k != "label"})
                if finished[label].get("onnx"):
                    onnx[label] = out / finished[label]["onnx"]
                continue
            with stage(f"compress {label}"):
                torch.manual_seed(args.seed)  # each result depends on the options only, resumed or not
                try:
                    gm, plan, used = _compress(method, model, train, ratio, cfg, plan_options, example, out / label,
                                               device, granularity.get(ratio, args.round_to), args.calibrate)
                finally:
                    if folder is not None:
                        folder.record(label)
                result = _evaluate(gm, test, cfg, args, device)
                gm_cpu = gm.cpu()
                params = sum(p.numel() for p in gm_cpu.parameters())
                flops = cstar_fx.count_flops(gm_cpu, example)
                plan_file = f"plans/{label}.json" if plan is not None else None
                if plan is not None and folder is not None:
                    folder.write_text(plan_file, plan.to_json())
                run = {"method": method, "ratio": ratio, "params": params, "ratio_params": dense["params"] / params,
                       "ratio_flops": dense["flops"] / flops if flops else None, "clean": result.clean,
                       "pgd": result.pgd, "autoattack": result.robust.get("autoattack"),
                       "sanity_ok": result.sanity.ok if result.sanity is not None else None,
                       "plan": plan_file, "onnx": None, "ranks": _ranks(plan) if plan is not None else {}}
                if used is not None:
                    run["round_to"] = used
                if not args.no_export and folder is not None:
                    onnx[label] = _export(folder, gm_cpu, example, label)
                    run["onnx"] = f"onnx/{label}.onnx"
                results["runs"].append(run)
                save()  # this result is on disk now, whatever happens to the next one

    if folder is None:
        return 0  # export, benchmark and report are rank 0's; the other ranks are done
    if not args.no_export:
        with stage("benchmark"):
            from cstar_fx.export import benchmark

            res = benchmark(onnx, providers=tuple(args.providers), batch_sizes=tuple(args.bench_batch),
                            baseline="dense", intra_op_threads=args.threads)
            results["bench"] = [{"model": b.model, "provider": b.ran_on, "batch": b.batch, "median_ms": b.median_ms,
                                 "p90_ms": b.p90_ms, "speedup": b.speedup} for b in res.rows]
            folder.write_text("bench.md", res.to_markdown() + "\n")
            for label, why in res.unavailable.items():
                print(f"[cstar-fx] {label} not measured: {why}")

    with stage("report"):
        validate_results(results)
        plots = plot_all(results, out / "plots")
        folder.record("plots")
    save(plots)  # after the stage, so its time is in it
    folder.write_text(COMPLETE, dt.datetime.now().isoformat(timespec="seconds") + "\n")
    root = folder.finish()
    print(_summary(results))
    print(f"\nreport: {root / 'report.md'}")
    return 0


def _export(folder: RunFolder, model: Any, example: Any, label: str) -> Path:
    from cstar_fx.export import to_onnx

    name = f"onnx/{label}.onnx"
    folder.files.add(name)
    folder.record()
    (folder.path / "onnx").mkdir(exist_ok=True)
    return to_onnx(model.cpu(), example, folder.path / name)


def _compress(method: str, model: Any, train: Any, ratio: float, cfg: dict[str, Any], plan_options: dict[str, Any],
              example: Any, run_dir: Path, device: Any, prune_round_to: int,
              calibrate: int = 0) -> tuple[Any, Any, int | None]:
    """The compressed, fine-tuned model, its rank plan (None for pruning) and the pruning granularity used."""
    import cstar_fx
    from cstar_fx.robust import cstar, decompose_finetune, finetune, recalibrate_bn
    from cstar_fx.robust.cstar import model_on

    ex = example.to(device)
    try:
        if method == "cstar":
            gm = cstar(model, train, ratio, cfg["joint"], example_inputs=ex, run_dir=run_dir, device=device,
                       calibrate=calibrate, **plan_options)
            return gm, cstar_fx.get_plan(gm), None
        if method == "decompose":
            gm = decompose_finetune(model, train, ratio, cfg["tune"], example_inputs=ex, run_dir=run_dir, device=device,
                                    calibrate=calibrate, **plan_options)
            return gm, cstar_fx.get_plan(gm), None
        from cstar_fx.passes.prune import prune_to_ratio_finer

        pruned, used = prune_to_ratio_finer(model, ratio, ex, round_to=prune_round_to, budget=plan_options["budget"])
        recalibrate_bn(pruned, train, batch_size=cfg["tune"].batch_size, seed=cfg["tune"].seed, device=device)
        finetune(pruned, train, cfg["tune"], run_dir=run_dir / "finetune", device=device,
                 teacher=model_on(model, device) if cfg["tune"].loss.distill > 0 else None)
        return pruned, None, used
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
