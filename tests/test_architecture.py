"""The package's import structure: no import cycles, no reaching into another module's private names.

Every module is parsed with ``ast`` (not imported), so function-level imports count too: a lazy import
that only hides a cycle is still a cycle here. Importing ``a.b.c`` runs ``a/b/__init__`` first, so an
import of a module also counts as an import of the packages above it (except the importer's own, which
are already running).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed package's layout (pyproject.toml's package-dir): passes/ and export/ are cstar_fx's subpackages.
PACKAGE_DIRS = {"cstar_fx": ROOT / "cstar_fx", "cstar_fx.passes": ROOT / "passes", "cstar_fx.export": ROOT / "export"}
# Private names one module may import from another, with the reason; keep this empty.
PRIVATE_IMPORTS_ALLOWED: dict[tuple[str, str, str], str] = {}
# Imports a cycle may pass through, with the reason; keep this empty.
EDGES_ALLOWED: set[tuple[str, str]] = set()


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``), for every module of the installed package."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "cstar_fx" and parts[0] in ("passes", "export"):
                continue  # not part of the installed package: those names map to the top-level folders
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_package else parts)])
            modules[name] = (path, is_package)
    return modules


MODULES = package_modules()


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """``(module imported, name taken from it or None, line)`` for every import of ``name``, at any depth; a
    private attribute read off an imported package module (``D._helper``) counts as importing that name."""
    path, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
            aliases.update({alias.asname: alias.name for alias in node.names if alias.asname})
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # "from . import io" imports a module; "from .io import save" takes a name from one
                found.append((submodule, None, node.lineno) if submodule in MODULES else (source, alias.name, node.lineno))
                if submodule in MODULES:
                    aliases[alias.asname or alias.name] = submodule
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return [(mod, what, line) for mod, what, line in found if mod in MODULES]


def packages_above(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (directly, or by running a package ``__init__`` on the way)."""
    graph = {}
    for name in MODULES:
        running = packages_above(name) | {name}
        targets = set()
        for mod, _, _ in imports_of(name):
            targets |= ({mod} | {p for p in packages_above(mod) if p in MODULES}) - running
        graph[name] = {t for t in targets if (name, t) not in EDGES_ALLOWED}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert {"cstar_fx", "cstar_fx.api", "cstar_fx.passes.prune", "cstar_fx.export.onnx", "cstar_fx.robust.admm"} <= set(graph)
    assert "cstar_fx.passes.trace" in graph["cstar_fx.analysis"]  # a relative import through the passes/ mapping
    assert "cstar_fx.passes" in graph["cstar_fx.analysis"]  # ... which runs the passes package's __init__ first


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, ("import cycle: " + " -> ".join(cycle) + "; move what both sides need into a module "
                           "below both (docs/concepts.md, Architecture)")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    taken = [(mod, what, line) for mod, what, line in imports_of(name)
             if what and what.startswith("_") and not what.startswith("__") and mod != name
             and (name, mod, what) not in PRIVATE_IMPORTS_ALLOWED]
    assert not taken, (f"{name} imports private names of other modules: "
                       + ", ".join(f"{mod}.{what} (line {line})" for mod, what, line in taken)
                       + "; make the name public where it belongs, or move it to the module that uses it")


# What the package raises on purpose is a cstar_fx.CstarError (docs/errors.md); these builtins have a
# CstarError twin in cstar_fx.errors that keeps them as a base.
BUILTIN_ERRORS = {name for name, obj in vars(builtins).items()
                  if isinstance(obj, type) and issubclass(obj, BaseException)}


def raised_builtins(tree: ast.AST) -> list[tuple[str, int]]:
    """``raise ValueError(...)`` / ``raise ValueError`` of a builtin exception class in ``tree``, in line order;
    a bare ``raise NotImplementedError`` (an abstract method's body, a contract for subclasses) is not one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            abstract = isinstance(node.exc, ast.Name) and node.exc.id == "NotImplementedError"
            if isinstance(target, ast.Name) and target.id in BUILTIN_ERRORS and not abstract:
                found.append((target.id, node.lineno))
    return sorted(found, key=lambda f: f[1])


def test_raised_builtins_finds_them():
    tree = ast.parse("def f(x):\n    if x:\n        raise ValueError('x')\n    raise KeyError\n"
                     "def g():\n    raise NotImplementedError\n")
    assert raised_builtins(tree) == [("ValueError", 3), ("KeyError", 4)]
    reraise = "raise CstarValueError('x')\ntry:\n    pass\nexcept ValueError:\n    raise\n"
    assert raised_builtins(ast.parse(reraise)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_error_raised_on_purpose_is_a_cstar_error(name):
    path, _ = MODULES[name]
    found = raised_builtins(ast.parse(path.read_text()))
    assert not found, (f"{name} raises builtin exceptions: "
                       + ", ".join(f"{cls} (line {line})" for cls, line in found)
                       + "; raise the CstarError twin from cstar_fx.errors (e.g. CstarValueError), so that "
                         "`except cstar_fx.CstarError` catches it")
