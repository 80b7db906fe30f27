"""The latency-aware allocator: fake deterministic cost tables, and one real (tiny) CPU measurement."""

import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx.costs import LayerSpec
from cstar_fx.latency import LatencyCost, LatencyTable, LatencyTarget, Op, chain_ops, validate


class FakeLatency:
    """Deterministic latency: MACs / speed, with a per-op launch cost; layer 'slow' runs factors badly."""

    name = "latency"

    def __init__(self, launch=0.0, slow=()):
        self.launch, self.slow = launch, set(slow)

    def __call__(self, layer, scheme, ranks):
        ops = chain_ops(layer, scheme, ranks)
        ms = 0.0
        for op in ops:
            positions = op.hw[0] * op.hw[1] if op.kind == "conv" else 1
            ms += op.c_in * op.c_out * op.kernel[0] * op.kernel[1] * positions * 1e-6 + self.launch
        if scheme != "dense" and layer.name in self.slow:
            ms *= 1000
        return ms


def _model():
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 8 * 8, 10))


def test_latency_budget_met_with_fake_table():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    cost = FakeLatency()
    plan = cstar_fx.plan_ranks(model, budget="latency", target_speedup=3.0, cost_model=cost, example_inputs=x)
    assert plan.budget == "latency"
    assert plan.dense_cost / plan.cost >= 3.0
    assert plan.dense_cost / plan.cost == pytest.approx(3.0, rel=0.1)
    assert all(lp.cost is not None for lp in plan.factorized.values())
    again = cstar_fx.plan_ranks(model, budget="latency", target_speedup=3.0, cost_model=cost, example_inputs=x)
    assert again == plan  # reproducible


def test_prefers_dense_where_factorizing_is_slower():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    plan = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.2, cost_model=FakeLatency(slow={"4"}),
                               example_inputs=x)
    assert plan.layers["4"].scheme == "dense"
    assert plan.layers["2"].factorized


def test_launch_cost_keeps_small_layers_dense():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    plan = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.5, cost_model=FakeLatency(launch=0.05),
                               example_inputs=x)
    assert plan.layers["0"].scheme == "dense"  # two extra launches cost more than the tiny conv saves


def test_param_cap_respected_beside_latency_budget():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    plan = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.5, param_ratio=3, cost_model=FakeLatency(),
                               example_inputs=x)
    assert plan.ratio_params >= 3
    loose = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.5, cost_model=FakeLatency(), example_inputs=x)
    assert loose.ratio_params < plan.ratio_params


def test_latency_ms_target_and_errors():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    cost = FakeLatency()
    dense = cstar_fx.plan_ranks(model, budget="latency", target_speedup=2, cost_model=cost, example_inputs=x).dense_cost
    plan = cstar_fx.plan_ranks(model, budget="latency", latency_ms=dense / 4, cost_model=cost, example_inputs=x)
    assert plan.cost <= dense / 4
    with pytest.raises(ValueError, match="needs example_inputs"):
        cstar_fx.plan_ranks(model, budget="latency", target_speedup=2)
    with pytest.raises(ValueError, match="latency_ms must be"):
        cstar_fx.plan_ranks(model, budget="latency", latency_ms=-1, cost_model=cost, example_inputs=x)
    with pytest.raises(ValueError, match="either target_speedup or latency_ms"):
        cstar_fx.plan_ranks(model, budget="latency", latency_ms=1, target_speedup=2, cost_model=cost, example_inputs=x)


def test_chain_ops_mirror_the_rewrite():
    spec = LayerSpec("c", "conv", (64, 32, 3, 3), True, (), in_shape=(1, 32, 16, 16), out_shape=(1, 64, 8, 8),
                     stride=(2, 2), padding=(1, 1))
    ops = chain_ops(spec, "tucker2", (16, 8))
    assert [(o.c_in, o.c_out, o.kernel, o.stride, o.hw) for o in ops] == [
        (32, 8, (1, 1), (1, 1), (16, 16)), (8, 16, (3, 3), (2, 2), (16, 16)), (16, 64, (1, 1), (1, 1), (8, 8))]
    assert [o.bias for o in ops] == [False, False, True]
    for op in ops:  # each op runs on its own input shape
        assert op.module()(op.input(2)).shape[1] == op.c_out


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_real_cpu_measurement_small_net(tmp_path, backend):
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1))
    x = torch.randn(1, 3, 16, 16)
    target = LatencyTarget(backend=backend, threads=1, warmup=2, iters=5)
    path = tmp_path / "table.json"
    cost = LatencyCost(target, path=path)
    plan = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.3, cost_model=cost, example_inputs=x,
                               round_to=16)
    assert cost.measured > 0 and path.exists()
    assert all(k.startswith(target.key()) for k in LatencyTable(path).entries)
    cached = LatencyCost(target, path=path)
    assert cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.3, cost_model=cached, example_inputs=x,
                               round_to=16) == plan
    assert cached.measured == 0  # everything came from the table
    gm = cstar_fx.transform(model, plan=plan)
    check = validate(model, gm, x, target)
    assert check.measured > 0 and check.predicted > 0


def test_interpolation_between_ladder_points_uses_corners():
    class Table(LatencyCost):
        def _exact(self, op):
            return float(op.c_in + 10 * op.c_out)

    cost = Table(LatencyTarget(backend="torch"))
    op = Op("conv", 72, 80, hw=(4, 4))  # both between ladder points 64 and 96
    assert cost.op_ms(op) == pytest.approx(72 + 800)


def test_table_rejects_foreign_files(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a cstar_fx latency table"):
        LatencyTable(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        LatencyTable(bad)


def test_target_validation():
    with pytest.raises(ValueError, match="backend"):
        LatencyTarget(backend="tvm")
    with pytest.raises(ValueError, match="batch_size"):
        LatencyTarget(batch_size=0)


def test_auto_scheme_picks_svd_where_tucker2_launches_cost_more():
    model, x = _model(), torch.randn(1, 3, 8, 8)
    launch = FakeLatency(launch=0.3)  # Tucker-2 runs three ops, SVD two: a launch-bound target favours SVD
    auto = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.3, cost_model=launch, example_inputs=x,
                               conv_scheme="auto")
    tucker = cstar_fx.plan_ranks(model, budget="latency", target_speedup=1.3, cost_model=launch, example_inputs=x)
    schemes = {lp.scheme for lp in auto.factorized.values()}
    two_ops = {"svd", "spatial_svd"}  # each runs two ops to Tucker-2's three
    assert two_ops & {auto.layers[n].scheme for n in ("2", "4")}
    assert auto.cost <= auto.dense_cost / 1.3 * (1 + 1e-9)  # still on budget
    assert sum(lp.energy for lp in auto.factorized.values()) >= sum(lp.energy for lp in tucker.factorized.values())
    gm = cstar_fx.transform(model, plan=auto)
    assert gm(x).shape == (1, 10) and schemes <= two_ops | {"tucker2"}
