"""The fine-tuning hook: one adversarial training loss that any training loop can call.

The attack runs with the model in eval mode (its batch-norm statistics untouched); the returned loss
is computed in whatever mode the caller left the model, so a training loop keeps ``model.train()``.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.robust import LossConfig, AttackConfig
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    >>> cfg = LossConfig("trades", attack=AttackConfig(eps=0.1, alpha=0.03, steps=3))
    >>> loss = adversarial_loss(model, x, y, cfg)
    >>> loss.backward()  # parameters now hold the TRADES gradient
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CstarTypeError, CstarValueError
from ..torchutil import eval_mode
from .attacks import fgsm, pgd_attack, project_delta
from .config import LossConfig, TrainConfig

__all__ = ["adversarial_loss", "adversarial_step", "LossOutput"]


@dataclass(frozen=True)
class LossOutput:
    """A training loss with the logits it was computed from (on the inputs the loss scores).

    Example:
        >>> out = LossOutput(torch.tensor(1.0), torch.zeros(2, 3))
        >>> out.logits.shape
        torch.Size([2, 3])
    """

    loss: torch.Tensor
    logits: torch.Tensor


def _kl(logits_adv: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    # Per-example KL(target || softmax(adv)), the TRADES robustness term.
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), target_probs, reduction="none").sum(1)


def _with_distill(ce: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, cfg: LossConfig,
                  teacher: nn.Module | None) -> torch.Tensor:
    if cfg.distill == 0:
        return ce
    if teacher is None:
        raise CstarValueError(f"LossConfig(distill={cfg.distill:g}) needs the teacher: pass teacher=<dense "
                              "robust model> to finetune/adversarial_loss, or set distill=0")
    with torch.no_grad(), eval_mode(teacher):
        target = F.softmax(teacher(x).float(), dim=1)
    return (1.0 - cfg.distill) * ce + cfg.distill * _kl(logits, target).mean()


def adversarial_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LossConfig | TrainConfig, *,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     teacher: nn.Module | None = None) -> LossOutput:
    """Like :func:`adversarial_loss` but also returns the logits the loss scored (for accuracy logging).

    For ``"trades"`` the logits are those of the adversarial inputs. ``forward`` (default ``model``)
    computes the logits that the loss backpropagates through, e.g. a ``DistributedDataParallel``
    wrapper of ``model``: the attack's many forward passes then run on the plain ``model`` and only
    the training forward takes part in the gradient all-reduce. ``teacher`` is the model that
    ``cfg.distill`` distils from (run in eval mode on the clean inputs, without gradients).

    Example:
        >>> import torch, torch.nn as nn
        >>> out = adversarial_step(nn.Linear(4, 2), torch.rand(3, 4), torch.tensor([0, 1, 0]), LossConfig("clean"))
        >>> out.logits.shape
        torch.Size([3, 2])
    """
    cfg = cfg.loss if isinstance(cfg, TrainConfig) else cfg
    if not isinstance(cfg, LossConfig):
        raise CstarTypeError(f"cfg must be a LossConfig or TrainConfig, got {type(cfg).__name__}")
    a = cfg.attack
    fwd = model if forward is None else forward
    if cfg.kind == "clean":
        logits = fwd(x)
        return LossOutput(_with_distill(F.cross_entropy(logits.float(), y), logits, x, cfg, teacher), logits)
    if cfg.kind == "pgd":
        x_adv = pgd_attack(model, x, y, a)
        logits = fwd(x_adv)
        return LossOutput(_with_distill(F.cross_entropy(logits.float(), y), logits, x, cfg, teacher), logits)
    if cfg.kind == "fast":
        x_adv = fgsm(model, x, y, eps=a.eps, alpha=cfg.fast_alpha * a.eps, random_start=True)
        logits = fwd(x_adv)
        return LossOutput(_with_distill(F.cross_entropy(logits.float(), y), logits, x, cfg, teacher), logits)
    # TRADES: the attack maximises KL(f(x) || f(x')) from a small Gaussian start (Zhang et al. 2019).
    with torch.no_grad(), eval_mode(model):
        target = F.softmax(model(x).float(), dim=1)
    start = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
    # From this fixed start every restart would be the same attack: one is enough.
    x_adv = pgd_attack(model, start, y, a, random_start=False, restarts=1, loss_fn=lambda logits, _y: _kl(logits, target))
    # pgd measured its ball around the jittered start; re-project onto the ball around x.
    x_adv = x + project_delta(x_adv - x, x, a.eps, a.norm)
    logits_clean = fwd(x)
    logits_adv = fwd(x_adv)
    natural = F.cross_entropy(logits_clean.float(), y)
    robust = _kl(logits_adv, F.softmax(logits_clean.float(), dim=1)).mean()
    return LossOutput(natural + cfg.beta * robust, logits_adv)


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LossConfig | TrainConfig, *,
                     teacher: nn.Module | None = None) -> torch.Tensor:
    """The scalar training loss for ``cfg.kind``: PGD-AT (Madry), TRADES (``beta``), fast AT or clean CE.

    ``x`` holds inputs in [0, 1]; call ``loss.backward()`` and step your optimiser as usual.
    ``teacher`` is needed when ``cfg.distill > 0`` (robust distillation, see :class:`LossConfig`).

    Example:
        >>> import torch, torch.nn as nn
        >>> from cstar_fx.robust import LossConfig
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> loss = adversarial_loss(model, torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]), LossConfig("fast"))
        >>> loss.ndim
        0
    """
    return adversarial_step(model, x, y, cfg, teacher=teacher).loss
