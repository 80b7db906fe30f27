"""int8 on top of low rank: onnxruntime static QDQ quantization of an fp32 ONNX model, and its evaluation.

:func:`quantize_int8` calibrates activation ranges on a few hundred training images
(``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``, per-channel int8 weights, uint8
activations) and checks the int8 file against the float one (agreement of the predicted classes).
A factorized model quantizes like a dense one: its factors are ordinary ``Conv``/``Gemm`` nodes.
:func:`evaluate_onnx` measures clean accuracy through onnxruntime, accuracy under PGD examples made on
the float PyTorch model (a transfer attack: the int8 graph has no gradients of its own), and under
random sign noise of the same size (a gradient-free check).

Example:
    >>> import torch, cstar_fx
    >>> from cstar_fx.export import to_onnx, quantize_int8, evaluate_onnx
    >>> gm = cstar_fx.transform(model, ratio=8)  # doctest: +SKIP
    >>> to_onnx(gm, train.x[:2] / 255, "r18_8x.onnx")  # doctest: +SKIP
    >>> q = quantize_int8("r18_8x.onnx", train, "r18_8x_int8.onnx")  # doctest: +SKIP
    >>> print(q)  # doctest: +SKIP
    >>> evaluate_onnx(q.path, test, attack_from=gm).pgd  # doctest: +SKIP
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cstar_fx.errors import CstarError, CstarFileNotFoundError, CstarTypeError, CstarValueError
from cstar_fx.extras import require
from cstar_fx.fileutil import atomic_path

from .onnx import OnnxExportError, error_summary, to_onnx

__all__ = ["quantize_int8", "evaluate_onnx", "pgd_examples", "Int8Export", "OnnxEvaluation", "calibration_array",
           "Int8AgreementError"]


@dataclass(frozen=True)
class Int8Export:
    """What :func:`quantize_int8` wrote, and how the int8 model compares with the float one.

    ``agreement`` is the fraction of ``n_checked`` images on which both models predict the same class;
    ``max_abs`` the largest logit difference. ``float_bytes`` / ``int8_bytes`` are the file sizes;
    ``float_path`` is ``None`` when the float model was a module exported to a temporary file.

    Example:
        >>> q = Int8Export(Path("m_int8.onnx"), Path("m.onnx"), 256, 256, 0.98, 0.4, 4_000_000, 1_100_000)
        >>> round(q.size_ratio, 2)
        3.64
    """

    path: Path
    float_path: Path | None
    n_calibration: int
    n_checked: int
    agreement: float
    max_abs: float
    float_bytes: int
    int8_bytes: int

    @property
    def size_ratio(self) -> float:
        """Float file size / int8 file size."""
        return self.float_bytes / max(self.int8_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d.update(path=str(self.path), float_path=None if self.float_path is None else str(self.float_path),
                 size_ratio=self.size_ratio)
        return d

    def __str__(self) -> str:
        return (f"int8 (QDQ, per-channel, {self.n_calibration} calibration images) vs float: same class on "
                f"{self.agreement:.1%} of {self.n_checked} images, max logit difference {self.max_abs:.3g}; "
                f"{self.float_bytes / 2**20:.2f} MiB -> {self.int8_bytes / 2**20:.2f} MiB ({self.size_ratio:.2f}x)")


class Int8AgreementError(CstarError, AssertionError):
    """The int8 model predicts the float model's class on fewer check images than ``min_agreement`` asks.

    ``result`` is the :class:`Int8Export` (the int8 file is written, for inspection). An ``AssertionError``
    too, as this check raised before it had a class of its own.

    Example:
        >>> issubclass(Int8AgreementError, AssertionError) and issubclass(Int8AgreementError, CstarError)
        True
    """

    def __init__(self, message: str, result: Int8Export) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class OnnxEvaluation:
    """Accuracy of an ONNX model in onnxruntime (CPU): clean, under PGD transferred from the float PyTorch
    model (``None`` without ``attack_from``), and under random sign noise of size ``eps``.

    Example:
        >>> e = OnnxEvaluation(n=100, clean=0.9, pgd=0.4, noise=0.88, eps=8 / 255, pgd_steps=10)
        >>> e.pgd_label
        'PGD-10 transferred from the float model'
    """

    n: int
    clean: float
    pgd: float | None
    noise: float | None
    eps: float
    pgd_steps: int

    @property
    def pgd_label(self) -> str:
        """How the PGD number was obtained (always a transfer attack, never white-box on the int8 graph)."""
        return f"PGD-{self.pgd_steps} transferred from the float model"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "pgd_label": self.pgd_label}


def calibration_array(data: Any, limit: int | None = None) -> np.ndarray:
    """Images as one float32 array in [0, 1]: from a tensor or array (uint8 is divided by 255), a
    :class:`cstar_fx.data.TensorData`, or an iterable of batches or ``(images, labels)`` pairs; at most
    ``limit`` images.

    Example:
        >>> calibration_array(torch.full((4, 3, 2, 2), 255, dtype=torch.uint8), limit=2).shape
        (2, 3, 2, 2)
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CstarValueError(f"the number of calibration images must be an int >= 1, got {limit!r}")
    if hasattr(data, "x") and isinstance(getattr(data, "x"), torch.Tensor):
        data = data.x
    if isinstance(data, (torch.Tensor, np.ndarray)):
        chunks: Iterable[Any] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        chunks = data
    else:
        raise CstarTypeError(f"calibration data must be images (a tensor or array N x C x H x W, a TensorData, or "
                             f"an iterable of batches), got {type(data).__name__}")
    out, total = [], 0
    for chunk in chunks:
        if isinstance(chunk, (tuple, list)) and chunk:
            chunk = chunk[0]  # (images, labels)
        arr = chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif not np.issubdtype(arr.dtype, np.floating):
            raise CstarTypeError(f"calibration images must be float in [0, 1] or uint8, got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise CstarValueError("calibration images contain NaN or Inf; pass real images")
        out.append(arr)
        total += arr.shape[0] if arr.ndim else 1
        if limit is not None and total >= limit:
            break
    if not out or total == 0:
        raise CstarValueError("calibration data is empty; pass a few hundred training images")
    shapes = {a.shape[1:] for a in out}
    if len(shapes) > 1 or out[0].ndim < 2:
        raise CstarValueError(f"calibration batches must share one image shape (N x C x H x W), got {sorted(shapes)}")
    arr = np.concatenate(out)
    return arr[:limit] if limit is not None else arr


def _input_spec(session: Any) -> tuple[str, list[Any]]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CstarValueError(f"quantize_int8 handles models with one image input; this one has {len(inputs)}")
    return inputs[0].name, list(inputs[0].shape)


def _check_shape(images: np.ndarray, shape: list[Any], what: str) -> None:
    fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int) and i > 0]
    if images.ndim != len(shape) or any(images.shape[i] != d for i, d in fixed):
        want = "x".join(str(d) if isinstance(d, int) else "N" for d in shape)
        raise CstarValueError(f"{what} have shape {tuple(images.shape)}, the model takes {want}; pass images of "
                              f"that size")


def _session(path: Path, threads: int | None = None) -> Any:
    (ort,) = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, name: str, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def _reader(name: str, images: np.ndarray, batch_size: int) -> Any:
    (quantization,) = require("onnxruntime.quantization")

    class _Batches(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                [{name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Batches()


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def quantize_int8(model: str | Path | nn.Module, calibration: Any, path: str | Path, *, num_calibration: int = 256,
                  batch_size: int = 32, per_channel: bool = True, reduce_range: bool = False,
                  check_images: Any = None, min_agreement: float | None = None,
                  preprocess: bool = True) -> Int8Export:
    """Quantize an fp32 ONNX model (a path, or an ``nn.Module`` exported with :func:`to_onnx` first) to int8.

    onnxruntime static quantization in QDQ format: int8 weights per output channel, uint8 activations
    whose ranges are calibrated (min-max) on the first ``num_calibration`` images of ``calibration``
    (a tensor, TensorData, or iterable of batches; training images, values in [0, 1] or uint8).
    ``preprocess`` runs onnxruntime's ``quant_pre_process`` (shape inference, graph optimisation) first.
    ``reduce_range`` uses 7-bit weights, for x86 CPUs without VNNI where uint8 x int8 products can
    saturate. The int8 file is then compared with the float one on ``check_images`` (default: the
    calibration images): the agreement of predicted classes and the largest logit difference;
    below ``min_agreement`` an :class:`Int8AgreementError` is raised (the int8 file is already written,
    for inspection). The float file is not changed.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        >>> q = quantize_int8(model, torch.rand(64, 3, 8, 8), "/tmp/small_int8.onnx")  # doctest: +SKIP
        >>> q.agreement > 0.9  # doctest: +SKIP
        True
    """
    for label, v in (("num_calibration", num_calibration), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CstarValueError(f"{label} must be an int >= 1, got {v!r}")
    if min_agreement is not None and not (isinstance(min_agreement, (int, float)) and 0 <= min_agreement <= 1):
        raise CstarValueError(f"min_agreement must be a number in [0, 1] or None, got {min_agreement!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise CstarValueError(f"path must end in .onnx, got {str(path)!r}")
    # onnxruntime ships onnxruntime.quantization, so the onnx extra brings it
    _, _, quantization = require("onnx", "onnxruntime", "onnxruntime.quantization", purpose="quantize_int8")
    images = calibration_array(calibration, num_calibration)
    check = images if check_images is None else calibration_array(check_images)
    with tempfile.TemporaryDirectory(prefix="cstar_int8_") as tmp:
        tmpdir = Path(tmp)
        if isinstance(model, nn.Module):
            float_path = to_onnx(model, torch.from_numpy(images[:2]), tmpdir / "float.onnx")
        else:
            float_path = Path(model)
            if not float_path.is_file():
                raise CstarFileNotFoundError(f"no ONNX file at {float_path}; export one with cstar_fx.export.to_onnx")
        if float_path.resolve() == path.resolve():
            raise CstarValueError(f"path {path} is the float model itself; write the int8 model to another file")
        name, shape = _input_spec(_session(float_path))
        _check_shape(images, shape, "calibration images")
        _check_shape(check, shape, "check images")
        source = float_path
        if preprocess:
            pre = tmpdir / "pre.onnx"
            try:
                quantization.quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=False)
                source = pre
            except Exception as exc:  # the pre-processing is an optimisation; quantization works without it
                warnings.warn(f"onnxruntime quant_pre_process failed ({error_summary(exc)}); quantizing the "
                              f"model as exported", RuntimeWarning, stacklevel=2)
        out = tmpdir / "int8.onnx"
        float_bytes = _file_bytes(float_path)
        if float_bytes > (1 << 30):
            raise CstarValueError(f"{float_path.name} is over 1 GiB (weights in external data); quantize_int8 handles "
                                  "single-file models only: quantize it with onnxruntime.quantization directly")
        try:
            quantization.quantize_static(
                str(source), str(out), _reader(name, images, batch_size),
                quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax)
        except Exception as exc:  # onnxruntime raises plain Exceptions; say which step failed
            raise OnnxExportError(f"onnxruntime static quantization of {float_path.name} failed: "
                                  f"{error_summary(exc)}") from exc
        ref = _run(_session(float_path), name, check, batch_size)
        got = _run(_session(out), name, check, batch_size)
        with atomic_path(path) as target:
            shutil.copyfile(out, target)
            shutil.copymode(float_path, target)  # the atomic temp file is private (0600); match the float file
        int8_bytes = _file_bytes(out)
    agreement = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    max_abs = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
    result = Int8Export(path, None if isinstance(model, nn.Module) else float_path, len(images), len(check),
                        agreement, max_abs, float_bytes, int8_bytes)
    if min_agreement is not None and agreement < min_agreement:
        raise Int8AgreementError(f"{path.name}: {result}; below min_agreement={min_agreement:g}. Calibrate on "
                                 f"more (and more typical) images (num_calibration=), or keep sensitive layers "
                                 f"in float.", result)
    return result


def _labelled(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise CstarTypeError(f"data must be a TensorData or an (images, labels) pair, got {type(data).__name__}")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim != 4 or y.shape != (x.shape[0],) or y.is_floating_point():
        raise CstarValueError(f"need images N x C x H x W and N integer labels, got {tuple(x.shape)} and "
                              f"{tuple(y.shape)} {y.dtype}")
    return x, y.long()


def pgd_examples(model: nn.Module, data: Any, *, eps: float = 8 / 255, steps: int = 10, alpha: float | None = None,
                 batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """L-inf PGD examples (random start) made on the float PyTorch ``model``, on CPU tensors in [0, 1], for
    :func:`evaluate_onnx` (``adversarial=``): made once, they can be evaluated through several files.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> adv = pgd_examples(model, (x, y), eps=0.1, steps=2)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    from cstar_fx.robust.attacks import pgd

    x, y = _labelled(data)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.cat([pgd(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), eps=eps,
                              alpha=alpha, steps=steps).cpu() for i in range(0, len(x), batch_size)])
    finally:
        torch.random.set_rng_state(state)


def evaluate_onnx(path: str | Path, data: Any, *, attack_from: nn.Module | None = None, eps: float = 8 / 255,
                  pgd_steps: int = 10, alpha: float | None = None, noise: bool = True, batch_size: int = 100,
                  threads: int | None = None, seed: int = 0, adversarial: torch.Tensor | None = None
                  ) -> OnnxEvaluation:
    """Clean and perturbed accuracy of an ONNX model in onnxruntime (CPU) on labelled images.

    ``data`` is a TensorData or ``(images, labels)``. With ``attack_from`` (the float PyTorch model the
    file came from), L-inf PGD examples (``pgd_steps`` steps, radius ``eps``, random start) are made on
    that model and evaluated through the ONNX file: for an int8 file this is a transfer attack, stated
    as such in :attr:`OnnxEvaluation.pgd_label`; for the float file it is the white-box number.
    ``adversarial`` takes examples already made with :func:`pgd_examples` (with this ``eps`` and
    ``pgd_steps``) instead of ``attack_from``. ``noise`` adds random signs of size ``eps`` (clipped to
    [0, 1]), a gradient-free check.

    Example:
        >>> ev = evaluate_onnx("r18_8x_int8.onnx", test, attack_from=gm)  # doctest: +SKIP
        >>> print(f"{ev.clean:.3f} {ev.pgd:.3f} ({ev.pgd_label})")  # doctest: +SKIP
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 <= eps < 1):
        raise CstarValueError(f"eps must be a finite number in [0, 1), got {eps!r}")
    for label, v in (("pgd_steps", pgd_steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if label == "pgd_steps" else 1):
            raise CstarValueError(f"{label} must be a non-negative int (batch_size >= 1), got {v!r}")
    path = Path(path)
    if not path.is_file():
        raise CstarFileNotFoundError(f"no ONNX file at {path}; export one with cstar_fx.export.to_onnx")
    x, y = _labelled(data)
    session = _session(path, threads)
    name, shape = _input_spec(session)
    _check_shape(x.numpy(), shape, "images")
    labels = y.numpy()

    def accuracy(images: torch.Tensor) -> float:
        return float(np.mean(_run(session, name, images.numpy(), batch_size).argmax(-1) == labels))

    clean = accuracy(x)
    pgd_acc = noise_acc = None
    if attack_from is not None and adversarial is not None:
        raise CstarValueError("pass attack_from (PGD is run here) or adversarial (examples made before), not both")
    if attack_from is not None:
        adversarial = pgd_examples(attack_from, (x, y), eps=eps, steps=pgd_steps, alpha=alpha,
                                   batch_size=batch_size, seed=seed)
    if adversarial is not None:
        if tuple(adversarial.shape) != tuple(x.shape):
            raise CstarValueError(f"adversarial has shape {tuple(adversarial.shape)}, the images {tuple(x.shape)}; "
                                  f"make them with pgd_examples(model, data)")
        pgd_acc = accuracy(adversarial.detach().cpu().float())
    if noise:
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
        noise_acc = accuracy((x + eps * signs).clamp(0, 1))
    return OnnxEvaluation(len(x), clean, pgd_acc, noise_acc, float(eps), pgd_steps if pgd_acc is not None else 0)
