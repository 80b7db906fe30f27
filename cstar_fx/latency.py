"""A measured-latency cost model for the global allocator.

A layer's cost is the latency of the primitive ops its dense or factorized form runs, as its scheme lists
them — one conv or linear op when dense, two (SVD, spatial SVD) or three (Tucker-2) when factorized — timed
on a target (onnxruntime with a provider, or PyTorch on a device) at the user's batch size and input
resolution. Each op is timed once and cached in a JSON table keyed by machine, target and op shape, so a
second plan costs nothing. Channel counts between two points of a fine ladder (…, 64, 96, 128, 192, 256, …) are
interpolated bilinearly from the four bracketing measurements: latency is smooth and monotone in
channel count at that spacing, while measuring every rank pair of every layer would take minutes.
Pass ``interpolate=False`` to time every op exactly.

Example:
    >>> import torch.nn as nn, cstar_fx
    >>> from cstar_fx.latency import LatencyCost, LatencyTarget
    >>> cost = LatencyCost(LatencyTarget(backend="torch", iters=3, warmup=1))
    >>> plan = cstar_fx.plan_ranks(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), budget="latency",
    ...                            target_speedup=1.2, cost_model=cost, example_inputs=torch.randn(1, 64))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import hashlib
import io
import copy
import json
import os
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .analysis import Analysis, TraceConfig, analyse
from .costs import CostModel, register_budget
from .errors import CstarRuntimeError, CstarValueError
from .extras import require
from .schemes import DENSE, LayerSpec, Op, get
from .fileutil import atomic_path
from .plan import RankPlan, get_plan
from .sysinfo import cpu_name
from .timing import OrtRunner, median_ms, ort_session
from .torchutil import as_tuple

__all__ = ["LatencyTarget", "Op", "chain_ops", "LatencyTable", "LatencyCost", "LatencyCheck", "measure_model",
           "validate", "predict", "TABLE_FORMAT"]

TABLE_FORMAT = "cstar-fx/latency-table/1"
_LADDER = sorted({1, 2, 3, 4, 6} | {b * m for b in (8, 12) for m in (1, 2, 4, 8, 16, 32, 64, 128)})


@dataclass(frozen=True)
class LatencyTarget:
    """Where latency is measured: backend, provider or device, dtype, batch size and threads.

    Example:
        >>> LatencyTarget(batch_size=64).batch_size
        64
    """

    backend: str = "onnxruntime"
    provider: str = "CPUExecutionProvider"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    threads: int | None = None
    warmup: int = 5
    iters: int = 30

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "torch"):
            raise CstarValueError(f"backend must be 'onnxruntime' or 'torch', got {self.backend!r}")
        if self.dtype not in ("float32", "float16"):
            raise CstarValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        for name in ("batch_size", "warmup", "iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise CstarValueError(f"{name} must be a positive int, got {v!r}")

    def key(self) -> str:
        """A cache key naming this machine and target, so tables from other machines never mix."""
        where = self.provider if self.backend == "onnxruntime" else self.device
        threads = self.threads if self.threads is not None else os.cpu_count()
        return f"{_machine(self)}|{self.backend}:{where}|{self.dtype}|b{self.batch_size}|t{threads}"


def _machine(target: LatencyTarget) -> str:
    if "CUDA" in target.provider and target.backend == "onnxruntime" or target.device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return f"{cpu_name()} x{os.cpu_count()}"


def chain_ops(layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> list[Op]:
    """The ops a layer runs in a scheme (the same structure the rewrite pass builds; the scheme says which).

    Example:
        >>> spec = LayerSpec("c", "conv", (64, 32, 3, 3), True, (), in_shape=(1, 32, 8, 8), out_shape=(1, 64, 8, 8),
        ...                  padding=(1, 1))
        >>> [(o.c_in, o.c_out, o.kernel) for o in chain_ops(spec, "tucker2", (16, 8))]
        [(32, 8, (1, 1)), (8, 16, (3, 3)), (16, 64, (1, 1))]
    """
    return get(scheme).latency_ops(layer, ranks)


class LatencyTable:
    """A JSON cache of measured op latencies (milliseconds), keyed by target and op.

    Example:
        >>> t = LatencyTable()
        >>> t.set("k", 1.5); t.get("k")
        1.5
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CstarValueError(f"latency table {self.path} is unreadable "
                                      f"({exc}); delete it to re-measure") from exc
            if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
                raise CstarValueError(f"{self.path} is not a cstar_fx latency table; delete it or pass another path")
            self.entries = {str(k): float(v) for k, v in data["entries"].items()}

    def get(self, key: str) -> float | None:
        """The cached value, or ``None``."""
        return self.entries.get(key)

    def set(self, key: str, ms: float) -> None:
        """Cache a value (in memory; :meth:`save` writes the file)."""
        self.entries[key] = float(ms)

    def save(self) -> None:
        """Write the table atomically (temp file + rename) if it has a path."""
        if self.path is None:
            return
        text = json.dumps({"format": TABLE_FORMAT, "entries": self.entries}, indent=1, sort_keys=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)


def _ort_runner(module: nn.Module, x: torch.Tensor, target: LatencyTarget) -> Any:
    """A runner of ``module`` in onnxruntime on the target, with input and output bound once (IOBinding)."""
    (ort,) = require("onnxruntime", purpose="the onnxruntime latency backend")
    buf = io.BytesIO()
    module = module.eval()
    if target.dtype == "float16":
        module, x = module.half(), x.half()
    # The TorchScript exporter is deliberate: a single op exports in milliseconds, the dynamo path in seconds.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    sess = ort_session(ort, buf.getvalue(), target.provider, threads=target.threads)
    if sess.get_providers()[0] != target.provider:
        raise CstarRuntimeError(f"{target.provider} is not usable here (session runs on {sess.get_providers()[0]}); "
                                f"measure on a machine with it or use provider='CPUExecutionProvider'")
    return OrtRunner(ort, sess, {"x": x.numpy()}, x.shape[0], "cuda" if "CUDA" in target.provider else "cpu")


def _time(module: nn.Module, x: torch.Tensor, target: LatencyTarget) -> float:
    if target.backend == "onnxruntime":
        return median_ms(_ort_runner(module, x, target), target.warmup, target.iters)
    dev = torch.device(target.device)
    dtype = torch.float16 if target.dtype == "float16" else torch.float32
    module = module.to(dev, dtype).eval()
    x = x.to(dev, dtype)
    threads = torch.get_num_threads()
    if target.threads is not None:
        torch.set_num_threads(target.threads)
    try:
        with torch.no_grad():
            if dev.type == "cuda":
                return median_ms(lambda: (module(x), torch.cuda.synchronize()), target.warmup, target.iters)
            return median_ms(lambda: module(x), target.warmup, target.iters)
    finally:
        torch.set_num_threads(threads)


def _bracket(v: int) -> tuple[int, int]:
    i = bisect.bisect_left(_LADDER, v)
    if i < len(_LADDER) and _LADDER[i] == v:
        return v, v
    if i == 0 or i == len(_LADDER):
        return v, v
    return _LADDER[i - 1], _LADDER[i]


class LatencyCost(CostModel):
    """Cost model: measured latency (ms) of a layer's dense or factorized form on a target.

    ``table`` (or ``path``) caches measurements across runs. The per-call overhead of the runtime
    (timed on a trivial op) is subtracted from each op, and counted once for the whole model.

    Example:
        >>> cost = LatencyCost(LatencyTarget(backend="torch", iters=3, warmup=1))
        >>> spec = LayerSpec("fc", "linear", (32, 32), False, (), in_shape=(1, 32), out_shape=(1, 32))
        >>> cost(spec, "dense", ()) >= 0.0
        True
    """

    name = "latency"

    def __init__(self, target: LatencyTarget | None = None, *, table: LatencyTable | None = None,
                 path: str | os.PathLike | None = None, interpolate: bool = True) -> None:
        self.target = target or LatencyTarget()
        self.table = table if table is not None else LatencyTable(path)
        self.interpolate = interpolate
        self.measured = 0

    def _measure(self, key: str, module: nn.Module, x: torch.Tensor) -> float:
        full = f"{self.target.key()}|{key}"
        hit = self.table.get(full)
        if hit is None:
            torch.manual_seed(0)
            hit = _time(module, x, self.target)
            self.table.set(full, hit)
            self.measured += 1
        return hit

    def overhead_ms(self) -> float:
        """Latency of a trivial op on the target: the fixed cost of one call."""
        return self._measure("overhead", nn.Flatten(0), torch.zeros(1, 1))

    def _exact(self, op: Op) -> float:
        ms = self._measure(op.key(), op.module(), op.input(self.target.batch_size))
        return max(ms - self.overhead_ms(), 0.0)

    def op_ms(self, op: Op) -> float:
        """Latency of one op (ms), interpolated between ladder channel counts when allowed."""
        if not self.interpolate:
            return self._exact(op)
        (i0, i1), (o0, o1) = _bracket(op.c_in), _bracket(op.c_out)
        if (i0, o0) == (i1, o1):
            return self._exact(op)
        ti = 0.0 if i1 == i0 else (op.c_in - i0) / (i1 - i0)
        to = 0.0 if o1 == o0 else (op.c_out - o0) / (o1 - o0)
        corner = {(a, b): self._exact(op.with_channels(a, b)) for a in {i0, i1} for b in {o0, o1}}
        lo = corner[(i0, o0)] * (1 - to) + corner[(i0, o1)] * to
        hi = corner[(i1, o0)] * (1 - to) + corner[(i1, o1)] * to
        return lo * (1 - ti) + hi * ti

    def __call__(self, layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float:
        return sum(self.op_ms(op) for op in chain_ops(layer, scheme, ranks))

    def model_cost(self, model: nn.Module, example_inputs: Any) -> float:
        """End-to-end latency of a whole model at the target's batch size (ms), cached by architecture."""
        code = getattr(model, "code", None) or repr(model)
        shapes = [tuple(p.shape) for p in model.parameters()] + [tuple(t.shape[1:]) for t in as_tuple(example_inputs)]
        key = "model " + hashlib.sha1(f"{code}{shapes}".encode()).hexdigest()
        full = f"{self.target.key()}|{key}"
        hit = self.table.get(full)
        if hit is None:
            hit = measure_model(model, example_inputs, self.target)
            self.table.set(full, hit)
            self.measured += 1
        return hit

    def total(self, analysis: Analysis) -> float:
        """The dense model's end-to-end latency (ms), at least the sum of its eligible layers' latencies."""
        analysis.require_shapes(f"budget={self.name!r}")
        layers = sum(self(spec, DENSE, ()) for spec in analysis.eligible)
        # The cost outside the layers (total - layers) must not be negative: a whole run can fuse ops timed one by one.
        return max(self.model_cost(analysis.gm, analysis.example_inputs), layers)

    def flush(self) -> None:
        """Save the table (if it has a path), so that the next plan on this target measures nothing."""
        self.table.save()


register_budget("latency", LatencyCost)


def measure_model(model: nn.Module, example_inputs: Any, target: LatencyTarget) -> float:
    """Median end-to-end latency (ms) of ``model`` on ``target``; the example's batch is resized.

    Example:
        >>> measure_model(nn.Linear(8, 8), torch.randn(1, 8), LatencyTarget(backend="torch", iters=3)) > 0
        True
    """
    (x, *rest) = as_tuple(example_inputs)
    if rest:
        raise CstarValueError("latency measurement supports single-input models")
    x = x[:1].expand(target.batch_size, *x.shape[1:]).contiguous()
    return _time(copy.deepcopy(model).eval(), x, target)  # a copy: timing moves it to the target's device/dtype


@dataclass(frozen=True)
class LatencyCheck:
    """Predicted (from the plan) vs measured end-to-end latency, dense and compressed, in ms.

    Example:
        >>> c = LatencyCheck(10.0, 4.0, 10.0, 5.0)
        >>> c.measured_speedup, round(c.error, 2)
        (2.0, -0.2)
    """

    predicted_dense: float
    predicted: float
    measured_dense: float
    measured: float

    @property
    def predicted_speedup(self) -> float:
        """Dense / compressed, as the plan predicted."""
        return self.predicted_dense / self.predicted

    @property
    def measured_speedup(self) -> float:
        """Dense / compressed, as measured side by side."""
        return self.measured_dense / self.measured

    @property
    def error(self) -> float:
        """Relative error of the predicted compressed latency: (predicted - measured) / measured."""
        return (self.predicted - self.measured) / self.measured

    def to_dict(self) -> dict[str, float]:
        """JSON-ready, derived values included."""
        return {**asdict(self), "predicted_speedup": self.predicted_speedup,
                "measured_speedup": self.measured_speedup, "error": self.error}


def validate(model: nn.Module, gm: nn.Module, example_inputs: Any, target: LatencyTarget) -> LatencyCheck:
    """Measure ``model`` and its latency-planned transform ``gm`` side by side; compare with the plan.

    Example:
        >>> # gm = cstar_fx.transform(model, plan=latency_plan); validate(model, gm, x, target).error
    """
    plan = get_plan(gm)
    if plan.budget != "latency" or plan.cost is None or plan.dense_cost is None:
        raise CstarValueError("the model was not planned with budget='latency'; nothing to validate")
    dense, compressed = [], []
    for _ in range(3):  # interleaved rounds, so that drift on a shared machine hits both alike
        dense.append(measure_model(model, example_inputs, target))
        compressed.append(measure_model(gm, example_inputs, target))
    return LatencyCheck(plan.dense_cost, plan.cost, statistics.median(dense), statistics.median(compressed))


def predict(plan: RankPlan, model: nn.Module, example_inputs: Any, cost: LatencyCost) -> tuple[float, float]:
    """``(dense, compressed)`` latency (ms) that ``cost`` predicts for any plan of ``model`` — e.g. to
    compare a parameter-budget plan with a latency-budget one on the same table.

    Example:
        >>> # dense_ms, plan_ms = predict(cstar_fx.plan_ranks(model, 8), model, x, LatencyCost(target))
    """
    a = analyse(model, TraceConfig(), example_inputs, need_spectra=False)
    total = cost.total(a)
    compressed = total
    for name, lp in plan.factorized.items():
        spec = a.specs[name]
        compressed += cost(spec, lp.scheme, lp.ranks) - cost(spec, DENSE, ())
    cost.flush()
    return total, compressed
