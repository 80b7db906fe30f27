"""Graph passes over torch.fx GraphModules: tracing, layer discovery, shapes, the factorization rewrite,
Torch-Pruning interop. Installed as ``cstar_fx.passes``; the PassManager objects built on them are
:class:`cstar_fx.CstarPass` / :class:`cstar_fx.PrunePass`.

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
           "dense_weight", "record_shapes"]

