"""CstarPass and PrunePass as torch.fx passes: PassManager pipelines with foreign passes, the PassResult contract,
inputs left unchanged, budgets met, and clear errors for bad input."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager, pass_result_wrapper
from torch.fx.passes.shape_prop import ShapeProp

import cstar_fx
from cstar_fx.pass_objects import CstarPass, PassCheckError, PrunePass

pytest.importorskip("torch_pruning", reason="PrunePass needs Torch-Pruning (pip install 'cstar-fx[pruning]')")
pass_objects = sys.modules["cstar_fx.pass_objects"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = x + torch.relu(self.conv3(x))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class ShapePropPass(PassBase):
    """torch's own ShapeProp, wrapped as a pass: annotates every node with its tensor metadata, in place."""

    def __init__(self, example: torch.Tensor) -> None:
        self.example = example

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        ShapeProp(graph_module).propagate(self.example)
        return PassResult(graph_module, False)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def gm() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(Net().eval())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16)


def _snapshot(gm: fx.GraphModule) -> tuple:
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, dict(gm.meta), [n.name for n in gm.graph.nodes]


def _unchanged(gm: fx.GraphModule, snap: tuple) -> bool:
    code, state, meta, nodes = snap
    now = gm.state_dict()
    return (gm.code == code and set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
            and dict(gm.meta) == meta and [n.name for n in gm.graph.nodes] == nodes)


def test_pipeline_factorize_prune_factorize_with_foreign_passes(gm, x):
    seen = []

    def count_nodes(graph_module: fx.GraphModule) -> None:  # a user pass: plain function, wrapped by torch
        seen.append(len(graph_module.graph.nodes))

    snap = _snapshot(gm)
    manager = PassManager([CstarPass(ratio=2, round_to=4), PrunePass(1.5, x, round_to=1), ShapePropPass(x),
                           pass_result_wrapper(count_nodes), CstarPass(ratio=1.5, round_to=4)])
    result = manager(gm)

    assert isinstance(result, PassResult) and result.modified is True
    out = result.graph_module
    assert isinstance(out, fx.GraphModule) and out is not gm
    out.graph.lint()
    assert _unchanged(gm, snap)  # no pass modified the GraphModule it was given
    assert seen and seen[0] > len(gm.graph.nodes)  # the user pass saw the factorized, pruned graph
    # budgets compound: 2x, then 1.5x (within the pruning tolerance), then 1.5x
    assert _count(gm) / _count(out) >= 2 * 1.5 * 0.97 * 1.5
    assert cstar_fx.get_report(out).ratio_params >= 1.5
    assert out(x).shape == (1, 10)


def test_shapeprop_metadata_survives_a_cstar_pass(gm, x):
    result = PassManager([ShapePropPass(x), CstarPass(ratio=2, round_to=4)])(gm)
    kept = [n for n in result.graph_module.graph.nodes if n.op == "placeholder"]
    assert kept[0].meta["tensor_meta"].shape == x.shape
    assert "tensor_meta" in next(n for n in gm.graph.nodes if n.op == "placeholder").meta  # ShapeProp ran on the input


def test_cstar_pass_honours_the_pass_result_contract(gm, x):
    snap = _snapshot(gm)
    p = CstarPass(ratio=4, round_to=4)
    result = p(gm)
    assert isinstance(result, PassResult) and result.modified is True
    assert isinstance(result.graph_module, fx.GraphModule) and result.graph_module is not gm
    assert _unchanged(gm, snap)
    plan = cstar_fx.get_plan(result.graph_module)
    assert plan.dense_cost / plan.cost >= 4 and cstar_fx.get_report(result.graph_module).ratio_params >= 4
    p.ensures(result.graph_module)


def test_cstar_pass_options_reach_transform(gm, x):
    result = CstarPass(ratio=2, budget="flops", example_inputs=x, skip=("fc2",))(gm)
    report = cstar_fx.get_report(result.graph_module)
    assert report.ratio_flops >= 2 * 0.98 and "fc2" in report.dense


def test_cstar_pass_at_full_rank_is_exact(gm, x):
    gm = gm.double()
    result = PassManager([CstarPass(plan=cstar_fx.RankPlan.full_rank(gm))])(gm)
    with torch.no_grad():
        assert torch.allclose(result.graph_module(x.double()), gm(x.double()), atol=1e-10)


def test_prune_pass_contract_budget_and_plan(gm, x):
    factorized = CstarPass(ratio=2, round_to=4)(gm).graph_module
    snap = _snapshot(factorized)
    result = PrunePass(2, x, round_to=1)(factorized)
    out = result.graph_module
    assert isinstance(result, PassResult) and result.modified is True and isinstance(out, fx.GraphModule)
    assert _unchanged(factorized, snap)
    assert abs(_count(factorized) / _count(out) / 2 - 1) <= 0.03
    # the plan and report are re-read from the pruned modules and stay end to end
    assert cstar_fx.get_plan(out).params == _count(out)
    assert cstar_fx.get_report(out).params == _count(out)
    assert cstar_fx.get_report(out).ratio_params == pytest.approx(_count(gm) / _count(out))


def test_prune_pass_budget_both_reaches_the_ratio_in_params_and_flops(gm, x):
    out = PrunePass(2, x, round_to=1, budget="both")(gm).graph_module
    by_params, by_flops = _count(gm) / _count(out), cstar_fx.count_flops(gm, x) / cstar_fx.count_flops(out, x)
    assert min(by_params, by_flops) == pytest.approx(out.meta["cstar_prune"]["achieved"])
    assert abs(min(by_params, by_flops) / 2 - 1) <= 0.03 and max(by_params, by_flops) >= 2 * 0.97


def test_prune_pass_keep_ranks_keeps_every_rank(gm, x):
    factorized = CstarPass(ratio=2, round_to=4)(gm).graph_module
    out = PrunePass(1.2, x, round_to=1, keep_ranks=True)(factorized).graph_module
    before, after = cstar_fx.get_plan(factorized), cstar_fx.get_plan(out)
    assert {n: lp.ranks for n, lp in after.factorized.items()} == {n: lp.ranks for n, lp in before.factorized.items()}
    assert _count(out) < _count(factorized)


def test_prune_pass_retraces_a_plain_module(gm, x, monkeypatch):
    plain = Net().eval()
    monkeypatch.setattr(pass_objects, "prune_to_ratio", lambda model, ratio, inputs, **kw: plain)
    p = PrunePass(1.0001, x, tolerance=0.99)
    result = p(gm)
    assert isinstance(result.graph_module, fx.GraphModule)
    assert torch.equal(result.graph_module(x), plain(x))


def test_bad_input_gives_a_clear_error(x):
    model = Net()
    for p in (CstarPass(ratio=2), PrunePass(2, x)):
        with pytest.raises(TypeError, match=r"runs on a torch.fx.GraphModule, got Net; .*symbolic_trace\(model\)"):
            p(model)
        with pytest.raises(Exception, match="An error occurred when running") as info:
            PassManager([p])(model)
        assert isinstance(info.value.__cause__, TypeError) and "symbolic_trace" in str(info.value.__cause__)


def test_bad_options_fail_when_the_pipeline_is_built(x):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['round_two'\]"):
        CstarPass(ratio=2, round_two=8)
    with pytest.raises(ValueError, match="ratio must be a finite number > 1"):
        CstarPass(ratio=1)
    with pytest.raises(ValueError, match="the plan fixes every rank"):
        CstarPass(8, plan=cstar_fx.RankPlan.full_rank(nn.Linear(64, 64)))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['ratio_x'\]"):
        PrunePass(2, x, ratio_x=3)
    with pytest.raises(TypeError, match="ignored_layers by name"):
        PrunePass(2, x, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="budget must be one of .params., .flops., .both."):
        PrunePass(2, x, budget="latency")


def test_keep_ranks_needs_a_factorized_input(gm, x):
    with pytest.raises(ValueError, match="put a CstarPass before it"):
        PrunePass(2, x, keep_ranks=True)(gm)


def test_ensures_catches_a_missed_budget(gm, x):
    out = CstarPass(ratio=2, round_to=4)(gm).graph_module
    out.meta["cstar_plan"] = dataclasses.replace(cstar_fx.get_plan(out), target_ratio=100.0)
    with pytest.raises(PassCheckError, match="short of the 100x asked for"):
        CstarPass(ratio=100).ensures(out)
    pruned = copy.deepcopy(gm)
    pruned.meta["cstar_prune"] = {"budget": "params", "ratio": 4.0, "achieved": 2.0, "tolerance": 0.03}
    with pytest.raises(PassCheckError, match=r"reached 2.000x \(params\), not within 3% of the 4x"):
        PrunePass(4, x).ensures(pruned)
