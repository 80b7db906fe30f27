"""onnxruntime benchmark: result structure, interleaving, CUDA fallback detection, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx import timing
from cstar_fx.cli import main
from cstar_fx.export import CPU, CUDA, BenchResult, benchmark, to_onnx
from cstar_fx.export import bench as bench_mod
from cstar_fx.models import small_cnn
from cstar_fx.timing import OrtRunner, time_interleaved

FAST = dict(providers=(CPU,), warmup=1, iters=5, intra_op_threads=1, progress=False)


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bench")
    dense = small_cnn(width=16).eval()
    x = torch.rand(2, 1, 8, 8)
    small = cstar_fx.transform(dense, 4, example_inputs=x[:1])
    return {"dense": to_onnx(dense, x, out / "dense.onnx"), "small": to_onnx(small, x, out / "small.onnx"),
            "static": to_onnx(dense, x[:1], out / "static.onnx", dynamic_batch=False)}


def test_result_structure(onnx_pair: dict[str, Path]) -> None:
    res = benchmark({"dense": onnx_pair["dense"], "small": onnx_pair["small"]}, batch_sizes=(1, 4), **FAST)
    assert isinstance(res, BenchResult) and res.baseline == "dense" and res.models == ["dense", "small"]
    assert res.unavailable == {}
    assert [(r.model, r.batch) for r in res.rows] == [("dense", 1), ("small", 1), ("dense", 4), ("small", 4)]
    for r in res.rows:
        assert r.provider == r.ran_on == CPU and not r.cuda_graph and r.iters == 5
        assert 0 < r.median_ms <= r.p90_ms
        assert r.throughput == pytest.approx(r.batch * 1e3 / r.median_ms)
    for batch in (1, 4):
        base, other = res.row("dense", CPU, batch), res.row("small", CPU, batch)
        assert base.speedup == 1.0
        assert other.speedup == pytest.approx(base.median_ms / other.median_ms)
    data = json.loads(res.to_json())
    assert set(data) == {"baseline", "rows", "unavailable", "meta"}
    assert data["meta"]["intra_op_threads"] == 1 and data["meta"]["onnxruntime"] == ort.__version__
    assert len(data["rows"]) == 4 and data["rows"][1]["model"] == "small"
    md = res.to_markdown({"small": {"FLOP ratio": "3.1x"}})
    lines = md.splitlines()
    assert lines[0].startswith("| model | provider | batch |") and "speedup vs dense" in lines[0]
    assert lines[0].rstrip().endswith("FLOP ratio |") and len(lines) == 2 + 4
    assert "| small | CPU | 4 |" in md and "3.1x |" in md
    with pytest.raises(KeyError, match="no row"):
        res.row("dense", CUDA, 1)


def test_named_baseline_and_module_input(onnx_pair: dict[str, Path]) -> None:
    torch.manual_seed(0)
    module = small_cnn(width=8).eval()
    res = benchmark({"dense": onnx_pair["dense"], "tiny": module}, batch_sizes=(2,), baseline="tiny",
                    example_inputs=torch.rand(2, 1, 8, 8), **FAST)
    assert res.row("tiny", CPU, 2).speedup == 1.0
    assert res.row("dense", CPU, 2).speedup == pytest.approx(res.row("tiny", CPU, 2).median_ms
                                                             / res.row("dense", CPU, 2).median_ms)


def test_models_are_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(runners, warmup=2, iters=10)
    assert {n: len(t) for n, t in times.items()} == {"a": 10, "b": 10, "c": 10}
    timed = calls[6:]  # after 2 warm-up calls each
    blocks = [timed[i] for i in range(0, len(timed), 5)]  # 2 rounds of 5 iterations per model
    assert blocks == ["a", "b", "c", "b", "c", "a"]  # measured in rounds, order rotated each round


def test_cuda_request_on_this_machine_is_not_mislabelled(onnx_pair: dict[str, Path]) -> None:
    res = benchmark([onnx_pair["dense"]], providers=(CUDA, CPU), batch_sizes=(1,), warmup=1, iters=3,
                    intra_op_threads=1, progress=False)
    assert all(r.ran_on == r.provider for r in res.rows)
    cuda_rows = [r for r in res.rows if r.provider == CUDA]
    if not torch.cuda.is_available():  # no GPU: CUDA must be reported unavailable, the CPU still measured
        assert not cuda_rows
        assert CUDA in res.unavailable and "not measured" in res.to_markdown()
        assert [r.provider for r in res.rows] == [CPU]
    else:  # a GPU machine: the CUDA rows are real CUDA runs
        assert cuda_rows or CUDA in res.unavailable


def test_cuda_silent_fallback_is_detected(onnx_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    def cpu_session(ort_mod, path, provider, **options):
        made.append(provider)  # whatever is asked for, onnxruntime hands back a CPU session
        return ort_mod.InferenceSession(str(path), providers=[CPU])

    monkeypatch.setattr(bench_mod, "ort_session", cpu_session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    res = benchmark([onnx_pair["dense"]], providers=(CUDA, CPU), batch_sizes=(1, 2), warmup=1, iters=2,
                    progress=False)
    assert "fell back to CPUExecutionProvider" in res.unavailable[CUDA]
    assert {r.provider for r in res.rows} == {CPU} and len(res.rows) == 2
    assert made[0] == CUDA


def test_no_gpu_driver_skips_the_noisy_cuda_attempt(onnx_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    made = []
    real = ort.InferenceSession

    def session(path, options=None, providers=None):
        made.append([p[0] if isinstance(p, tuple) else p for p in providers])
        return real(path, options, providers=providers)

    def missing():
        return "no NVIDIA driver on this machine: libcuda.so.1 cannot be loaded"

    monkeypatch.setattr(timing, "gpu_driver_missing", missing)
    monkeypatch.setattr(bench_mod, "gpu_driver_missing", missing)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    res = benchmark([onnx_pair["dense"]], providers=(CUDA, CPU), batch_sizes=(1,), warmup=1, iters=2, progress=False)
    assert made[0] == [CPU]  # the CUDA provider was never handed to onnxruntime
    assert "no NVIDIA driver on this machine" in res.unavailable[CUDA]
    assert [r.provider for r in res.rows] == [CPU]
    assert "onnxruntime" not in capfd.readouterr().err


def test_gpu_driver_check_names_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name):
        raise OSError(f"{name}: cannot open shared object file")

    timing.gpu_driver_missing.cache_clear()
    monkeypatch.setattr(timing.sys, "platform", "linux")
    monkeypatch.setattr(timing.ctypes, "CDLL", fail)
    try:
        assert timing.gpu_driver_missing() == "no NVIDIA driver on this machine: libcuda.so.1 cannot be loaded"
        timing.gpu_driver_missing.cache_clear()
        monkeypatch.setattr(timing.ctypes, "CDLL", lambda name: object())
        assert timing.gpu_driver_missing() is None
        timing.gpu_driver_missing.cache_clear()
        monkeypatch.setattr(timing.sys, "platform", "darwin")
        assert timing.gpu_driver_missing() is None  # no known driver library: onnxruntime decides
    finally:
        timing.gpu_driver_missing.cache_clear()


def test_missing_cuda_provider_is_reported(onnx_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    res = benchmark([onnx_pair["dense"]], providers=(CUDA,), batch_sizes=(1,), cuda_graph="both", **{
        k: v for k, v in FAST.items() if k != "providers"})
    assert res.rows == []
    assert set(res.unavailable) == {CUDA, CUDA + "+cuda_graph"}
    assert "get_available_providers" in res.unavailable[CUDA] and "onnxruntime-gpu" in res.unavailable[CUDA]
    assert "(nothing measured)" in res.to_markdown()


def test_argument_validation(onnx_pair: dict[str, Path], tmp_path: Path) -> None:
    p = onnx_pair["dense"]
    with pytest.raises(ValueError, match="batch_sizes"):
        benchmark([p], batch_sizes=(0,), providers=(CPU,))
    with pytest.raises(ValueError, match="iters"):
        benchmark([p], iters=0, providers=(CPU,))
    with pytest.raises(ValueError, match="cuda_graph"):
        benchmark([p], cuda_graph="sometimes", providers=(CPU,))
    with pytest.raises(ValueError, match="providers"):
        benchmark([p], providers=CPU)
    with pytest.raises(ValueError, match="baseline 'x'"):
        benchmark([p], baseline="x", **FAST)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        benchmark([tmp_path / "missing.onnx"], **FAST)
    with pytest.raises(ValueError, match="example_inputs="):
        benchmark({"m": nn.Linear(2, 2)}, **FAST)
    with pytest.raises(ValueError, match="names must be unique"):
        benchmark([p, p], **FAST)
    with pytest.raises(ValueError, match="fixed batch size 1.*dynamic_batch=True"):
        benchmark([onnx_pair["static"]], batch_sizes=(4,), **FAST)


def test_onnxruntime_missing_names_the_extra(onnx_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install "cstar-fx\[onnx\]"'):
        benchmark([onnx_pair["dense"]], **FAST)


def test_cli_bench_files(onnx_pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, md = tmp_path / "out" / "b.json", tmp_path / "out" / "b.md"
    code = main(["bench", str(onnx_pair["dense"]), str(onnx_pair["small"]), "--providers", CUDA, CPU,
                 "--batch-sizes", "1", "3", "--warmup", "1", "--iters", "3", "--threads", "1", "--no-progress",
                 "--json", str(js), "--markdown", str(md)])
    text = capsys.readouterr().out
    assert code == 0, text
    data = json.loads(js.read_text())
    assert {(r["model"], r["batch"]) for r in data["rows"]} == {("dense", 1), ("small", 1), ("dense", 3), ("small", 3)}
    assert all(r["ran_on"] == r["provider"] for r in data["rows"])
    assert md.read_text().startswith("| model |") and "| small |" in text


def test_cli_bench_usage_errors(onnx_pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert main(["bench", str(onnx_pair["dense"]), "--ratio", "8"]) == 2
    assert main(["bench", str(onnx_pair["dense"]), "--batch-sizes", "0", "--providers", CPU]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare" in err and "not both" in err and "batch_sizes" in err


def test_cli_bench_model_dense_vs_compressed(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--model", "resnet18", "--ratio", "8", "--providers", CPU, "--batch-sizes", "1",
                 "--warmup", "0", "--iters", "2", "--threads", "1", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "| dense | CPU | 1 |" in text and "| cstar 8x | CPU | 1 |" in text
    assert "8.00x |" in text  # the params-ratio column of the compressed row
    assert text.count("onnxruntime vs torch") == 2  # both exports were verified


def test_iobinding_runner_matches_plain_run(onnx_pair: dict[str, Path]) -> None:
    # The CUDA path binds inputs/outputs once at fixed addresses; "cpu" runs the same code without a GPU.
    session = ort.InferenceSession(str(onnx_pair["small"]), providers=[CPU])
    feeds = bench_mod._feeds(session, 3, None, 0, "small")
    plain = OrtRunner(ort, session, feeds, 3, None, False)
    bound = OrtRunner(ort, session, feeds, 3, "cpu", cuda_graph=True)
    assert set(bound.device_outputs) == {"output"}  # output preallocated from the graph's symbolic shape
    bound()
    plain()
    (got,), (ref,) = bound.outputs(), plain.outputs()
    assert got.shape == (3, 10)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref))
