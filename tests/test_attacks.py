"""Attacks and adversarial losses: loss goes up, perturbations stay in the ball and the box, flags restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cstar_fx.data import digits
from cstar_fx.models import small_cnn
from cstar_fx.robust import AttackConfig, LossConfig, TrainConfig, adversarial_loss, fgsm, finetune, pgd

EPS = 0.1


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    train, test = digits()
    model = small_cnn(width=8)
    finetune(model, train, TrainConfig(epochs=6, batch_size=64, lr=0.05, loss=LossConfig("clean"), progress=False))
    x, y = test.subset(128).tensors()
    return model.eval(), x, y


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 1.0)])
def test_pgd_raises_loss_and_stays_in_ball_and_box(trained, norm: str, eps: float) -> None:
    model, x, y = trained
    adv = pgd(model, x, y, eps=eps, steps=10, norm=norm, restarts=2)
    assert _loss(model, adv, y) > _loss(model, x, y) + 0.5
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else torch.linalg.vector_norm(delta, dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(size.max()) > 0.5 * eps  # it did move
    assert not adv.requires_grad


def test_pgd_without_random_start_is_deterministic_and_beats_noise(trained) -> None:
    model, x, y = trained
    a = pgd(model, x, y, eps=EPS, alpha=0.02, steps=10, random_start=False)
    b = pgd(model, x, y, eps=EPS, alpha=0.02, steps=10, random_start=False)
    assert torch.equal(a, b)
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    assert _loss(model, a, y) > _loss(model, noise, y)


def test_eps_zero_returns_input(trained) -> None:
    model, x, y = trained
    assert torch.equal(pgd(model, x, y, eps=0.0, steps=5), x)


def test_restarts_are_never_weaker(trained) -> None:
    model, x, y = trained

    def acc(restarts: int) -> float:
        torch.manual_seed(1)  # the first restart draws the same start in both runs
        adv = pgd(model, x, y, eps=0.05, alpha=0.0125, steps=5, restarts=restarts)
        with torch.no_grad():
            return float((model(adv).argmax(1) == y).float().mean())

    assert acc(4) <= acc(1)


def test_training_flags_restored_and_param_grads_untouched() -> None:
    model = small_cnn(width=4).train()
    model[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    running = model[1].running_mean.clone()
    pgd(model, x, y, eps=EPS, steps=3)
    fgsm(model, x, y, eps=EPS, random_start=True)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model[1].running_mean, running)  # eval mode: batch-norm statistics untouched


def test_fgsm_takes_one_full_sign_step() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    adv = fgsm(model, x, y, eps=EPS)
    grad_nonzero = model[1].weight.abs().sum(0) > 0
    assert torch.allclose((adv - x).abs().flatten(1)[:, grad_nonzero], torch.full((4, int(grad_nonzero.sum())), EPS))
    adv_rs = fgsm(model, x, y, eps=EPS, random_start=True)
    assert float((adv_rs - x).abs().max()) <= EPS + 1e-6


def test_pgd_under_cpu_bf16_autocast_keeps_float32_and_the_ball(trained) -> None:
    model, x, y = trained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd(model, x, y, eps=EPS, steps=3)
    assert adv.dtype == torch.float32
    assert float((adv - x).abs().max()) <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _loss(model, adv, y) > _loss(model, x, y)


def test_attack_argument_errors() -> None:
    model = nn.Linear(4, 2)
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="one label per input"):
        pgd(model, x, torch.tensor([0]), eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=-0.1)


@pytest.mark.parametrize("kind", ["pgd", "trades", "fast", "clean"])
def test_adversarial_loss_is_a_differentiable_scalar(trained, kind: str) -> None:
    model, x, y = trained
    cfg = LossConfig(kind, attack=AttackConfig(eps=EPS, alpha=0.025, steps=3))
    model.zero_grad(set_to_none=True)
    loss = adversarial_loss(model, x, y, cfg)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_adversarial_losses_exceed_clean_and_trades_beta0_is_clean(trained) -> None:
    model, x, y = trained
    atk = AttackConfig(eps=EPS, alpha=0.025, steps=5)
    with torch.no_grad():
        clean = float(adversarial_loss(model, x, y, LossConfig("clean")))
        assert float(adversarial_loss(model, x, y, LossConfig("pgd", attack=atk))) > clean + 0.5
        assert float(adversarial_loss(model, x, y, LossConfig("trades", attack=atk, beta=0.0))) == pytest.approx(clean, abs=1e-6)
        assert float(adversarial_loss(model, x, y, LossConfig("trades", attack=atk, beta=6.0))) > clean
        assert float(adversarial_loss(model, x, y, TrainConfig(loss=LossConfig("pgd", attack=atk)))) > clean


def test_configs_validate_with_helpful_messages() -> None:
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps=-1)
    with pytest.raises(ValueError, match="norm"):
        AttackConfig(norm="linfinity")
    with pytest.raises(ValueError, match="kind='pgd' for L2"):
        LossConfig("fast", attack=AttackConfig(norm="l2", eps=0.5))
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(TypeError, match="LossConfig"):
        TrainConfig(loss="pgd")  # type: ignore[arg-type]
    assert AttackConfig(eps=0.1, alpha=0.025).scaled(0.2).alpha == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": float("nan")}, "finite numbers"),
    ({"eps": float("inf")}, "finite numbers"),
    ({"eps": 0.1, "alpha": -1.0}, "finite numbers"),
])
def test_pgd_rejects_non_finite_or_negative_budgets(kwargs, message):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        pgd(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), **kwargs)


def test_pgd_rejects_bad_labels_and_non_finite_inputs():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="integer class indices"):
        pgd(model, torch.rand(2, 1, 2, 2), torch.tensor([0.0, 1.0]), eps=0.1)
    with pytest.raises(ValueError, match="integer class indices"):
        pgd(model, torch.rand(2, 1, 2, 2), torch.tensor([0, -1]), eps=0.1)
    x = torch.rand(2, 1, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pgd(model, x, torch.tensor([0, 1]), eps=0.1)
