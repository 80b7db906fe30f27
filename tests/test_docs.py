"""Docs match the code: the API reference is generated from docstrings, and every public name has an example."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gen_api_docs  # noqa: E402


@pytest.mark.parametrize("module_name", gen_api_docs.MODULES)
def test_every_public_name_has_docstring_with_example(module_name):
    missing = []
    for name, obj in gen_api_docs.public_names(module_name):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if not any(line.strip().startswith("Example") for line in doc.splitlines()):  # a section, not the word
            missing.append(name)
    assert not missing, f"{module_name}: public names without a docstring example: {missing}"


def test_api_reference_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_api_docs.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_docs_pages_exist_and_link():
    for page in ("quickstart.md", "concepts.md", "recipes.md", "api.md", "benchmarks.md", "robustness.md",
                 "export.md", "pruning.md", "errors.md"):
        assert (ROOT / "docs" / page).exists(), page
    index = (ROOT / "docs" / "index.md").read_text()
    for page in ("quickstart.md", "concepts.md", "recipes.md", "api.md", "benchmarks.md"):
        assert page in index
