"""Frozen, validated settings for attacks, adversarial losses, training loops, ADMM and CSTAR.

Every class checks its fields when built and names the fix in its error, so a bad value fails at
the call site rather than hours into a run. ``replace(**changes)`` returns a validated copy.

Example:
    >>> cfg = TrainConfig(epochs=5, loss=LossConfig("trades", beta=6.0))
    >>> cfg.replace(lr=0.05).lr
    0.05
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..costs import budget_names
from ..errors import CstarTypeError, CstarValueError

__all__ = ["AttackConfig", "LossConfig", "TrainConfig", "AdmmConfig", "JointConfig", "Recipe", "RECOMMENDED",
           "NORMS", "LOSSES", "SCHEDULES", "check_prune_share", "check_prune_epochs"]

NORMS = ("linf", "l2")
LOSSES = ("pgd", "trades", "fast", "clean")
SCHEDULES = ("cosine", "step", "constant")
PROJECTIONS = ("euclidean", "plan")  # what the ADMM Z-step optimises when it re-plans (AdmmConfig.projection)


def _number(obj: Any, name: str, *, low: float | None = None, high: float | None = None, strict_low: bool = False) -> float:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise CstarTypeError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (strict_low and value == low)):
        raise CstarValueError(f"{name} must be {'>' if strict_low else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise CstarValueError(f"{name} must be <= {high:g}, got {value:g}")
    object.__setattr__(obj, name, value)
    return value


def check_prune_share(value: Any) -> float:
    """``value`` as a share of the compression given to channel pruning: a number in ``[0, 1)``.

    Example:
        >>> check_prune_share(0.5)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise CstarValueError(f"prune must be the share of the compression given to channel pruning, 0 <= prune < 1 "
                              f"(0: off; 1 would leave nothing to factorize), got {value!r}")
    return float(value)


def check_prune_epochs(value: Any, prune: float | None = None, epochs: int | None = None) -> int:
    """``value`` as the number of fine-tune epochs spent on the pruned network before it is factorized: an int
    ``>= 0``; when given, 0 unless ``prune`` (the pruning share) is on, and fewer than the fine-tune's ``epochs``.

    Example:
        >>> check_prune_epochs(1, 0.5, epochs=3)
        1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CstarValueError(f"prune_epochs must be a number of epochs >= 0 (0: off), got {value!r}")
    if value and prune is not None and not prune:
        raise CstarValueError(f"prune_epochs={value} trains the pruned network, so it needs a prune "
                              "share > 0 (the share of the compression given to channel pruning)")
    if value and epochs is not None and value >= epochs:
        raise CstarValueError(f"prune_epochs ({value}) must be fewer than the fine-tune's epochs ({epochs}): the "
                              "factorized network needs the rest")
    return int(value)


def check_gradual_epochs(value: Any, epochs: int | None = None, prune_epochs: int = 0) -> int:
    """``value`` as the number of fine-tune epochs spent on an intermediate factorization before it is re-truncated
    to the final ranks: an int ``>= 0``; when given, fewer than the fine-tune's ``epochs`` less ``prune_epochs``.

    Example:
        >>> check_gradual_epochs(1, epochs=3)
        1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CstarValueError(f"gradual_epochs must be a number of epochs >= 0 (0: off), got {value!r}")
    if value and epochs is not None and value + prune_epochs >= epochs:
        raise CstarValueError(f"gradual_epochs ({value}) plus prune_epochs ({prune_epochs}) must be fewer than the "
                              f"fine-tune's epochs ({epochs}): the network at its final ranks needs the rest")
    return int(value)


def _int(obj: Any, name: str, low: int) -> int:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise CstarValueError(f"{name} must be an int >= {low}, got {value!r}")
    object.__setattr__(obj, name, int(value))
    return int(value)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise CstarValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class _Replace:
    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (nested configs become dicts)."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class AttackConfig(_Replace):
    """A PGD threat model and attack budget. Inputs live in [0, 1].

    * ``norm``: ``"linf"`` or ``"l2"``; ``eps``: the radius; ``alpha``: the step size.
    * ``steps``: gradient steps; ``restarts``: random restarts (the worst case per example is kept);
      ``random_start``: start from a uniform point in the ball instead of the clean input.

    Defaults are the CIFAR-10 L_inf threat model of the paper: eps 8/255, step 2/255, 10 steps.

    Example:
        >>> AttackConfig(steps=20).alpha == 2 / 255
        True
    """

    norm: str = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    restarts: int = 1
    random_start: bool = True

    def __post_init__(self) -> None:
        _choice(self, "norm", NORMS)
        _number(self, "eps", low=0.0)
        _number(self, "alpha", low=0.0)
        _int(self, "steps", 0)
        _int(self, "restarts", 1)
        if not isinstance(self.random_start, bool):
            raise CstarTypeError(f"random_start must be a bool, got {self.random_start!r}")

    def scaled(self, eps: float) -> "AttackConfig":
        """The same attack at another radius, the step size scaled in proportion (used by eps sweeps).

        Example:
            >>> round(AttackConfig(eps=0.1, alpha=0.025).scaled(0.2).alpha, 6)
            0.05
        """
        alpha = self.alpha * (eps / self.eps) if self.eps > 0 else eps / 4
        return self.replace(eps=float(eps), alpha=float(alpha))


@dataclass(frozen=True)
class LossConfig(_Replace):
    """Which training loss :func:`~cstar_fx.robust.adversarial_loss` computes.

    * ``"pgd"``: Madry et al. PGD adversarial training, CE on PGD examples.
    * ``"trades"``: Zhang et al. TRADES, CE(clean) + ``beta`` * KL(adv || clean), the attack maximising the KL.
    * ``"fast"``: Wong et al. fast AT, CE on one FGSM step from a random start with step ``fast_alpha`` * eps.
    * ``"clean"``: plain cross-entropy (standard training, no attack).

    ``distill`` (0 to 1, kinds ``"pgd"``, ``"fast"`` and ``"clean"``): robust distillation from a teacher
    passed to :func:`~cstar_fx.robust.finetune` (``teacher=``). The loss becomes
    ``(1 - distill) * CE(f(x'), y) + distill * KL(teacher(x) || f(x'))`` where ``x'`` is the same
    adversarial example as without distillation and the teacher sees the clean input (RSLAD's
    robust soft labels, Zi et al. 2021): one extra teacher forward per batch, no extra attack.

    Example:
        >>> LossConfig("fast").attack.eps == 8 / 255
        True
    """

    kind: str = "pgd"
    attack: AttackConfig = field(default_factory=AttackConfig)
    beta: float = 6.0
    fast_alpha: float = 1.25
    distill: float = 0.0

    def __post_init__(self) -> None:
        _choice(self, "kind", LOSSES)
        _number(self, "distill", low=0.0, high=1.0)
        if self.distill > 0 and self.kind == "trades":
            raise CstarValueError("distill is defined for kinds 'pgd', 'fast' and 'clean' (TRADES "
                                  "has its own KL term); use LossConfig('pgd', distill=...)")
        if not isinstance(self.attack, AttackConfig):
            raise CstarTypeError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        _number(self, "beta", low=0.0)
        _number(self, "fast_alpha", low=0.0, strict_low=True)
        if self.kind == "fast" and self.attack.norm != "linf":
            raise CstarValueError("loss 'fast' (FGSM with random start) is "
                                  "defined for norm='linf'; use kind='pgd' for L2")


@dataclass(frozen=True)
class TrainConfig(_Replace):
    """One training or fine-tuning run: SGD with momentum, a learning-rate schedule and a loss.

    * ``schedule``: ``"cosine"`` (per step, after ``warmup_epochs`` of linear warm-up), ``"step"``
      (x0.1 at 50% and 75% of the epochs) or ``"constant"``.
    * ``amp``: bf16 autocast, used only on CUDA; ``channels_last``: NHWC memory format (GPU and CPU).
    * ``seed``: seeds the data order, the augmentation and the attacks' random starts.
    * ``grad_clip``: clip the global gradient norm to this value (``None``: off).

    Example:
        >>> TrainConfig(epochs=3, batch_size=64, loss=LossConfig("clean")).loss.kind
        'clean'
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    grad_clip: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _int(self, "epochs", 0)
        _int(self, "batch_size", 1)
        _number(self, "lr", low=0.0, strict_low=True)
        _number(self, "momentum", low=0.0, high=1.0)
        _number(self, "weight_decay", low=0.0)
        _choice(self, "schedule", SCHEDULES)
        _number(self, "warmup_epochs", low=0.0)
        if self.warmup_epochs > self.epochs:
            raise CstarValueError(f"warmup_epochs ({self.warmup_epochs:g}) must not exceed epochs ({self.epochs})")
        if not isinstance(self.loss, LossConfig):
            raise CstarTypeError(f"loss must be a LossConfig (e.g. LossConfig('pgd')), got {type(self.loss).__name__}")
        _int(self, "seed", 0)
        if self.grad_clip is not None:
            _number(self, "grad_clip", low=0.0, strict_low=True)
        for name in ("nesterov", "amp", "channels_last", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise CstarTypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise CstarValueError("nesterov=True needs momentum > 0")


@dataclass(frozen=True)
class AdmmConfig(_Replace):
    """CSTAR's ADMM proximity term ``rho/2 * ||W - Z + U||^2`` over the factorizable weights.

    * ``rho``: the penalty weight; ``None`` (default) is "auto", resolved by
      :func:`~cstar_fx.robust.cstar` with :func:`~cstar_fx.robust.admm.auto_rho`: the weight at which
      SGD with momentum closes the gap between W and Z about once per refresh at the joint phase's
      learning rate. ``lr * rho / (1 - momentum)`` is the fraction of the gap closed per step; far
      larger values turn the "joint" phase into a hard projection followed by retraining.
    * ``rho_growth``: multiplies ``rho`` after each refresh (up to ``rho_max``), the usual ADMM
      continuation; 1.0 (default) keeps it constant, as in the group's reference ADMM code.
    * ``refresh_every``: refresh Z and U every this many optimiser steps; ``None`` (default): once per epoch.
    * ``replan``: re-run the global rank allocator on ``W + U`` at each refresh (the allocator as the
      budget-constrained projection); ``False`` keeps the ranks chosen on the initial weights.
    * ``projection`` (what the plans optimise): ``"plan"`` (default) plans and re-plans with the plan's own
      objective (by default the log of each layer's kept *fraction* of its energy: not a projection, and it
      rarely moves a rank) and gives a layer whose ranks change a fresh dual variable. ``"euclidean"`` plans with
      ``objective="discarded"``, so Z is the Euclidean projection of ``W + U`` onto the networks within the budget
      (exact for SVD layers, an estimate for Tucker-2), and keeps the dual variable when ranks move (the
      constraint, the budget, is the same). In a network with batch norm after its convs the absolute energies
      of different layers are not comparable (a conv's function does not depend on its weights' scale), and the
      projection starves the deep layers: measured 2-3 PGD-20 points worse (docs/robustness.md).

    Example:
        >>> AdmmConfig(rho=0.5, refresh_every=50).refresh_every
        50
        >>> AdmmConfig().rho is None  # auto
        True
    """

    rho: float | None = None
    rho_growth: float = 1.0
    rho_max: float = 10.0
    refresh_every: int | None = None
    replan: bool = True
    projection: str = "plan"

    def __post_init__(self) -> None:
        if self.rho is not None:
            _number(self, "rho", low=0.0, strict_low=True)
        _number(self, "rho_growth", low=1.0)
        _number(self, "rho_max", low=0.0, strict_low=True)
        if self.rho is not None and self.rho_max < self.rho:
            raise CstarValueError(f"rho_max ({self.rho_max:g}) must be >= rho "
                                  f"({self.rho:g}); raise rho_max or lower rho")
        if self.refresh_every is not None:
            _int(self, "refresh_every", 1)
        if not isinstance(self.replan, bool):
            raise CstarTypeError(f"replan must be a bool, got {self.replan!r}")
        if self.projection not in PROJECTIONS:
            raise CstarValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")


@dataclass(frozen=True)
class JointConfig(_Replace):
    """The whole CSTAR recipe: ADMM adversarial training of the dense model, then adversarial fine-tuning.

    * ``joint``: the training run with the ADMM term (dense weights, usually from a robust teacher); a
      constant learning rate by default, so W can still follow Z at the end of the phase.
    * ``finetune``: the adversarial fine-tune of the factorized network.
    * ``admm``: the proximity term's settings.

    Example:
        >>> cfg = JointConfig(joint=TrainConfig(epochs=5, lr=0.01), finetune=TrainConfig(epochs=10, lr=0.01))
        >>> cfg.admm.refresh_every is None
        True
    """

    joint: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01, schedule="constant"))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01))
    admm: AdmmConfig = field(default_factory=AdmmConfig)

    def __post_init__(self) -> None:
        for name, kind in (("joint", TrainConfig), ("finetune", TrainConfig), ("admm", AdmmConfig)):
            if not isinstance(getattr(self, name), kind):
                raise CstarTypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")


@dataclass(frozen=True)
class Recipe(_Replace):
    """The levers of a robust compression, beside the training configs.

    * ``calibrate``: training images (with their adversarial examples against the teacher) on which
      the factorization preserves each layer's outputs (0: factors from the weights alone).
    * ``distill``: weight of robust distillation from the dense teacher in the fine-tune (0: off).
    * ``sensitivity``: training images on which each layer's adversarial-loss sensitivity weighs the
      rank allocation (0: spectral energy alone).
    * ``prune``: share of the compression (in log terms) given to Torch-Pruning channel pruning before
      the factorization (0: low rank alone; 0.5: ``sqrt(ratio)`` each).
    * ``prune_epochs``: fine-tune epochs spent on the pruned network before it is factorized (they come out
      of the fine-tune's epochs; 0: the pruned network is factorized at once). Needs ``prune > 0``.
    * ``budget``: what the ratio counts (:func:`cstar_fx.costs.budget_names`; ``"both"``: parameters and
      FLOPs alike, so it needs example inputs).

    Example:
        >>> Recipe(calibrate=256).distill
        0.0
    """

    calibrate: int = 0
    distill: float = 0.0
    sensitivity: int = 0
    prune: float = 0.0
    prune_epochs: int = 0
    budget: str = "params"

    def __post_init__(self) -> None:
        _int(self, "calibrate", 0)
        _number(self, "distill", low=0.0, high=1.0)
        _int(self, "sensitivity", 0)
        object.__setattr__(self, "prune", check_prune_share(self.prune))
        check_prune_epochs(self.prune_epochs, self.prune)
        if self.budget not in budget_names():
            raise CstarValueError(f"budget must be one of {budget_names()}, got {self.budget!r}")


RECOMMENDED = Recipe(calibrate=512, prune=0.5, prune_epochs=1, budget="both")
"""The recipe the benchmark supports (docs/robustness.md, "The recommended recipe"): channel pruning for
``sqrt(ratio)``, one epoch of the adversarial fine-tune on the pruned network, then data-aware factors for the
rest, ``ratio`` times smaller in parameters and FLOPs alike, and the rest of the plain adversarial fine-tune;
the CLI's defaults."""
