"""The transform report: what a transform achieved, measured on the rewritten model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from .decompose import relative_error
from .errors import CstarValueError
from .passes.discover import LayerSite
from .passes.factorize import dense_weight, factors_path
from .plan import RankPlan, Ratios

__all__ = ["TransformReport", "build_report", "get_report"]


@dataclass(frozen=True)
class TransformReport(Ratios):
    """Achieved ratios (measured on the rewritten model), and what happened to every layer.

    ``errors`` maps each factorized layer to its relative weight reconstruction error
    ``||W_hat - W||_F / ||W||_F``; ``dense`` and ``unsupported`` map layers left dense to the reason.

    Example:
        >>> r = TransformReport(dense_params=100, params=25)
        >>> r.ratio_params
        4.0
    """

    dense_params: int
    params: int
    dense_flops: float | None = None
    flops: float | None = None
    factorized: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ratios included."""
        return {**asdict(self), "ratio_params": self.ratio_params, "ratio_flops": self.ratio_flops}

    def __str__(self) -> str:
        lines = [f"params: {self.dense_params:,} -> {self.params:,} ({self.ratio_params:.2f}x fewer)"]
        if self.ratio_flops is not None:
            lines.append(f"FLOPs:  {self.dense_flops:,.0f} -> {self.flops:,.0f} ({self.ratio_flops:.2f}x fewer)")
        lines.append(f"factorized {len(self.factorized)} layer(s); kept dense {len(self.dense) + len(self.unsupported)}")
        for name, desc in self.factorized.items():
            err = f", weight error {self.errors[name]:.3f}" if name in self.errors else ""
            lines.append(f"  {name}: {desc}{err}")
        for name, why in {**self.dense, **self.unsupported}.items():
            lines.append(f"  {name}: dense ({why})")
        return "\n".join(lines)


def build_report(gm: fx.GraphModule, sites: list[LayerSite], plan: RankPlan, *, dense_params: int, params: int,
                 dense_flops: float | None, flops: float | None, with_errors: bool = True) -> TransformReport:
    """Measure the rewritten ``gm`` against the sites it came from (``with_errors=False``: skip the weight errors,
    for factors that were not computed from the weights)."""
    factorized, errors, dense = {}, {}, {}
    for site in sites:
        lp = plan.layers.get(site.name)
        if lp is None or not lp.factorized:
            dense[site.name] = lp.reason if lp is not None and lp.reason else "not in the plan"
            continue
        factorized[site.name] = f"{lp.scheme} ranks {','.join(map(str, lp.ranks))}"
        if not with_errors:
            continue
        approx = dense_weight(gm.get_submodule(factors_path(site)))
        errors[site.name] = relative_error(approx, site.weight.detach())
    return TransformReport(dense_params, params, dense_flops, flops, factorized, errors, dense, dict(plan.unsupported))


def get_report(gm: fx.GraphModule) -> TransformReport:
    """The transform report (achieved ratios, factorized and dense layers with reasons).

    Example:
        >>> import cstar_fx, torch.nn as nn
        >>> gm = cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), ratio=2)
        >>> get_report(gm).ratio_params >= 2
        True
    """
    try:
        return gm.meta["cstar_report"]
    except (AttributeError, KeyError):
        raise CstarValueError("this module was not produced by cstar_fx.transform (no report attached)") from None
