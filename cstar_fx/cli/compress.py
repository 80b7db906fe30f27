"""``cstar-fx compress``: the whole pipeline in one command, written to one run folder.

model -> robust teacher (trained or loaded) -> for each ratio and method: compress + adversarial
fine-tune -> robust evaluation -> ONNX export -> onnxruntime benchmark -> report.md, results.json,
plots. Every option has a default; ``--config run/config.json`` repeats a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import UsageError
from .options import MAX_SEED, check_providers, config_values, explicit_dests, fraction, integer, number
from .runfolder import RunFolder
from ..allocate import UnreachableBudgetError
from ..io import CheckpointError, load_weights
from ..robust.config import RECOMMENDED
from ..pipeline import (DATASETS, METHODS, MODELS, NEEDS_ROOT, Directory, Pipeline, PipelineConfig, PipelineResult,
                        default_eps, load_data, model_for, run_label)

__all__ = ["register", "run", "parse_eps"]

COMPLETE = "COMPLETE"
_NOT_CONFIG = {"func", "command", "config", "overwrite", "out", "argv", "parser"}
"""Namespace entries that are not options of a run (never read from, nor written to, config.json)."""
_RESUME_IGNORES = ("device", "min_agreement")
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
    d = PipelineConfig()
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
                   help="cifar10: torchvision root; cifar10-jpeg: the .tar.xz archive (default $CSTAR_FX_CIFAR10_JPEG or "
                        "../shared/data/cifar10-jpeg.tar.xz); folder: root with train/ test/")
    g.add_argument("--limit", type=integer(at_least=8), default=None,
                   help="use only the first N training and N//4 test images")
    g = p.add_argument_group("compression")
    g.add_argument("--ratios", type=number(above=1), nargs="+", default=list(d.ratios), help="compression ratios")
    g.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS,
                   help="cstar: ADMM joint training + fine-tune; decompose: transform + fine-tune; prune: Torch-Pruning")
    g.add_argument("--budget", default=d.budget, choices=("params", "flops", "both"),
                   help="what the ratio counts (both: parameters and FLOPs, each at least the ratio)")
    g.add_argument("--round-to", type=positive, default=d.round_to,
                   help="ranks/channels are multiples of this (pruning goes finer where it cannot reach a ratio)")
    g.add_argument("--skip", nargs="*", default=[], help="layer names or globs kept dense")
    g.add_argument("--calibrate", type=count, default=d.calibrate,
                   help="data-aware factorization on this many training images and their adversarial examples "
                        "(cstar and decompose; 0: factors from the weights alone)")
    g.add_argument("--prune-share", type=fraction(), default=d.prune_share,
                   help="share of the compression given to Torch-Pruning channel pruning before the factorization "
                        "(decompose only; any --budget but latency; 0: low rank alone, 0.5: sqrt(ratio) each)")
    g.add_argument("--prune-epochs", type=count, default=None,
                   help="fine-tune epochs spent on the pruned network before it is factorized, out of "
                        "--finetune-epochs (decompose with --prune-share > 0 only; default: the recommended "
                        f"recipe's {RECOMMENDED.prune_epochs} where the prune share and the epochs allow, else 0)")
    g.add_argument("--distill", type=fraction(), default=d.distill,
                   help="weight of robust distillation from the teacher in every method's fine-tune, pruning "
                        "included (0: plain adversarial fine-tune)")
    g = p.add_argument_group("training")
    g.add_argument("--teacher-epochs", type=count, default=d.teacher_epochs, help="robust teacher epochs (not with --checkpoint, which is the teacher)")
    g.add_argument("--joint-epochs", type=count, default=d.joint_epochs, help="CSTAR ADMM joint-training epochs")
    g.add_argument("--finetune-epochs", type=count, default=d.finetune_epochs, help="adversarial fine-tune epochs (same for all methods)")
    g.add_argument("--loss", default=d.loss, choices=("pgd", "trades", "fast", "clean"), help="training loss")
    g.add_argument("--lr", type=number(above=0), default=d.lr, help="teacher learning rate (compression phases use lr/5)")
    g.add_argument("--batch-size", type=positive, default=d.batch_size, help="training batch size")
    g.add_argument("--rho", type=number(above=0), default=None,
                   help="ADMM proximity weight (default: auto, from the joint learning rate; see AdmmConfig)")
    g = p.add_argument_group("attack")
    g.add_argument("--eps", type=fraction(), default=None, help="L_inf radius (default: 8/255, digits 0.1)")
    g.add_argument("--alpha", type=number(above=0, below=1, fractions=True), default=None,
                   help="PGD step (default: eps/4)")
    g.add_argument("--train-steps", type=count, default=d.train_steps, help="PGD steps during training")
    g.add_argument("--eval-steps", type=count, default=d.eval_steps, help="PGD steps for evaluation")
    g.add_argument("--eval-n", type=positive, default=d.eval_n, help="test images for clean/PGD accuracy")
    g.add_argument("--autoattack-n", type=count, default=d.autoattack_n, help="test images for AutoAttack (0: skip; needs [robust])")
    g = p.add_argument_group("deployment")
    g.add_argument("--no-export", action="store_true", help="skip ONNX export and benchmark")
    g.add_argument("--bench-batch", type=positive, nargs="+", default=list(d.bench_batch), help="onnxruntime batch sizes")
    g.add_argument("--providers", nargs="+", default=list(d.providers),
                   help="onnxruntime providers (an unusable one is reported, not faked)")
    g.add_argument("--threads", type=positive, default=None, help="onnxruntime intra-op threads")
    g.add_argument("--int8", action="store_true",
                   help="also write an int8 ONNX file per model (onnxruntime static QDQ) and report its clean "
                        "accuracy, transferred-PGD accuracy and agreement with the float model")
    g.add_argument("--calib-samples", type=positive, default=d.calib_samples,
                   help="training images that calibrate the int8 activation ranges (with --int8)")
    g.add_argument("--min-agreement", type=number(at_least=0, at_most=1), default=None,
                   help="exit 1 (after writing everything) when an int8 model predicts its float model's class on "
                        "less than this fraction of the test images (with --int8)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<date-time>); a run folder with the same options is resumed")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (a cstar-fx run folder) with a new one once the new one has finished")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--seed", type=integer(at_least=0, at_most=MAX_SEED), default=d.seed, help="random seed")
    g.add_argument("--config", type=Path, default=None,
                   help="repeat a run from its config.json (flags override; --model-class is never taken from it)")
    p.set_defaults(func=run, parser=p)


def _apply_config(args: argparse.Namespace) -> None:
    """Fill in the options the command line left out from ``--config``, parsed by the same parser."""
    explicit = _explicit(args)
    values = config_values(args.parser, args.config, skip=explicit, not_options=_NOT_CONFIG)
    if values.get("model_class") is not None:
        raise UsageError(f"--config {args.config} names model_class {values['model_class']!r}; a config file never "
                         f"imports code, so pass --model-class {values['model_class']} on the command line to use it")
    for key, value in values.items():
        setattr(args, key, value)


def _explicit(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (not defaults, not from --config)."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    return explicit_dests(args.parser, argv[argv.index(args.command) + 1:] if args.command in argv else [])


def _check(args: argparse.Namespace) -> None:
    """The input errors that involve several options (each option's own range is checked by its type)."""
    explicit = _explicit(args)
    if args.dataset in NEEDS_ROOT and args.data is None:
        raise UsageError(f"--dataset {args.dataset} needs --data PATH (the dataset root)")
    if args.dataset == "digits" and args.data is not None:
        raise UsageError(f"--data {args.data} is not read by --dataset digits (built in); drop --data, or pass "
                         f"--dataset cifar10, cifar10-jpeg or folder")
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
    if "prune_share" in explicit and args.prune_share and "decompose" not in args.methods:
        raise UsageError(f"--prune-share {args.prune_share:g} splits the ratio of the decompose method; add "
                         f"decompose to --methods or drop --prune-share")
    if args.prune_epochs and "decompose" in args.methods:
        if not args.prune_share:
            raise UsageError(f"--prune-epochs {args.prune_epochs} trains the pruned network, so it needs "
                             f"--prune-share > 0; pass --prune-epochs 0 or a prune share")
        if args.prune_epochs >= args.finetune_epochs:
            raise UsageError(f"--prune-epochs {args.prune_epochs} must be fewer than --finetune-epochs "
                             f"{args.finetune_epochs}: the factorized network needs the rest; lower --prune-epochs")
    elif "prune_epochs" in explicit and args.prune_epochs:
        raise UsageError(f"--prune-epochs {args.prune_epochs} trains the pruned network of the decompose method; "
                         f"add decompose to --methods or drop --prune-epochs")
    if "stem" in explicit and (args.model == "small_cnn" or args.model_class is not None):
        raise UsageError(f"--stem {args.stem} sets a torchvision model's first layers; --model "
                         f"{args.model_class or args.model} has none to set, so drop --stem or pick a torchvision "
                         "--model")
    if args.checkpoint is not None and "teacher_epochs" in explicit:
        raise UsageError(f"--teacher-epochs {args.teacher_epochs} trains a teacher, but --checkpoint "
                         f"{args.checkpoint} is the teacher; drop one of them")
    if args.int8 and args.no_export:
        raise UsageError("--int8 quantizes the exported ONNX models; drop --no-export")
    unused = [f"--{d.replace('_', '-')}" for d in ("bench_batch", "providers", "threads") if d in explicit]
    if args.no_export and unused:
        one = len(unused) == 1
        raise UsageError(f"{' and '.join(unused)} {'sets' if one else 'set'} the onnxruntime benchmark, which "
                         f"--no-export skips; drop {'it' if one else 'them'} or --no-export")
    if "calib_samples" in explicit and not args.int8:
        raise UsageError(f"--calib-samples {args.calib_samples} calibrates the int8 models; add --int8 or drop it")
    if args.min_agreement is not None and not args.int8:
        raise UsageError(f"--min-agreement {args.min_agreement:g} checks the int8 models; add --int8 or drop it")
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
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; pass one "
                         "of them, or --device cuda")
    return dev


def _load_data(args: argparse.Namespace) -> tuple[Any, Any]:
    try:
        return load_data(args.dataset, args.data, limit=args.limit, seed=args.seed)
    except (OSError, RuntimeError, ValueError) as exc:  # OSError: also PIL's UnidentifiedImageError (a bad image)
        raise UsageError(f"could not load --dataset {args.dataset}: {' '.join(str(exc).split())}") from None


def _build_model(args: argparse.Namespace, train: Any) -> Any:
    import torch

    if args.model_class:
        module_name, _, cls_name = args.model_class.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            model = cls()
        except Exception as exc:  # the user's own code: whatever it raises is a problem with the option
            raise UsageError(f"--model-class {args.model_class}: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model-class {args.model_class} built a {type(model).__name__}, not a torch.nn.Module")
    else:
        try:
            model = model_for(args.model, train, stem=args.stem)
        except ValueError as exc:
            raise UsageError(f"--model {args.model}: {exc}") from None
    if args.checkpoint is not None:
        try:
            load_weights(model, args.checkpoint)
        except (OSError, CheckpointError) as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
    return model


def _config(args: argparse.Namespace) -> PipelineConfig:
    """The options as a :class:`PipelineConfig` (each field is the option of the same name)."""
    values = {f.name: getattr(args, f.name) for f in fields(PipelineConfig) if hasattr(args, f.name)}
    values.update(export=not args.no_export, eps=args.eps if args.eps is not None else default_eps(args.dataset),
                  teacher_epochs=0 if args.checkpoint is not None else args.teacher_epochs)
    try:
        return PipelineConfig(**values)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as config.json holds them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _NOT_CONFIG}


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


def _resolve(args: argparse.Namespace) -> Pipeline:
    """Every check that needs no run folder: options, config, device, data, model, reachability."""
    from cstar_fx.robust.distributed import local_device, rank0_first

    if args.config is not None:
        _apply_config(args)
    _check(args)
    if not args.no_export:
        check_providers(args.providers)
    _check_world(args)
    config = _config(args)
    device = local_device(_device(args.device))

    import torch

    with rank0_first():  # rank 0 extracts and caches a dataset once; the others then read the cache
        train, test = _load_data(args)
    torch.manual_seed(args.seed)
    model = _build_model(args, train)
    try:
        pipeline = Pipeline(model, train, test, config, device=device, options=_options(args))
    except ImportError as exc:
        raise UsageError(f"--methods prune: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if _rank0():
        for note in pipeline.notes:
            print(f"[cstar-fx] {note}", flush=True)
    return pipeline


def _run(args: argparse.Namespace) -> int:
    from cstar_fx.robust.distributed import barrier, broadcast_object

    pipeline = _resolve(args)
    out = broadcast_object(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    labels = [run_label(m, r) for r in args.ratios for m in args.methods]
    folder = None
    state: dict[str, Any] = {}
    if _rank0():  # nothing was written or deleted before this point
        folder = RunFolder.claim(out, _options(args), overwrite=args.overwrite, ignore=_RESUME_IGNORES,
                                 entries=["config.json", "results.json", "report.md", "teacher.pt", COMPLETE, "bench.md",
                                          "plots", "onnx", "plans", "teacher", *labels])
        state = _saved_state(folder)
        if folder.resumed:
            done = [r.label for r in state["results"].runs] if "results" in state else []
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
            return _agreement_check(state["results"], args.min_agreement)
        return 0
    return _stages(pipeline, folder, path, state, args.min_agreement)


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
            state["results"] = PipelineResult.from_dict(results)
    except (OSError, ValueError, TypeError):
        pass  # written atomically, so only a hand-edited file lands here: redo what it held
    if "results" in state:
        state["complete"] = COMPLETE in folder.files and (folder.path / COMPLETE).is_file()
    return state


def _stages(pipeline: Pipeline, folder: RunFolder | None, out: Path, state: dict[str, Any],
            min_agreement: float | None) -> int:
    """Run the pipeline into the run folder (rank 0; the other ranks train and evaluate with it), then report."""
    import time

    from cstar_fx.runreport import plot_all, validate_results, write_report

    if folder is not None:
        folder.remove(COMPLETE)

    def stage(name: str) -> None:
        if _rank0():
            print(f"[cstar-fx] {name} ...", flush=True)

    def save(result: PipelineResult, plots: list[Path] = ()) -> None:  # results.json and report.md as they stand
        if folder is None:
            return
        results = result.to_dict()
        validate_results(results)
        folder.write_text("results.json", json.dumps(results, indent=2))
        write_report(results, out, list(plots))
        folder.record("report.md")

    try:
        result = pipeline.run(folder if folder is not None else Directory(out), resume=state.get("results"),
                              teacher=out / "teacher.pt" if state.get("teacher") else None, on_stage=stage,
                              on_result=save)
    except UnreachableBudgetError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if folder is None:
        return 0  # export, benchmark and report are rank 0's; the other ranks are done
    if result.benchmark is not None:
        folder.write_text("bench.md", result.benchmark.to_markdown() + "\n")
        for label, why in result.benchmark.unavailable.items():
            print(f"[cstar-fx] {label} not measured: {why}")
    stage("report")
    start = time.perf_counter()
    plots = plot_all(result.to_dict(), out / "plots")
    folder.record("plots")
    result.timings["report"] = time.perf_counter() - start
    save(result, plots)  # after the stage, so its time is in it
    folder.write_text(COMPLETE, dt.datetime.now().isoformat(timespec="seconds") + "\n")
    root = folder.finish()
    print(_summary(result))
    print(f"\nreport: {root / 'report.md'}")
    return _agreement_check(result, min_agreement)


def _agreement_check(result: PipelineResult, min_agreement: float | None) -> int:
    """1 (after saying which) when an int8 model agrees with its float model on less than ``min_agreement``."""
    if min_agreement is None:
        return 0
    low = [f"{name} {q.agreement:.1%}" for name, q in _int8_results(result) if q.agreement < min_agreement]
    if low:
        print(f"int8 check FAILED: same class as float on less than {min_agreement:.1%} of the test images: "
              + ", ".join(low))
        return 1
    return 0


def _summary(result: PipelineResult) -> str:
    d = result.dense
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"{'model':<18} {'params':>10} {'ratio':>7} {'clean%':>7} {'PGD%':>7}",
             f"{'dense':<18} {d.params:>10,} {'1.00x':>7} {pct(d.clean):>7} {pct(d.pgd):>7}"]
    for r in result.runs:
        lines.append(f"{r.method + ' ' + format(r.ratio, 'g') + 'x':<18} {r.params:>10,} "
                     f"{r.ratio_params:>6.2f}x {pct(r.clean):>7} {pct(r.pgd):>7}")
    for name, q in _int8_results(result):
        lines.append(f"{name + ' int8':<18} clean {pct(q.clean).strip()}%, {q.pgd_label} {pct(q.pgd).strip()}%, "
                     f"same class as float on {q.agreement:.1%} of {q.n} images, {q.size_ratio:.2f}x smaller")
    return "\n".join(lines)


def _int8_results(result: PipelineResult) -> list[tuple[str, Any]]:
    """``(model name, Int8Result)`` of every model of the run that has an int8 file, the dense one first."""
    named = [("dense", result.dense.int8)] + [(f"{r.method} {r.ratio:g}x", r.int8) for r in result.runs]
    return [(name, q) for name, q in named if q is not None]
