"""Shared helpers for the benchmark scripts: machine description and JSON + markdown output."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from cstar_fx.sysinfo import describe

OUT = Path(__file__).resolve().parent / "out"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows of dicts as a GitHub markdown table (floats to 3 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, rows: list[dict[str, Any]], columns: list[str], meta: dict[str, Any]) -> str:
    """Write ``bench/out/<name>.json`` and ``.md``; return the markdown."""
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": describe(), "date": _dt.date.today().isoformat(), **meta}
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown_table(rows, columns)
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (OUT / f"{name}.md").write_text(f"{head}\n\n{md}\n")
    return f"{head}\n\n{md}\n"
