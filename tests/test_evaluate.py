"""Robust evaluation: accuracies, the sanity checks that flag gradient masking, the AutoAttack extra."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn as nn

from cstar_fx.data import digits
from cstar_fx.models import small_cnn
from cstar_fx.robust import AttackConfig, LossConfig, MissingExtraError, TrainConfig, autoattack, evaluate, finetune

ATTACK = AttackConfig(eps=0.1, alpha=0.0125, steps=10)


class RoundInput(nn.Module):
    """A non-differentiable input quantiser: torch.round has a zero gradient almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


@pytest.fixture(scope="module")
def model_and_data() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    train, test = digits()
    model = small_cnn(width=16)
    finetune(model, train, TrainConfig(epochs=6, batch_size=64, lr=0.05, loss=LossConfig("clean"), progress=False))
    return model.eval(), test.subset(200)


def test_healthy_model_passes_every_sanity_check(model_and_data) -> None:
    model, test = model_and_data
    res = evaluate(model, test, attacks=("pgd", "fgsm"), attack=ATTACK, sanity_n=100, progress=False)
    assert res.n == 200 and set(res.robust) == {"pgd10", "fgsm"}
    assert res.clean > 0.85
    assert res.robust["pgd10"] <= res.robust["fgsm"] + 0.02 and res.robust["pgd10"] < res.clean - 0.2
    assert res.sanity is not None and res.sanity.ok and not res.sanity.gradient_masking, str(res.sanity)
    curve = [acc for _, acc in res.sanity.eps_curve]
    assert curve[0] >= curve[-1] and curve[-1] < 0.1
    assert res.sanity["eps0_equals_clean"].value == 0.0
    json.dumps(res.to_dict())
    assert "pgd10" in str(res)


def test_input_quantiser_is_flagged_as_gradient_masking(model_and_data) -> None:
    model, test = model_and_data
    masked = nn.Sequential(RoundInput(), model)
    with pytest.warns(UserWarning, match="masks gradients"):
        res = evaluate(masked, test, attack=ATTACK, sanity_n=128, progress=False)
    assert res.sanity.gradient_masking
    assert not res.sanity["nonzero_input_gradients"].passed
    assert res.sanity["nonzero_input_gradients"].value == 1.0
    assert not res.sanity["near_zero_at_large_eps"].passed  # PGD cannot move: only its random start remains
    honest = evaluate(model, test, attack=ATTACK, sanity=False, progress=False)
    assert res.pgd > honest.pgd + 0.2  # the quantiser fakes robustness the checks expose


def test_randomised_model_fails_the_eps0_check(model_and_data) -> None:
    model, test = model_and_data
    class Jitter(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 0.3 * torch.randn_like(x)

    noisy = nn.Sequential(Jitter(), model)
    with pytest.warns(UserWarning, match="sanity checks failed"):
        res = evaluate(noisy, test, attack=ATTACK, sanity_n=128, progress=False)
    assert not res.sanity["eps0_equals_clean"].passed


def test_evaluate_accepts_batches_and_restores_training_flags(model_and_data) -> None:
    model, test = model_and_data
    model.train()
    try:
        x, y = test.tensors()
        batches = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
        a = evaluate(model, batches, n=120, attack=ATTACK, sanity=False, progress=False)
        b = evaluate(model, test.subset(120), attack=ATTACK, sanity=False, progress=False)
        assert model.training
    finally:
        model.eval()
    assert a.n == 120 and a.clean == b.clean and a.pgd == b.pgd  # same examples, same seed


def test_missing_autoattack_extra_names_the_install_command(model_and_data, monkeypatch: pytest.MonkeyPatch) -> None:
    model, test = model_and_data
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r'pip install "cstar-fx\[robust\]"'):
        evaluate(model, test, attacks=("pgd", "autoattack"), progress=False)


def test_autoattack_adapter_passes_the_threat_model(model_and_data, monkeypatch: pytest.MonkeyPatch) -> None:
    model, test = model_and_data
    calls = {}

    class FakeAutoAttack:
        """Records its arguments and returns the inputs shifted by eps (a stand-in for the real package)."""

        def __init__(self, m: nn.Module, *, eps: float, norm: str, version: str, device: object, seed: int) -> None:
            calls.update(eps=eps, norm=norm, version=version, training=m.training)
            self.eps = eps

        def run_standard_evaluation(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int):
            calls["n"] = x.shape[0]
            return (x + self.eps).clamp(0, 1), y

    monkeypatch.setitem(sys.modules, "pyautoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    res = evaluate(model, test, attacks=("pgd", "autoattack"), attack=ATTACK, autoattack_n=50, sanity=False,
                   progress=False)
    assert calls == {"eps": 0.1, "norm": "Linf", "version": "standard", "training": False, "n": 50}
    assert res.counts["autoattack"] == 50 and 0.0 <= res.robust["autoattack"] <= 1.0


def test_apgd_runs_autoattacks_first_two_attacks_only(model_and_data, monkeypatch: pytest.MonkeyPatch) -> None:
    model, test = model_and_data
    ran = {}

    class FakeAutoAttack:
        def __init__(self, m: nn.Module, *, eps: float, norm: str, version: str, device: object, seed: int) -> None:
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]  # what version="standard" sets

        def run_standard_evaluation(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int):
            ran["attacks"] = list(self.attacks_to_run)
            return x, y

    monkeypatch.setitem(sys.modules, "pyautoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    res = evaluate(model, test, attacks=("apgd",), attack=ATTACK, autoattack_n=20, sanity=False, progress=False)
    assert ran["attacks"] == ["apgd-ce", "apgd-t"]
    assert res.counts["apgd"] == 20 and "autoattack" not in res.robust
    with pytest.raises(ValueError, match="version must be"):
        autoattack(model, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), eps=0.1, version="fast")


def test_evaluate_argument_errors(model_and_data) -> None:
    model, test = model_and_data
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(model, test, attacks=("cw",))
    with pytest.raises(ValueError, match="L_inf attack"):
        evaluate(model, test, attacks=("fgsm",), attack=AttackConfig(norm="l2", eps=0.5))
