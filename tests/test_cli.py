"""The command line: compress end to end on digits, plan, and one-line usage errors."""

import json
import subprocess
import sys

import pytest

from cstar_fx.runreport import validate_results

TINY = ["--teacher-epochs", "1", "--joint-epochs", "1", "--finetune-epochs", "1", "--eval-n", "48", "--limit", "192",
        "--train-steps", "2", "--eval-steps", "3", "--bench-batch", "1", "2", "--providers", "CPUExecutionProvider",
        "--threads", "1"]


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "cstar_fx", *args], capture_output=True, text=True, cwd=cwd,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", **(env or {})})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    res = cli("compress", *TINY, "--ratios", "4", "--methods", "cstar", "decompose", "prune", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_compress_writes_complete_run_folder(run_dir):
    for name in ("report.md", "results.json", "config.json", "teacher.pt", "COMPLETE", "bench.md"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    validate_results(results)
    assert {r["method"] for r in results["runs"]} == {"cstar", "decompose", "prune"}
    for r in results["runs"]:
        assert r["ratio_params"] >= 4 * 0.97  # budget "both": at least 4x in parameters and in FLOPs
        assert 0 <= r["clean"] <= 1 and 0 <= r["pgd"] <= 1
    assert {b["provider"] for b in results["bench"]} == {"CPUExecutionProvider"}
    report = (run_dir / "report.md").read_text()
    assert "| cstar | 4x |" in report and "plots/accuracy_vs_ratio.png" in report


def test_plots_are_valid_pngs(run_dir):
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["accuracy_vs_ratio.png", "latency_vs_batch.png", "ranks_per_layer.png"]
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_onnx_files_load_in_onnxruntime(run_dir):
    import numpy as np
    import onnxruntime as ort

    for path in (run_dir / "onnx").glob("*.onnx"):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.random.rand(2, 1, 8, 8).astype(np.float32)
        assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (2, 10)


def test_config_json_repeats_the_run(run_dir, tmp_path):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["ratios"] == [4.0] and config["options"]["methods"] == ["cstar", "decompose", "prune"]
    again = tmp_path / "again"
    res = cli("compress", "--config", str(run_dir / "config.json"), "--methods", "decompose", "--no-export",
              "--out", str(again))
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((again / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["decompose"]  # the flag overrides the config
    assert results["config"]["limit"] == 192  # the rest comes from the config
    first = json.loads((run_dir / "results.json").read_text())
    assert results["dense"]["clean"] == first["dense"]["clean"]  # same seed, same teacher


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0.5"], "argument --ratios: must be a finite number > 1"),
    (["--methods", "magic"], "invalid choice"),
    (["--dataset", "cifar10"], "needs --data PATH"),
    (["--dataset", "cifar10-jpeg", "--data", "/nonexistent/cifar.tar.xz"], "does not exist"),
    (["--model", "resnet18"], "needs 3-channel images"),
    (["--eps", "abc"], "fraction like 8/255"),
])
def test_bad_options_one_line_exit_2_and_no_run_folder(tmp_path, args, message):
    out = tmp_path / "bad"
    res = cli("compress", *args, "--out", str(out))
    assert res.returncode == 2
    assert message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not (out / "COMPLETE").exists()
    assert not out.exists() or not any(out.iterdir())


def test_cifar10_jpeg_without_data_reads_the_archives_default_location(tmp_path):
    out = tmp_path / "run"
    res = cli("compress", "--dataset", "cifar10-jpeg", "--model", "resnet18", "--out", str(out),
              env={"CSTAR_FX_CIFAR10_JPEG": str(tmp_path / "missing.tar.xz")})
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "CSTAR_FX_CIFAR10_JPEG=" in res.stderr and "missing.tar.xz does not exist" in res.stderr


def test_existing_run_folder_is_not_overwritten(run_dir):
    res = cli("compress", *TINY, "--out", str(run_dir))
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (run_dir / "COMPLETE").exists()


def test_plan_command(tmp_path):
    res = cli("plan", "--model", "resnet18", "--ratio", "8", "--json", str(tmp_path / "p.json"))
    assert res.returncode == 0, res.stderr
    assert "net.layer4.1.conv2" in res.stdout and "target 8x by params" in res.stdout
    from cstar_fx import RankPlan

    assert RankPlan.from_json((tmp_path / "p.json").read_text()).ratio_params == pytest.approx(8, rel=0.02)
    bad = cli("plan", "--ratio", "1")
    assert bad.returncode == 2 and "argument --ratio: must be a finite number > 1" in bad.stderr


def test_help_shows_defaults():
    res = cli("compress", "--help")
    assert res.returncode == 0
    assert "(default: 8.0" in res.stdout.replace("[", "").replace("]", "") or "default: [8.0]" in res.stdout


def test_plan_command_conv_scheme_auto():
    res = cli("plan", "--model", "resnet18", "--ratio", "8", "--conv-scheme", "auto", "--budget", "flops")
    assert res.returncode == 0, res.stderr
    assert "target 8x by flops" in res.stdout
