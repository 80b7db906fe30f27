"""Every docstring example in the package runs and prints what it says (examples are documentation)."""

import doctest
import importlib
import pkgutil

import pytest

import cstar_fx
import cstar_fx.export
import cstar_fx.passes


def _walk(pkg):
    return [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]


# passes/ and export/ are mapped into the cstar_fx namespace from folders of their own, so walk each.
MODULES = sorted({"cstar_fx", *_walk(cstar_fx), *_walk(cstar_fx.passes), *_walk(cstar_fx.export)})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
