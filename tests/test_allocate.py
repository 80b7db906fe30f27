import math

import pytest
import torch

import cstar_fx
from cstar_fx.allocate import UnreachableBudgetError, allocate, min_cost, rank_grid
from cstar_fx.costs import FlopCost, LayerSpec, ParamCost
from cstar_fx.decompose import mode_spectra, project
from cstar_fx.models import cifar_resnet18


def spec(name, shape, decay=0.0, positions=None):
    w = torch.randn(*shape, dtype=torch.float64)
    if decay:
        u, s, vh = torch.linalg.svd(w.reshape(shape[0], -1), full_matrices=False)
        s = torch.exp(-decay * torch.arange(len(s), dtype=torch.float64))
        w = (u * s) @ vh
        w = w.reshape(shape)
    p = positions
    return LayerSpec(name, "conv" if len(shape) == 4 else "linear", shape, False, mode_spectra(w), p, p)


def test_rank_grid():
    assert rank_grid(20, 8, 1) == [8, 16, 20]
    assert rank_grid(3, 8, 1) == [3]
    assert rank_grid(64, 8, 20) == [24, 32, 40, 48, 56, 64]
    assert rank_grid(5, 1, 1) == [1, 2, 3, 4, 5]


def test_budget_met_and_ranks_on_grid():
    layers = [spec("a", (64, 64, 3, 3)), spec("b", (128, 64, 3, 3)), spec("c", (10, 128))]
    cost = ParamCost()
    dense = sum(cost(l, "dense", ()) for l in layers)
    for ratio in (2, 4, 8):
        alloc = allocate(layers, cost, ratio=ratio)
        assert alloc.total_cost <= dense / ratio * (1 + 1e-9)
        assert ratio <= alloc.ratio < ratio * 1.15  # three layers: coarse rank steps
        for name, (scheme, ranks) in alloc.choices.items():
            full = dict(a=(64, 64), b=(128, 64), c=(10,))[name]
            assert all(r % 8 == 0 or r == f for r, f in zip(ranks, full))


def test_layer_with_decaying_spectrum_gets_lower_rank():
    fast = spec("fast", (64, 64), decay=0.5)
    flat = spec("flat", (64, 64))
    alloc = allocate([fast, flat], ParamCost(), ratio=3, round_to=1)
    assert alloc.choices["fast"][1][0] < alloc.choices["flat"][1][0]


def test_dense_when_factorized_costs_more():
    tiny = spec("tiny", (4, 3, 3, 3))  # full ranks cheaper dense; min ranks (4, 3) cost more than dense
    big = spec("big", (256, 256))
    alloc = allocate([tiny, big], ParamCost(), ratio=4)
    assert alloc.choices["tiny"] == ("dense", ())
    assert alloc.choices["big"][0] == "svd"


def test_unreachable_ratio_reports_maximum():
    layers = [spec("a", (32, 32))]
    with pytest.raises(UnreachableBudgetError) as info:
        allocate(layers, ParamCost(), ratio=100, fixed_cost=500)
    best = (32 * 32 + 500) / min_cost(layers, ParamCost(), round_to=8, min_rank=1)
    assert info.value.max_ratio < 100
    assert info.value.max_ratio == pytest.approx((32 * 32 + 500) / (500 + min_cost(layers, ParamCost(), round_to=8, min_rank=1)))
    assert "reachable maximum" in str(info.value)
    assert best > 0


def test_flop_cost_needs_shapes_and_counts():
    layer = spec("a", (16, 8, 3, 3), positions=100)
    assert FlopCost()(layer, "dense", ()) == 2 * 16 * 8 * 9 * 100
    assert FlopCost()(layer, "tucker2", (4, 2)) == 2 * (8 * 2 * 100 + 4 * 2 * 9 * 100 + 16 * 4 * 100)
    with pytest.raises(ValueError, match="example_inputs"):
        FlopCost()(spec("b", (4, 4)), "dense", ())


def test_custom_cost_model_is_used_and_deterministic():
    calls = []

    def cost(layer, scheme, ranks):
        calls.append(scheme)
        return 1000.0 if scheme == "dense" else float(sum(ranks))

    layers = [spec("a", (64, 64)), spec("b", (64, 64, 3, 3))]
    a1 = allocate(layers, cost, ratio=10)
    a2 = allocate(layers, cost, ratio=10)
    assert a1 == a2 and calls
    assert a1.total_cost <= 200


def test_ratio_validated():
    with pytest.raises(ValueError, match="ratio"):
        allocate([spec("a", (8, 8))], ParamCost(), ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        allocate([spec("a", (8, 8))], ParamCost(), ratio=math.nan)


def test_auto_scheme_moves_a_conv_to_svd_when_that_keeps_more_energy():
    w = (torch.randn(64, 8, dtype=torch.float64) @ torch.randn(8, 64 * 9, dtype=torch.float64)).reshape(64, 64, 3, 3)
    conv = LayerSpec("c", "conv", (64, 64, 3, 3), False, mode_spectra(w))  # rank 8 as a matrix, not in channel modes
    other = spec("o", (128, 128, 3, 3))
    tucker = allocate([conv, other], ParamCost(), ratio=6)
    auto = allocate([conv, other], ParamCost(), ratio=6, conv_scheme="auto")
    assert tucker.choices["c"][0] == "tucker2"
    assert auto.choices["c"] == ("svd", (8,))
    assert auto.total_cost <= auto.budget * (1 + 1e-9)


def _objective(plan: cstar_fx.RankPlan) -> float:
    return sum(math.log(lp.energy) for lp in plan.layers.values() if lp.scheme != "dense")


def test_a_loose_cap_does_not_cost_energy_and_a_tight_one_is_met():
    model = cifar_resnet18(width=8)
    x = torch.rand(1, 3, 32, 32)
    free = cstar_fx.plan_ranks(model, 8, budget="flops", example_inputs=x, round_to=1)
    loose = cstar_fx.plan_ranks(model, 8, budget="flops", param_ratio=free.ratio_params * 0.9, example_inputs=x,
                                round_to=1)
    assert _objective(loose) >= _objective(free) - 1e-9  # a cap the free plan meets changes nothing for the worse
    tight = cstar_fx.plan_ranks(model, 8, budget="flops", param_ratio=free.ratio_params * 1.5, example_inputs=x,
                                round_to=1)
    assert tight.ratio_params >= free.ratio_params * 1.5 * (1 - 1e-9) and tight.ratio_flops >= 8 * (1 - 1e-9)


def test_budget_both_reaches_the_ratio_in_flops_and_in_parameters():
    model, x = cifar_resnet18(width=8), torch.rand(1, 3, 32, 32)
    plan = cstar_fx.plan_ranks(model, 8, budget="both", example_inputs=x, round_to=1)
    assert plan.ratio_params >= 8 * (1 - 1e-9) and plan.ratio_flops >= 8 * (1 - 1e-9) and plan.budget == "both"
    flops_only = cstar_fx.plan_ranks(model, 8, budget="flops", example_inputs=x, round_to=1)
    assert flops_only.ratio_params < 8  # on this network a FLOP budget alone keeps more parameters: the cap binds
    with pytest.raises(ValueError, match="budget='both' needs example_inputs"):
        cstar_fx.plan_ranks(model, 8, budget="both")


def test_the_discarded_objective_is_the_euclidean_projection_onto_the_budget():
    torch.manual_seed(0)  # two same-shape SVD layers (equal cost per rank), one with 10x the weights
    ws = {"a": torch.randn(12, 12), "b": 10 * torch.randn(12, 12) @ torch.diag(torch.linspace(1, 0.1, 12))}
    layers = [LayerSpec(n, "linear", (12, 12), False, mode_spectra(w)) for n, w in ws.items()]
    got = allocate(layers, ParamCost(), ratio=3, round_to=1, objective="discarded")
    budget = got.budget

    def error(ranks):  # ||W - Z||^2 summed, Z each layer's truncated SVD at its rank
        return sum(float((w - project(w, (r,))).pow(2).sum()) for w, r in zip(ws.values(), ranks))

    feasible = [(ra, rb) for ra in range(1, 12) for rb in range(1, 12) if 24 * (ra + rb) <= budget]
    best = min(error(r) for r in feasible)
    ranks = tuple(got.choices[n][1][0] for n in ws)
    assert got.total_cost <= budget and error(ranks) == pytest.approx(best, rel=1e-4)
    log_ranks = tuple(allocate(layers, ParamCost(), ratio=3, round_to=1).choices[n][1][0] for n in ws)
    assert error(log_ranks) > best * 1.05  # the default objective is not that projection: it spreads rank evenly
    with pytest.raises(ValueError, match="objective must be one of"):
        allocate(layers, ParamCost(), ratio=3, objective="energy")


def test_the_objective_is_a_planning_option_recorded_in_the_plan():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    plan = cstar_fx.plan_ranks(model, 2, objective="discarded")
    assert plan.options["objective"] == "discarded" and "objective" not in cstar_fx.plan_ranks(model, 2).options
    assert cstar_fx.RankPlan.from_json(plan.to_json()).options["objective"] == "discarded"
    with pytest.raises(ValueError, match="objective must be one of"):
        cstar_fx.CstarConfig(objective="l2")
    with pytest.raises(ValueError, match="only steer planning"):
        cstar_fx.transform(model, plan=plan, objective="discarded")
