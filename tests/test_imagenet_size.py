"""ImageNet-size models at 224x224 (random weights): transform, then ONNX export checked with onnxruntime.

The full resnet50 and vit_b_16 cases are the slow tier (``-m slow``; CI still runs them): most of their
time is the factorization itself (one SVD per layer), not the export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision

import cstar_fx
from cstar_fx.allocate import UnreachableBudgetError
from cstar_fx.export import to_onnx

SIZE = 224


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _random_head(vit: torchvision.models.VisionTransformer) -> torchvision.models.VisionTransformer:
    # torchvision zero-initialises the classifier: every output would be 0 and any two models would "agree"
    with torch.no_grad():
        vit.heads.head.weight.normal_(0.0, 0.02)
        vit.heads.head.bias.normal_(0.0, 0.02)
    return vit.eval()


def _vit_b_16_width(num_layers: int) -> torchvision.models.VisionTransformer:
    """vit_b_16's shape (patch 16, width 768, 12 heads, MLP 3072, 1000 classes) at a chosen depth."""
    torch.manual_seed(0)
    return _random_head(torchvision.models.VisionTransformer(SIZE, 16, num_layers=num_layers, num_heads=12,
                                                             hidden_dim=768, mlp_dim=3072))


def _check_onnx(gm: torch.nn.Module, path: Path) -> None:
    """Export with cstar_fx.export.to_onnx (which checks ORT at batch 1 and 2), then check independently:
    onnxruntime on a fresh image agrees with torch, and the file holds the compressed weights."""
    to_onnx(gm, _image(1), path)
    x = _image(2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = gm(x).numpy()
    assert got.shape == want.shape == (1, 1000)
    assert np.abs(want).max() > 1e-3  # a non-trivial output, so agreement means something
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert stored <= 1.01 * cstar_fx.get_report(gm).params


def _transform(model: nn.Module, ratio: float, **options) -> torch.fx.GraphModule:
    gm = cstar_fx.transform(model, ratio=ratio, example_inputs=_image(0), **options)
    report = cstar_fx.get_report(gm)
    assert report.ratio_params == pytest.approx(ratio, rel=0.02)
    assert report.ratio_flops > 1
    with torch.no_grad():
        out = gm(_image(3))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    return gm


@pytest.fixture(scope="module")
def resnet50_8x() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return _transform(torchvision.models.resnet50().eval(), 8)


@pytest.fixture(scope="module")
def vit_b_16_4x() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return _transform(_random_head(torchvision.models.vit_b_16()), 4, unpack_attention=True)


def test_resnet18_224():
    torch.manual_seed(0)
    gm = _transform(torchvision.models.resnet18().eval(), 8)
    plan = cstar_fx.get_plan(gm)
    assert plan.layers["layer4.1.conv2"].scheme == "tucker2"


@pytest.mark.slow
def test_resnet50_224(resnet50_8x):
    plan = cstar_fx.get_plan(resnet50_8x)
    assert plan.layers["layer3.0.conv2"].scheme == "tucker2" and plan.layers["fc"].kind == "linear"


@pytest.mark.slow
def test_resnet50_224_onnx(resnet50_8x, tmp_path):
    _check_onnx(resnet50_8x, tmp_path / "resnet50_8x.onnx")


@pytest.mark.slow
def test_vit_b_16_224(vit_b_16_4x):
    plan = cstar_fx.get_plan(vit_b_16_4x)
    attention = [n for n, lp in plan.factorized.items() if ".self_attention." in n]
    assert len(attention) == 12 * 4  # q/k/v/out in each of the 12 blocks
    assert not plan.unsupported


@pytest.mark.slow
def test_vit_b_16_224_onnx(vit_b_16_4x, tmp_path):
    _check_onnx(vit_b_16_4x, tmp_path / "vit_b_16_4x.onnx")


def test_vit_b_16_width_needs_unpacked_attention_beyond_3x():
    vit = _vit_b_16_width(num_layers=2)
    with pytest.raises(UnreachableBudgetError):
        cstar_fx.plan_ranks(vit, ratio=4)  # the packed attention projections stay dense
    plan = cstar_fx.plan_ranks(vit, ratio=4, unpack_attention=True)
    assert plan.ratio_params == pytest.approx(4, rel=0.02)


def test_vit_b_16_width_reduced_depth_onnx(tmp_path):
    gm = _transform(_vit_b_16_width(num_layers=2), 4, unpack_attention=True)
    _check_onnx(gm, tmp_path / "vit_2layers_4x.onnx")
