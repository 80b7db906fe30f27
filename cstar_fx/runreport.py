"""The run report: ``results.json`` (schema-checked), ``report.md`` and PNG plots for a compress run.

The results schema (``format: cstar-fx/run/1``)::

    {"format": ..., "config": {...}, "created": "ISO date", "machine": "...",
     "dense": {"params": int, "flops": float|null, "clean": float, "pgd": float|null, "autoattack": float|null},
     "runs": [{"method": "cstar"|"decompose"|"prune", "ratio": float, "params": int, "ratio_params": float,
               "ratio_flops": float|null, "clean": float, "pgd": float|null, "autoattack": float|null,
               "sanity_ok": bool|null, "plan": str|null, "onnx": str|null, "ranks": {layer: [dense, kept]},
               "round_to": int (pruning only), "int8": {...} (with --int8)}],
     "bench": [{"model": str, "provider": str, "batch": int, "median_ms": float, "speedup": float|null}],
     "timings": {stage: seconds}}

``"int8"`` (dense and each run, with ``--int8``): ``{"onnx", "agreement", "max_abs", "clean", "pgd", "noise", "n",
"size_ratio", "pgd_label"}``, the int8 file evaluated through onnxruntime (see :class:`cstar_fx.pipeline.Int8Result`).

Example:
    >>> validate_results({"format": RESULTS_FORMAT, "config": {}, "dense": {"params": 1, "clean": 0.9},
    ...                   "runs": [], "bench": [], "timings": {}})
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import CstarValueError
from .extras import require

__all__ = ["RESULTS_FORMAT", "validate_results", "write_report", "plot_all"]

RESULTS_FORMAT = "cstar-fx/run/1"
_PLOTS = "the run report's plots"
_RUN_KEYS = {"method": str, "ratio": (int, float), "params": int, "ratio_params": (int, float), "clean": (int, float)}


def validate_results(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field that breaks the results schema.

    Example:
        >>> validate_results({"format": "x"})
        Traceback (most recent call last):
        ...
        cstar_fx.errors.CstarValueError: results.format must be 'cstar-fx/run/1', got 'x'
    """
    if results.get("format") != RESULTS_FORMAT:
        raise CstarValueError(f"results.format must be {RESULTS_FORMAT!r}, got {results.get('format')!r}")
    for key, kind in (("config", dict), ("dense", dict), ("runs", list), ("bench", list), ("timings", dict)):
        if not isinstance(results.get(key), kind):
            raise CstarValueError(f"results.{key} must be a {kind.__name__}")
    for key in ("params", "clean"):
        if key not in results["dense"]:
            raise CstarValueError(f"results.dense.{key} is missing")
    for i, run in enumerate(results["runs"]):
        for key, kind in _RUN_KEYS.items():
            if not isinstance(run.get(key), kind):
                raise CstarValueError(f"results.runs[{i}].{key} must be {kind}")
        for key in ("clean", "pgd", "autoattack"):
            v = run.get(key)
            if v is not None and not 0.0 <= v <= 1.0:
                raise CstarValueError(f"results.runs[{i}].{key} must be an accuracy in [0, 1], got {v}")
    for i, row in enumerate(results["bench"]):
        for key in ("model", "provider", "batch", "median_ms"):
            if key not in row:
                raise CstarValueError(f"results.bench[{i}].{key} is missing")


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def write_report(results: dict[str, Any], run_dir: Path, plots: list[Path]) -> Path:
    """Write ``report.md`` from validated results and the plot files; returns its path.

    Example:
        >>> import tempfile
        >>> res = {"format": RESULTS_FORMAT, "config": {}, "dense": {"params": 10, "clean": 0.9}, "runs": [],
        ...        "bench": [], "timings": {}}
        >>> write_report(res, Path(tempfile.mkdtemp()), []).name
        'report.md'
    """
    validate_results(results)
    d = results["dense"]
    lines = ["# cstar-fx run report", "", f"- created: {results.get('created', '-')}",
             f"- machine: {results.get('machine', '-')}",
             f"- model: {results['config'].get('model', '-')}, dataset: {results['config'].get('dataset', '-')}",
             f"- attack (eval): {results['config'].get('eval_attack', '-')}", "",
             "## Accuracy and compression", "",
             "| method | ratio (target) | params | params ratio | FLOPs ratio | clean % | PGD % | AutoAttack % | sanity |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense | - | {d['params']:,} | 1.00x | 1.00x | {_pct(d.get('clean'))} | {_pct(d.get('pgd'))} | "
             f"{_pct(d.get('autoattack'))} | - |"]
    for r in results["runs"]:
        sanity = {True: "ok", False: "FAILED", None: "-"}[r.get("sanity_ok")]
        lines.append(f"| {r['method']} | {r['ratio']:g}x | {r['params']:,} | {_ratio(r['ratio_params'])} | "
                     f"{_ratio(r.get('ratio_flops'))} | {_pct(r['clean'])} | {_pct(r.get('pgd'))} | "
                     f"{_pct(r.get('autoattack'))} | {sanity} |")
    quantized = [("dense", d.get("int8"))] + [(f"{r['method']} {r['ratio']:g}x", r.get("int8")) for r in results["runs"]]
    if any(q for _, q in quantized):
        lines += ["", "## int8 (onnxruntime static QDQ, per-channel weights)", "",
                  "| model | clean % | PGD % (transferred from float) | noise % | same class as float | size ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} int8 | {_pct(q['clean'])} | {_pct(q.get('pgd'))} | {_pct(q.get('noise'))} | "
                  f"{_pct(q['agreement'])}% of {q['n']} | {_ratio(q['size_ratio'])} |" for name, q in quantized if q]
    if results["bench"]:
        lines += ["", "## Latency (onnxruntime)", "", "| model | provider | batch | median ms | speedup |",
                  "|---|---|---|---|---|"]
        for b in results["bench"]:
            sp = "-" if b.get("speedup") is None else f"{b['speedup']:.2f}x"
            lines.append(f"| {b['model']} | {b['provider']} | {b['batch']} | {b['median_ms']:.3f} | {sp} |")
    if results["timings"]:
        lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in plots]
    lines += ["", "Robust accuracy is measured with the attack above on the held-out split; `sanity` is the",
              "evaluation's gradient-masking checks (eps=0 equals clean, robust <= clean, monotone in eps, near zero at",
              "a huge eps). Reproduce with `cstar-fx compress --config config.json`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Accuracy vs ratio, ranks per layer and latency vs batch plots (PNG, no display needed).

    Example:
        >>> import tempfile
        >>> res = {"format": RESULTS_FORMAT, "config": {}, "dense": {"params": 10, "clean": 0.9}, "runs": [],
        ...        "bench": [{"model": "dense", "provider": "CPU", "batch": 1, "median_ms": 1.0}], "timings": {}}
        >>> [p.name for p in plot_all(res, Path(tempfile.mkdtemp()))]
        ['latency_vs_batch.png']
    """
    (matplotlib,) = require("matplotlib", purpose=_PLOTS)
    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    (plt,) = require("matplotlib.pyplot", purpose=_PLOTS)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    runs = results["runs"]
    if runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, method in enumerate(sorted({r["method"] for r in runs})):
            rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["ratio_params"])
            xs = [r["ratio_params"] for r in rs]
            color = f"C{i}"
            ax.plot(xs, [100 * r["clean"] for r in rs], "o-", color=color, label=f"{method} clean")
            if any(r.get("pgd") is not None for r in rs):
                ax.plot(xs, [100 * (r.get("pgd") or 0.0) for r in rs], "s--", color=color, label=f"{method} PGD")
        d = results["dense"]
        ax.axhline(100 * d["clean"], color="gray", lw=1, label="dense clean")
        if d.get("pgd") is not None:
            ax.axhline(100 * d["pgd"], color="gray", lw=1, ls="--", label="dense PGD")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (parameters)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "accuracy_vs_ratio.png"))
        ranked = [r for r in runs if r.get("ranks")]
        if ranked:
            r = max(ranked, key=lambda r: r["ratio_params"])
            names = list(r["ranks"])
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
            ax.bar(range(len(names)), [r["ranks"][n][0] for n in names], color="lightgray", label="full rank")
            ax.bar(range(len(names)), [r["ranks"][n][1] for n in names], color="C0", label="kept rank")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_ylabel("rank (Tucker-2: output mode)")
            ax.set_title(f"{r['method']} at {r['ratio']:g}x")
            ax.legend(fontsize=7)
            paths.append(_save(fig, out_dir / "ranks_per_layer.png"))
    bench = results["bench"]
    if bench:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, key in enumerate(sorted({(b["model"], b["provider"]) for b in bench})):
            rows = sorted((b for b in bench if (b["model"], b["provider"]) == key), key=lambda b: b["batch"])
            ax.plot([b["batch"] for b in rows], [b["median_ms"] for b in rows], "o-", color=f"C{i}",
                    label=f"{key[0]} ({key[1]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("median latency (ms)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "latency_vs_batch.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    (plt,) = require("matplotlib.pyplot", purpose=_PLOTS)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
