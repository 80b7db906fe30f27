"""White-box attacks in [0, 1] pixel space: PGD (L_inf and L_2, random start, restarts) and FGSM.

Normalisation belongs inside the model, so the attacks clip to [0, 1] and measure ``eps`` in pixels.
Each attack runs the model in eval mode and restores every module's ``training`` flag afterwards;
gradients are taken with respect to the perturbation only, so parameter ``.grad`` is never touched.
Under a caller's bf16 ``torch.autocast`` the forward runs in bf16 while the perturbation and the
loss stay float32.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> adv = pgd(model, x, y, eps=0.1, alpha=0.02, steps=5)
    >>> bool((adv - x).abs().max() <= 0.1 + 1e-6) and bool(adv.min() >= 0) and bool(adv.max() <= 1)
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CstarTypeError, CstarValueError
from ..torchutil import eval_mode
from .config import NORMS, AttackConfig

__all__ = ["pgd", "pgd_attack", "fgsm", "project_delta", "as_logits", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, y) -> per-example loss`` (shape ``(batch,)``) that an attack maximises."""

_TINY = 1e-12


def as_logits(out: Any) -> torch.Tensor:
    """The model output as a logits tensor, or a ``TypeError`` that says how to make it one.

    Example:
        >>> as_logits(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
        >>> as_logits({"logits": torch.zeros(2, 3)})
        Traceback (most recent call last):
        ...
        cstar_fx.errors.CstarTypeError: the model returns a dict with keys ['logits'], not a tensor of logits; wrap it so forward returns the logits ...
    """
    if isinstance(out, torch.Tensor):
        if out.ndim != 2:
            raise CstarTypeError(f"the model returns a tensor of shape {tuple(out.shape)}; attacks and evaluation need "
                                 f"(batch, classes) logits")
        return out
    what = f"a dict with keys {sorted(map(str, out))[:5]}" if isinstance(out, dict) else f"a {type(out).__name__}"
    raise CstarTypeError(f"the model returns {what}, not a tensor of logits; wrap it so forward returns the logits "
                         f"(e.g. a module whose forward returns model(x)['logits'])")


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.ndim - 1)))


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # Uniform direction, radius uniform in [0, eps].
        direction = torch.randn_like(x)
        direction = direction / _flat_norm(direction).clamp_min(_TINY)
        radius = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype)
        delta = direction * radius * eps
    return (x + delta).clamp(0.0, 1.0) - x


def project_delta(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the ``norm`` ball of radius ``eps`` and keep ``x + delta`` in [0, 1].

    Example:
        >>> round(float(project_delta(torch.full((1, 2), 0.9), torch.full((1, 2), 0.5), 0.2, "linf").max()), 4)
        0.2
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    # Clipping x + delta into [0, 1] only shrinks each coordinate of delta, so it stays in the ball.
    return (x + delta).clamp(0.0, 1.0) - x


def _step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / _flat_norm(grad).clamp_min(_TINY)


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, norm: str, restarts: int) -> None:
    if norm not in NORMS:
        raise CstarValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise CstarTypeError("x must be a floating-point tensor of inputs in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise CstarValueError("y must be a tensor with one label per input "
                              f"({x.shape[0]}), got {getattr(y, 'shape', y)}")
    if y.ndim != 1:
        raise CstarValueError("y must be a 1-D tensor of class indices, shape "
                              f"({x.shape[0]},), got shape {tuple(y.shape)}; pass y.view(-1)")
    for name, value in (("steps", steps), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CstarTypeError(f"{name} must be an int, got {value!r}")
    if not (math.isfinite(eps) and math.isfinite(alpha) and eps >= 0 and alpha >= 0):
        raise CstarValueError(f"eps and alpha must be finite numbers >= 0, got eps={eps:g}, alpha={alpha:g}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or (y.numel() and int(y.min()) < 0):
        raise CstarValueError("y must hold integer class indices >= 0 (e.g. torch.long labels)")
    if not torch.isfinite(x).all():
        raise CstarValueError("x contains NaN or Inf; inputs must be images in [0, 1]")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise CstarValueError("x must hold images in [0, 1] (the attack clips to that box and measures "
                              f"eps in pixels), got values in [{float(x.min()):.3g}, "
                              f"{float(x.max()):.3g}]; pass unnormalised images and put the normalisation "
                              "inside the model, e.g. nn.Sequential(Normalize(mean, std), model)")
    if steps < 0 or restarts < 1:
        raise CstarValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")


def _attack_once(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                 norm: str, random_start: bool, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(as_logits(model(x + delta)), y)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        delta = project_delta(delta.detach() + _step(grad, alpha, norm), x, eps, norm)
    x_adv = (x + delta.detach()).clamp(0.0, 1.0)
    with torch.no_grad():
        logits = as_logits(model(x_adv))
        return x_adv, loss_fn(logits, y).float(), logits.argmax(1) != y


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        loss_fn: LossFn | None = None) -> torch.Tensor:
    """Projected gradient ascent on the loss within the ``norm`` ball of radius ``eps`` around ``x``.

    ``alpha`` defaults to ``2.5 * eps / steps``. With ``restarts > 1`` each example keeps the
    restart that misclassifies it, else the one with the highest loss. ``loss_fn(logits, y)``
    returns a per-example loss (default: cross-entropy). Returns a detached tensor in [0, 1] with
    ``||x_adv - x|| <= eps``. ``eps == 0`` runs the attack all the same and returns ``x`` unchanged,
    which is what the evaluation's sanity check relies on.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
        >>> x, y = torch.rand(3, 2, 2, 2), torch.tensor([0, 1, 0])
        >>> adv = pgd(model, x, y, eps=0.5, steps=3, norm="l2")
        >>> bool((torch.linalg.vector_norm((adv - x).flatten(1), dim=1) <= 0.5 + 1e-5).all())
        True
    """
    for name, value in (("eps", eps), ("alpha", alpha)):
        if (value is not None or name == "eps") and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise CstarTypeError(f"{name} must be a number, got {value!r}")
    eps = float(eps)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise CstarTypeError(f"steps must be an int, got {steps!r}")
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else float(alpha)
    _check(x, y, eps, alpha, steps, norm, restarts)
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise CstarTypeError(f"x is {x.dtype} but the model's weights are {weight.dtype}; pass x.to({weight.dtype}) "
                             f"(or convert the model)")
    x = x.detach()
    y = y.long()
    if steps == 0 and not random_start:
        return x.clone()
    loss_fn = loss_fn or _ce
    with eval_mode(model), torch.enable_grad():
        best, best_loss, best_wrong = _attack_once(model, x, y, eps, alpha, steps, norm, random_start, loss_fn)
        for _ in range(restarts - 1):
            adv, loss, wrong = _attack_once(model, x, y, eps, alpha, steps, norm, random_start, loss_fn)
            # Prefer a misclassifying restart; among equals, the higher loss.
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.ndim - 1))), adv, best)
            best_loss = torch.where(better, loss, best_loss)
            best_wrong = best_wrong | wrong
    return best


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, **overrides: Any) -> torch.Tensor:
    """:func:`pgd` with the threat model and budget of ``attack``; ``overrides`` replace or add :func:`pgd`
    arguments (e.g. ``loss_fn``).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
        >>> x, y = torch.rand(3, 2, 2, 2), torch.tensor([0, 1, 0])
        >>> adv = pgd_attack(model, x, y, AttackConfig(eps=0.1, alpha=0.05, steps=2))
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    options = dict(eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm=attack.norm,
                   random_start=attack.random_start, restarts=attack.restarts)
    return pgd(model, x, y, **{**options, **overrides})


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
         random_start: bool = False, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The fast gradient sign method (one L_inf step); with ``random_start`` it is FGSM-RS of fast AT.

    ``alpha`` defaults to ``eps`` (``1.25 * eps`` with a random start, as in Wong et al. 2020). The
    result is projected back onto the eps-ball and [0, 1].

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x = torch.full((2, 1, 2, 2), 0.5)
        >>> round(float((fgsm(model, x, torch.tensor([0, 1]), eps=0.1) - x).abs().max()), 4)
        0.1
    """
    alpha = (1.25 * eps if random_start else eps) if alpha is None else alpha
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=1, norm="linf", random_start=random_start, loss_fn=loss_fn)
