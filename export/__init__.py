"""ONNX export with numeric verification, int8 quantization, and onnxruntime benchmarks. Installed as
``cstar_fx.export``.

Importing this package needs neither onnx nor onnxruntime; the functions import them when called
and otherwise raise ``ImportError`` naming the extra to install (``pip install "cstar-fx[onnx]"``).

Example:
    >>> import torch, cstar_fx
    >>> from cstar_fx.export import to_onnx, benchmark
    >>> from cstar_fx.models import cifar_resnet18
    >>> dense = cifar_resnet18()
    >>> x = torch.rand(1, 3, 32, 32)
    >>> to_onnx(dense, x, "dense.onnx")  # doctest: +SKIP
    >>> to_onnx(cstar_fx.transform(dense, ratio=8), x, "cstar8.onnx")  # doctest: +SKIP
    >>> print(benchmark({"dense": "dense.onnx", "8x": "cstar8.onnx"}).to_markdown())  # doctest: +SKIP
"""

from .bench import CPU, CUDA, BenchResult, BenchRow, benchmark
from .onnx import (
    DEFAULT_TOLERANCES,
    DTYPES,
    OnnxExport,
    OnnxExportError,
    OnnxMismatchError,
    Verification,
    check_opset,
    export_onnx,
    to_onnx,
    verify_onnx,
)
from .quantize import Int8AgreementError, Int8Export, OnnxEvaluation, evaluate_onnx, pgd_examples, quantize_int8

__all__ = [
    "to_onnx",
    "export_onnx",
    "check_opset",
    "verify_onnx",
    "benchmark",
    "quantize_int8",
    "evaluate_onnx",
    "pgd_examples",
    "Int8Export",
    "Int8AgreementError",
    "OnnxEvaluation",
    "BenchResult",
    "BenchRow",
    "OnnxExport",
    "Verification",
    "OnnxExportError",
    "OnnxMismatchError",
    "DTYPES",
    "DEFAULT_TOLERANCES",
    "CUDA",
    "CPU",
]
