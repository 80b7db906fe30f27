"""Packaging: one namespace (cstar_fx.passes, cstar_fx.export), version in one place, README and CI agree."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cstar_fx

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import_under_cstar_fx_namespace():
    import cstar_fx.export
    import cstar_fx.passes

    assert Path(cstar_fx.passes.__file__).parent == ROOT / "passes"
    assert Path(cstar_fx.export.__file__).parent == ROOT / "export"


def test_no_global_passes_or_export_package_installed(tmp_path):
    code = ("import importlib.util, sys; "
            "print(importlib.util.find_spec('passes') is None and importlib.util.find_spec('export') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.slow
def test_wheel_maps_folders_into_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("cstar_fx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cstar_fx/passes/factorize.py" in names
    assert "cstar_fx/export/__init__.py" in names
    assert "cstar_fx/schemes/spatial_svd.py" in names
    tops = {n.split("/")[0] for n in names}
    assert "passes" not in tops and "export" not in tops
    assert wheel.name.startswith(f"cstar_fx-{cstar_fx.__version__}-")
    # the wheel imports on its own, from a fresh folder
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = "import cstar_fx, cstar_fx.passes, cstar_fx.export; print(cstar_fx.passes.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip().startswith(str(target / "cstar_fx" / "passes"))


def test_version_in_one_place():
    hits = []
    for path in list(ROOT.glob("cstar_fx/**/*.py")) + list(ROOT.glob("passes/*.py")) + list(ROOT.glob("export/*.py")):
        if re.search(r"^__version__\s*=", path.read_text(), re.M):
            hits.append(path.relative_to(ROOT))
    assert hits == [Path("cstar_fx/version.py")]
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    test_cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert test_cmd in readme
    assert "pytest" in test_cmd
    demo_cmd = test_cmd.replace(".venv/bin/python -m pytest -q", ".venv/bin/cstar-fx demo")
    assert demo_cmd in readme
