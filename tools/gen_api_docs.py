"""Generate docs/api.md from the public names' signatures and docstrings.

    python tools/gen_api_docs.py          # rewrite docs/api.md
    python tools/gen_api_docs.py --check  # exit 1 if docs/api.md is stale (the test suite runs this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("cstar_fx", "cstar_fx.robust", "cstar_fx.export", "cstar_fx.passes", "cstar_fx.passes.prune",
           "cstar_fx.passes.attention", "cstar_fx.io",
           "cstar_fx.latency", "cstar_fx.models", "cstar_fx.data", "cstar_fx.pipeline",
           "cstar_fx.schemes")
DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def public_names(module_name: str) -> list[tuple[str, object]]:
    """The module's ``__all__`` entries (skipping dunders), as (name, object)."""
    mod = importlib.import_module(module_name)
    names = [n for n in getattr(mod, "__all__", []) if not n.startswith("__")]
    return [(n, getattr(mod, n)) for n in names]


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def render() -> str:
    """The whole api.md text."""
    out = ["# API reference", "", "Generated from the docstrings by `python tools/gen_api_docs.py`; "
           "`tests/test_docs.py` fails when it is stale.", ""]
    seen: set[int] = set()
    for module_name in MODULES:
        items = [(n, o) for n, o in public_names(module_name) if id(o) not in seen]
        if not items:
            continue
        out += [f"## `{module_name}`", ""]
        for name, obj in items:
            seen.add(id(obj))
            kind = "class" if inspect.isclass(obj) else ("function" if callable(obj) else "constant")
            sig = _signature(obj) if kind != "constant" else f" = {obj!r}"
            out += [f"### `{name}{sig}`", "", f"*{kind}*", ""]
            doc = inspect.getdoc(obj) if kind != "constant" else ""
            if doc:
                out += [doc, ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/api.md is stale: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
