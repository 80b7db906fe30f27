"""torch.export graphs: ``transform`` / ``plan_ranks`` on ``torch.export.export(model, args).module()``.

Those GraphModules are aten-level: conv and linear layers are ``aten.conv2d`` / ``aten.linear`` calls on
``get_attr`` parameters, next to in-place ops and a ``_guards_fn`` input check. vit_b_16 itself needs
224x224 inputs and 86M parameters (about a minute per export on 2 CPU cores), so the ViT case is a small
torchvision ``VisionTransformer``: the same class and code path (packed in_proj, out_proj, MLP, conv stem).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import cstar_fx
from cstar_fx import RankPlan
from cstar_fx.passes.discover import find_layers

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from cstar_fx.export import export_onnx  # noqa: E402


def _small_vit() -> nn.Module:
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                            num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.05)  # torchvision zero-inits the head: outputs would be all zero
    return vit


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vit": _small_vit,
}


def _export(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch")
    return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)).module()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_model_exact_budget_and_onnx(name: str, tmp_path: Path) -> None:
    model = MODELS[name]().double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    gm = _export(model, x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    n_nodes = len(gm.graph.nodes)

    full = cstar_fx.transform(gm, plan=RankPlan.full_rank(gm))
    with torch.no_grad():
        ref = model(x)
        assert _max_err(full(x), ref) < 1e-9
    assert any(n.op == "call_module" and n.target.endswith("_factors.reduce") for n in full.graph.nodes)

    ratio = 4
    small = cstar_fx.transform(gm, ratio=ratio)
    report = cstar_fx.get_report(small)
    assert report.ratio_params >= ratio * 0.98
    plan = cstar_fx.plan_ranks(gm, ratio=ratio)
    assert plan.ratio_params == pytest.approx(report.ratio_params)

    # the user's exported module is untouched
    assert len(gm.graph.nodes) == n_nodes
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())

    small = small.float()
    result = export_onnx(small, x[:2].float(), tmp_path / f"{name}.onnx")
    assert result.verification.passed


def test_sites_are_named_after_their_weights_and_depthwise_stays_dense() -> None:
    gm = _export(torchvision.models.mobilenet_v2(num_classes=10), torch.rand(2, 3, 32, 32))
    sites, unsupported = find_layers(gm)
    names = {s.name for s in sites}
    assert {"features.0.0.weight", "classifier.1.weight"} <= names
    assert all(s.form == "function" for s in sites)
    assert unsupported["features.1.conv.0.0.weight"] == "grouped conv (groups=32) stays dense"
    stride2 = next(s for s in sites if s.name == "features.0.0.weight")
    assert stride2.stride == (2, 2) and stride2.padding == (1, 1)
    gm8 = cstar_fx.transform(gm, ratio=4, skip=("classifier.*",))
    assert cstar_fx.get_plan(gm8).layers["classifier.1.weight"].scheme == "dense"


def test_vit_attention_projections_are_plain_linears_in_an_exported_graph() -> None:
    gm = _export(_small_vit(), torch.rand(2, 3, 32, 32))
    sites, _ = find_layers(gm)
    by_name = {s.name: s for s in sites}
    in_proj = by_name["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    assert in_proj.kind == "linear" and in_proj.weight_shape == (192, 64)
    assert "conv_proj.weight" in by_name


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c1 = nn.Conv1d(4, 4, 1)
        self.same = nn.Conv2d(4, 6, 3, padding="same")
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)
        z = self.c1(y.flatten(2)).reshape(y.shape)
        return self.grouped(self.same(z))


def test_unsupported_aten_convs_are_reported_and_same_padding_is_exact() -> None:
    model = _Odd().double().eval()
    x = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).module()
    plan = RankPlan.full_rank(gm)
    reasons = list(plan.unsupported.values())
    assert "conv_transpose2d is not supported" in reasons and "conv1d is not supported" in reasons
    assert "grouped conv" in plan.unsupported["grouped.weight"]
    assert list(plan.factorized) == ["same.weight"]
    full = cstar_fx.transform(gm, plan=plan)
    with torch.no_grad():
        assert _max_err(full(x), model(x)) < 1e-9


def test_decomposed_graph_convolution_is_found() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).double().eval()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).run_decompositions().module()
    assert any(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes)
    full = cstar_fx.transform(gm, plan=RankPlan.full_rank(gm))
    assert len(cstar_fx.get_plan(full).factorized) == 2
    with torch.no_grad():
        assert _max_err(full(x), model(x)) < 1e-9


def test_dense_exported_module_exports_to_onnx(tmp_path: Path) -> None:
    x = torch.rand(2, 3, 32, 32)
    gm = _export(torchvision.models.resnet18(num_classes=10), x)
    assert export_onnx(gm, x, tmp_path / "dense.onnx").verification.passed
