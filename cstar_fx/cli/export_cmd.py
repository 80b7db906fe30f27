"""``cstar-fx export``: build a torchvision model (optionally compressed), export it to ONNX and verify it;
``--int8 --calib-data FILE`` then quantizes the verified float model (onnxruntime static QDQ)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import UsageError
from .options import check_output, integer, number, unwritable

__all__ = ["register", "run", "add_model_args", "build_models", "BuiltModels"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``export`` and ``bench``: which model, how to compress it, which weights.

    Example:
        >>> p = argparse.ArgumentParser(); add_model_args(p)
        >>> p.parse_args(["--ratio", "8"]).ratio
        8.0
    """
    p.add_argument("--model", default="resnet18", help="torchvision model name (cstar_fx.models.TORCHVISION_NAMES)")
    p.add_argument("--num-classes", type=integer(at_least=1), default=10, help="classifier outputs")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar", help="input stem / resolution")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=number(above=1), default=None, help="compress with cstar_fx.transform at this ratio")
    group.add_argument("--plan", type=Path, default=None,
                       help="compress with this rank plan (JSON from `cstar-fx plan`)")
    p.add_argument("--budget", choices=("params", "flops"), default="params", help="what --ratio counts")
    p.add_argument("--round-to", type=integer(at_least=1), default=8, help="ranks are multiples of this (with --ratio)")
    p.add_argument("--dense-weights", type=Path, default=None,
                   help="state dict loaded into the dense model before compressing (torch.load, weights_only)")
    p.add_argument("--weights", type=Path, default=None,
                   help="state dict loaded into the final (compressed, with --ratio/--plan) model")
    p.add_argument("--seed", type=integer(at_least=0), default=0, help="random seed for untrained weights and inputs")


@dataclass
class BuiltModels:
    """The dense model, the model to export (the compressed one with --ratio/--plan), and an example input.

    Example:
        >>> BuiltModels(None, None, None, None).compressed is None
        True
    """

    dense: Any
    compressed: Any
    example: Any
    report: Any

    @property
    def final(self) -> Any:
        """The compressed model if there is one, else the dense model."""
        return self.compressed if self.compressed is not None else self.dense


def _load_state(model: Any, path: Path, what: str) -> None:
    from ..io import CheckpointError, load_weights

    try:
        load_weights(model, path)
    except OSError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except CheckpointError as exc:
        hint = "; for a compressed model pass the same --ratio/--plan it was trained with" \
            if "does not fit the model" in str(exc) else ""
        raise UsageError(f"{what}: {exc}{hint}") from None


def build_models(args: argparse.Namespace, *, batch: int = 1) -> BuiltModels:
    """Build the model the options describe (dense, then transformed when --ratio or --plan is given).

    Example:
        >>> ns = argparse.Namespace(model="resnet18", num_classes=10, stem="cifar", ratio=None, plan=None,
        ...                         budget="params", round_to=8, dense_weights=None, weights=None, seed=0)
        >>> build_models(ns).compressed is None  # doctest: +SKIP
        True
    """
    import torch

    import cstar_fx
    from cstar_fx.models import build_model

    if args.ratio is not None and args.ratio <= 1:
        raise UsageError(f"--ratio must be > 1, got {args.ratio:g}")
    if args.round_to < 1:
        raise UsageError(f"--round-to must be >= 1, got {args.round_to}")
    torch.manual_seed(args.seed)
    try:
        dense = build_model(args.model, num_classes=args.num_classes, stem=args.stem).eval()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.dense_weights is not None:
        _load_state(dense, args.dense_weights, "--dense-weights")
    size = 32 if args.stem == "cifar" else 224
    example = torch.rand(batch, 3, size, size)
    compressed = report = None
    if args.plan is not None:
        if not args.plan.is_file():
            raise UsageError(f"--plan: no file at {args.plan}; write one with `cstar-fx plan --json PLAN`")
        try:
            text = args.plan.read_text()
        except UnicodeDecodeError:
            raise UsageError(f"--plan {args.plan} is not a text file; pass the JSON that `cstar-fx plan --json PLAN` "
                             "writes") from None
        try:
            plan = cstar_fx.RankPlan.from_json(text)
            compressed = cstar_fx.transform(dense, plan=plan, example_inputs=example[:1])
        except (ValueError, cstar_fx.PlanMismatchError) as exc:
            raise UsageError(f"--plan {args.plan}: " + str(exc).replace("\n", " ")) from None
    elif args.ratio is not None:
        try:
            compressed = cstar_fx.transform(dense, args.ratio, budget=args.budget, round_to=args.round_to,
                                            example_inputs=example[:1])
        except cstar_fx.UnreachableBudgetError as exc:
            raise UsageError(str(exc).replace("\n", " ")) from None
    if compressed is not None:
        compressed.eval()
        report = cstar_fx.get_report(compressed)
    if args.weights is not None:
        _load_state(compressed if compressed is not None else dense, args.weights, "--weights")
    return BuiltModels(dense, compressed, example, report)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("export", help="export a (compressed) model to ONNX and check it against PyTorch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", type=Path, default=Path("model.onnx"), help="ONNX file to write")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="float16 stores weights/compute in half precision, inputs/outputs stay float32")
    p.add_argument("--opset", type=integer(at_least=9), default=None,
                   help="ONNX opset (default: the exporter's; the dynamo exporter writes 18 or newer)")
    p.add_argument("--batch", type=integer(at_least=1), default=2, help="batch size of the example input used for export and check")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis instead of making it dynamic")
    p.add_argument("--atol", type=number(at_least=0), default=None,
                   help="absolute tolerance (default: 1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--rtol", type=number(at_least=0), default=None,
                   help="tolerance relative to max |output| (default: 1e-4 fp32, 1e-2 fp16)")
    q = p.add_argument_group("int8 (onnxruntime static QDQ quantization of the exported float model)")
    q.add_argument("--int8", action="store_true",
                   help="write an int8 model to --out; the verified float model goes beside it as <out>.fp32.onnx")
    q.add_argument("--calib-data", type=Path, default=None,
                   help="calibration images: .npy or .pt tensor N x 3 x H x W (float in [0, 1] or uint8), "
                        "training images of the model's input size")
    q.add_argument("--calib-samples", type=integer(at_least=1), default=256,
                   help="number of calibration images used (the first ones of --calib-data)")
    q.add_argument("--min-agreement", type=number(at_least=0, at_most=1), default=None,
                   help="exit 1 when int8 and float predict the same class on less than this fraction of "
                        "the calibration images")
    p.set_defaults(func=run)


def _load_images(path: Path) -> Any:
    """Calibration images from a .npy or .pt file (a tensor, or a dict holding one under "x"/"images")."""
    import numpy as np
    import torch

    from ..io import CheckpointError, load_tensors

    if not path.is_file():
        raise UsageError(f"--calib-data: no file at {path}")
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise UsageError(f"--calib-data {path}: expected a .npy or .pt file of images N x 3 x H x W")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = load_tensors(path)
            if isinstance(data, dict):
                data = next((data[k] for k in ("x", "images") if k in data), data)
    except CheckpointError as exc:
        raise UsageError(f"--calib-data: {exc}") from None
    except Exception as exc:  # any unreadable .npy file: numpy raises many types
        raise UsageError(f"--calib-data {path}: cannot read it as a .npy array ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())})") from None
    if not isinstance(data, (np.ndarray, torch.Tensor)) or data.ndim != 4:
        raise UsageError(f"--calib-data {path}: expected one tensor of images N x 3 x H x W, "
                         f"got {getattr(data, 'shape', type(data).__name__)}")
    return data


def _check_int8_args(args: argparse.Namespace) -> None:
    if not args.int8:
        if args.calib_data is not None or args.min_agreement is not None:
            raise UsageError("--calib-data and --min-agreement go with --int8; add --int8 or drop them")
        return
    if args.dtype != "float32":
        raise UsageError("--int8 quantizes the float32 export; drop --dtype float16")
    if args.calib_data is None:
        raise UsageError("--int8 needs --calib-data FILE (a .npy or .pt tensor of a few hundred training images)")


@contextlib.contextmanager
def _exporter_logs_quiet() -> Iterator[None]:
    """Keep torch.onnx's and onnxscript's log lines (tracebacks of internal retries) off the terminal: the
    command prints what the export did, or one line saying why it could not."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Build, export, verify; print the exporter used and the verification errors."""
    from cstar_fx.export import OnnxExportError, OnnxMismatchError, check_opset, export_onnx

    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.out.suffix != ".onnx":
        raise UsageError(f"--out must end in .onnx, got {args.out}")
    _check_int8_args(args)
    float_out = args.out.with_name(args.out.stem + ".fp32.onnx") if args.int8 else args.out
    inputs = {"the --plan file": args.plan, "the --dense-weights file": args.dense_weights,
              "the --weights file": args.weights, "the --calib-data file": args.calib_data}
    for path in dict.fromkeys([args.out, float_out]):
        check_output(path, "--out", inputs=inputs, example="model.onnx")
    try:
        check_opset(args.opset)
    except ValueError as exc:
        raise UsageError(f"--opset: {exc} (None: drop --opset)") from None
    images = _load_images(args.calib_data) if args.int8 else None
    built = build_models(args, batch=args.batch)
    try:
        with _exporter_logs_quiet():
            result = export_onnx(built.final, built.example, float_out, opset=args.opset,
                                 dynamic_batch=not args.static_batch, dtype=args.dtype, atol=args.atol,
                                 rtol=args.rtol)
    except (ImportError, ValueError, TypeError) as exc:  # a missing extra, a bad dtype or tolerance
        raise UsageError(" ".join(str(exc).split())) from None
    except OSError as exc:  # the output could not be written after all (a full disk, a folder gone)
        raise unwritable(float_out, "--out", exc) from None
    except OnnxMismatchError as exc:
        print(f"verification FAILED: {exc}")
        return 1
    except OnnxExportError as exc:
        print(f"export FAILED: {exc}")
        return 1
    size = sum(f.stat().st_size for f in (float_out, float_out.with_name(float_out.name + ".data")) if f.exists())
    if built.report is not None:
        print(f"compressed {args.model}: {built.report.ratio_params:.2f}x fewer params"
              + (f", {built.report.ratio_flops:.2f}x fewer FLOPs" if built.report.ratio_flops else ""))
    note = f" (dynamo exporter failed: {result.fallback_reason})" if result.fallback_reason else ""
    print(f"wrote {result.path} ({size / 2**20:.1f} MiB, {result.dtype}, opset {result.opset}, "
          f"{result.exporter} exporter{note})")
    print(result.verification)
    if args.int8:
        return _int8(args, float_out, images)
    return 0


def _int8(args: argparse.Namespace, float_out: Path, images: Any) -> int:
    from cstar_fx.export import Int8AgreementError, OnnxExportError, quantize_int8

    try:
        q = quantize_int8(float_out, images, args.out, num_calibration=args.calib_samples,
                          min_agreement=args.min_agreement)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--calib-data {args.calib_data}: {exc}") from None
    except OSError as exc:
        raise unwritable(args.out, "--out", exc) from None
    except Int8AgreementError as exc:
        print(f"int8 check FAILED: {exc}")
        return 1
    except OnnxExportError as exc:
        print(f"int8 quantization FAILED: {exc}")
        return 1
    print(f"wrote {q.path} (int8)")
    print(q)
    return 0
