import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import cstar_fx
from cstar_fx import RankPlan
from cstar_fx.analysis import analyse
from cstar_fx.config import CstarConfig
from cstar_fx.planner import plan_under
from toy_nets import ValueBranch


def _exact_at_full_rank(model, x, **options):
    model = model.double().eval()
    x = x.double()
    gm = cstar_fx.transform(model, plan=RankPlan.full_rank(model, **options), **options)
    gm.eval()
    with torch.no_grad():
        ref, out = model(x), gm(x)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * max(scale, 1.0)
    return gm


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3, stride=2, padding=1),
    nn.Conv2d(4, 8, 3, padding=2, dilation=2, bias=False),
    nn.Conv2d(4, 8, (3, 1), padding=(1, 0)),
    nn.Conv2d(4, 8, 1),
    nn.Conv2d(4, 8, 1, stride=2, padding=1),
    nn.Conv2d(4, 6, 3, padding="same"),
    nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 8, 5, stride=(2, 1), padding=(2, 0), bias=True),
])
def test_full_rank_conv_exact(conv):
    gm = _exact_at_full_rank(nn.Sequential(conv), torch.randn(2, 4, 9, 9))
    report = cstar_fx.get_report(gm)
    assert list(report.factorized) == ["0"]
    assert report.errors["0"] < 1e-10
    kinds = [type(m).__name__ for n, m in gm.named_modules() if n.startswith("0.")]
    assert kinds == (["Conv2d"] * (3 if conv.kernel_size != (1, 1) else 2))


def test_full_rank_svd_scheme_for_kxk_conv_exact():
    _exact_at_full_rank(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), torch.randn(2, 4, 6, 6), conv_scheme="svd")


def test_full_rank_linear_and_nd_input_exact():
    _exact_at_full_rank(nn.Sequential(nn.Linear(12, 7), nn.GELU(), nn.Linear(7, 5, bias=False)), torch.randn(3, 4, 12))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=1, padding=1))
        x = x.mean((2, 3))
        return F.linear(x, self.w2)


def test_functional_forms_found_and_exact():
    gm = _exact_at_full_rank(Functional(), torch.randn(2, 3, 8, 8))
    plan = cstar_fx.get_plan(gm)
    assert set(plan.factorized) == {"w1", "w2"}
    names = {n for n, _ in gm.named_parameters()}
    assert "w1" not in names and "w2" not in names and "b1" not in names
    assert "w1_factors.core.weight" in names and "w2_factors.expand.weight" in names


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x))) + x
        y = torch.cat([y, self.a(y)], 1)[:, :6]  # shared module called twice
        return self.head(y.mean((2, 3)))


def test_residual_and_shared_module_exact():
    gm = _exact_at_full_rank(Residual(), torch.randn(2, 6, 5, 5))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("a.core") == 2


def test_input_model_not_modified_and_lint_passes():
    model = torchvision.models.resnet18(num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    gm = cstar_fx.transform(model, 8, example_inputs=torch.randn(2, 3, 32, 32))
    gm.graph.lint()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and isinstance(model.layer1, nn.Sequential)
    assert isinstance(gm.get_submodule("layer4.1.conv2.core"), nn.Conv2d)


def test_accepts_graph_module_and_card_example():
    traced = fx.symbolic_trace(torchvision.models.resnet18(num_classes=10))
    gm = cstar_fx.transform(traced, ratio=8)
    report = cstar_fx.get_report(gm)
    assert report.ratio_params == pytest.approx(8, rel=0.02)
    assert sum(p.numel() for p in gm.parameters()) == report.params
    assert gm.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_plan_prediction_matches_measured_params_and_flops():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    plan = cstar_fx.plan_ranks(model, 8, example_inputs=x)
    gm = cstar_fx.transform(model, plan=plan, example_inputs=x)
    report = cstar_fx.get_report(gm)
    assert report.params == plan.params
    assert report.flops == pytest.approx(plan.flops, rel=1e-9)
    assert report.dense_flops == pytest.approx(cstar_fx.count_flops(model, x))


def test_flops_budget_hits_target():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    gm = cstar_fx.transform(model, cstar_fx.CstarConfig(ratio=4, budget="flops"), example_inputs=x)
    assert cstar_fx.get_report(gm).ratio_flops == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
def test_budget_hit_on_torchvision_models(name):
    model = getattr(torchvision.models, name)(num_classes=10)
    analysis = analyse(model, CstarConfig().trace)
    hit = 0
    for ratio in (2, 4, 8, 16, 32):
        try:
            cfg = CstarConfig(ratio=ratio)
            plan = plan_under(analysis, cfg, cfg.make_budget())
        except cstar_fx.UnreachableBudgetError as err:
            assert 1 < err.max_ratio < ratio and "reachable maximum" in str(err)
            continue
        assert plan.ratio_params == pytest.approx(ratio, rel=0.02)
        assert plan.ratio_params >= ratio * (1 - 1e-9)
        hit += 1
    assert hit >= 3


def test_skip_and_unsupported_reported():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.ConvTranspose2d(16, 16, 2),
                          nn.Conv2d(16, 64, 3), nn.Flatten(1), nn.LazyLinear(10))
    model(torch.randn(1, 3, 12, 12))
    plan = cstar_fx.plan_ranks(model, 1.2, skip=("0",))
    assert plan.layers["0"].scheme == "dense" and "skipped" in plan.layers["0"].reason
    assert "depthwise" in plan.unsupported["1"]
    assert "ConvTranspose2d" in plan.unsupported["2"]
    text = str(plan)
    assert "unsupported" in text and "skipped" in text


def test_skip_patterns():
    model = torchvision.models.resnet18(num_classes=10)
    plan = cstar_fx.plan_ranks(model, 1.2, skip=("layer4.*", "fc"))
    assert all(not lp.factorized for n, lp in plan.layers.items() if n.startswith("layer4") or n == "fc")


def test_plan_json_round_trip_and_reuse():
    model = torchvision.models.resnet18(num_classes=10)
    plan = cstar_fx.plan_ranks(model, 8, example_inputs=torch.randn(1, 3, 32, 32))
    again = RankPlan.from_json(plan.to_json())
    assert again == plan
    g1 = cstar_fx.transform(model, plan=plan)
    g2 = cstar_fx.transform(model, plan=again)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(g1.eval()(x), g2.eval()(x))
    with pytest.raises(ValueError, match="not a cstar_fx rank plan"):
        RankPlan.from_json('{"layers": []}')


def test_bad_inputs_have_clear_errors():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    for bad in (1, 0.5, -3):
        with pytest.raises(ValueError, match="ratio must be a finite number > 1"):
            cstar_fx.transform(model, bad)
    for bad in ("8", None, True):
        with pytest.raises(TypeError, match="ratio must be a number"):
            cstar_fx.plan_ranks(model, bad)
    with pytest.raises(cstar_fx.UnreachableBudgetError, match="reachable maximum"):
        cstar_fx.transform(model, 1000)
    with pytest.raises(cstar_fx.NoEligibleLayerError, match="no conv2d/linear"):
        cstar_fx.transform(nn.Sequential(nn.ReLU()), 2)
    with pytest.raises(cstar_fx.ExampleInputError, match="e.g. torch.randn"):
        cstar_fx.plan_ranks(model, 2, example_inputs=torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs example_inputs"):
        cstar_fx.plan_ranks(model, 2, budget="flops")
    with pytest.raises(TypeError, match="unknown option"):
        cstar_fx.plan_ranks(model, 2, round_two=8)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*NaN"):
        cstar_fx.transform(broken, 2)


def test_plan_mismatch_rejected():
    plan = cstar_fx.plan_ranks(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), 2)
    with pytest.raises(cstar_fx.PlanMismatchError, match="weight shape"):
        cstar_fx.transform(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), plan=plan)
    with pytest.raises(cstar_fx.PlanMismatchError, match="not a factorizable layer"):
        cstar_fx.transform(nn.Sequential(nn.ReLU(), nn.Linear(64, 64)), plan=plan)


def test_untraceable_model_names_module_and_fix():
    model = nn.Sequential(nn.Linear(4, 4), ValueBranch(4))
    with pytest.raises(cstar_fx.TraceError, match=r"(?s)module '1' \(ValueBranch\).*leaf_modules"):
        cstar_fx.transform(model, 2)
    plan = cstar_fx.plan_ranks(nn.Sequential(nn.Linear(64, 64), ValueBranch()), 1.3, leaf_modules=("1",))
    assert list(plan.layers) == ["0"]


def test_register_leaf_keeps_module_opaque():
    @cstar_fx.register_leaf
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    plan = cstar_fx.plan_ranks(nn.Sequential(nn.Linear(64, 64), Opaque()), 1.3)
    assert list(plan.layers) == ["0"]


def test_double_transform_is_correct():
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    gm = cstar_fx.transform(model, plan=RankPlan.full_rank(model))
    gm2 = cstar_fx.transform(gm, plan=RankPlan.full_rank(gm))
    x = torch.randn(1, 16, 6, 6)
    assert torch.allclose(gm2(x), model(x), atol=1e-4)


def test_plan_table_and_report_text():
    model = torchvision.models.resnet18(num_classes=10)
    gm = cstar_fx.transform(model, 8, example_inputs=torch.randn(1, 3, 32, 32))
    text = str(cstar_fx.get_report(gm))
    assert "params:" in text and "FLOPs:" in text and "x fewer" in text
    assert "layer4.1.conv2" in str(cstar_fx.get_plan(gm))


def test_count_flops_sees_multihead_attention_projections():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 10, 64)
    projections = 2 * 2 * 10 * 64 * 64 * 4  # q, k, v and out: 2 FLOPs per multiply-add
    assert cstar_fx.count_flops(Block().eval(), x) >= projections
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_decompose_false_builds_the_same_architecture_with_zero_factors():
    model = torchvision.models.resnet18(num_classes=10)
    plan = cstar_fx.plan_ranks(model, 8)
    full = cstar_fx.transform(model, plan=plan)
    bare = cstar_fx.transform(model, plan=plan, decompose=False)
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    assert shapes == {k: v.shape for k, v in bare.state_dict().items()}
    assert bare.get_submodule("layer4.1.conv2.core").weight.abs().sum() == 0
    bare.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(bare.eval()(x), full.eval()(x))
    assert cstar_fx.get_report(bare).errors == {}
    with pytest.raises(ValueError, match="pass plan="):
        cstar_fx.transform(model, 8, decompose=False)


def test_refold_gives_the_dense_model_the_factors_equal_and_retruncates_exactly():
    torch.manual_seed(0)
    for model, x in ((Functional().double(), torch.randn(2, 3, 8, 8)), (Residual().double(), torch.randn(2, 6, 5, 5))):
        model.eval()
        before = copy.deepcopy(model.state_dict())
        gm = cstar_fx.transform(model, 2, round_to=1).eval()
        with torch.no_grad():  # trained factors: no longer the truncation of the model's weights
            for p in gm.parameters():
                p.add_(0.05 * torch.randn_like(p))
        dense = cstar_fx.refold(gm, model)
        assert set(dense.state_dict()) == set(model.state_dict())  # the model's own architecture
        with torch.no_grad():
            assert torch.allclose(dense(x.double()), gm(x.double()), atol=1e-10)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        # the folded weights have the plan's ranks, so factorizing them again at those ranks loses nothing
        again = cstar_fx.transform(dense, plan=cstar_fx.get_plan(gm)).eval()
        with torch.no_grad():
            assert torch.allclose(again(x.double()), gm(x.double()), atol=1e-8)


def test_refold_refuses_a_model_it_was_not_made_from():
    gm = cstar_fx.transform(Residual(), 2, round_to=1)
    with pytest.raises(cstar_fx.PlanMismatchError, match="pass the model it was transformed from"):
        cstar_fx.refold(gm, Functional())
    with pytest.raises(TypeError, match="made by cstar_fx.transform"):
        cstar_fx.refold(Residual(), Residual())


def test_refold_takes_only_trace_options():
    gm = cstar_fx.transform(Residual(), 2, round_to=1)
    with pytest.raises(TypeError, match="refold takes the trace options"):
        cstar_fx.refold(gm, Residual(), round_to=1)
