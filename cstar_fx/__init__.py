"""cstar_fx: CSTAR (compact, structured, adversarially robust) low-rank compression for torch.fx.

Example:
    >>> import torch, torchvision, cstar_fx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> gm = cstar_fx.transform(torch.fx.symbolic_trace(model), ratio=8)
    >>> print(cstar_fx.get_report(gm))  # doctest: +ELLIPSIS
    params: ... (8.0...x fewer)
    ...
"""

from . import latency  # noqa: F401  (registers budget="latency" with the cost models)
from .allocate import UnreachableBudgetError
from .analysis import count_flops
from .api import get_plan, get_report, plan_ranks, refold, transform
from .config import CstarConfig
from .costs import CostModel, FlopCost, LayerSpec, ParamCost
from .errors import CstarError, NoEligibleLayerError, PlanMismatchError
from .io import CheckpointError, load, save
from .pass_objects import CstarPass, PassCheckError, PrunePass
from .passes.shapes import ExampleInputError
from .passes.trace import TraceError, register_leaf
from .plan import LayerPlan, RankPlan
from .report import TransformReport
from .version import __version__

__all__ = [
    "__version__",
    "transform",
    "refold",
    "plan_ranks",
    "get_plan",
    "get_report",
    "count_flops",
    "save",
    "load",
    "register_leaf",
    "CstarConfig",
    "RankPlan",
    "LayerPlan",
    "TransformReport",
    "CostModel",
    "ParamCost",
    "FlopCost",
    "LayerSpec",
    "CstarError",
    "TraceError",
    "ExampleInputError",
    "PlanMismatchError",
    "NoEligibleLayerError",
    "UnreachableBudgetError",
    "CheckpointError",
    "CstarPass",
    "PrunePass",
    "PassCheckError",
]
