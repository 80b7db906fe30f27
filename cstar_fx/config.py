"""Frozen, validated configuration for planning and transforming."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from collections.abc import Callable
from typing import Any

from .costs import CostModel

__all__ = ["CstarConfig", "resolve_config"]

_BUDGETS = ("params", "flops", "latency")
_CONV_SCHEMES = ("tucker2", "svd", "auto")


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a number > 1 (e.g. ratio=8 for 8x fewer parameters), got {ratio!r}")
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio <= 1.0:
        raise ValueError(f"ratio must be a finite number > 1 (e.g. ratio=8 for 8x fewer parameters), got {ratio!r}")
    return ratio


@dataclass(frozen=True)
class CstarConfig:
    """How to plan ranks: target ratio, what the budget counts, rank granularity, what to skip.

    * ``ratio``: dense cost / compressed cost for the whole model (8 = 8x smaller).
    * ``budget``: ``"params"`` (default) or ``"flops"`` (needs ``example_inputs``).
    * ``round_to``: ranks are multiples of this (hardware-friendly), or a mode's full rank.
    * ``min_rank``: no factor narrower than this (rounded up to ``round_to``).
    * ``skip``: layer names or glob patterns kept dense (e.g. ``("conv1", "fc")``).
    * ``conv_scheme``: ``"tucker2"`` (default), ``"svd"``, or ``"auto"`` (per layer, whichever keeps more
      energy for the cost: Tucker-2 first, then a layer moves to SVD when that is better within the budget).
    * ``leaf_modules``: module names/patterns/types fx should not trace into.
    * ``concrete_args``: forward() arguments to fix while tracing (for control flow on them).
    * ``autowrap_functions``: module-level functions fx should call opaquely rather than trace into
      (helpers with data-dependent control flow); timm's own not-traced registry is added automatically
      when timm is loaded.
    * ``cost_model``: a custom cost (e.g. measured latency); overrides ``budget``.
    * ``target``: for ``budget="latency"``, a :class:`cstar_fx.latency.LatencyTarget` (default: onnxruntime
      CPU, batch 1); ``ratio`` is then the speedup to reach.
    * ``param_ratio``: also require at least this parameter ratio (a cap beside a latency or FLOP budget).
    * ``unpack_attention``: replace each ``nn.MultiheadAttention`` by an equivalent module of plain q/k/v/out
      ``nn.Linear`` layers (:func:`cstar_fx.passes.attention.unpack_attention`) so they are factorized too;
      a plan made with it applies only with it.

    Example:
        >>> cfg = CstarConfig(ratio=8, budget="flops", round_to=8, skip=("fc",))
        >>> cfg.replace(ratio=16).ratio
        16.0
    """

    ratio: float = 8.0
    budget: str = "params"
    round_to: int = 8
    min_rank: int = 1
    skip: tuple[str, ...] = ()
    conv_scheme: str = "tucker2"
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, compare=False)
    cost_model: CostModel | None = field(default=None, compare=False)
    target: Any = None
    param_ratio: float | None = None
    unpack_attention: bool = False
    autowrap_functions: tuple[Callable[..., Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _check_ratio(self.ratio))
        if self.param_ratio is not None:
            object.__setattr__(self, "param_ratio", _check_ratio(self.param_ratio))
        if self.cost_model is None and self.budget not in _BUDGETS:
            raise ValueError(f"budget must be one of {_BUDGETS} (or pass cost_model=...), got {self.budget!r}")
        for name in ("round_to", "min_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.conv_scheme not in _CONV_SCHEMES:
            raise ValueError(f"conv_scheme must be one of {_CONV_SCHEMES}, got {self.conv_scheme!r}")
        for name in ("skip", "leaf_modules"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (tuple, list)):
                raise TypeError(f"{name} must be a tuple of names/patterns, got {type(v).__name__}")
            object.__setattr__(self, name, tuple(v))
        if any(not isinstance(s, str) for s in self.skip):
            raise TypeError(f"skip entries must be layer names or glob patterns (str), got {self.skip!r}")
        if any(not isinstance(x, (str, type)) for x in self.leaf_modules):
            raise TypeError(f"leaf_modules entries must be module names/glob patterns (str) or nn.Module classes, "
                            f"got {self.leaf_modules!r}")
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise TypeError(f"concrete_args must be a dict of forward() argument name -> value, "
                            f"got {type(self.concrete_args).__name__}")
        funcs = self.autowrap_functions
        funcs = (funcs,) if callable(funcs) else funcs
        if not isinstance(funcs, (tuple, list)) or any(not callable(f) or isinstance(f, type) for f in funcs):
            raise TypeError(f"autowrap_functions entries must be functions fx should call opaquely, e.g. "
                            f"autowrap_functions=(my_helper,), got {self.autowrap_functions!r}")
        object.__setattr__(self, "autowrap_functions", tuple(funcs))
        if not isinstance(self.unpack_attention, bool):
            raise TypeError(f"unpack_attention must be True or False, got {self.unpack_attention!r}")
        if self.cost_model is not None and not callable(self.cost_model):
            raise TypeError("cost_model must be callable as cost(layer, scheme, ranks) -> float")

    @property
    def budget_name(self) -> str:
        """The budget's name as reported in plans (the cost model's name when one is given)."""
        if self.cost_model is not None:
            return getattr(self.cost_model, "name", "custom")
        return self.budget

    def replace(self, **changes: Any) -> "CstarConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


_FIELDS = {f.name for f in fields(CstarConfig)}


def resolve_config(ratio: Any, options: dict[str, Any]) -> CstarConfig:
    """Build a :class:`CstarConfig` from ``ratio`` (a number or a config) and keyword options.

    Example:
        >>> resolve_config(4, {"skip": ("fc",)}).skip
        ('fc',)
    """
    unknown = set(options) - _FIELDS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; valid options are {sorted(_FIELDS - {'ratio'})}")
    if isinstance(ratio, CstarConfig):
        return ratio.replace(**options) if options else ratio
    return CstarConfig(ratio=ratio, **options)
