"""How much the adversarial loss depends on each factorizable layer: weights for robustness-aware rank allocation.

A layer factorized with relative output error ``e`` perturbs its output ``y`` by ``delta`` with
``||delta|| ~ e ||y||``; to first order the loss moves by ``<dL/dy, delta>``, at most
``e ||dL/dy|| ||y||``. :func:`layer_sensitivity` measures ``E[||dL/dy|| * ||y||]`` per example on
adversarial examples of the model itself (the inputs a robust model must get right), normalised to a
mean of 1 over the layers; ``plan_ranks(..., sensitivity=...)`` then weighs each layer's term of the
allocator's objective by it.

Example:
    >>> import torch, cstar_fx
    >>> from cstar_fx.data import digits
    >>> from cstar_fx.models import small_cnn
    >>> model = small_cnn(width=8)
    >>> s = layer_sensitivity(model, digits()[0], AttackConfig(eps=0.1, alpha=0.05, steps=2), n=64)
    >>> plan = cstar_fx.plan_ranks(model, 4, round_to=1, sensitivity=s)
    >>> round(sum(s.values()) / len(s), 6)
    1.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import as_loader
from ..errors import CstarTypeError, CstarValueError
from ..passes.discover import find_layers
from ..passes.trace import trace
from ..torchutil import eval_mode, model_device, private_rng
from .attacks import pgd_attack
from .config import AttackConfig

__all__ = ["layer_sensitivity"]


def layer_sensitivity(model: nn.Module, data: Any, attack: AttackConfig | None = None, *, n: int = 512,
                      batch_size: int = 128, seed: int = 0, **trace_options: Any) -> dict[str, float]:
    """``{layer name: weight}`` for the model's factorizable layers in module form (mean weight 1).

    ``data``: training data as for :func:`~cstar_fx.robust.finetune`; the first ``n`` examples are
    attacked with ``attack`` (default PGD-10, eps 8/255) and the loss gradient at every layer's output
    is measured in eval mode. Costs about ``steps + 2`` forward/backward passes per example. Layers
    called as functions (``F.conv2d`` on a parameter) are not measured and keep weight 1 in the
    allocator. ``trace_options`` (``leaf_modules``, ``concrete_args``, ``autowrap_functions``) are
    those of ``transform``. The model is not modified; the caller's RNG is untouched.

    Example:
        >>> weights = layer_sensitivity(teacher, train, AttackConfig(), n=512)  # doctest: +SKIP
        >>> plan = cstar_fx.plan_ranks(teacher, 16, sensitivity=weights)  # doctest: +SKIP
    """
    attack = AttackConfig() if attack is None else attack
    if not isinstance(attack, AttackConfig):
        raise CstarTypeError(f"attack must be an AttackConfig, got {type(attack).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CstarValueError(f"n must be an int >= 1 (examples to measure on), got {n!r}")
    sites, _ = find_layers(trace(model, **trace_options))
    names = [s.name for s in sites if s.form == "module" and s.name]
    if not names:
        raise CstarValueError("the model has no conv2d/linear module to measure; layer_sensitivity needs module layers")
    modules = {name: model.get_submodule(name) for name in names}
    dev = model_device(model)
    totals = dict.fromkeys(names, 0.0)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outputs[name] = out
        return hook

    seen = 0
    with eval_mode(model), private_rng(dev, seed):
        for x, y in as_loader(data, batch_size, False, dev):
            x, y = x[: n - seen], y[: n - seen]
            adv = pgd_attack(model, x, y, attack)
            handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
            try:
                with torch.enable_grad():
                    loss = F.cross_entropy(model(adv).float(), y, reduction="sum")
                    # Gradients at the layer outputs only: the parameters' .grad stay as the caller left them.
                    grads = torch.autograd.grad(loss, list(outputs.values()), allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            for (name, out), g in zip(outputs.items(), grads):
                if g is not None:
                    g, v = g.flatten(1).double(), out.detach().flatten(1).double()
                    totals[name] += float((g.norm(dim=1) * v.norm(dim=1)).sum())
            outputs.clear()
            seen += x.shape[0]
            if seen >= n:
                break
    if seen == 0:
        raise CstarValueError("the data holds no example to measure on; pass training data")
    mean = sum(totals.values()) / len(totals)
    floor = mean * 1e-3  # a layer the loss does not reach (e.g. unused) still keeps a small positive weight
    weights = {k: max(v, floor) for k, v in totals.items()}
    norm = sum(weights.values()) / len(weights)
    return {k: v / norm for k, v in weights.items()} if norm > 0 else dict.fromkeys(names, 1.0)
