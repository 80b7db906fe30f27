"""ONNX export: exporter choice, onnx.checker, onnxruntime-vs-torch agreement, fp16, dynamic batch, errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cstar_fx
from cstar_fx.cli import main
from cstar_fx.export import (
    DEFAULT_TOLERANCES,
    OnnxExportError,
    OnnxMismatchError,
    export_onnx,
    to_onnx,
    verify_onnx,
)
from cstar_fx.models import CIFAR_MEAN, CIFAR_STD, Normalize, cifar_resnet18
from torchvision.models.resnet import BasicBlock


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def small_resnet(num_classes: int = 10) -> nn.Module:
    """A narrow CIFAR-style ResNet (3x3 stem, no max-pool, torchvision BasicBlocks with downsampling)."""
    def block(c_in: int, c_out: int, stride: int) -> BasicBlock:
        down = None
        if stride != 1 or c_in != c_out:
            down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        return BasicBlock(c_in, c_out, stride, down)

    return nn.Sequential(
        Normalize(CIFAR_MEAN, CIFAR_STD),
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        block(32, 32, 1), block(32, 64, 2), block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = small_resnet()
    # Non-trivial batch-norm statistics, so that eval-mode export (BN folded) is actually tested.
    with torch.no_grad():
        model.train()
        model(torch.rand(16, 3, 32, 32))
    return model


@pytest.fixture(scope="module")
def resnet_8x(resnet: nn.Module) -> torch.fx.GraphModule:
    return cstar_fx.transform(resnet, 8, example_inputs=torch.rand(1, 3, 32, 32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, resnet: nn.Module, resnet_8x: torch.fx.GraphModule):
    out = tmp_path_factory.mktemp("onnx")
    x = torch.rand(2, 3, 32, 32)
    return {
        "dense": export_onnx(resnet, x, out / "dense.onnx"),
        "8x": export_onnx(resnet_8x, x, out / "8x.onnx"),
        "8x16": export_onnx(resnet_8x, x, out / "8x16.onnx", dtype="float16"),
    }


def test_dense_resnet_agrees_with_torch(exported, resnet: nn.Module) -> None:
    e = exported["dense"]
    assert e.exporter == "dynamo" and e.fallback_reason is None
    onnx.checker.check_model(str(e.path))
    v = e.verification
    assert v.passed and v.dtype == "float32"
    assert v.max_abs <= 1e-4 * max(1.0, v.ref_scale)
    assert v.batch_sizes == (2, 3)  # dynamic batch is checked at a second size too


def test_export_restores_training_flags_and_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    model.train()
    model[1].eval()  # a mixed state must come back exactly as it was
    stats = model[1].running_mean.clone()
    to_onnx(model, torch.rand(2, 3, 8, 8), tmp_path / "m.onnx")
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert torch.equal(model[1].running_mean, stats)


def test_dynamic_batch_runs_at_two_sizes(exported, resnet: nn.Module, resnet_8x: torch.fx.GraphModule) -> None:
    for key, model in (("dense", resnet), ("8x", resnet_8x)):
        path = exported[key].path
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch axis
        with torch.no_grad(), cstar_fx.passes.shapes.eval_mode(model):
            for batch in (1, 5):
                x = torch.rand(batch, 3, 32, 32)
                got = _ort_run(path, x)
                ref = model(x).numpy()
                assert got.shape == (batch, 10)
                np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_static_batch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 3))
    path = to_onnx(model, torch.rand(4, 6), tmp_path / "static.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 6]


def test_transformed_resnet_fp32_tight(exported, resnet_8x: torch.fx.GraphModule) -> None:
    e = exported["8x"]
    assert e.exporter == "dynamo"
    assert e.verification.passed
    assert e.verification.max_rel < 1e-5
    # The factors are real ONNX layers: more Conv nodes, and far fewer weights, than the dense export.
    convs = {k: sum(n.op_type == "Conv" for n in onnx.load(str(exported[k].path)).graph.node) for k in ("dense", "8x")}
    assert convs["8x"] > convs["dense"]
    n_factorized = len(cstar_fx.get_plan(resnet_8x).factorized)
    assert convs["8x"] >= convs["dense"] + n_factorized  # each factorized conv adds at least one conv
    assert exported["8x"].path.stat().st_size < exported["dense"].path.stat().st_size / 5


def test_transformed_resnet_fp16_loose(exported) -> None:
    e16, e32 = exported["8x16"], exported["8x"]
    assert e16.dtype == "float16" and e16.verification.dtype == "float16"
    v = e16.verification
    assert v.passed and v.atol == DEFAULT_TOLERANCES["float16"][0]
    assert v.max_rel < 1e-2
    assert v.max_abs > e32.verification.max_abs  # it really computes in half precision
    model = onnx.load(str(e16.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # IO stays float32
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert conv_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_weights)
    assert e16.path.stat().st_size < 0.75 * e32.path.stat().st_size


class FunctionalNet(nn.Module):
    """Weights as bare parameters, used through F.conv2d / F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(64, 32, 3, 3) * 0.06)
        self.w3 = nn.Parameter(torch.randn(10, 64) * 0.1)
        self.b3 = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, None, stride=2, padding=1))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, self.w3, self.b3)


def test_functional_model_transformed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FunctionalNet()
    x = torch.rand(2, 3, 16, 16)
    gm = cstar_fx.transform(model, 2, example_inputs=x[:1])
    assert cstar_fx.get_plan(gm).factorized  # something was factorized in functional form
    assert any(name.endswith("_factors") for name, _ in gm.named_children())
    e = export_onnx(gm, x, tmp_path / "functional.onnx")
    assert e.verification.passed and e.verification.max_rel < 1e-5
    with torch.no_grad():
        np.testing.assert_allclose(_ort_run(e.path, x[:1]), gm(x[:1]).numpy(), atol=1e-5, rtol=1e-4)


def test_mismatch_raises_with_numbers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, other = nn.Linear(5, 3), nn.Linear(5, 3)
    path = to_onnx(model, torch.rand(2, 5), tmp_path / "lin.onnx")
    with pytest.raises(OnnxMismatchError, match="max abs error") as info:
        verify_onnx(path, other, torch.rand(2, 5))
    assert not info.value.verification.passed and info.value.verification.max_abs > 1e-3
    v = verify_onnx(path, other, torch.rand(2, 5), raise_on_mismatch=False)
    assert not v.passed
    # The caller's tolerance decides: a huge one accepts the same difference.
    assert verify_onnx(path, other, torch.rand(2, 5), atol=100.0).passed


class Branchy(nn.Module):
    """A data-dependent branch: torch.export refuses it, the TorchScript tracer records one path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if y.sum() > -1e9:
            return y * 2
        return y


def test_fallback_to_torchscript_warns(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = export_onnx(Branchy(), torch.rand(2, 4), tmp_path / "branchy.onnx")
    assert e.exporter == "torchscript" and e.fallback_reason
    assert e.verification.passed
    assert any(issubclass(w.category, RuntimeWarning) and "falling back to the TorchScript exporter" in str(w.message)
               for w in caught)


@torch.library.custom_op("cstar_fx_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _opaque(x) + 1


def test_both_exporters_fail_names_the_op(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="falling back"), pytest.raises(OnnxExportError) as info:
        export_onnx(Opaque(), torch.rand(2, 4), tmp_path / "opaque.onnx")
    assert info.value.op == "cstar_fx_test::opaque"
    assert "'cstar_fx_test::opaque'" in str(info.value)


def test_onnx_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "cstar-fx\[onnx\]"'):
        to_onnx(nn.Linear(2, 2), torch.rand(1, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_import_works_without_onnx() -> None:
    code = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'onnxscript', 'onnxconverter_common'): sys.modules[m] = None\n"
        "import cstar_fx, cstar_fx.export as e\n"
        "import torch\n"
        "try:\n"
        "    e.benchmark(['x.onnx'], providers=('CPUExecutionProvider',))\n"
        "except ImportError as exc:\n"
        "    print('ERR', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'ERR' in out.stdout and 'pip install "cstar-fx[onnx]"' in out.stdout


def test_argument_validation(tmp_path: Path) -> None:
    lin, x = nn.Linear(2, 2), torch.rand(1, 2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        to_onnx(lin, x, tmp_path / "m.onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        to_onnx(lin, x, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_onnx(lambda t: t, x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="atol must be"):
        to_onnx(lin, x, tmp_path / "m.onnx", atol=-1.0)
    with pytest.raises(TypeError, match="example_inputs"):
        to_onnx(lin, [1.0, 2.0], tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="to_onnx"):
        verify_onnx(tmp_path / "missing.onnx", lin, x)


def test_cli_export_compressed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    plan = cstar_fx.plan_ranks(cifar_resnet18(), 8)
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = tmp_path / "r18.onnx"
    code = main(["export", "--plan", str(tmp_path / "plan.json"), "--out", str(out), "--dtype", "float16"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file()
    assert "8.00x fewer params" in text and "max abs error" in text and ": ok" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.random.rand(3, 3, 32, 32).astype(np.float32)})[0].shape == (3, 10)


def test_cli_export_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--model", "nope", "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--ratio", "0.5", "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--plan", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "no file at" in err
    assert "--ratio" in err and "> 1" in err


class FixedBatch(nn.Module):
    """Hard-codes batch size 2 in a reshape: a dynamic batch axis cannot work."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(2, 8)).reshape(x.shape[0], 3)


def test_model_with_fixed_batch_is_caught(tmp_path: Path) -> None:
    with pytest.raises(cstar_fx.ExampleInputError, match="batch size 3.*dynamic_batch=False"):
        export_onnx(FixedBatch(), torch.rand(2, 8), tmp_path / "fixed.onnx")
    e = export_onnx(FixedBatch(), torch.rand(2, 8), tmp_path / "fixed.onnx", dynamic_batch=False)
    assert e.verification.passed and e.verification.batch_sizes == (2,)
