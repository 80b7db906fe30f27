"""The pipeline as a library (cstar_fx.pipeline): typed config and result, a tiny run on CPU, resume, and
``cstar-fx compress --int8``."""

from __future__ import annotations

import json

import pytest

import cstar_fx
from cstar_fx import pipeline as P
from cstar_fx.cli import main
from cstar_fx.export import CPU
from cstar_fx.pipeline import Directory, Pipeline, PipelineConfig, PipelineResult, load_data, model_for
from cstar_fx.runreport import validate_results

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("onnxscript")

TINY = dict(ratios=(4,), methods=("decompose",), teacher_epochs=1, finetune_epochs=1, train_steps=1, eval_steps=1,
            eval_n=24, batch_size=48, calibrate=32, eps=0.1, providers=(CPU,), bench_batch=(1,), threads=1,
            calib_samples=32)


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit=96)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    train, test = data
    stages, saved = [], []
    workspace = Directory(tmp_path_factory.mktemp("pipeline") / "run")
    result = Pipeline(model_for("small_cnn", train), train, test, PipelineConfig(**TINY, int8=True)).run(
        workspace, on_stage=stages.append, on_result=lambda r: saved.append(len(r.runs)))
    return result, workspace, stages, saved


def test_config_is_typed_and_checked():
    cfg = PipelineConfig(ratios=[4, 8], methods=["prune"], eps=0.1, lr=0.1, distill=0.5)
    assert cfg.ratios == (4.0, 8.0) and cfg.methods == ("prune",)
    assert cfg.eval_attack.steps == 20 and cfg.eval_attack.alpha == pytest.approx(0.025)
    assert cfg.tune_config.lr == pytest.approx(0.02) and cfg.tune_config.loss.distill == 0.5
    assert cfg.joint_config.joint.schedule == "constant"
    with pytest.raises(ValueError, match="methods must be some of cstar, decompose, prune"):
        PipelineConfig(methods=("magic",))
    with pytest.raises(ValueError, match="must not repeat"):
        PipelineConfig(ratios=(4, 4))
    with pytest.raises(ValueError, match="distill"):
        PipelineConfig(loss="trades", distill=0.5)
    with pytest.raises(ValueError, match="must be fewer than the fine-tune's epochs"):
        PipelineConfig(prune_epochs=5, finetune_epochs=5)
    with pytest.raises(ValueError, match="needs a prune share > 0"):
        PipelineConfig(prune_epochs=1, prune_share=0)
    assert PipelineConfig(methods=["prune"], prune_epochs=5, finetune_epochs=5).prune_epochs == 5  # not decompose's
    from cstar_fx.robust import RECOMMENDED  # the documented import

    assert PipelineConfig().prune_epochs == RECOMMENDED.prune_epochs  # unset: the recipe's, where it applies
    assert PipelineConfig(prune_share=0).prune_epochs == 0 and PipelineConfig(finetune_epochs=1).prune_epochs == 0


def test_load_data_refuses_a_root_it_would_ignore(tmp_path):
    with pytest.raises(cstar_fx.CstarError, match="digits' is built in and reads no files") as info:
        load_data("digits", tmp_path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="needs root="):
        load_data("folder")


def test_load_data_takes_the_cifar10_jpeg_archives_default_location(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.tar.xz"
    monkeypatch.setenv("CSTAR_FX_CIFAR10_JPEG", str(missing))
    with pytest.raises(cstar_fx.CstarError, match="nowhere.tar.xz does not exist"):  # looked there, and only there
        load_data("cifar10-jpeg")


def test_unreachable_ratio_is_refused_before_training(data):
    train, test = data
    with pytest.raises(ValueError, match="decompose at 1000x"):
        Pipeline(model_for("small_cnn", train), train, test, PipelineConfig(**{**TINY, "ratios": (1000,)}))


def test_run_returns_typed_results_and_writes_the_workspace(finished):
    result, workspace, stages, saved = finished
    assert stages == ["teacher", "evaluate dense", "compress decompose_4x", "benchmark"]
    assert saved == [0, 1]  # after the dense model and after the compressed one
    (run,) = result.runs
    assert run.label == "decompose_4x" and run.ratio_params >= 4 * 0.97  # budget "both": at least 4x in each count
    assert 0 <= run.clean <= 1 and 0 <= run.pgd <= 1 and run.ranks
    for q in (result.dense.int8, run.int8):
        assert 0 <= q.clean <= 1 and 0 <= q.pgd <= 1 and 0 <= q.agreement <= 1 and q.n == 24
        assert q.pgd_label == "PGD-1 transferred from the float model" and q.size_ratio > 1
    for name in ("teacher.pt", run.plan, run.onnx, run.int8.onnx, result.dense.int8.onnx, "onnx/dense.onnx"):
        assert (workspace.path / name).is_file(), name
    assert {b.model for b in result.bench} == {"dense", "decompose_4x", "dense_int8", "decompose_4x_int8"}
    assert result.benchmark is not None and result.benchmark.baseline == "dense"
    data = result.to_dict()
    validate_results(data)
    assert PipelineResult.from_dict(json.loads(json.dumps(data))) == result
    assert "round_to" not in data["runs"][0] and data["runs"][0]["int8"]["onnx"] == "onnx/decompose_4x_int8.onnx"


def test_resume_keeps_finished_work(finished, data, monkeypatch):
    result, workspace, _, _ = finished
    train, test = data

    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was compressed again")

    monkeypatch.setattr(P, "_compress", no_training)
    stages = []
    again = Pipeline(model_for("small_cnn", train), train, test, PipelineConfig(**TINY, export=False)).run(
        workspace, resume=result, teacher=workspace.path / "teacher.pt", on_stage=stages.append)
    assert stages == [] and again.runs == result.runs and again.dense == result.dense


def test_without_a_workspace_nothing_is_kept(data):
    train, test = data
    cfg = PipelineConfig(**{**TINY, "teacher_epochs": 0, "export": False})
    result = Pipeline(model_for("small_cnn", train), train, test, cfg).run()
    assert result.runs[0].plan is None and result.runs[0].onnx is None and result.bench == []


def test_cli_compress_int8(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compress", "--teacher-epochs", "1", "--finetune-epochs", "1", "--eval-n", "24", "--limit", "96",
            "--train-steps", "1", "--eval-steps", "1", "--batch-size", "48", "--calibrate", "32",
            "--methods", "decompose", "--ratios", "4", "--providers", CPU, "--bench-batch", "1",
            "--threads", "1", "--int8", "--calib-samples", "32", "--out", str(out)]
    code = main(argv)
    stdout = capsys.readouterr().out
    assert code == 0
    assert "decompose 4x int8" in stdout and "PGD-1 transferred from the float model" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][0]["int8"]["onnx"] == "onnx/decompose_4x_int8.onnx"
    assert (out / "onnx" / "decompose_4x_int8.onnx").is_file() and (out / "onnx" / "dense_int8.onnx").is_file()
    assert "| decompose 4x int8 |" in (out / "report.md").read_text()
    assert "decompose_4x_int8" in (out / "bench.md").read_text()
    # the finished run again with the int8 gate: nothing is redone, the gate is applied to the stored results
    lowest = min(results["dense"]["int8"]["agreement"], results["runs"][0]["int8"]["agreement"])
    assert main([*argv, "--min-agreement", str(lowest)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    if lowest < 1:
        assert main([*argv, "--min-agreement", "1"]) == 1
        failed = "int8 check FAILED: same class as float on less than 100.0% of the test images"
        assert failed in capsys.readouterr().out
