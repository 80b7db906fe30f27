"""Graph passes over torch.fx GraphModules: tracing, layer discovery, shapes, the factorization rewrite,
Torch-Pruning interop, and :class:`CstarPass` / :class:`PrunePass` for ``torch.fx`` PassManager pipelines.
Installed as ``cstar_fx.passes``.

Example:
    >>> from cstar_fx.passes import trace, find_layers
    >>> import torch.nn as nn
    >>> len(find_layers(trace(nn.Sequential(nn.Linear(2, 2))))[0])
    1
"""

from .discover import LayerSite, find_layers
from .factorize import build_factors, dense_weight, factorize
from .shapes import record_shapes
from .trace import TraceError, register_leaf, trace

__all__ = ["trace", "register_leaf", "TraceError", "find_layers", "LayerSite", "factorize", "build_factors",
           "dense_weight", "record_shapes", "CstarPass", "PrunePass", "PassCheckError"]


def __getattr__(name: str) -> object:
    # The pass objects build on cstar_fx.api, which imports this package: load them on first use.
    if name in ("CstarPass", "PrunePass", "PassCheckError"):
        from . import pass_objects

        return getattr(pass_objects, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
