"""Tracing options: autowrap_functions, timm's not-traced registry, TraceError advice at the root, torch.compile input,
and a handful of timm architectures (when timm is installed)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx import CstarConfig, RankPlan, TraceError, get_report, plan_ranks, transform
from toy_nets import ValueBranch

trace_module = sys.modules["cstar_fx.passes.trace"]


def gate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x if x.sum() > 0 else y  # data-dependent control flow: fx cannot trace into this


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gate(self.fc1(x), x))


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_autowrap_functions_make_a_helper_one_node_and_stay_exact():
    torch.manual_seed(0)
    model = Gated().double().eval()
    with pytest.raises(TraceError):
        transform(model, 2)
    gm = transform(model, 2, autowrap_functions=(gate,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [gate]
    assert get_report(gm).ratio_params >= 2
    full = transform(model, plan=RankPlan.full_rank(model, autowrap_functions=gate), autowrap_functions=gate)
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(full(x), model(x), atol=1e-10)
        assert torch.allclose(full(-x.abs() - 1), model(-x.abs() - 1), atol=1e-10)  # the other branch, at run time
    assert list(plan_ranks(model, 2, autowrap_functions=[gate]).layers) == ["fc1", "fc2"]


def test_autowrap_functions_is_a_config_field():
    cfg = CstarConfig(ratio=4, autowrap_functions=gate)
    assert cfg.autowrap_functions == (gate,)
    assert cfg.replace(ratio=2).autowrap_functions == (gate,)
    for bad in ("gate", ["gate"], (Gated,), 3):
        with pytest.raises(TypeError, match=r"autowrap_functions entries must be functions .*autowrap_functions=\("):
            CstarConfig(autowrap_functions=bad)


def test_root_trace_error_names_the_function_and_a_fix_that_works():
    with pytest.raises(TraceError) as info:
        transform(Gated(), 2)
    message = str(info.value)
    assert "the top-level module (Gated), in gate at test_trace_options.py" in message
    assert "autowrap_functions=(gate,)" in message
    assert "leaf_modules=(''" not in message  # the root cannot be a leaf of itself


def test_root_trace_error_in_forward_suggests_concrete_args_or_autowrap():
    with pytest.raises(TraceError) as info:
        transform(ValueBranch(), 2)
    message = str(info.value)
    assert "the top-level module (ValueBranch), in ValueBranch.forward at" in message
    assert "concrete_args=" in message and "autowrap_functions=" in message
    assert "leaf_modules" not in message


def test_nested_trace_error_still_suggests_a_leaf():
    model = nn.Sequential(nn.Linear(64, 64), Gated())
    with pytest.raises(TraceError, match=r"(?s)module '1' \(Gated\), in gate .*autowrap_functions=\(gate,\).*"
                                         r"leaf_modules=\('1',\)"):
        transform(model, 2)


def test_torch_compile_wrapper_is_unwrapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    compiled = torch.compile(model)
    gm = transform(compiled, 2)
    assert get_report(gm).ratio_params >= 2
    assert list(plan_ranks(compiled, 2).layers) == ["0", "2"]
    full = transform(compiled, plan=RankPlan.full_rank(model))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(full(x), model(x), atol=1e-5)
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in model.modules())  # untouched


def _fake_timm(monkeypatch, functions, modules):
    """A stand-in for timm's not-traced registry (the getters timm >= 1.0.17 has in timm.layers)."""
    timm = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    layers.get_notrace_functions = lambda: list(functions)
    layers.get_notrace_modules = lambda: list(modules)
    timm.layers = layers
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.layers", layers)


def test_timm_registry_is_used_when_timm_is_loaded(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), Gated(), Opaque())
    _fake_timm(monkeypatch, [gate], [Opaque])
    gm = transform(model, 2)
    assert gate in [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert "2" in [n.target for n in gm.graph.nodes if n.op == "call_module"]  # Opaque called as a leaf
    assert trace_module.timm_notrace() == ((gate,), (Opaque,))


def test_timm_registry_is_empty_without_timm(monkeypatch):
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    assert trace_module.timm_notrace() == ((), ())


# --- real timm models (random init), when timm is installed -------------------------------------------------------

TIMM_MODELS = [  # (name, create_model kwargs, input size): small enough for a 2-core CPU
    ("resnet10t", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32),
    ("crossvit_tiny_240", {"img_size": 120}, 120),  # traces only with timm's notrace functions (scale_image)
]


@pytest.mark.parametrize("name,kwargs,size", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_model_exact_at_full_rank_and_hits_budget(name, kwargs, size):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'cstar-fx[timm]')")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    gm = transform(model, 4, round_to=4)
    assert get_report(gm).ratio_params >= 4
    full = transform(model, plan=RankPlan.full_rank(model))
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(full(x), ref, atol=1e-4 * ref.abs().max().item() + 1e-5)
        assert gm(x).shape == ref.shape


def test_timm_crossvit_needs_the_registry_and_the_error_says_so(monkeypatch):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'cstar-fx[timm]')")
    model = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=10, img_size=120).eval()
    monkeypatch.setattr(trace_module, "timm_notrace", lambda: ((), ()))
    with pytest.raises(TraceError, match=r"(?s)in scale_image at crossvit\.py.*autowrap_functions=\(scale_image,\)"):
        plan_ranks(model, 4)
    from timm.models.crossvit import scale_image

    assert plan_ranks(model, 4, autowrap_functions=(scale_image,)).ratio_params >= 4


def test_timm_model_exports_to_onnx(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'cstar-fx[timm]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cstar-fx[onnx]')")
    from cstar_fx.export import export_onnx

    torch.manual_seed(0)
    gm = transform(timm.create_model("resnet10t", pretrained=False, num_classes=10).eval(), 4, round_to=4)
    export_onnx(gm, torch.randn(1, 3, 32, 32), tmp_path / "resnet10t_4x.onnx")  # raises unless ORT agrees
    assert (tmp_path / "resnet10t_4x.onnx").stat().st_size > 0


def test_save_and_load_with_autowrap_functions(tmp_path):
    torch.manual_seed(0)
    model = Gated().eval()
    gm = transform(model, 2, autowrap_functions=(gate,))
    path = cstar_fx.save(gm, tmp_path / "gated.safetensors")
    loaded = cstar_fx.load(path, model=model, autowrap_functions=(gate,))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_leaf_pattern_matching_nothing_is_refused_with_the_names():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.ReLU())
    with pytest.raises(ValueError, match=r"match no submodule.*'0', '0\.0', '1'"):
        cstar_fx.transform(model, 2, leaf_modules=("blocks.*",))


def test_leaf_glob_matches_timm_style_names():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Sequential(nn.Linear(8, 8))
            self.mlp = nn.Linear(8, 8)

        def forward(self, x):
            return self.mlp(self.attn(x))

    model = nn.Sequential()
    model.add_module("blocks", nn.Sequential(Block(), Block()))
    gm = trace_module.trace(model, leaf_modules=("blocks.*.attn",))
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    # the attention blocks called opaquely (traced into, they would show as 'blocks.0.attn.0')
    assert called == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
