"""int8 on top of low rank: onnxruntime static QDQ quantization (cstar_fx.export.quantize_int8) and evaluate_onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx.cli import main

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("onnxscript")
from cstar_fx.export import Int8AgreementError, evaluate_onnx, quantize_int8, to_onnx  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 128), nn.ReLU(),
                         nn.Linear(128, 10)).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g)


@pytest.fixture(scope="module")
def float_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _net()
    path = tmp_path_factory.mktemp("q") / "float.onnx"
    return model, to_onnx(model, _images(2, 0), path)


def test_quantized_model_agrees_and_is_smaller(float_file, tmp_path: Path) -> None:
    model, path = float_file
    before = path.read_bytes()
    q = quantize_int8(path, _images(200, 1), tmp_path / "int8.onnx", check_images=_images(300, 2))
    assert q.path.is_file() and q.float_path == path and path.read_bytes() == before
    assert q.n_calibration == 200 and q.n_checked == 300
    assert q.agreement >= 0.9
    assert q.int8_bytes < q.float_bytes / 2.5
    assert "int8 (QDQ, per-channel, 200 calibration images)" in str(q)
    import onnx

    ops = {n.op_type for n in onnx.load(str(q.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_factorized_module_quantizes(tmp_path: Path) -> None:
    gm = cstar_fx.transform(_net(), ratio=2)
    calib = [(_images(64, s), torch.zeros(64, dtype=torch.long)) for s in range(3, 7)]  # (images, labels) batches
    q = quantize_int8(gm, calib, tmp_path / "lowrank_int8.onnx", num_calibration=128, check_images=_images(200, 9))
    assert q.float_path is None and q.n_calibration == 128
    assert q.agreement >= 0.9


def test_evaluate_onnx_clean_noise_and_transferred_pgd(float_file, tmp_path: Path) -> None:
    model, path = float_file
    x = _images(64, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    clean = evaluate_onnx(path, (x, y), attack_from=model, eps=0.0, pgd_steps=2)
    assert clean.clean == 1.0 and clean.pgd == 1.0 and clean.noise == 1.0  # eps 0: nothing moves
    q = quantize_int8(path, _images(128, 1), tmp_path / "int8.onnx")
    ev = evaluate_onnx(q.path, (x, y), attack_from=model, eps=8 / 255, pgd_steps=3)
    assert 0.0 <= ev.pgd <= 1.0 and 0.0 <= ev.noise <= 1.0 and ev.n == 64
    assert ev.pgd_label == "PGD-3 transferred from the float model"
    assert evaluate_onnx(q.path, (x, y), noise=False).pgd is None


def test_bad_inputs_have_clear_errors(float_file, tmp_path: Path) -> None:
    _, path = float_file
    out = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match=r"calibration images have shape \(8, 3, 16, 16\), the model takes Nx3x12x12"):
        quantize_int8(path, torch.rand(8, 3, 16, 16), out)
    with pytest.raises(ValueError, match="must end in .onnx"):
        quantize_int8(path, _images(8, 0), tmp_path / "int8.bin")
    with pytest.raises(FileNotFoundError, match="export one with cstar_fx.export.to_onnx"):
        quantize_int8(tmp_path / "missing.onnx", _images(8, 0), out)
    with pytest.raises(ValueError, match="is the float model itself"):
        quantize_int8(path, _images(8, 0), path)
    with pytest.raises(ValueError, match="empty"):
        quantize_int8(path, [], out)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8(path, torch.full((4, 3, 12, 12), float("nan")), out)
    with pytest.raises(TypeError, match="float in \\[0, 1\\] or uint8"):
        quantize_int8(path, torch.ones(4, 3, 12, 12, dtype=torch.int32), out)
    with pytest.raises(TypeError, match="calibration data must be images"):
        quantize_int8(path, "images.npy", out)
    with pytest.raises(ValueError, match="num_calibration must be an int >= 1"):
        quantize_int8(path, _images(8, 0), out, num_calibration=0)
    with pytest.raises(ValueError, match="min_agreement must be a number in"):
        quantize_int8(path, _images(8, 0), out, min_agreement=2)
    assert not out.exists()
    with pytest.raises(ValueError, match="eps must be a finite number"):
        evaluate_onnx(path, (_images(4, 0), torch.zeros(4, dtype=torch.long)), eps=float("nan"))
    with pytest.raises(TypeError, match="TensorData or an \\(images, labels\\) pair"):
        evaluate_onnx(path, _images(4, 0))


def test_min_agreement_raises_with_the_numbers(float_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cstar_fx.export import quantize as quantize_mod

    real_run = quantize_mod._run
    calls = []

    def shuffled(session, name, images, batch_size):  # the second run is the int8 model: make it disagree
        out = real_run(session, name, images, batch_size)
        calls.append(1)
        return np.roll(out, 1, axis=-1) if len(calls) == 2 else out

    monkeypatch.setattr(quantize_mod, "_run", shuffled)
    _, path = float_file
    with pytest.raises(Int8AgreementError, match=r"same class on 0.0% of 32 images.*below min_agreement=0.9\. Calibr"
                       ) as info:
        quantize_int8(path, _images(32, 0), tmp_path / "int8.onnx", min_agreement=0.9)
    assert isinstance(info.value, AssertionError) and info.value.result.agreement == 0.0


def test_cli_export_int8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "calib.npy"
    np.save(calib, (np.random.default_rng(0).random((48, 3, 32, 32)) * 255).astype(np.uint8))
    out = tmp_path / "r18.onnx"
    code = main(["export", "--model", "resnet18", "--ratio", "8", "--int8", "--calib-data", str(calib),
                 "--calib-samples", "32", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file() and (tmp_path / "r18.fp32.onnx").is_file()
    assert out.stat().st_size < (tmp_path / "r18.fp32.onnx").stat().st_size / 2.5
    assert "int8 (QDQ, per-channel, 32 calibration images) vs float" in text


@pytest.mark.parametrize("argv, message", [
    (["--int8"], "--int8 needs --calib-data FILE"),
    (["--calib-data", "x.npy"], "--calib-data and --min-agreement go with --int8"),
    (["--int8", "--calib-data", "missing.npy"], "--calib-data: no file at missing.npy"),
    (["--int8", "--dtype", "float16", "--calib-data", "x.npy"], "drop --dtype float16"),
    (["--int8", "--calib-data", "x.npy", "--calib-samples", "0"], "must be an integer >= 1"),
    (["--int8", "--calib-data", "x.npy", "--min-agreement", "1.5"],
     "argument --min-agreement: must be a finite number >= 0 and <= 1"),
])
def test_cli_int8_usage_errors(argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    assert main(["export", "--out", str(tmp_path / "m.onnx"), *argv]) == 2
    err = capsys.readouterr()
    text = (err.out + err.err).strip()
    assert message in text and len(text.splitlines()) == 1


def test_cli_int8_wrong_image_size_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 3, 16, 16), dtype=np.float32))
    code = main(["export", "--model", "resnet18", "--int8", "--calib-data", str(calib), "--out",
                 str(tmp_path / "m.onnx")])
    err = capsys.readouterr()
    assert code == 2
    assert "calibration images have shape (4, 3, 16, 16), the model takes Nx3x32x32" in (err.out + err.err)
