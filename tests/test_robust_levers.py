"""The levers of the robust recipe: distillation loss, data-aware factors and allocation, BN re-estimation."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cstar_fx
from cstar_fx.analysis import count_params
from cstar_fx.data import TensorData, digits
from cstar_fx.decompose import (spatial_svd_factors_data, svd_factors, svd_factors_data, svd_reconstruct,
                                tucker2_factors, tucker2_factors_data, tucker2_reconstruct)
from cstar_fx.schemes import get as get_scheme
from cstar_fx.models import small_cnn
from cstar_fx.passes.calibrate import CalibrationError
from cstar_fx.robust import (AttackConfig, LossConfig, TrainConfig, adversarial_loss, decompose_finetune, finetune,
                             recalibrate_bn)
from cstar_fx.robust.cstar import calibration_batches


def _patches(x: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    cols = F.unfold(x, k, padding=pad)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# -- distillation --------------------------------------------------------------------------------------------

def test_distill_loss_is_the_documented_mix_of_ce_and_kl_to_the_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 4), nn.Linear(6, 4)
    x, y = torch.rand(8, 6), torch.randint(0, 4, (8,))
    loss = adversarial_loss(student, x, y, LossConfig("clean", distill=0.25), teacher=teacher)
    logits = student(x)
    target = F.softmax(teacher(x), 1)
    kl = (target * (target.log() - F.log_softmax(logits, 1))).sum(1).mean()
    expected = 0.75 * F.cross_entropy(logits, y) + 0.25 * kl
    assert torch.allclose(loss, expected, atol=1e-6)


def test_distill_from_itself_is_zero_kl_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    teacher = copy.deepcopy(student)
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    loss = adversarial_loss(student, x, y, LossConfig("clean", distill=1.0), teacher=teacher)
    assert abs(float(loss.detach())) < 1e-6
    loss = adversarial_loss(student, x, y, LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.05, steps=2),
                                                      distill=0.5), teacher=teacher)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_distill_needs_a_teacher_and_rejects_trades() -> None:
    with pytest.raises(ValueError, match="teacher"):
        adversarial_loss(nn.Linear(3, 2), torch.rand(2, 3), torch.tensor([0, 1]), LossConfig("clean", distill=0.5))
    with pytest.raises(ValueError, match="TRADES"):
        LossConfig("trades", distill=0.5)
    with pytest.raises(ValueError, match="distill"):
        LossConfig("pgd", distill=1.5)
    with pytest.raises(ValueError, match="teacher="):
        finetune(small_cnn(width=4), digits()[0].subset(64),
                 TrainConfig(epochs=1, batch_size=32, loss=LossConfig("clean", distill=0.5), progress=False))


def test_finetune_with_distillation_learns_the_teachers_function_not_the_labels() -> None:
    train, test = digits()
    shifted = train._like(train.x, (train.y + 1) % 10)  # a teacher that disagrees with every label
    torch.manual_seed(0)
    teacher = small_cnn(width=8)
    finetune(teacher, shifted, TrainConfig(epochs=10, batch_size=64, lr=0.1, loss=LossConfig("clean"), progress=False))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, _ = test.tensors()
    with torch.no_grad():
        teacher_says = teacher.eval()(x).argmax(1)
    agree = {}
    for distill in (0.0, 1.0):
        torch.manual_seed(1)
        student = small_cnn(width=8)
        cfg = TrainConfig(epochs=6, batch_size=64, lr=0.05, loss=LossConfig("clean", distill=distill), progress=False)
        finetune(student, train, cfg, teacher=teacher)
        with torch.no_grad():
            agree[distill] = float((student.eval()(x).argmax(1) == teacher_says).float().mean())
    assert agree[1.0] > 0.75 and agree[0.0] < 0.3, agree
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is only read


# -- data-aware factors --------------------------------------------------------------------------------------

def test_data_aware_svd_is_exact_at_full_rank_and_optimal_in_output_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 9, dtype=torch.float64)
    x = torch.randn(9, 400, dtype=torch.float64) * torch.linspace(0.05, 3, 9, dtype=torch.float64)[:, None]
    m = x @ x.T / x.shape[1]
    assert torch.allclose(svd_reconstruct(*svd_factors_data(w, 9, m)), w)
    for r in (1, 3, 6):
        plain = ((svd_reconstruct(*svd_factors(w, r)) - w) @ x).norm()
        aware = ((svd_reconstruct(*svd_factors_data(w, r, m)) - w) @ x).norm()
        assert aware < plain
        # Eckart-Young on W X: nothing of rank r does better than the discarded output spectrum
        s = torch.linalg.svdvals(w @ x)
        assert torch.isclose(aware, s[r:].pow(2).sum().sqrt(), rtol=1e-6)


def test_data_aware_tucker2_is_exact_at_full_rank_and_beats_hosvd_on_the_outputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    x = torch.randn(32, 8, 8, 8, dtype=torch.float64) * torch.linspace(0.1, 4, 8, dtype=torch.float64)[None, :, None, None]
    m = _patches(x, 3, 1).T @ _patches(x, 3, 1) / _patches(x, 3, 1).shape[0]
    y = F.conv2d(x, w, padding=1)
    assert torch.allclose(tucker2_reconstruct(*tucker2_factors_data(w, 16, 8, m)), w)
    for ranks in ((8, 4), (4, 2), (12, 6)):
        plain = (F.conv2d(x, tucker2_reconstruct(*tucker2_factors(w, *ranks)), padding=1) - y).norm()
        aware = (F.conv2d(x, tucker2_reconstruct(*tucker2_factors_data(w, *ranks, m)), padding=1) - y).norm()
        assert aware < plain, ranks


def _spatial(height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    return torch.einsum("riy,orx->oiyx", height, width)


@pytest.mark.parametrize("shape", [(16, 4, 3, 3), (4, 16, 3, 3), (6, 5, 3, 2)])
def test_data_aware_spatial_svd_is_exact_at_full_rank_and_beats_the_weight_svd_on_the_outputs(shape) -> None:
    torch.manual_seed(0)
    c_out, c_in, kh, kw = shape
    w = torch.randn(*shape, dtype=torch.float64)
    # correlated neighbouring pixels and unequal channel scales, as in real feature maps
    x = F.avg_pool2d(torch.randn(32, c_in, 11, 11, dtype=torch.float64), 2, 1)
    x = x * torch.linspace(0.1, 4, c_in, dtype=torch.float64)[None, :, None, None]
    cols = F.unfold(x, (kh, kw), padding=1)
    p = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    m = p.T @ p / p.shape[0]
    y = F.conv2d(x, w, padding=1)
    full = min(c_in * kh, c_out * kw)
    height, width = spatial_svd_factors_data(w, full, m)
    assert height.shape == (full, c_in, kh) and width.shape == (c_out, full, kw)
    assert torch.allclose(_spatial(height, width), w)
    weight_form = get_scheme("spatial_svd")
    for r in (1, full // 3, full - 2):
        plain = (F.conv2d(x, weight_form.project(w, (r,)), padding=1) - y).norm()
        aware = (F.conv2d(x, _spatial(*spatial_svd_factors_data(w, r, m)), padding=1) - y).norm()
        assert aware < plain, r
    # the two halves of each component carry the same scale
    h, wd = spatial_svd_factors_data(w, 3, m)
    assert torch.allclose(h.flatten(1).norm(dim=1), wd.transpose(0, 1).flatten(1).norm(dim=1))


def test_data_aware_factors_are_scale_invariant_and_survive_dead_inputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    x = torch.rand(4, 4, 6, 6)
    x[:, 1] = 0  # a dead channel: a singular moment matrix
    m = _patches(x, 3, 1).T @ _patches(x, 3, 1)
    ref = tucker2_reconstruct(*tucker2_factors_data(w, 4, 2, m))
    assert torch.isfinite(ref).all()
    for scale in (1e-20, 1e20):
        got = tucker2_reconstruct(*tucker2_factors_data(w * scale, 4, 2, m * scale))
        assert torch.allclose(got / scale, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("conv_scheme", ["tucker2", "spatial_svd"])
def test_transform_with_calibration_is_exact_at_full_rank_and_closer_to_the_dense_outputs(conv_scheme) -> None:
    torch.manual_seed(0)
    model = small_cnn(width=16).eval()
    train, test = digits()
    calib, _ = train.subset(256).tensors()
    x, _ = test.subset(128).tensors()
    with torch.no_grad():
        y = model(x)
    full = cstar_fx.RankPlan.full_rank(model, conv_scheme=conv_scheme)
    gm = cstar_fx.transform(model, plan=full, calibration=calib).eval()
    with torch.no_grad():
        assert torch.allclose(gm(x), y, atol=1e-4)
    plan = cstar_fx.plan_ranks(model, 4, round_to=1, conv_scheme=conv_scheme)
    assert conv_scheme in {lp.scheme for lp in plan.factorized.values()}
    weight_based = cstar_fx.transform(model, plan=plan).eval()
    aware = cstar_fx.transform(model, plan=plan, calibration=[(calib, None)]).eval()
    with torch.no_grad():
        assert (aware(x) - y).norm() < (weight_based(x) - y).norm()


def test_calibration_errors_name_the_fix_and_leave_the_model_alone() -> None:
    model = small_cnn(width=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="cannot run"):
        cstar_fx.transform(model, 2, calibration=torch.rand(4, 3, 8, 8))
    with pytest.raises(CalibrationError, match="no non-empty batch"):
        cstar_fx.transform(model, 2, calibration=[])
    with pytest.raises(CalibrationError, match="tensor of inputs"):
        cstar_fx.transform(model, 2, calibration="images/")
    with pytest.raises(ValueError, match="calibration"):
        cstar_fx.transform(model, plan=cstar_fx.plan_ranks(model, 2, round_to=1), decompose=False,
                            calibration=torch.rand(2, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_batches_are_clean_and_attacked_inputs_inside_the_ball() -> None:
    torch.manual_seed(0)
    model = small_cnn(width=8)
    cfg = TrainConfig(batch_size=40, loss=LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.05, steps=2)))
    xs = calibration_batches(model, digits()[0], 100, cfg)
    assert [x.shape[0] for x in xs] == [40, 40, 40, 40, 20, 20]
    for clean, adv in zip(xs[::2], xs[1::2]):
        assert (adv - clean).abs().max() <= 0.1 + 1e-6
        assert not torch.equal(adv, clean)


# -- batch-norm re-estimation --------------------------------------------------------------------------------

def test_recalibrate_bn_measures_the_data_and_restores_the_settings() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Flatten())
    model.eval()
    train = digits()[0]
    assert recalibrate_bn(model, train, batches=5, batch_size=64) == 5
    bn = model[1]
    assert bn.momentum == 0.3 and not bn.training and not model.training
    x, _ = train.tensors()
    with torch.no_grad():
        feats = model[0](x)
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=0.05 * float(feats.abs().mean()))
    assert recalibrate_bn(nn.Linear(2, 2), train) == 0
    with pytest.raises(ValueError, match="batches"):
        recalibrate_bn(model, train, batches=0)


def test_decompose_finetune_with_calibration_and_distillation_runs_and_keeps_the_input() -> None:
    torch.manual_seed(0)
    train = digits()[0].subset(128)
    model = small_cnn(width=8)
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, progress=False,
                      loss=LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.05, steps=1), distill=0.8))
    gm = decompose_finetune(model, train, 4, cfg, calibrate=64, round_to=1)
    assert gm.meta["cstar_training"]["calibrate"] == 64
    assert cstar_fx.get_report(gm).ratio_params >= 3.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="calibrate"):
        decompose_finetune(model, train, 4, cfg, calibrate=-1)


def _pruning_case(epochs: int = 1) -> tuple[TensorData, nn.Module, dict, TrainConfig]:
    """Digits, a small_cnn of width 16, a copy of its weights and a short PGD fine-tune, for the prune-first tests."""
    torch.manual_seed(0)
    model = small_cnn(width=16)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.01, progress=False,
                      loss=LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.05, steps=1)))
    return digits()[0].subset(128), model, copy.deepcopy(model.state_dict()), cfg


def test_prune_share_prunes_channels_then_factorizes_to_the_total_ratio() -> None:
    train, model, before, cfg = _pruning_case()
    gm = decompose_finetune(model, train, 8, cfg, calibrate=64, prune=0.5, round_to=1)
    dense = sum(p.numel() for p in model.parameters())
    assert abs(dense / sum(p.numel() for p in gm.parameters()) / 8 - 1) < 0.05  # the total ratio, both steps together
    widths = [m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert max(widths) < 2 * 16  # channels were removed (small_cnn's widest conv has 2 * width outputs)
    assert cstar_fx.get_plan(gm).factorized and gm.meta["cstar_training"]["prune"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for bad, match in ((1.0, "0 <= prune < 1"), (-0.1, "0 <= prune < 1"), (True, "0 <= prune < 1")):
        with pytest.raises(ValueError, match=match):
            decompose_finetune(model, train, 8, cfg, prune=bad)
    with pytest.raises(ValueError, match="budget='latency'"):
        decompose_finetune(model, train, 8, cfg, prune=0.5, budget="latency", example_inputs=torch.rand(1, 1, 8, 8))


def test_prune_share_with_budget_both_reaches_the_ratio_in_params_and_flops() -> None:
    train, model, _, cfg = _pruning_case()
    example = torch.rand(1, 1, 8, 8)
    gm = decompose_finetune(model, train, 6, cfg, prune=0.5, budget="both", example_inputs=example, round_to=1)
    by_params = count_params(model) / count_params(gm)
    by_flops = cstar_fx.count_flops(model, example) / cstar_fx.count_flops(gm, example)
    assert min(by_params, by_flops) >= 6 * 0.97  # each measure at least the ratio (the allocator's tolerance)
    report = cstar_fx.get_report(gm)  # end to end: from the model given, not from its pruned copy
    assert report.ratio_params == pytest.approx(by_params) and report.ratio_flops == pytest.approx(by_flops)
    assert max(by_params, by_flops) > 6 * 1.03  # the measure pruning favoured overshoots: the other one binds
    assert [m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d)] != \
        [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_prune_epochs_train_the_pruned_network_first_within_the_same_epochs(tmp_path) -> None:
    train, model, before, cfg = _pruning_case(epochs=2)
    gm = decompose_finetune(model, train, 8, cfg, prune=0.5, prune_epochs=1, round_to=1, run_dir=tmp_path)
    rec = gm.meta["cstar_training"]
    first, rest = rec["pruned_finetune"]["epochs"], rec["finetune"]["epochs"]
    assert len(first) == 1 and len(rest) == 1  # the same two epochs in all, one per network
    assert first[0]["lr"] == pytest.approx(0.01)  # held constant on the pruned network
    assert rec["config"]["epochs"] == 2 and rec["prune_epochs"] == 1
    assert (tmp_path / "prune_finetune").is_dir() and (tmp_path / "finetune").is_dir()
    dense = count_params(model)
    assert abs(dense / count_params(gm) / 8 - 1) < 0.05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = decompose_finetune(model, train, 8, cfg, prune=0.5, prune_epochs=1, round_to=1, run_dir=tmp_path,
                               resume=True)  # both stages resume from their checkpoints: the same network
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="needs a prune share > 0"):
        decompose_finetune(model, train, 8, cfg, prune_epochs=1)
    with pytest.raises(ValueError, match="must be fewer than the fine-tune's epochs"):
        decompose_finetune(model, train, 8, cfg, prune=0.5, prune_epochs=2)
    with pytest.raises(ValueError, match="prune_epochs must be a number of epochs"):
        decompose_finetune(model, train, 8, cfg, prune=0.5, prune_epochs=-1)


def test_gradual_epochs_train_an_intermediate_factorization_then_retruncate(tmp_path) -> None:
    train, model, before, cfg = _pruning_case(epochs=2)
    gm = decompose_finetune(model, train, 8, cfg, gradual_epochs=1, calibrate=64, round_to=1, run_dir=tmp_path)
    rec = gm.meta["cstar_training"]
    first, rest = rec["gradual_finetune"]["epochs"], rec["finetune"]["epochs"]
    assert len(first) == 1 and len(rest) == 1 and rec["gradual_epochs"] == 1  # the same two epochs in all
    assert first[0]["lr"] == pytest.approx(0.01)  # held constant on the intermediate network
    assert (tmp_path / "gradual_finetune").is_dir() and (tmp_path / "finetune").is_dir()
    assert abs(count_params(model) / count_params(gm) / 8 - 1) < 0.05  # the final ratio
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mid, final = rec["gradual_finetune"]["ranks"], cstar_fx.get_plan(gm).factorized
    assert set(mid) <= set(final)  # re-truncated: at most the intermediate ranks, some lower (dense ones may go)
    pairs = [(a, b) for name, ranks in mid.items() for a, b in zip(final[name].ranks, ranks)]
    assert all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)
    again = decompose_finetune(model, train, 8, cfg, gradual_epochs=1, calibrate=64, round_to=1, run_dir=tmp_path,
                               resume=True)  # both stages resume from their checkpoints: the same network
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="plus prune_epochs .* must be fewer"):
        decompose_finetune(model, train, 8, cfg, prune=0.5, prune_epochs=1, gradual_epochs=1)
    with pytest.raises(ValueError, match="gradual_epochs must be a number of epochs"):
        decompose_finetune(model, train, 8, cfg, gradual_epochs=-1)
    with pytest.raises(TypeError, match="needs a numeric ratio"):
        decompose_finetune(model, train, cstar_fx.CstarConfig(ratio=8), cfg, gradual_epochs=1)


# -- the joint phase ------------------------------------------------------------------------------------------

def test_admm_gives_a_layer_whose_ranks_change_a_fresh_dual_and_logs_the_worst_layer() -> None:
    from cstar_fx.robust import Admm, AdmmConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    p2, p4 = cstar_fx.plan_ranks(model, 2, round_to=1), cstar_fx.plan_ranks(model, 4, round_to=1)
    assert all(p2.layers[n].ranks != p4.layers[n].ranks for n in p2.factorized)
    plans = iter([p2, p4])
    admm = Admm(model, p2, AdmmConfig(rho=1.0), replan_fn=lambda m: next(plans))
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(32, 32))
    admm.refresh()  # same ranks: U accumulates W - Z
    assert admm.U["0.weight"].abs().sum() > 0
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(32, 32))
    admm.refresh()  # new ranks everywhere: the dual restarts from W - Z alone
    for name in ("0.weight", "1.weight"):
        w = dict(model.named_parameters())[name].detach()
        assert torch.allclose(admm.U[name], w - admm.Z[name], atol=1e-6)
    last = admm.history[-1]
    per_layer = admm.layer_residuals()
    assert last.worst == max(per_layer.values()) and last.worst_layer in per_layer
    assert last.worst >= last.relative - 1e-9  # the global number never exceeds the worst layer


def test_cstar_resolves_auto_rho_from_the_joint_learning_rate() -> None:
    from cstar_fx.robust import AdmmConfig, JointConfig, auto_rho, cstar

    torch.manual_seed(0)
    data = digits()[0].subset(256)
    quick = TrainConfig(epochs=1, batch_size=64, lr=0.02, progress=False, loss=LossConfig("clean"))
    cfg = JointConfig(joint=quick.replace(schedule="constant"), finetune=quick, admm=AdmmConfig(replan=False))
    with pytest.warns(UserWarning, match="hand-off"):  # one joint epoch cannot close the gap: said, not hidden
        gm = cstar(small_cnn(width=8), data, 4, cfg, round_to=1)
    used = gm.meta["cstar_training"]["config"]["admm"]["rho"]
    assert used == pytest.approx(auto_rho(cfg.joint, 4))  # 256 images / batch 64 = 4 steps per refresh
    assert gm.meta["cstar_training"]["admm"][-1]["worst_layer"]
    with pytest.raises(ValueError, match="auto"):
        from cstar_fx.robust import Admm

        Admm(small_cnn(width=8), cstar_fx.plan_ranks(small_cnn(width=8), 4, round_to=1), AdmmConfig())


# -- robustness-aware allocation ------------------------------------------------------------------------------

def test_layer_sensitivity_is_normalised_reproducible_and_leaves_the_model_alone() -> None:
    from cstar_fx.robust import layer_sensitivity

    torch.manual_seed(0)
    model = small_cnn(width=8)
    before = copy.deepcopy(model.state_dict())
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=2)
    s = layer_sensitivity(model, digits()[0], attack, n=96, batch_size=32)
    assert set(s) == {"0", "3", "6", "11", "13"}
    assert sum(s.values()) / len(s) == pytest.approx(1.0) and all(v > 0 for v in s.values())
    assert s == layer_sensitivity(model, digits()[0], attack, n=96, batch_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_sensitivity_weighted_allocation_hits_the_budget_and_favours_the_weighted_layer(ratio: float) -> None:
    torch.manual_seed(0)
    model = small_cnn(width=16)
    base = cstar_fx.plan_ranks(model, ratio, round_to=1)
    target = max(base.factorized, key=lambda n: base.layers[n].dense_params)
    weights = {name: (20.0 if name == target else 0.5) for name in base.layers}
    plan = cstar_fx.plan_ranks(model, ratio, round_to=1, sensitivity=weights)
    assert abs(plan.ratio_params / ratio - 1) <= 0.02
    assert plan.layers[target].params > base.layers[target].params
    assert plan.options["sensitivity"][target] == 20.0


def test_sensitivity_mistakes_are_named() -> None:
    model = small_cnn(width=8)
    with pytest.raises(ValueError, match="not factorizable layers"):
        cstar_fx.plan_ranks(model, 2, round_to=1, sensitivity={"nope": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        cstar_fx.plan_ranks(model, 2, round_to=1, sensitivity={"0": float("nan")})
    with pytest.raises(TypeError, match="dict"):
        cstar_fx.plan_ranks(model, 2, round_to=1, sensitivity=[1.0])
    with pytest.raises(ValueError, match="plan_ranks"):
        cstar_fx.transform(model, plan=cstar_fx.plan_ranks(model, 2, round_to=1), sensitivity={"0": 1.0})


# -- the recipe as one call ------------------------------------------------------------------------------------

def test_compress_is_decompose_finetune_with_the_recipes_levers() -> None:
    from cstar_fx.robust import RECOMMENDED, compress

    train = digits()[0].subset(96)
    torch.manual_seed(0)
    teacher = small_cnn(width=8)
    before = copy.deepcopy(teacher.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, progress=False,
                      loss=LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.05, steps=1)))
    gm = compress(teacher, train, 4, cfg, example_inputs=train.x[:1], round_to=1)
    by_hand = decompose_finetune(teacher, train, 4, cfg, example_inputs=train.x[:1], round_to=1,
                                 calibrate=RECOMMENDED.calibrate, prune=RECOMMENDED.prune,
                                 prune_epochs=RECOMMENDED.prune_epochs, budget=RECOMMENDED.budget)
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), by_hand.state_dict().values()))
    assert gm.meta["cstar_training"]["recipe"] == RECOMMENDED.to_dict()
    assert gm.meta["cstar_training"]["prune_epochs"] == RECOMMENDED.prune_epochs == 1
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_compress_refuses_what_the_recipe_would_overrule_naming_the_fix() -> None:
    from cstar_fx.robust import RECOMMENDED, compress

    train = digits()[0].subset(32)
    model, cfg, x = small_cnn(width=4), TrainConfig(epochs=2, progress=False), train.x[:1]
    cases = [
        (dict(example_inputs=x, budget="params"), "recipe.replace(budget='params')"),
        (dict(example_inputs=x, cfg=cfg.replace(loss=LossConfig(distill=0.5))), "recipe.replace(distill=0.5)"),
        (dict(example_inputs=x, cfg=cfg.replace(epochs=1)), "recipe.replace(prune_epochs=0)"),
        (dict(), "needs example_inputs"),
        (dict(example_inputs=x, recipe={"calibrate": 8}), "must be a cstar_fx.robust.Recipe"),
    ]
    for kwargs, fix in cases:
        kwargs.setdefault("cfg", cfg)
        with pytest.raises(cstar_fx.CstarError, match=re.escape(fix)):
            compress(model, train, 4, **kwargs)
    assert RECOMMENDED.replace(budget="params").budget == "params"  # the fix the messages name works
