"""The one onnxruntime timing harness: a session, a runner with its inputs in place, and interleaved timing.

Used by :mod:`cstar_fx.latency` (per-op latency tables, end-to-end checks) and by
:func:`cstar_fx.export.benchmark` (several ONNX models side by side). The caller passes the imported
``onnxruntime`` module, so this module needs no optional extra and imports nothing from the package.

Example:
    >>> times = time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=1, iters=4)
    >>> {name: len(t) for name, t in times.items()}
    {'a': 4, 'b': 4}
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from .errors import CstarRuntimeError

__all__ = ["ort_session", "OrtRunner", "time_interleaved", "median_ms", "NP_TYPES", "GPU_PROVIDERS",
           "gpu_driver_missing"]

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
"""numpy dtypes of the onnxruntime input/output types a runner feeds and binds."""
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_DRIVER_LIBRARY = {"linux": "libcuda.so.1", "win32": "nvcuda.dll"}


@functools.cache
def gpu_driver_missing() -> str | None:
    """Why no GPU provider can run on this machine (its NVIDIA driver library does not load), else ``None``.

    ``None`` also where the platform's driver library is not known: onnxruntime then decides.

    Example:
        >>> reason = gpu_driver_missing()
        >>> reason is None or reason.startswith("no NVIDIA driver")
        True
    """
    name = _DRIVER_LIBRARY.get(sys.platform)
    if name is None:
        return None
    try:
        ctypes.CDLL(name)
    except OSError:
        return f"no NVIDIA driver on this machine: {name} cannot be loaded"
    return None


def ort_session(ort: Any, model: Any, provider: str, *, cuda_graph: bool = False, threads: int | None = None,
                spinning: bool = False) -> Any:
    """An onnxruntime session for ``model`` (a path or the serialized bytes) on ``provider`` only.

    onnxruntime may still fall back to the CPU when the provider's libraries cannot load: compare
    ``session.get_providers()[0]`` with ``provider`` before trusting a time. Without a GPU driver
    (:func:`gpu_driver_missing`) a GPU provider gets that CPU session directly, since trying it only
    prints onnxruntime's load errors.

    Example:
        >>> import onnxruntime as ort  # doctest: +SKIP
        >>> ort_session(ort, "m.onnx", "CPUExecutionProvider", threads=1).get_providers()[0]  # doctest: +SKIP
        'CPUExecutionProvider'
    """
    options = ort.SessionOptions()
    # Idle sessions' spinning pool threads would steal cores from the session being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if provider in GPU_PROVIDERS and gpu_driver_missing():
        provider = "CPUExecutionProvider"
    provider_options: dict[str, str] = {}
    if provider in GPU_PROVIDERS and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # finds pip-installed CUDA/cuDNN libraries before the session needs them
        except Exception:  # a failed preload shows up as a fallback session, which callers report
            pass
    if provider == "CUDAExecutionProvider":
        provider_options["device_id"] = "0"
        if cuda_graph:
            provider_options["enable_cuda_graph"] = "1"
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=[(provider, provider_options)])


def _output_shapes(session: Any, batch: int) -> list[tuple[int, ...]] | None:
    """Output shapes from the graph's metadata, the batch symbol resolved; ``None`` if any dim is unknown."""
    batch_syms = {i.shape[0] for i in session.get_inputs() if i.shape and not isinstance(i.shape[0], int)}
    shapes = []
    for out in session.get_outputs():
        dims = []
        for k, d in enumerate(out.shape):
            if isinstance(d, int):
                dims.append(d)
            elif k == 0 and d in batch_syms:
                dims.append(batch)
            else:
                return None
        shapes.append(tuple(dims))
    return shapes


class OrtRunner:
    """One session with its inputs in place; ``__call__`` runs one inference and waits for it.

    With ``device`` ("cuda", or "cpu" to exercise the same path without a GPU) inputs and outputs are
    bound once on that device (IOBinding), at fixed addresses as CUDA graphs require, so that timing
    sees the kernels rather than per-call copies of the tensors.
    """

    def __init__(self, ort: Any, session: Any, feeds: dict[str, np.ndarray], batch: int, device: str | None = None,
                 cuda_graph: bool = False) -> None:
        self.session = session
        self.out_names = [o.name for o in session.get_outputs()]
        self.feeds = feeds
        self.binding = None
        if device is None:
            return
        binding = session.io_binding()
        # Keep the OrtValues referenced: the binding holds raw device pointers.
        self.device_inputs = {n: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in feeds.items()}
        for n, v in self.device_inputs.items():
            binding.bind_ortvalue_input(n, v)
        shapes = _output_shapes(session, batch)
        if shapes is None and cuda_graph:
            raise CstarRuntimeError("CUDA graphs need outputs of known shape; export with dynamic_batch=True "
                                    "and no other symbolic output dims")
        self.device_outputs = {}
        for out, shape in zip(session.get_outputs(), shapes or [None] * len(self.out_names)):
            if shape is None:
                binding.bind_output(out.name, device, 0)
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), NP_TYPES.get(out.type, np.float32),
                                                                  device, 0)
                self.device_outputs[out.name] = value
                binding.bind_ortvalue_output(out.name, value)
        self.binding = binding

    def __call__(self) -> None:
        if self.binding is None:
            self.session.run(self.out_names, self.feeds)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The latest outputs, copied to the host (for checks, not timed)."""
        if self.binding is None:
            return self.session.run(self.out_names, self.feeds)
        return self.binding.copy_outputs_to_cpu()


def time_interleaved(calls: Mapping[str, Callable[[], Any]], warmup: int, iters: int,
                     progress: Callable[[int], Any] | None = None) -> dict[str, list[float]]:
    """Per-call times (ms) of each callable: ``warmup`` untimed calls each, then ``iters`` timed ones.

    The timed calls run in rounds (at most 5), the order of the callables rotated each round, so that
    drift on a shared machine hits all of them alike. Each call must return only when its work is done.
    ``progress`` is told how many calls were made after each block.

    Example:
        >>> len(time_interleaved({"noop": lambda: None}, warmup=0, iters=3)["noop"])
        3
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
        if progress:
            progress(warmup)
    rounds = max(1, min(5, iters // 5))
    per_round = [iters // rounds + (1 if k < iters % rounds else 0) for k in range(rounds)]
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for k, n_iter in enumerate(per_round):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:  # rotate so no callable always runs first
            call, out = calls[name], times[name]
            for _ in range(n_iter):
                t0 = time.perf_counter()
                call()
                out.append((time.perf_counter() - t0) * 1e3)
            if progress:
                progress(n_iter)
    return times


def median_ms(call: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median time (ms) of ``iters`` calls after ``warmup`` untimed ones.

    Example:
        >>> median_ms(lambda: None, warmup=1, iters=3) >= 0.0
        True
    """
    return statistics.median(time_interleaved({"call": call}, warmup, iters)["call"])
