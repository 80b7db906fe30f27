"""onnxruntime latency benchmark: several ONNX models side by side, per execution provider and batch size.

Models are measured in one process and interleaved (rounds of iterations, model order rotated each
round) so that drift on a shared machine hits all of them alike; speedups are ratios of medians
within one provider and batch size. On CUDA, inputs and outputs stay on the device (IOBinding), and
CUDA graphs can be captured. A requested CUDA provider that cannot load (onnxruntime silently falls
back to the CPU) is reported in :attr:`BenchResult.unavailable`, never timed under the CUDA label.

Example:
    >>> result = benchmark({"dense": "dense.onnx", "8x": "cstar8.onnx"},
    ...                    providers=("CPUExecutionProvider",), batch_sizes=(1,))  # doctest: +SKIP
    >>> print(result.to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from cstar_fx.errors import CstarFileNotFoundError, CstarKeyError, CstarTypeError, CstarValueError
from cstar_fx.sysinfo import cpu_name
from cstar_fx.timing import GPU_PROVIDERS, NP_TYPES, OrtRunner, gpu_driver_missing, ort_session, time_interleaved

from .onnx import require, to_onnx

__all__ = ["benchmark", "BenchResult", "BenchRow", "CUDA", "CPU"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class BenchRow:
    """One model at one provider, CUDA-graph setting and batch size.

    ``provider`` is what was asked for, ``ran_on`` what the session actually used
    (``session.get_providers()[0]``); rows exist only where they agree. Latencies are in
    milliseconds; ``throughput`` is samples per second at the median latency; ``speedup`` is the
    baseline's median over this one's (``None`` without a baseline row).

    Example:
        >>> r = BenchRow("dense", CPU, CPU, False, 1, 2.0, 2.5, 500.0, 1.0, 50)
        >>> r.throughput
        500.0
    """

    model: str
    provider: str
    ran_on: str
    cuda_graph: bool
    batch: int
    median_ms: float
    p90_ms: float
    throughput: float
    speedup: float | None
    iters: int


@dataclass
class BenchResult:
    """All rows of a :func:`benchmark` run, the providers that could not run, and run metadata.

    ``unavailable`` maps a provider label (``"CUDAExecutionProvider"``, or with ``"+cuda_graph"``)
    to the reason nothing was measured for it.

    Example:
        >>> res = BenchResult([BenchRow("dense", CPU, CPU, False, 1, 2.0, 2.5, 500.0, 1.0, 50)], "dense")
        >>> res.row("dense", CPU, 1).median_ms
        2.0
    """

    rows: list[BenchRow]
    baseline: str | None
    unavailable: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, model: str, provider: str, batch: int, cuda_graph: bool = False) -> BenchRow:
        """The row for one model, provider, batch size and CUDA-graph setting (``KeyError`` if absent)."""
        for r in self.rows:
            if (r.model, r.provider, r.batch, r.cuda_graph) == (model, provider, batch, cuda_graph):
                return r
        why = self.unavailable.get(_label(provider, cuda_graph))
        raise CstarKeyError(f"no row for {model!r} on {provider} at batch {batch}" + (f" ({why})" if why else ""))

    @property
    def models(self) -> list[str]:
        """Model names in the order they were given."""
        return list(dict.fromkeys(r.model for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"baseline": self.baseline, "rows": [asdict(r) for r in self.rows],
                "unavailable": dict(self.unavailable), "meta": dict(self.meta)}

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
        """A markdown table, one row per measurement, then a note per unusable provider.

        ``extra`` adds per-model columns, e.g. ``{"8x": {"FLOP ratio": "7.8"}}``.

        Example:
            >>> res = BenchResult([BenchRow("dense", CPU, CPU, False, 1, 2.0, 2.5, 500.0, 1.0, 50)], "dense")
            >>> res.to_markdown().splitlines()[0].startswith("| model |")
            True
        """
        extra = extra or {}
        extra_cols = list(dict.fromkeys(c for cols in extra.values() for c in cols))
        graphs = any(r.cuda_graph for r in self.rows)
        head = ["model", "provider", *(["CUDA graph"] if graphs else []), "batch", "median ms", "p90 ms",
                "samples/s", f"speedup vs {self.baseline}" if self.baseline else "speedup", *extra_cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in self.rows:
            cells = [r.model, r.ran_on.replace("ExecutionProvider", ""), *(["yes" if r.cuda_graph else "no"]
                     if graphs else []), str(r.batch), f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.throughput:,.0f}",
                     "-" if r.speedup is None else f"{r.speedup:.2f}x",
                     *(extra.get(r.model, {}).get(c, "") for c in extra_cols)]
            lines.append("| " + " | ".join(cells) + " |")
        if not self.rows:
            lines.append("| " + " | ".join(["(nothing measured)"] + [""] * (len(head) - 1)) + " |")
        for label, why in self.unavailable.items():
            lines.append(f"\n**{label} not measured:** {why}")
        return "\n".join(lines)


def _label(provider: str, cuda_graph: bool) -> str:
    return provider + ("+cuda_graph" if cuda_graph else "")


def _check(providers: Sequence[str], batch_sizes: Sequence[int], warmup: int, iters: int, cuda_graph: Any,
           intra_op_threads: int | None) -> None:
    if isinstance(providers, str) or not providers or not all(isinstance(p, str) for p in providers):
        raise CstarValueError(f"providers must be a non-empty sequence of provider names, e.g. ({CPU!r},); "
                              f"got {providers!r}")
    if isinstance(batch_sizes, int) or not batch_sizes or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise CstarValueError("batch_sizes must be a non-empty sequence of "
                              f"ints >= 1, e.g. (1, 64); got {batch_sizes!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise CstarValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(iters, int) or iters < 1:
        raise CstarValueError(f"iters must be an int >= 1, got {iters!r}")
    if cuda_graph not in (False, True, "both"):
        raise CstarValueError(f"cuda_graph must be False, True or 'both', got {cuda_graph!r}")
    if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 1):
        raise CstarValueError(f"intra_op_threads must be an int >= 1 or None (onnxruntime's default), "
                              f"got {intra_op_threads!r}")


def _resolve(models_or_paths: Any, example_inputs: Any, tmp: Callable[[], Path]) -> dict[str, Path]:
    if isinstance(models_or_paths, Mapping):
        items = list(models_or_paths.items())
    else:
        if isinstance(models_or_paths, (str, os.PathLike, nn.Module)):
            models_or_paths = [models_or_paths]
        items = [(Path(m).stem if isinstance(m, (str, os.PathLike)) else f"model{i}", m)
                 for i, m in enumerate(models_or_paths)]
    if not items:
        raise CstarValueError("models_or_paths is empty; pass ONNX paths or {name: path or nn.Module}")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise CstarValueError(f"model names must be unique, got {names}; pass a dict {{name: path}} to name them")
    paths: dict[str, Path] = {}
    for name, m in items:
        if isinstance(m, nn.Module):
            if example_inputs is None:
                raise CstarValueError(f"model {name!r} is an nn.Module: pass example_inputs= to export it, "
                                      f"or export it first with cstar_fx.export.to_onnx")
            paths[name] = to_onnx(m, example_inputs, tmp() / f"{name}.onnx")
        elif isinstance(m, (str, os.PathLike)):
            path = Path(m)
            if not path.is_file():
                raise CstarFileNotFoundError(f"model {name!r}: no ONNX file at {path}")
            paths[name] = path
        else:
            raise CstarTypeError(f"model {name!r} must be an ONNX path or an nn.Module, got {type(m).__name__}")
    return paths


def _feeds(session: Any, batch: int, input_shapes: Mapping[str, Sequence[int]] | None, seed: int,
           name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        if inp.type not in NP_TYPES:
            raise CstarValueError(f"model {name!r}: input {inp.name!r} has type {inp.type}; benchmark feeds random "
                                  f"floats only")
        dims = list(inp.shape)
        if input_shapes and inp.name in input_shapes:
            rest = [int(d) for d in input_shapes[inp.name]]
        else:
            rest = dims[1:]
            if any(not isinstance(d, int) for d in rest):
                raise CstarValueError(f"model {name!r}: input {inp.name!r} has symbolic dims {dims}; pass "
                                      f"input_shapes={{{inp.name!r}: (C, H, W)}} (the shape without the batch axis)")
        if dims and isinstance(dims[0], int) and dims[0] != batch:
            raise CstarValueError(f"model {name!r} has a fixed batch size {dims[0]}; export it with dynamic_batch=True "
                                  f"or ask for batch_sizes=({dims[0]},)")
        feeds[inp.name] = rng.random([batch, *rest], dtype=np.float32).astype(NP_TYPES[inp.type])
    return feeds


def _meta(ort: Any, warmup: int, iters: int, threads: int | None, paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "onnxruntime": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
        "intra_op_threads": threads,
        "warmup": warmup,
        "iters": iters,
        "models": {n: str(p) for n, p in paths.items()},
    }


def benchmark(models_or_paths: Mapping[str, str | os.PathLike | nn.Module] | Sequence[str | os.PathLike] | str
              | os.PathLike, *, providers: Sequence[str] = (CUDA, CPU), batch_sizes: Sequence[int] = (1, 64, 256),
              warmup: int = 10, iters: int = 50, cuda_graph: bool | str = False, baseline: str | None = None,
              intra_op_threads: int | None = None, example_inputs: Any = None,
              input_shapes: Mapping[str, Sequence[int]] | None = None, allow_spinning: bool = False,
              progress: bool = True, seed: int = 0) -> BenchResult:
    """Time ONNX models in onnxruntime, side by side, for each provider and batch size.

    ``models_or_paths``: ONNX paths (named by file stem) or ``{name: path or nn.Module}`` (modules
    are exported with :func:`to_onnx`, which needs ``example_inputs``). One session is made per
    model, provider and batch size; inputs are random floats (same seed for every model). On CUDA
    the inputs and outputs are bound on the device (IOBinding); ``cuda_graph=True`` captures a CUDA
    graph (``"both"`` measures with and without). A CUDA provider that is missing or falls back to
    the CPU is recorded in ``result.unavailable`` and not timed. ``baseline`` (default: the first
    model) is the model speedups are relative to; ``intra_op_threads`` sets onnxruntime's thread pool.
    ``allow_spinning`` (onnxruntime's intra-op spin-wait) is off by default: with several sessions
    alive, the idle ones' spinning threads take cores from the one being timed, which on a small
    shared machine inflates every latency and blurs the ratios.

    Example:
        >>> res = benchmark(["dense.onnx", "cstar8.onnx"], providers=("CPUExecutionProvider",),
        ...                 batch_sizes=(1, 64), intra_op_threads=2)  # doctest: +SKIP
        >>> res.row("cstar8", "CPUExecutionProvider", 1).speedup  # doctest: +SKIP
        3.1
    """
    _check(providers, batch_sizes, warmup, iters, cuda_graph, intra_op_threads)
    (ort,) = require("onnxruntime")
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="cstar_bench_") as tmpdir:
        paths = _resolve(models_or_paths, example_inputs, lambda: Path(tmpdir))
        if baseline is not None and baseline not in paths:
            raise CstarValueError(f"baseline {baseline!r} is not one of the models {list(paths)}")
        baseline = baseline if baseline is not None else next(iter(paths))
        graph_modes = {False: [False], True: [True], "both": [False, True]}[cuda_graph]
        variants = [(p, g) for p in providers for g in (graph_modes if p == CUDA else [False])]
        result = BenchResult([], baseline, {}, _meta(ort, warmup, iters, intra_op_threads, paths))
        result.meta["allow_spinning"] = allow_spinning
        available = ort.get_available_providers()
        total = len(variants) * len(batch_sizes) * len(paths) * (warmup + iters)
        with tqdm(total=total, desc="onnxruntime benchmark", unit="run", disable=not progress) as bar:
            for provider, graph in variants:
                label = _label(provider, graph)
                why = _run_variant(ort, result, paths, provider, graph, batch_sizes, warmup, iters,
                                   intra_op_threads, allow_spinning, input_shapes, seed, available, bar)
                if why:
                    result.unavailable[label] = why
                    bar.update(len(batch_sizes) * len(paths) * (warmup + iters))
    return result


def _run_variant(ort: Any, result: BenchResult, paths: dict[str, Path], provider: str, graph: bool,
                 batch_sizes: Sequence[int], warmup: int, iters: int, threads: int | None, spinning: bool,
                 input_shapes: Mapping[str, Sequence[int]] | None, seed: int, available: list[str],
                 bar: Any) -> str | None:
    """Measure every model at every batch size on one provider; return why it could not run, if so."""
    if provider not in available:
        return (f"{provider} is not in onnxruntime.get_available_providers() {available}; install the onnxruntime "
                f"build for it (onnxruntime-gpu for CUDA)")
    device = "cuda" if provider == CUDA else None
    for batch in batch_sizes:
        runners: dict[str, OrtRunner] = {}
        for name, path in paths.items():
            try:
                session = ort_session(ort, path, provider, cuda_graph=graph, threads=threads, spinning=spinning)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
                return f"creating a {provider} session for {name!r} failed: {exc}".replace("\n", " ")[:500]
            ran_on = session.get_providers()[0]
            if ran_on != provider:
                why = ((provider in GPU_PROVIDERS and gpu_driver_missing())
                       or "the provider's libraries, e.g. CUDA/cuDNN, could not load, or there is no device")
                return (f"{provider} was requested but the session fell back to {ran_on} ({why}); its numbers would "
                        f"be {ran_on} numbers, so none are reported under {provider}")
            try:
                runners[name] = OrtRunner(ort, session, _feeds(session, batch, input_shapes, seed, name), batch,
                                        device, graph)
            except RuntimeError as exc:
                return f"{name!r} at batch {batch}: {exc}"
        try:
            times = time_interleaved(runners, max(warmup, 2 if graph else 0), iters, bar.update)
        except Exception as exc:  # e.g. CUDA graph capture refused: a node was placed on the CPU
            how = " with CUDA graphs" if graph else ""
            return f"running on {provider}{how} failed at batch {batch}: {exc}".replace("\n", " ")[:500]
        medians = {n: float(np.median(t)) for n, t in times.items()}
        base = medians.get(result.baseline)
        for name, t in times.items():
            med = medians[name]
            result.rows.append(BenchRow(
                model=name, provider=provider, ran_on=provider, cuda_graph=graph, batch=batch, median_ms=med,
                p90_ms=float(np.percentile(t, 90)), throughput=batch * 1e3 / med,
                speedup=None if base is None else base / med, iters=len(t)))
        del runners
    return None
