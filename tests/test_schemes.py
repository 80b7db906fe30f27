"""The scheme registry, and spatial SVD (the fourth scheme) end to end: exact at full rank, the Eckart-Young error
when truncated, chosen by conv_scheme="auto", saved and loaded, exported to ONNX, pruned, projected by ADMM."""

import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx import schemes
from cstar_fx.analysis import TraceConfig, analyse
from cstar_fx.costs import FlopCost, ParamCost
from cstar_fx.latency import chain_ops
from cstar_fx.models import cifar_resnet18
from cstar_fx.passes.discover import find_layers
from cstar_fx.passes.factorize import build_factors, dense_weight
from cstar_fx.passes.trace import trace
from cstar_fx.robust import Admm, AdmmConfig

SPATIAL = "spatial_svd"


def _site(conv: nn.Conv2d):
    return find_layers(trace(nn.Sequential(conv)))[0][0]


def _matrix_svdvals(w: torch.Tensor) -> torch.Tensor:
    """Singular values of the (C_in*kh, C_out*kw) matrix, computed independently of the scheme."""
    c_out, c_in, kh, kw = w.shape
    m = torch.stack([torch.cat([w[o, i, y, :] for o in range(c_out)]) for i in range(c_in) for y in range(kh)])
    return torch.linalg.svdvals(m)


def _spatially_low_rank(c_out: int, c_in: int, k: int, rank: int) -> torch.Tensor:
    """A kernel W[o,i,y,x] = sum_r A[r,i,y] B[o,r,x]: rank ``rank`` as spatial SVD reads it, full in channel modes."""
    a, b = torch.randn(rank, c_in, k), torch.randn(c_out, rank, k)
    return torch.einsum("riy,orx->oiyx", a, b)


CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "stride_bias": dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1, bias=True),
    "non_square": dict(in_channels=3, out_channels=8, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2),
                       dilation=(2, 1)),
    "reflect": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
    "circular": dict(in_channels=4, out_channels=5, kernel_size=(5, 3), padding=(2, 1), padding_mode="circular"),
    "same": dict(in_channels=4, out_channels=6, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", sorted(CONVS))
def test_spatial_svd_exact_at_full_rank(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONVS[name]).double()
    site = _site(conv)
    scheme = schemes.get(SPATIAL)
    spec = cstar_fx.LayerSpec("0", "conv", tuple(conv.weight.shape), conv.bias is not None, ())
    chain = build_factors(site, SPATIAL, scheme.max_ranks(spec))
    x = torch.randn(2, conv.in_channels, 11, 9, dtype=torch.float64)
    assert torch.allclose(chain(x), conv(x), atol=1e-10)
    assert torch.allclose(dense_weight(chain), conv.weight, atol=1e-10)


def test_spatial_svd_truncation_has_the_eckart_young_error():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=False).double()
    w = conv.weight.detach()
    s = _matrix_svdvals(w)
    for r in (1, 4, 9):
        approx = dense_weight(build_factors(_site(conv), SPATIAL, (r,)))
        err2 = float((approx - w).pow(2).sum())
        assert err2 == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-8)
        assert torch.allclose(schemes.get(SPATIAL).project(w, (r,)), approx, atol=1e-10)  # ADMM's Z step
    modes, own = schemes.layer_spectra(w, "conv", SPATIAL)
    spec = cstar_fx.LayerSpec("0", "conv", tuple(w.shape), False, modes, scheme_spectra=own)
    assert schemes.get(SPATIAL).energy(spec, (4,)) == pytest.approx(float(s[:4].pow(2).sum() / s.pow(2).sum()))


def test_plan_energy_is_exact_for_spatial_svd_and_the_estimate_for_tucker2_is_labelled():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    plan = cstar_fx.plan_ranks(model, 3, conv_scheme=SPATIAL, round_to=4)
    lp = plan.layers["0"]
    assert lp.scheme == SPATIAL
    err = cstar_fx.get_report(cstar_fx.transform(model, plan=plan)).errors["0"]
    assert lp.energy == pytest.approx(1 - err ** 2, abs=1e-5)
    assert schemes.get(SPATIAL).exact_energy and schemes.get("svd").exact_energy
    assert not schemes.get("tucker2").exact_energy


def test_auto_picks_spatial_svd_when_it_keeps_more_energy_within_the_budget():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    with torch.no_grad():
        model[0].weight.copy_(_spatially_low_rank(32, 32, 3, 8))
        model[2].weight.copy_(_spatially_low_rank(32, 32, 3, 8))
    plan = cstar_fx.plan_ranks(model, 3, conv_scheme="auto")
    assert {lp.scheme for lp in plan.factorized.values()} == {SPATIAL}
    assert all(lp.energy == pytest.approx(1.0) for lp in plan.factorized.values())
    assert plan.ratio_params >= 3
    gm = cstar_fx.transform(model, plan=plan)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert float((gm(x) - model(x)).norm() / model(x).norm()) < 1e-5  # rank 8 holds all of the kernel
    # the same model planned as Tucker-2 or SVD alone keeps less
    for other in ("tucker2", "svd"):
        kept = cstar_fx.plan_ranks(model, 3, conv_scheme=other).layers["0"].energy
        assert kept < plan.layers["0"].energy


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_spatial_svd_budget_is_met_within_two_percent(budget):
    torch.manual_seed(4)
    model = cifar_resnet18(width=16)
    x = torch.randn(1, 3, 32, 32)
    gm = cstar_fx.transform(model, 4, budget=budget, conv_scheme=SPATIAL, example_inputs=x)
    report = cstar_fx.get_report(gm)
    achieved = report.ratio_params if budget == "params" else report.ratio_flops
    assert abs(achieved / 4 - 1) <= 0.02
    assert any(lp.scheme == SPATIAL for lp in cstar_fx.get_plan(gm).factorized.values())


def test_spatial_svd_costs_match_the_built_chain():
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True)
    x = torch.randn(1, 8, 13, 10)
    model = nn.Sequential(conv)
    r = 5
    plan = cstar_fx.RankPlan.full_rank(model, example_inputs=x).with_layer("0", scheme=SPATIAL, ranks=(r,))
    gm = cstar_fx.transform(model, plan=plan)
    spec = analyse(model, TraceConfig(), x).eligible[0]
    assert ParamCost()(spec, SPATIAL, (r,)) == sum(p.numel() for p in gm.parameters())
    flops_bias_free = cstar_fx.count_flops(gm, x)
    assert FlopCost()(spec, SPATIAL, (r,)) == pytest.approx(flops_bias_free)
    ops = chain_ops(spec, SPATIAL, (r,))
    chain = gm.get_submodule("0")
    assert [(o.c_in, o.c_out, o.kernel, o.stride, o.padding, o.dilation) for o in ops] == [
        (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation) for m in chain]
    shapes = [(o.hw, o.module()(o.input(1)).shape[-2:]) for o in ops]
    assert shapes[0][1] == shapes[1][0]  # the second op reads what the first writes


def test_spatial_svd_saves_and_loads(tmp_path):
    torch.manual_seed(5)
    model = cifar_resnet18(width=8).eval()
    gm = cstar_fx.transform(model, 4, conv_scheme=SPATIAL)
    path = cstar_fx.save(gm, tmp_path / "spatial.safetensors")
    again = cstar_fx.load(path, model=model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), gm.eval()(x))
    assert cstar_fx.get_plan(again) == cstar_fx.get_plan(gm)
    spatial = [lp for lp in cstar_fx.get_plan(again).factorized.values() if lp.scheme == SPATIAL]
    assert spatial and all(again.get_submodule(lp.factor_path).scheme == SPATIAL for lp in spatial)


def test_spatial_svd_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cstar_fx.export import export_onnx

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, (3, 5), padding=(1, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    gm = cstar_fx.transform(model, 2, conv_scheme=SPATIAL).eval()
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(gm, x, tmp_path / "spatial.onnx")
    assert result.verification.passed


def test_spatial_svd_composes_with_pruning():
    pytest.importorskip("torch_pruning")
    from torch.fx.passes.infra.pass_manager import PassManager

    from cstar_fx import CstarPass, PrunePass
    from cstar_fx.passes.prune import derive_plan, protected_layers

    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(1, 3, 12, 12)
    gm = cstar_fx.transform(model, plan=cstar_fx.RankPlan.full_rank(model).with_layer("2", scheme=SPATIAL,
                                                                                          ranks=(16,)))
    protected = protected_layers(gm)
    assert gm.get_submodule("2.reduce") in protected and gm.get_submodule("2.expand") not in protected
    result = PassManager([PrunePass(1.5, x, keep_ranks=True, round_to=1)])(gm)
    pruned = result.graph_module
    lp = derive_plan(pruned, example_inputs=x).layers["2"]
    assert lp.scheme == SPATIAL and lp.ranks == (16,)
    assert lp.params == sum(p.numel() for p in pruned.get_submodule("2").parameters())
    assert pruned(x).shape == (1, 10)
    both = PassManager([CstarPass(ratio=2, conv_scheme=SPATIAL), PrunePass(1.3, x, round_to=1)])(
        torch.fx.symbolic_trace(model)).graph_module
    assert both(x).shape == (1, 10)


def test_admm_projects_with_the_layer_scheme():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    plan = cstar_fx.plan_ranks(model, 2, conv_scheme=SPATIAL, round_to=4)
    admm = Admm(model, plan, AdmmConfig(rho=1.0, replan=False))
    for lp in plan.factorized.values():
        w = dict(model.named_parameters())[lp.param].detach()
        z = admm.Z[lp.param]
        assert torch.allclose(z, schemes.get(SPATIAL).project(w, lp.ranks), atol=1e-6)
        s = _matrix_svdvals(z.double())
        assert float(s[lp.ranks[0]:].max()) <= 1e-5 * float(s[0])  # Z has the planned spatial rank


def test_registry_names_and_errors():
    assert schemes.names() == ("dense", "svd", "tucker2", SPATIAL)
    assert SPATIAL in schemes.conv_scheme_names()
    with pytest.raises(ValueError, match="registered schemes are"):
        schemes.get("cp")
    with pytest.raises(ValueError, match="spatial_svd"):
        cstar_fx.plan_ranks(nn.Sequential(nn.Conv2d(3, 8, 3)), 2, conv_scheme="cp")
    with pytest.raises(ValueError, match="already registered"):
        schemes.register(schemes.get("svd"))
    with pytest.raises(cstar_fx.PlanMismatchError, match="does not apply"):
        model = nn.Sequential(nn.Linear(8, 8))
        cstar_fx.transform(model, plan=cstar_fx.RankPlan.full_rank(model).with_layer("0", scheme=SPATIAL, ranks=(4,)))


def test_layer_plan_records_form_and_factor_path_and_reads_old_plans():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(64, 64))
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(torch.nn.functional.linear(x, self.w1))

    plan = cstar_fx.plan_ranks(Functional(), 2)
    forms = {name: (lp.form, lp.factor_path) for name, lp in plan.layers.items()}
    assert forms == {"w1": ("function", "w1_factors"), "fc": ("module", "fc")}
    old = plan.to_dict()
    for layer in old["layers"]:
        del layer["form"]  # written before the form was recorded
    assert cstar_fx.RankPlan.from_dict(old) == plan
