"""Cost models for the global rank allocator: what one layer costs, dense or factorized.

A cost model is any callable ``cost(layer, scheme, ranks) -> float``; ``scheme`` is the name of a registered
scheme (:mod:`cstar_fx.schemes`: ``"dense"`` with ``ranks == ()``, ``"svd"``, ``"tucker2"``, ``"spatial_svd"``,
...) and ``ranks`` as many ranks as it takes. The allocator only compares sums of these numbers, so any additive
cost works: parameters, FLOPs, or measured latency. A :class:`CostModel` may also price the whole dense model
(:meth:`CostModel.total`), and a budget name (``budget="flops"``) stands for the cost model registered under it
(:func:`register_budget`; :mod:`cstar_fx.latency` registers ``"latency"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .analysis import Analysis
from .errors import CstarTypeError, CstarValueError
from .schemes import LayerSpec, get

__all__ = ["LayerSpec", "CostModel", "CallableCost", "ParamCost", "FlopCost", "as_cost_model", "cost_model_for",
           "register_budget", "budget_names", "caps_params"]


@runtime_checkable
class CostModel(Protocol):
    """The budget's cost interface (parameters, FLOPs, latency, ...).

    ``cost(layer, scheme, ranks)`` is what one layer costs in a form; ``total(analysis)`` what the whole
    dense model costs (``None``: no whole-model measure, so the budget covers the eligible layers only);
    ``flush()`` keeps what the model measured once a plan is made (nothing, unless it measures). Subclass
    it to inherit both defaults; a plain callable ``cost(layer, scheme, ranks)`` is adapted by
    :func:`as_cost_model`.

    Example:
        >>> cost: CostModel = ParamCost()
        >>> cost.name, isinstance(cost, CostModel)
        ('params', True)
    """

    name: str

    def __call__(self, layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float: ...

    def total(self, analysis: Analysis) -> float | None:
        """The dense model's whole cost, layers that are not factorized included; ``None`` if unknown."""
        return None

    def flush(self) -> None:
        """Keep what was measured (e.g. write a table), so that the next plan measures nothing."""


@dataclass(frozen=True)
class CallableCost(CostModel):
    """A plain ``cost(layer, scheme, ranks)`` callable as a :class:`CostModel`: no whole-model total, nothing to
    flush. ``name`` is the callable's own ``name`` attribute, if it has one.

    Example:
        >>> as_cost_model(lambda layer, scheme, ranks: 1.0).name
        'custom'
    """

    fn: Callable[[LayerSpec, str, tuple[int, ...]], float]
    name: str = "custom"

    def __call__(self, layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float:
        return self.fn(layer, scheme, ranks)


def as_cost_model(cost: Any) -> CostModel:
    """``cost`` itself when it is a :class:`CostModel`, a :class:`CallableCost` around any other callable.

    Example:
        >>> as_cost_model(ParamCost()) == ParamCost()
        True
    """
    if isinstance(cost, CostModel):
        return cost
    if not callable(cost):
        raise CstarTypeError("cost_model must be callable as cost(layer, scheme, ranks) -> float")
    return CallableCost(cost, getattr(cost, "name", "custom"))


@dataclass(frozen=True)
class ParamCost(CostModel):
    """Cost = number of parameters (weights and bias) of the layer's dense or factorized form.

    Example:
        >>> spec = LayerSpec("fc", "linear", (10, 64), True, ())
        >>> ParamCost()(spec, "dense", ()), ParamCost()(spec, "svd", (4,))
        (650.0, 306.0)
    """

    name: str = "params"

    def __call__(self, layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float:
        return get(scheme).params(layer, ranks)

    def total(self, analysis: Analysis) -> float:
        return float(analysis.dense_params)


@dataclass(frozen=True)
class FlopCost(CostModel):
    """Cost = floating-point operations on the example input (2 per multiply-add, bias not counted),
    the convention of :class:`torch.utils.flop_counter.FlopCounterMode`.

    Example:
        >>> spec = LayerSpec("fc", "linear", (10, 64), False, (), in_positions=1, out_positions=1)
        >>> FlopCost()(spec, "dense", ())
        1280.0
    """

    name: str = "flops"

    def __call__(self, layer: LayerSpec, scheme: str, ranks: tuple[int, ...]) -> float:
        return get(scheme).flops(layer, ranks)

    def total(self, analysis: Analysis) -> float | None:
        analysis.require_shapes(f"budget={self.name!r}")
        return analysis.dense_flops


_BUDGETS: dict[str, Callable[[Any], CostModel]] = {}
_CAPS_PARAMS: set[str] = set()


def register_budget(name: str, factory: Callable[[Any], CostModel], *, params_too: bool = False) -> None:
    """Make ``budget=name`` mean the cost model ``factory(target)`` builds (``target``: the config's ``target``);
    ``params_too``: the ratio must be reached in parameters as well (a parameter cap at the same ratio).

    Example:
        >>> "latency" in budget_names()
        True
    """
    if name in _BUDGETS:
        raise CstarValueError(f"a budget named {name!r} is already registered; choose another name")
    _BUDGETS[name] = factory
    if params_too:
        _CAPS_PARAMS.add(name)


def caps_params(budget: str) -> bool:
    """Whether budget ``budget`` also holds the parameters to its ratio (``"both"``).

    Example:
        >>> caps_params("both"), caps_params("flops")
        (True, False)
    """
    return budget in _CAPS_PARAMS


def budget_names() -> tuple[str, ...]:
    """The registered budget names, in registration order.

    Example:
        >>> budget_names()[:2]
        ('params', 'flops')
    """
    return tuple(_BUDGETS)


def cost_model_for(budget: str, target: Any = None) -> CostModel:
    """The cost model a budget name stands for (``target`` configures a measured one, e.g. latency).

    Example:
        >>> cost_model_for("flops").name
        'flops'
    """
    if budget not in _BUDGETS:
        raise CstarValueError(f"budget must be one of {budget_names()} (or pass cost_model=...), got {budget!r}")
    return _BUDGETS[budget](target)


register_budget("params", lambda target: ParamCost())
register_budget("flops", lambda target: FlopCost())
# "8x" in FLOPs and in parameters at once: measured the better robust plan at equal parameters (docs/concepts.md)
register_budget("both", lambda target: FlopCost(name="both"), params_too=True)
