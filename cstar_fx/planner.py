"""Planning under a budget: the dense model's whole cost (from the budget's cost model), the share of it the
eligible layers carry, the global allocator's schemes and ranks for them, and the plan they make.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.analysis import analyse
    >>> from cstar_fx.config import CstarConfig
    >>> cfg = CstarConfig(ratio=2)
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> plan = plan_under(analyse(model, cfg.trace), cfg, cfg.make_budget())
    >>> plan.ratio_params >= 2
    True
"""

from __future__ import annotations

from .allocate import Cap, UnreachableBudgetError, allocate
from .analysis import Analysis
from .config import Budget, CstarConfig
from .costs import ParamCost
from .errors import NoEligibleLayerError
from .plan import RankPlan, assemble
from .schemes import DENSE, get

__all__ = ["plan_under"]


def plan_under(a: Analysis, cfg: CstarConfig, budget: Budget) -> RankPlan:
    """The plan for the analysed model that fits ``budget``, with ``cfg``'s rounding, minimum rank and conv scheme.

    Raises :class:`~cstar_fx.errors.NoEligibleLayerError` when no layer can be factorized and
    :class:`~cstar_fx.allocate.UnreachableBudgetError` (with advice for this model) when the budget cannot be met.
    """
    eligible = a.eligible
    if not eligible:
        found = ", ".join(f"{k}: {v}" for k, v in {**a.skipped, **a.unsupported}.items()) or "none"
        raise NoEligibleLayerError(
            "the model has no conv2d/linear layer that can be factorized (found: " + found + "). "
            "Remove layers from skip=, or mark blocks that hide layers as non-leaf.")
    cost = budget.cost
    whole = cost.total(a)
    layer_dense = sum(cost(s, DENSE, ()) for s in eligible)
    total = layer_dense if whole is None else whole  # without a whole-model measure the budget covers the layers
    ratio = budget.ratio_for(total)
    caps = ()
    if budget.param_ratio is not None:
        params = ParamCost()
        fixed_params = a.dense_params - sum(params(s, DENSE, ()) for s in eligible)
        caps = (Cap(params, fixed_params, a.dense_params / budget.param_ratio),)
    try:
        alloc = allocate(eligible, cost, ratio=ratio, fixed_cost=total - layer_dense, round_to=cfg.round_to,
                         min_rank=cfg.min_rank, conv_scheme=cfg.conv_scheme, caps=caps, objective=cfg.objective)
    except UnreachableBudgetError as exc:
        raise UnreachableBudgetError(str(exc) + a.more_layers_advice(), max_ratio=exc.max_ratio) from None
    reasons = dict(a.skipped)
    for name, (scheme, _) in alloc.choices.items():
        if not get(scheme).factorizes:
            reasons[name] = "factorized form would cost at least the dense layer"
    layer_costs = {s.name: (cost(s, DENSE, ()), cost(s, *alloc.choices[s.name])) for s in eligible}
    cost.flush()
    return assemble(a, alloc.choices, reasons, cfg, layer_costs=layer_costs, dense_cost=total, cost=alloc.total_cost,
                    ratio=ratio)
