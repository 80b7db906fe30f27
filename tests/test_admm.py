"""CSTAR's ADMM term and the one-call pipelines (cstar, decompose_finetune)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx.data import digits
from cstar_fx.decompose import project
from cstar_fx.models import small_cnn
from cstar_fx.robust import (Admm, AdmmConfig, AttackConfig, JointConfig, LossConfig, TrainConfig, cstar,
                             decompose_finetune, finetune)

QUICK = TrainConfig(epochs=1, batch_size=64, lr=0.02, progress=False,
                    loss=LossConfig("fast", attack=AttackConfig(eps=0.1, alpha=0.04, steps=1)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn(width=16)


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    model = _model()
    finetune(model, digits()[0], TrainConfig(epochs=4, batch_size=64, lr=0.05, loss=LossConfig("clean"), progress=False))
    return model


ADMM_RUN = TrainConfig(epochs=5, batch_size=32, lr=0.02, loss=LossConfig("clean"), progress=False)


def test_admm_drives_w_towards_its_low_rank_projection(pretrained: nn.Module) -> None:
    model = copy.deepcopy(pretrained)
    admm = Admm(model, cstar_fx.plan_ranks(model, ratio=4), AdmmConfig(rho=1.0, replan=False))
    finetune(model, digits()[0].subset(640), ADMM_RUN, hook=admm)
    rel = [r.relative for r in admm.history]
    gaps = [r.gap for r in admm.history]
    assert [r.step for r in admm.history] == [0, 20, 40, 60, 80, 100]  # initial projection + once per epoch
    assert rel[-1] < 0.15 * rel[0] and rel[-1] < min(rel[1:-1]), rel
    assert gaps[-1] < 0.15 * gaps[0], gaps  # W itself is now close to rank-limited


def test_without_the_term_w_stays_far_from_low_rank(pretrained: nn.Module) -> None:
    model = copy.deepcopy(pretrained)
    plan = cstar_fx.plan_ranks(model, ratio=4)
    finetune(model, digits()[0].subset(640), ADMM_RUN)
    assert Admm(model, plan, AdmmConfig(rho=1.0, replan=False)).history[0].gap > 0.5


def test_refresh_every_n_steps_is_counted() -> None:
    model = _model()
    admm = Admm(model, cstar_fx.plan_ranks(model, ratio=4), AdmmConfig(rho=1.0, refresh_every=3, replan=False))
    finetune(model, digits()[0].subset(320), TrainConfig(epochs=1, batch_size=32, lr=0.01, progress=False,
                                                         loss=LossConfig("clean")), hook=admm)
    assert [r.step for r in admm.history] == [0, 3, 6, 9]


def test_refresh_is_the_scaled_admm_update_and_penalty_gradient() -> None:
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 6))
    plan = cstar_fx.plan_ranks(model, ratio=2, round_to=1)
    admm = Admm(model, plan, AdmmConfig(rho=0.5, rho_growth=2.0, rho_max=10.0, replan=False))
    ranks = admm.ranks
    w = {n: p.detach().clone() for n, p in model.named_parameters() if n in ranks}
    for n in ranks:
        assert torch.allclose(admm.Z[n], project(w[n], ranks[n]), atol=1e-6)
    with torch.no_grad():
        for n in ranks:
            dict(model.named_parameters())[n].add_(0.01)
    u_before = {n: admm.U[n].clone() for n in ranks}
    admm.refresh()
    for n in ranks:
        w_now = dict(model.named_parameters())[n].detach()
        z = project(w_now + u_before[n], ranks[n])
        assert torch.allclose(admm.Z[n], z, atol=1e-5)
        assert torch.allclose(admm.U[n], (u_before[n] + w_now - z) * 0.5, atol=1e-5)  # rescaled: rho 0.5 -> 1.0
    assert admm.rho == 1.0
    model.zero_grad()
    admm.penalty().backward()
    for n in ranks:
        p = dict(model.named_parameters())[n]
        assert torch.allclose(p.grad, admm.rho * (p.detach() - admm.Z[n] + admm.U[n]), atol=1e-6)


def test_admm_state_survives_a_weights_only_checkpoint() -> None:
    model = _model()
    admm = Admm(model, cstar_fx.plan_ranks(model, ratio=4), AdmmConfig(rho=1.0, replan=True))
    admm.refresh()
    buf = io.BytesIO()
    torch.save(admm.state_dict(), buf)
    buf.seek(0)
    other = Admm(_model(), cstar_fx.plan_ranks(model, ratio=4), AdmmConfig(rho=1.0, replan=True))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.rho == admm.rho and other.steps == admm.steps and other.plan == admm.plan
    assert all(torch.equal(other.U[n], admm.U[n]) for n in admm.U)
    assert [r.to_dict() for r in other.history] == [r.to_dict() for r in admm.history]


def test_admm_argument_errors() -> None:
    model = _model()
    flops_plan = cstar_fx.plan_ranks(model, ratio=4, budget="flops", example_inputs=torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="replan_fn="):
        Admm(model, flops_plan, AdmmConfig(rho=1.0, replan=True))
    other = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="not parameters of this model"):
        Admm(other, cstar_fx.plan_ranks(model, ratio=4), AdmmConfig(rho=1.0, replan=False))
    with pytest.raises(ValueError, match="rho_max"):
        AdmmConfig(rho=2.0, rho_max=1.0)


def test_cstar_runs_the_whole_method_and_leaves_the_input_alone(pretrained: nn.Module, tmp_path: Path) -> None:
    model = pretrained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = digits()[0].subset(640)
    cfg = JointConfig(joint=QUICK.replace(epochs=2, batch_size=32), finetune=QUICK, admm=AdmmConfig(rho=1.0))
    gm = cstar(model, data, 4, cfg, run_dir=tmp_path)
    assert isinstance(gm, torch.fx.GraphModule)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = cstar_fx.get_report(gm)
    assert report.ratio_params >= 4.0
    meta = gm.meta["cstar_training"]
    assert meta["method"] == "cstar" and len(meta["admm"]) == 3 and len(meta["finetune"]["epochs"]) == 1
    assert meta["admm"][-1]["relative"] < meta["admm"][0]["relative"]
    assert (tmp_path / "joint" / "checkpoint.pt").is_file() and (tmp_path / "finetune" / "checkpoint.pt").is_file()
    x = torch.rand(4, 1, 8, 8)
    again = cstar(model, data, 4, cfg, run_dir=tmp_path, resume=True)  # both phases done: loads, trains nothing
    assert again.meta["cstar_training"]["finetune"]["resumed_from"] == 1
    with torch.no_grad():
        assert torch.equal(again.eval()(x), gm.eval()(x))


def test_decompose_finetune_is_the_plain_variant() -> None:
    model = _model()
    gm = decompose_finetune(model, digits()[0].subset(256), 4, QUICK)
    meta = gm.meta["cstar_training"]
    assert meta["method"] == "decompose_finetune" and "admm" not in meta
    assert cstar_fx.get_report(gm).ratio_params >= 4.0
    assert gm(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_the_euclidean_z_step_moves_rank_to_the_energy_and_keeps_the_dual() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24))
    plan = cstar_fx.plan_ranks(model, ratio=2, round_to=1)  # the default objective: ranks spread evenly
    admm = Admm(model, plan, AdmmConfig(rho=1.0, projection="euclidean"))
    with torch.no_grad():
        for n in admm.U:
            admm.U[n].normal_()
        model[2].weight.mul_(20)  # now the second layer holds nearly all the energy
    u_before = {n: admm.U[n].clone() for n in admm.U}
    admm.refresh()
    assert admm.ranks["2.weight"][0] > plan.layers["2"].ranks[0] > admm.ranks["0.weight"][0]
    old = {lp.param: lp.ranks[0] for lp in plan.factorized.values()}
    assert admm.history[0].rank_moves == 0
    assert admm.history[-1].rank_moves == sum(abs(admm.ranks[n][0] - r) for n, r in old.items()) > 0
    assert admm.plan.ratio_params >= 2 and admm.plan.options["objective"] == "discarded"
    params = dict(model.named_parameters())
    for n in admm.U:  # the same budget, so the same constraint: the dual carries on (U += W - Z)
        w = params[n].detach()
        assert torch.allclose(admm.U[n], u_before[n] + w - admm.Z[n], atol=1e-5)
        assert torch.allclose(admm.Z[n], project(w + u_before[n], admm.ranks[n]), atol=1e-4)
    other = Admm(copy.deepcopy(model), plan, AdmmConfig(rho=1.0, projection="plan"))
    other.refresh()  # the plan's own objective leaves these ranks where they were
    assert other.ranks == {lp.param: lp.ranks for lp in plan.factorized.values()}
    assert other.history[-1].rank_moves == 0
    with pytest.raises(ValueError, match="projection must be one of"):
        AdmmConfig(projection="nuclear")


def test_cstar_refuses_a_planning_objective_the_euclidean_z_step_would_override() -> None:
    cfg = JointConfig(joint=QUICK, finetune=QUICK, admm=AdmmConfig(projection="euclidean"))
    with pytest.raises(ValueError, match="projection='plan'"):
        cstar(_model(), digits()[0].subset(64), 4, cfg, objective="log_energy")
