"""Torch-Pruning interop: factorize then prune, prune then factorize, and the prune_to_ratio baseline."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import cstar_fx
from cstar_fx.models import build_model
from cstar_fx.passes.factorize import dense_weight
from cstar_fx.passes.prune import derive_plan, output_layers, protected_layers, prune_to_ratio

tp = pytest.importorskip("torch_pruning")

MODELS = {
    # name: (builder, example input shape, classes)
    "cifar_resnet18": (lambda: build_model("resnet18", stem="cifar"), (2, 3, 32, 32), 10),
    "tv_resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64), 1000),
}


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    """(model, x, classes, 4x transform of the model); the model is never modified by the tests."""
    torch.manual_seed(0)
    build, shape, classes = MODELS[request.param]
    model = build().eval()
    x = torch.rand(shape)
    gm = cstar_fx.transform(model, ratio=4, example_inputs=x).eval()
    return model, x, classes, gm


def _tp_prune(model, x, ratio, ignored, round_to=8):
    pruner = tp.pruner.BasePruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return model.eval()


def _assert_plan_matches(gm, plan):
    """Every layer of the plan has exactly the shapes, ranks and parameter counts of gm's modules."""
    for name, lp in plan.layers.items():
        if lp.factorized:
            path = f"{lp.param}_factors" if lp.name == lp.param else lp.name
            seq = gm.get_submodule(path)
            assert tuple(dense_weight(seq).shape) == lp.weight_shape, name
            if lp.scheme == "tucker2":
                assert lp.ranks == (seq.core.out_channels, seq.core.in_channels) == (seq.expand.in_channels,
                                                                                   seq.reduce.out_channels), name
            else:
                assert lp.ranks == (seq.reduce.weight.shape[0],) == (seq.expand.weight.shape[1],), name
            assert lp.params == _count(seq), name
        else:
            mod = gm.get_submodule(lp.name)
            assert tuple(mod.weight.shape) == lp.weight_shape, name
            assert lp.params == lp.dense_params == _count(mod), name
    assert plan.params == _count(gm)


def _assert_onnx_agrees(model, x, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": x.numpy()})[0]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_factorize_then_prune_with_protected_ranks(case):
    model, x, classes, gm0 = case
    gm = copy.deepcopy(gm0)
    plan0 = cstar_fx.get_plan(gm)
    assert plan0.factorized
    ignored = protected_layers(gm) + output_layers(gm, x)
    _tp_prune(gm, x, 0.25, ignored)
    plan = derive_plan(gm)
    _assert_plan_matches(gm, plan)
    # ranks exactly as planned, yet the network's own channels were pruned around them
    assert {n: lp.ranks for n, lp in plan.factorized.items()} == {n: lp.ranks for n, lp in plan0.factorized.items()}
    changed = [n for n, lp in plan.layers.items() if lp.weight_shape != plan0.layers[n].weight_shape]
    assert len(changed) >= len(plan.layers) // 2
    # the factorized layers' own output channels (the expand factors: residual stream, next inputs) shrank
    assert any(lp.weight_shape[0] < plan0.layers[n].weight_shape[0] for n, lp in plan.factorized.items())
    assert _count(gm) < _count(gm0)
    assert gm(x).shape == (x.shape[0], classes)


def test_factorize_then_prune_shrinks_ranks(case, tmp_path):
    model, x, classes, gm0 = case
    gm = copy.deepcopy(gm0)
    plan0 = cstar_fx.get_plan(gm)
    _tp_prune(gm, x, 0.3, output_layers(gm, x))
    plan = derive_plan(gm, plan0, example_inputs=x)
    _assert_plan_matches(gm, plan)
    shrunk = [n for n, lp in plan.factorized.items() if any(a < b for a, b in zip(lp.ranks, plan0.layers[n].ranks))]
    assert len(shrunk) >= len(plan.factorized) // 2
    assert all(a <= b for n, lp in plan.factorized.items() for a, b in zip(lp.ranks, plan0.layers[n].ranks))
    assert "pruned after transform" in plan.layers[shrunk[0]].reason
    assert plan.ratio_params > plan0.ratio_params
    assert plan.flops == pytest.approx(cstar_fx.count_flops(gm, x))
    assert plan.ratio_flops > plan0.ratio_flops
    gm.eval()
    assert gm(x).shape == (x.shape[0], classes)
    # the plan survives JSON
    assert cstar_fx.RankPlan.from_json(plan.to_json()) == plan
    _assert_onnx_agrees(gm, x, tmp_path)


def test_derive_plan_layer_flops_match_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    x = torch.rand(2, 3, 16, 16)
    plan = cstar_fx.RankPlan.full_rank(model, example_inputs=x).with_layer("0", scheme="svd", ranks=(8,))
    plan = plan.with_layer("2", scheme="tucker2", ranks=(16, 16)).with_layer("5", scheme="svd", ranks=(8,))
    gm = cstar_fx.transform(model, plan=plan)
    _tp_prune(gm, x, 0.4, output_layers(gm, x), round_to=None)
    plan = derive_plan(gm, example_inputs=x)
    captured = {}
    hooks = [gm.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: captured.setdefault(n, a[0]))
             for n in ("0.reduce", "2.reduce", "5.reduce")]
    gm(x)
    for h in hooks:
        h.remove()
    for name in ("0", "2", "5"):
        assert plan.layers[name].flops == cstar_fx.count_flops(gm.get_submodule(name), captured[f"{name}.reduce"])


def test_derive_plan_is_identity_before_pruning(case):
    _, x, _, gm = case
    plan0, plan = cstar_fx.get_plan(gm), derive_plan(gm, example_inputs=x)
    assert plan.layers == plan0.layers
    assert (plan.params, plan.cost) == (plan0.params, plan0.cost)
    assert plan.flops == pytest.approx(plan0.flops)


def test_protected_layers_are_the_rank_factors():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64))
    plan = cstar_fx.RankPlan.full_rank(model).with_layer("0", scheme="tucker2", ranks=(8, 8))
    plan = plan.with_layer("3", scheme="svd", ranks=(8,))
    gm = cstar_fx.transform(model, plan=plan)
    assert protected_layers(gm) == [gm.get_submodule("0.reduce"), gm.get_submodule("0.core"),
                                    gm.get_submodule("3.reduce")]


def test_prune_then_factorize_with_odd_widths(case, tmp_path):
    model, x, classes, _ = case
    pruned = copy.deepcopy(model)
    _tp_prune(pruned, x, 0.3, output_layers(pruned, x), round_to=None)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert any(w % 2 for w in widths)
    gm = cstar_fx.transform(pruned, ratio=4, example_inputs=x).eval()
    plan, report = cstar_fx.get_plan(gm), cstar_fx.get_report(gm)
    assert plan.factorized
    assert report.params == plan.params == _count(gm)
    assert report.dense_params == _count(pruned)
    assert abs(report.ratio_params / 4 - 1) <= 0.03
    _assert_plan_matches(gm, derive_plan(gm))
    assert gm(x).shape == (x.shape[0], classes)
    _assert_onnx_agrees(gm, x, tmp_path)


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.rand(1, 3, 64, 64)


@pytest.mark.parametrize("ratio", [4, 8, 16])
def test_prune_to_ratio_hits_param_ratio(tv_resnet18, ratio):
    model, x = tv_resnet18
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_to_ratio(model, ratio, x, importance="l2", round_to=8)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert abs(_count(model) / _count(pruned) / ratio - 1) <= 0.03
    assert pruned.fc.out_features == 1000
    assert pruned.training  # the copy keeps the input's modes
    widths = [m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 and w >= 8 for w in widths)
    assert pruned.eval()(x).shape == (1, 1000)


def test_prune_to_ratio_flop_budget(tv_resnet18):
    model, x = tv_resnet18
    pruned = prune_to_ratio(model, 8, x, budget="flops")
    achieved = cstar_fx.count_flops(model, x) / cstar_fx.count_flops(pruned, x)
    assert abs(achieved / 8 - 1) <= 0.03


def test_prune_to_ratio_both_budget_reaches_the_ratio_in_params_and_flops():
    torch.manual_seed(0)
    model, x = build_model("resnet18", stem="cifar"), torch.rand(1, 3, 32, 32)
    pruned = prune_to_ratio(model, 4, x, budget="both", round_to=1)
    by_params = _count(model) / _count(pruned)
    by_flops = cstar_fx.count_flops(model, x) / cstar_fx.count_flops(pruned, x)
    assert abs(min(by_params, by_flops) / 4 - 1) <= 0.03 and max(by_params, by_flops) >= 4 * 0.97


def test_prune_to_ratio_respects_ignored_layers_and_cifar_model():
    torch.manual_seed(0)
    model = build_model("resnet18", stem="cifar")
    x = torch.rand(1, 3, 32, 32)
    pruned = prune_to_ratio(model, 4, x, ignored_layers=[model.net.layer1[0].conv1, "net.layer2.0.conv1"])
    assert pruned.net.layer1[0].conv1.out_channels == 64
    assert pruned.net.layer2[0].conv1.out_channels == 128
    assert pruned.net.fc.out_features == 10
    assert abs(_count(model) / _count(pruned) / 4 - 1) <= 0.03


def _small():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("ratio", [1, 0.5, -2])
def test_prune_to_ratio_rejects_ratio_at_most_one(ratio):
    with pytest.raises(ValueError, match="ratio must be"):
        prune_to_ratio(_small(), ratio, torch.rand(1, 3, 8, 8))


def test_prune_to_ratio_unreachable_names_the_max():
    with pytest.raises(cstar_fx.UnreachableBudgetError, match=r"at most \d+\.\d+x") as info:
        prune_to_ratio(_small(), 50, torch.rand(1, 3, 8, 8))
    assert 1 < info.value.max_ratio < 50


def test_prune_to_ratio_reports_ratios_it_cannot_land_between():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(cstar_fx.UnreachableBudgetError, match=r"within 3% of 2x.*nearest reachable ratios are"):
        prune_to_ratio(model, 2, x, round_to=8)
    pruned = prune_to_ratio(model, 2, x, round_to=8, tolerance=0.05)  # 2.079x is reachable
    assert abs(_count(model) / _count(pruned) / 2 - 1) <= 0.05
    pruned = prune_to_ratio(model, 2, x, round_to=None)  # channel-by-channel lands close
    assert abs(_count(model) / _count(pruned) / 2 - 1) <= 0.01


def test_prune_to_ratio_at_least_never_lands_below_the_ratio():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(1, 3, 16, 16)
    ratios = {}
    for at_least in (False, True):
        for r in (1.9, 2.0, 2.1, 2.5, 3.0):
            pruned = prune_to_ratio(model, r, x, round_to=8, tolerance=0.3, at_least=at_least)
            ratios[at_least, r] = _count(model) / _count(pruned)
    assert all(ratios[True, r] >= r for r in (1.9, 2.0, 2.1, 2.5, 3.0))
    assert any(ratios[False, r] < r for r in (1.9, 2.0, 2.1, 2.5, 3.0))  # nearest may undershoot; at_least may not
    with pytest.raises(cstar_fx.UnreachableBudgetError, match="within 1%"):  # the overshoot is bounded by tolerance
        prune_to_ratio(model, 2, x, round_to=8, tolerance=0.01, at_least=True)
    with pytest.raises(TypeError, match="at_least must be True or False"):
        prune_to_ratio(model, 2, x, at_least="yes")


def test_prune_to_ratio_rejects_unknown_importance_and_foreign_layers():
    model = _small()
    with pytest.raises(ValueError, match="unknown importance 'taylor'.*l2"):
        prune_to_ratio(model, 2, torch.rand(1, 3, 8, 8), importance="taylor")
    with pytest.raises(ValueError, match="not a submodule"):
        prune_to_ratio(model, 2, torch.rand(1, 3, 8, 8), ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="budget must be"):
        prune_to_ratio(model, 2, torch.rand(1, 3, 8, 8), budget="latency")


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r'pip install "cstar-fx\[pruning\]"'):
        output_layers(_small(), torch.rand(1, 3, 8, 8))


def test_importing_the_pass_does_not_import_torch_pruning():
    code = "import sys, cstar_fx.passes.prune; print('torch_pruning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
