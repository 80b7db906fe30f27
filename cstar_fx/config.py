"""Frozen, validated configuration for planning and transforming: :class:`CstarConfig` is one flat set of options,
made of what is traced (:class:`~cstar_fx.analysis.TraceConfig`, :attr:`CstarConfig.trace`) and what the plan
must fit (:class:`Budget`, :meth:`CstarConfig.make_budget`), plus how ranks are rounded and which conv scheme
is used."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from collections.abc import Callable
from typing import Any

from .allocate import OBJECTIVES
from .analysis import TraceConfig
from .costs import CostModel, as_cost_model, budget_names, caps_params, cost_model_for
from .errors import CstarTypeError, CstarValueError
from .schemes import DEFAULT_CONV, conv_scheme_names

__all__ = ["CstarConfig", "Budget", "resolve_config", "resolve_options", "check_ratio"]


def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float, if it is a finite number > 1 (a dense / compressed ratio); else a clear error.

    Example:
        >>> check_ratio(8)
        8.0
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise CstarTypeError(f"ratio must be a number > 1 (e.g. ratio=8 for 8x fewer parameters), got {ratio!r}")
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio <= 1.0:
        raise CstarValueError("ratio must be a finite number > 1 (e.g. "
                              f"ratio=8 for 8x fewer parameters), got {ratio!r}")
    return ratio


@dataclass(frozen=True)
class CstarConfig:
    """How to plan ranks: target ratio, what the budget counts, rank granularity, what to skip.

    * ``ratio``: dense cost / compressed cost for the whole model (8 = 8x smaller).
    * ``budget``: what the ratio counts, a name registered with :func:`cstar_fx.costs.register_budget`:
      ``"params"`` (default), ``"flops"`` (needs ``example_inputs``), ``"both"`` (at least ``ratio`` fewer FLOPs
      *and* parameters; needs ``example_inputs``) or ``"latency"`` (measured on ``target``).
    * ``round_to``: ranks are multiples of this (hardware-friendly), or a mode's full rank.
    * ``min_rank``: no factor narrower than this (rounded up to ``round_to``).
    * ``skip``: layer names or glob patterns kept dense (e.g. ``("conv1", "fc")``).
    * ``conv_scheme``: ``"tucker2"`` (default), ``"svd"``, ``"spatial_svd"`` (any scheme registered for kxk
      convs, :func:`cstar_fx.schemes.conv_scheme_names`), or ``"auto"`` (per layer, whichever keeps more energy
      for the cost: Tucker-2 first, then a layer moves to another kxk scheme when that is better within the budget).
    * ``leaf_modules``: module names/patterns/types fx should not trace into.
    * ``concrete_args``: forward() arguments to fix while tracing (for control flow on them).
    * ``autowrap_functions``: module-level functions fx should call opaquely rather than trace into
      (helpers with data-dependent control flow); timm's own not-traced registry is added automatically
      when timm is loaded.
    * ``cost_model``: a custom cost (e.g. measured latency); overrides ``budget``.
    * ``target``: for ``budget="latency"``, a :class:`cstar_fx.latency.LatencyTarget` (default: onnxruntime
      CPU, batch 1); ``ratio`` is then the speedup to reach.
    * ``param_ratio``: also require at least this parameter ratio (a cap beside a latency or FLOP budget).
    * ``objective``: what the allocator maximises (:data:`cstar_fx.allocate.OBJECTIVES`): ``"log_energy"``
      (default: the sum of the logs of each layer's kept fraction of its energy, so no layer is starved) or
      ``"discarded"`` (the least discarded energy in absolute terms: the Euclidean projection onto the budget, the
      textbook ADMM Z-step; with batch norm after the convs it starves the deep layers, see docs/robustness.md).
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
    conv_scheme: str = DEFAULT_CONV
    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, compare=False)
    cost_model: CostModel | None = field(default=None, compare=False)
    target: Any = None
    param_ratio: float | None = None
    unpack_attention: bool = False
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    objective: str = "log_energy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.param_ratio is not None:
            object.__setattr__(self, "param_ratio", check_ratio(self.param_ratio))
        if self.cost_model is None and self.budget not in budget_names():
            raise CstarValueError(f"budget must be one of {budget_names()} (or "
                                  f"pass cost_model=...), got {self.budget!r}")
        for name in ("round_to", "min_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CstarValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.objective not in OBJECTIVES:
            raise CstarValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.conv_scheme not in conv_scheme_names():
            raise CstarValueError(f"conv_scheme must be one of {conv_scheme_names()}, got {self.conv_scheme!r}")
        trace = self.trace  # validates the traced half
        for f in fields(TraceConfig):
            object.__setattr__(self, f.name, getattr(trace, f.name))
        if self.cost_model is not None:
            as_cost_model(self.cost_model)  # validates it

    @property
    def budget_name(self) -> str:
        """The budget's name as reported in plans (the cost model's name when one is given)."""
        if self.cost_model is not None:
            return as_cost_model(self.cost_model).name
        return self.budget

    @property
    def trace(self) -> TraceConfig:
        """What is traced: ``leaf_modules``, ``concrete_args``, ``autowrap_functions``, ``unpack_attention``, ``skip``.

        Example:
            >>> CstarConfig(skip="fc").trace.skip
            ('fc',)
        """
        return TraceConfig(**{f.name: getattr(self, f.name) for f in fields(TraceConfig)})

    def make_budget(self, limit: float | None = None) -> "Budget":
        """The budget a plan must fit: ``cost_model`` (or the one ``budget`` names, built for ``target``) with
        ``ratio``, or with the absolute ``limit`` on the compressed cost instead when one is given.

        Example:
            >>> b = CstarConfig(ratio=4, budget="flops").make_budget()
            >>> b.cost.name, b.ratio_for(100.0)
            ('flops', 4.0)
        """
        cost = as_cost_model(self.cost_model) if self.cost_model is not None else cost_model_for(self.budget, self.target)
        param_ratio = self.param_ratio
        if self.cost_model is None and caps_params(self.budget):
            if limit is not None:
                raise CstarValueError(f"budget={self.budget!r} holds a ratio in "
                                      "FLOPs and parameters; it takes no limit")
            param_ratio = max(param_ratio or self.ratio, self.ratio)
        return Budget(cost, None if limit is not None else self.ratio, limit, param_ratio)

    def replace(self, **changes: Any) -> "CstarConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: a cost model and either a ``ratio`` (dense / compressed cost of the whole model)
    or a ``limit`` on the compressed cost in the cost model's unit (e.g. milliseconds for latency), plus an
    optional ``param_ratio`` the parameters must reach as well.

    Example:
        >>> from cstar_fx.costs import ParamCost
        >>> Budget(ParamCost(), limit=25.0).ratio_for(100.0)
        4.0
    """

    cost: CostModel
    ratio: float | None = None
    limit: float | None = None
    param_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.limit is None):
            raise CstarValueError("a budget has either a ratio or a limit on the compressed cost, not both or neither")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, numbers.Real)
                                       or not 0 < self.limit < math.inf):
            raise CstarValueError("the limit must be a positive finite number "
                                  f"(in the cost model's unit), got {self.limit!r}")

    def ratio_for(self, total: float) -> float:
        """The ratio to plan at, for a dense model whose whole cost is ``total``.

        Example:
            >>> from cstar_fx.costs import ParamCost
            >>> Budget(ParamCost(), ratio=8).ratio_for(100.0)
            8.0
        """
        if self.limit is None:
            return self.ratio
        if total <= self.limit:
            raise CstarValueError(f"the target {self.cost.name} {self.limit:g} is not "
                                  f"below the dense model's {total:.4g}; ask for less")
        return total / self.limit


_FIELDS = {f.name for f in fields(CstarConfig)}


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - _FIELDS
    if unknown:
        raise CstarTypeError(f"unknown option(s) {sorted(unknown)}; valid options are {sorted(_FIELDS - {'ratio'})}")


def resolve_config(ratio: Any, options: dict[str, Any]) -> CstarConfig:
    """Build a :class:`CstarConfig` from ``ratio`` (a number or a config) and keyword options.

    Example:
        >>> resolve_config(4, {"skip": ("fc",)}).skip
        ('fc',)
    """
    _check_options(options)
    if isinstance(ratio, CstarConfig):
        return ratio.replace(**options) if options else ratio
    return CstarConfig(ratio=ratio, **options)


def resolve_options(options: dict[str, Any]) -> CstarConfig:
    """A :class:`CstarConfig` from keyword options alone, for a plan that fixes the ranks: what is traced and the
    conv scheme are read from it, its ratio never is.

    Example:
        >>> resolve_options({"skip": "fc"}).trace.skip
        ('fc',)
    """
    _check_options(options)
    return CstarConfig(**options)
