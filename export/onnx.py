"""Export a model (dense or a ``cstar_fx.transform`` GraphModule) to ONNX and check it numerically.

The export runs in three steps: the torch.onnx exporter (the ``torch.export``-based "dynamo" path,
then the TorchScript path as a fallback), ``onnx.checker``, and a comparison of onnxruntime (CPU)
with PyTorch on the example inputs. ``dtype="float16"`` converts the fp32 export with
``onnxconverter_common.float16`` and keeps the graph's inputs and outputs in float32.

Example:
    >>> import torch, torch.nn as nn
    >>> path = to_onnx(nn.Linear(4, 2), torch.randn(3, 4), "/tmp/linear.onnx")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'linear.onnx'
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cstar_fx.errors import (CstarError, CstarFileNotFoundError, CstarIsADirectoryError, CstarNotADirectoryError,
                             CstarTypeError, CstarValueError)
from cstar_fx.extras import require
from cstar_fx.passes.shapes import ExampleInputError
from cstar_fx.torchutil import as_tuple, eval_mode

__all__ = [
    "to_onnx",
    "export_onnx",
    "check_opset",
    "verify_onnx",
    "OnnxExport",
    "Verification",
    "OnnxExportError",
    "OnnxMismatchError",
    "DTYPES",
    "DEFAULT_TOLERANCES",
    "require",
]

DTYPES = ("float32", "float16")
#: (atol, rtol) per dtype: the check passes when max |ort - torch| <= atol + rtol * max |torch|.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2)}
# Weights above this size go to an external data file: a single protobuf is limited to 2 GiB.
_EXTERNAL_DATA_BYTES = 1 << 30


class OnnxExportError(CstarError, RuntimeError):
    """Both torch.onnx exporters failed; ``op`` names the operator that could not be exported (if known).

    Example:
        >>> OnnxExportError("no ONNX function for mylib::op", op="mylib::op").op
        'mylib::op'
    """

    def __init__(self, message: str, *, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


class OnnxMismatchError(CstarError, AssertionError):
    """onnxruntime disagrees with PyTorch beyond the tolerance; ``verification`` holds the numbers.

    Example:
        >>> v = Verification("float32", 0.5, 0.25, 2.0, 1e-4, 1e-4, (1,), False)
        >>> OnnxMismatchError("too far", v).verification.max_abs
        0.5
    """

    def __init__(self, message: str, verification: "Verification") -> None:
        super().__init__(message)
        self.verification = verification


@dataclass(frozen=True)
class Verification:
    """onnxruntime (CPU) vs PyTorch on the example inputs.

    ``max_abs`` is ``max |ort - torch|`` over all outputs and checked batch sizes; ``max_rel`` is that
    divided by ``ref_scale = max |torch|`` (element-wise relative error is meaningless near zero).
    ``passed`` is ``max_abs <= atol + rtol * ref_scale``.

    Example:
        >>> v = Verification("float32", 1e-6, 5e-7, 2.0, 1e-4, 1e-4, (2, 3), True)
        >>> round(v.tolerance, 6)
        0.0003
    """

    dtype: str
    max_abs: float
    max_rel: float
    ref_scale: float
    atol: float
    rtol: float
    batch_sizes: tuple[int, ...]
    passed: bool

    @property
    def tolerance(self) -> float:
        """The bound ``max_abs`` is checked against."""
        return self.atol + self.rtol * self.ref_scale

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        sizes = ",".join(map(str, self.batch_sizes))
        return (f"onnxruntime vs torch ({self.dtype}, batch {sizes}): max abs error {self.max_abs:.3g}, "
                f"relative {self.max_rel:.3g} (tolerance {self.tolerance:.3g}): {verdict}")


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` produced: the file, the exporter that worked, and the numeric check.

    ``fallback_reason`` is set when the dynamo exporter failed and the TorchScript one was used.

    Example:
        >>> e = OnnxExport(Path("m.onnx"), "dynamo", "float32", 20, None, None)
        >>> e.to_dict()["exporter"]
        'dynamo'
    """

    path: Path
    exporter: str
    dtype: str
    opset: int | None
    verification: Verification | None
    fallback_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        if self.verification is not None:
            d["verification"]["tolerance"] = self.verification.tolerance
        return d


def _check_args(model: Any, dtype: str, opset: int | None, atol: float | None, rtol: float | None) -> None:
    if not isinstance(model, nn.Module):
        raise CstarTypeError(f"model must be a torch.nn.Module (a GraphModule from cstar_fx.transform is one), "
                             f"got {type(model).__name__}")
    if dtype not in DTYPES:
        raise CstarValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_opset(opset)
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if tol is not None and (not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0):
            raise CstarValueError(f"{name} must be a finite number >= 0 or None (the dtype's default), got {tol!r}")


def check_opset(opset: int | None) -> None:
    """Refuse an ``opset`` that the installed onnx or onnxruntime cannot take, before anything is exported.

    onnxruntime is asked to load an empty model of that opset (milliseconds), since the export is checked with
    it. Without onnx or onnxruntime installed nothing is checked here (the export says which extra is missing).

    Example:
        >>> check_opset(None)
        >>> check_opset(10_000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cstar_fx.errors.CstarValueError: opset 10000 is newer than the installed onnx ... knows (at most ...); ...
    """
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 9:
        raise CstarValueError(f"opset must be an int >= 9 or None (the exporter's default), got {opset!r}")
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise CstarValueError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows (at most "
                              f"{newest}); pass a lower opset or None")
    ids = [onnx.helper.make_opsetid("", opset)]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "opset_check", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=ids, ir_version=onnx.helper.find_min_ir_version_for(ids))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CstarValueError(f"the installed onnxruntime {ort.__version__} cannot load models of opset {opset}, so "
                              "the export could not be checked; pass a lower opset or None") from None


def _tensor_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    args = as_tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise CstarTypeError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                             "e.g. torch.rand(1, 3, 32, 32)")
    return args


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise CstarTypeError(f"model outputs must be tensors (or tuples/lists/dicts of them), got {type(out).__name__}")


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"(?:operator|namespace)\s+'?([A-Za-z_]\w*::\w+)"),
    re.compile(r"\b((?:aten|prims|torchvision|[a-z_]\w*)::\w+)"),
)


def _failing_op(*errors: BaseException | None) -> str | None:
    """The operator named in an exporter error (its cause chain included), as ``namespace::name``."""
    for pattern in _OP_PATTERNS:
        for err in errors:
            seen: set[int] = set()
            while err is not None and id(err) not in seen:
                seen.add(id(err))
                m = pattern.search(str(err))
                if m:
                    name = m.group(1)
                    if "::" not in name:  # torch.ops form: ns.op[.overload]
                        parts = name.split(".")
                        name = f"{parts[0]}::{parts[1]}" if len(parts) > 1 else name
                    return name
                err = err.__cause__ or err.__context__
    return None


def error_summary(exc: BaseException) -> str:
    """One line (at most 300 characters) saying what an exporter or onnxruntime error was: its type and the first
    line of its summary (torch.onnx's reports run to pages).

    Example:
        >>> error_summary(RuntimeError("no ONNX function\\nlong trace ..."))
        'RuntimeError: no ONNX function'
    """
    text = str(exc).strip()
    summary = text.split("## Exception summary", 1)[-1].strip() if "## Exception summary" in text else text
    return f"{type(exc).__name__}: {summary.splitlines()[0] if summary else ''}"[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch.onnx repeats advice this module already acts on (eval mode, the exporter choice).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Exporting a model while it is in training mode.*")
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    # torch.export's .module() refuses train()/eval() (instance attributes that raise): its graph fixed
    # batch-norm and dropout behaviour at export time, so there is no mode to switch.
    if "eval" in vars(model) or "train" in vars(model):
        yield model
        return
    with eval_mode(model):
        yield model


def _export_dynamo(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *, opset: int | None,
                   dynamic_batch: bool, external: bool, in_names: list[str], out_names: list[str]) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    with _quiet():
        torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset, input_names=in_names,
                          output_names=out_names, dynamic_shapes=dynamic_shapes, external_data=external,
                          verbose=False, optimize=True)


def _export_torchscript(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *, opset: int | None,
                        dynamic_batch: bool, in_names: list[str], out_names: list[str]) -> None:
    axes = {name: {0: "batch"} for name in in_names + out_names} if dynamic_batch else None
    with _quiet():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=in_names,
                          output_names=out_names, dynamic_axes=axes, do_constant_folding=True)


def _to_float16(path: Path, external: bool) -> None:
    (onnx,) = require("onnx")
    (float16,) = require("onnxconverter_common.float16")
    model = onnx.load(str(path))
    with warnings.catch_warnings():
        # The converter warns once per weight it clamps to fp16's range; the numeric check judges the result.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    _save(onnx, half, path, external)


def _save(onnx: ModuleType, model: Any, path: Path, external: bool) -> None:
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save(model, str(path))


def _ort_session(path: Path) -> Any:
    (ort,) = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_ORT_FLOATS = {"tensor(double)": torch.float64, "tensor(float16)": torch.float16, "tensor(float)": torch.float32}


def _feed(a: torch.Tensor, ort_type: str) -> np.ndarray:
    """An input as the array the ONNX graph declares (a float64 model exports float64 inputs)."""
    a = a.detach().cpu()
    if a.is_floating_point():
        a = a.to(_ORT_FLOATS.get(ort_type, torch.float32))
    return a.numpy()


def _second_batch(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs with one more sample (the first repeated), to exercise the dynamic batch axis."""
    return tuple(torch.cat([a, a[:1]]) for a in args)


def verify_onnx(path: str | Path, model: nn.Module, example_inputs: Any, *, dtype: str = "float32",
                atol: float | None = None, rtol: float | None = None, dynamic_batch: bool = False,
                raise_on_mismatch: bool = True) -> Verification:
    """Run ``path`` in onnxruntime (CPU) and ``model`` in PyTorch (eval mode, fp32) and compare.

    With ``dynamic_batch`` the check also runs at the example batch size plus one. ``atol``/``rtol``
    default to :data:`DEFAULT_TOLERANCES` for ``dtype``. Raises :class:`OnnxMismatchError` above the
    tolerance unless ``raise_on_mismatch=False``.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Linear(4, 2)
        >>> p = to_onnx(m, torch.randn(3, 4), "/tmp/lin.onnx")  # doctest: +SKIP
        >>> verify_onnx(p, m, torch.randn(5, 4)).passed  # doctest: +SKIP
        True
    """
    _check_args(model, dtype, None, atol, rtol)
    path = Path(path)
    if not path.is_file():
        raise CstarFileNotFoundError(f"no ONNX file at {path}; export one with cstar_fx.export.to_onnx")
    d_atol, d_rtol = DEFAULT_TOLERANCES[dtype]
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    args = _tensor_inputs(example_inputs)
    session = _ort_session(path)
    in_names = [i.name for i in session.get_inputs()]
    in_types = [i.type for i in session.get_inputs()]
    if len(in_names) != len(args):
        raise CstarValueError(f"{path.name} takes {len(in_names)} input(s) but {len(args)} example input(s) were given")
    batches = [args, _second_batch(args)] if dynamic_batch else [args]
    max_abs, scale = 0.0, 0.0
    with torch.no_grad(), _eval_mode(model):
        for batch in batches:
            size = int(batch[0].shape[0]) if batch[0].dim() else 1
            try:
                out = model(*batch)
            except Exception as exc:  # any failure of the user's model; say which batch size it was
                hint = (" If the model fixes its batch size, export with dynamic_batch=False."
                        if len(batches) > 1 else "")
                raise ExampleInputError(f"the model cannot run in PyTorch at batch size {size}: "
                                        f"{type(exc).__name__}: {exc}.{hint}") from exc
            ref = [t.detach().float().cpu().numpy() for t in _flatten(out)]
            feeds = {name: _feed(a, kind) for name, a, kind in zip(in_names, batch, in_types)}
            try:
                got = session.run(None, feeds)
            except Exception as exc:  # onnxruntime's own error types; the file is unusable at this batch size
                raise OnnxExportError(
                    f"onnxruntime cannot run {path.name} at batch size {size}: {error_summary(exc)}. If the model "
                    f"fixes its batch size, export with dynamic_batch=False.") from exc
            if len(got) != len(ref):
                raise CstarValueError(f"{path.name} has {len(got)} output(s); the model returns {len(ref)}")
            for r, g in zip(ref, got):
                if r.shape != g.shape:
                    raise CstarValueError(f"output shape {g.shape} from onnxruntime differs from torch's {r.shape}")
                max_abs = max(max_abs, float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0)
                scale = max(scale, float(np.max(np.abs(r))) if r.size else 0.0)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = bool(max_abs <= atol + rtol * scale)  # NaN compares False, so NaN outputs fail
    result = Verification(dtype, max_abs, max_rel, scale, atol, rtol,
                          tuple(int(b[0].shape[0]) if b[0].dim() else 1 for b in batches), passed)
    if not passed and raise_on_mismatch:
        raise OnnxMismatchError(
            f"{path.name}: {result}. If the model is numerically sensitive, loosen atol/rtol; "
            f"for dtype='float16' check that activations stay within fp16 range.", result)
    return result


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, opset: int | None = None,
                dynamic_batch: bool = True, dtype: str = "float32", atol: float | None = None,
                rtol: float | None = None, verify: bool = True) -> OnnxExport:
    """Like :func:`to_onnx`, but returns an :class:`OnnxExport` with the exporter used and the check.

    Example:
        >>> import torch, torch.nn as nn
        >>> e = export_onnx(nn.Linear(4, 2), torch.randn(3, 4), "/tmp/lin.onnx")  # doctest: +SKIP
        >>> e.verification.passed, e.exporter  # doctest: +SKIP
        (True, 'dynamo')
    """
    _check_args(model, dtype, opset, atol, rtol)
    args = _tensor_inputs(example_inputs)
    (onnx,) = require("onnx")
    require("onnxruntime", "onnxscript")
    if dtype == "float16":
        require("onnxconverter_common")
    path = Path(path)
    if path.is_dir():
        raise CstarIsADirectoryError(f"{str(path)!r} is a directory; pass a file path such as "
                                     f"{str(path / 'model.onnx')!r}")
    if path.suffix != ".onnx":
        raise CstarValueError(f"path must end in .onnx, got {str(path)!r}")
    if path.parent.exists() and not path.parent.is_dir():
        raise CstarNotADirectoryError(f"{str(path.parent)!r} is a file, not a directory; pass a path inside a "
                                      "directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written and checked in a private folder beside path, then moved into place: a failed or
    # mismatching export never replaces a good file at path.
    work = Path(tempfile.mkdtemp(prefix=".cstar-fx-export.", dir=path.parent))
    try:
        result = _export_checked(model, args, work / path.name, onnx, opset=opset, dynamic_batch=dynamic_batch,
                                 dtype=dtype, atol=atol, rtol=rtol, verify=verify)
        for produced in sorted(work.iterdir()):  # the model and its external data file, same relative names
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return OnnxExport(path, result.exporter, result.dtype, result.opset, result.verification, result.fallback_reason)


def _export_checked(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, onnx: ModuleType, *,
                    opset: int | None, dynamic_batch: bool, dtype: str, atol: float | None, rtol: float | None,
                    verify: bool) -> OnnxExport:
    with torch.no_grad():
        n_out = len(_flatten(_run_eval(model, args)))
    in_names, out_names = _names("input", len(args)), _names("output", n_out)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > _EXTERNAL_DATA_BYTES
    exporter, fallback_reason = "dynamo", None
    with _eval_mode(model):
        try:
            _export_dynamo(model, args, path, opset=opset, dynamic_batch=dynamic_batch, external=external,
                           in_names=in_names, out_names=out_names)
        except Exception as dynamo_exc:  # the exporter raises many types; all mean "try the other path"
            fallback_reason = error_summary(dynamo_exc)
            warnings.warn(f"torch.onnx dynamo exporter failed ({fallback_reason}); falling back to the "
                          f"TorchScript exporter (dynamo=False)", RuntimeWarning, stacklevel=2)
            exporter = "torchscript"
            try:
                _export_torchscript(model, args, path, opset=opset, dynamic_batch=dynamic_batch,
                                    in_names=in_names, out_names=out_names)
            except Exception as ts_exc:
                op = _failing_op(dynamo_exc, ts_exc)
                where = f"operator {op!r}" if op else "an operator neither exporter could name"
                raise OnnxExportError(
                    f"ONNX export failed on {where}. dynamo exporter: {fallback_reason}; TorchScript exporter: "
                    f"{error_summary(ts_exc)}. Replace the operator with supported torch ops, or register an ONNX "
                    f"translation (torch.onnx.export(..., custom_translation_table=...)).", op=op) from ts_exc
    if dtype == "float16":
        _to_float16(path, external)
    onnx.checker.check_model(str(path))
    opset_used = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset_used != opset:
        raise CstarValueError(f"opset={opset} was asked for, but torch.onnx wrote opset {opset_used} "
                              f"({exporter} exporter; the dynamo exporter writes opset >= 18); pass opset=None "
                              f"or opset={opset_used}, or convert the file with onnx.version_converter")
    check = None
    if verify:
        check = verify_onnx(path, model, args, dtype=dtype, atol=atol, rtol=rtol, dynamic_batch=dynamic_batch)
    return OnnxExport(path, exporter, dtype, opset_used, check, fallback_reason)


def _run_eval(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    with _eval_mode(model):
        return model(*args)


def to_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, opset: int | None = None,
            dynamic_batch: bool = True, dtype: str = "float32", atol: float | None = None,
            rtol: float | None = None) -> Path:
    """Export ``model`` to ONNX at ``path``, check it with ``onnx.checker`` and against PyTorch; return the path.

    The model is exported in eval mode (each module's ``training`` flag is restored afterwards) with
    the dynamo exporter, falling back to the TorchScript exporter with a ``RuntimeWarning``; when both
    fail, :class:`OnnxExportError` names the operator. ``dynamic_batch`` makes axis 0 of every input
    and output symbolic. ``dtype="float16"`` stores weights and compute in half precision with float32
    inputs/outputs, checked at fp16 tolerance. onnxruntime (CPU) must agree with PyTorch within
    ``atol + rtol * max|output|`` (defaults in :data:`DEFAULT_TOLERANCES`) or
    :class:`OnnxMismatchError` is raised. Use :func:`export_onnx` to get the measured errors back.

    Example:
        >>> import torch, cstar_fx
        >>> from cstar_fx.models import cifar_resnet18
        >>> gm = cstar_fx.transform(cifar_resnet18(), ratio=8)  # doctest: +SKIP
        >>> to_onnx(gm, torch.rand(1, 3, 32, 32), "resnet18_8x.onnx")  # doctest: +SKIP
        PosixPath('resnet18_8x.onnx')
    """
    return export_onnx(model, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, dtype=dtype,
                       atol=atol, rtol=rtol).path
