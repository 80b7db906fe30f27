"""The fx rewrite: replace planned conv/linear nodes by chains of plain ``nn.Conv2d``/``nn.Linear``.

Each factorized layer becomes a :class:`cstar_fx.schemes.Factors` container (an ``nn.Sequential``) with
readable children, as its scheme builds them — ``reduce``, ``core``, ``expand`` for Tucker-2, ``reduce``,
``expand`` for SVD and spatial SVD — stored where the layer was (module form) or at ``<weight>_factors``
(functional form). The graph calls each child as its own
``call_module`` node, so Torch-Pruning's dependency graph and the ONNX exporter see ordinary layers.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> from cstar_fx.passes.discover import find_layers
    >>> gm = trace(nn.Sequential(nn.Linear(8, 8)))
    >>> sites, _ = find_layers(gm)
    >>> gm = factorize(gm, sites, {"0": ("svd", (2,))})
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['0.reduce', '0.expand']
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CstarTypeError, CstarValueError
from ..schemes import DENSE, Factors, factor_path, get
from .discover import LayerSite

__all__ = ["build_factors", "factorize", "dense_weight", "factors_path"]


def build_factors(site: LayerSite, scheme: str, ranks: tuple[int, ...], decompose: bool = True,
                  moment: torch.Tensor | None = None) -> Factors:
    """The factorized replacement of one layer in a registered scheme (:meth:`cstar_fx.schemes.Scheme.build`),
    initialised from its weights (``decompose=False``: the same modules with zero weights, when the weights will
    be loaded from elsewhere). With ``moment`` (the second moment of the layer's inputs, from
    :func:`cstar_fx.passes.calibrate.input_moments`) the factors of a data-aware scheme (SVD, Tucker-2, spatial
    SVD) are the ones that preserve the layer's outputs rather than its weights.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> site = find_layers(trace(nn.Sequential(nn.Conv2d(4, 8, 3))))[0][0]
        >>> [type(m).__name__ for m in build_factors(site, "tucker2", (4, 2))]
        ['Conv2d', 'Conv2d', 'Conv2d']
    """
    return get(scheme).build(site, ranks, decompose=decompose, moment=moment)


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    parent_path, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, leaf)


def factors_path(site: LayerSite) -> str:
    """Where a site's factor container lives: the layer's own path, or ``<weight>_factors``.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> factors_path(find_layers(trace(nn.Sequential(nn.Linear(4, 3))))[0][0])
        '0'
    """
    return factor_path(site.name, site.param, site.form)


def factorize(gm: fx.GraphModule, sites: list[LayerSite], choices: dict[str, tuple[str, tuple[int, ...]]],
              decompose: bool = True, moments: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place: every site whose choice is a factorized scheme becomes its factor chain.

    ``gm`` must be the module the sites were found in (callers pass a private copy). Runs
    ``graph.lint()`` and ``recompile()`` and returns ``gm``. ``decompose=False`` builds zero factors;
    ``moments`` (site name -> input second moment) makes those sites' factors data-aware.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> gm = trace(nn.Sequential(nn.Conv2d(4, 8, 3)))
        >>> gm = factorize(gm, find_layers(gm)[0], {"0": ("tucker2", (4, 2))})
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['0.reduce', '0.core', '0.expand']
    """
    graph = gm.graph
    released: set[str] = set()
    for site in sites:
        scheme, ranks = choices.get(site.name, (DENSE, ()))
        if not get(scheme).factorizes:
            continue
        seq = build_factors(site, scheme, ranks, decompose, (moments or {}).get(site.name))
        path = factors_path(site)
        if site.form == "module" and not path:
            raise CstarValueError("cannot factorize the root module itself; wrap it in an nn.Sequential first")
        _set_submodule(gm, path, seq)
        if site.form == "function":
            released.update(t for t in (site.param, site.bias_target) if t)
        for node in site.nodes:
            x = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_before(node):
                out = x
                for child in seq._modules:
                    out = graph.call_module(f"{path}.{child}", (out,))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
    _drop_unused_attrs(gm, released)
    graph.lint()
    gm.recompile()
    return gm


def _drop_unused_attrs(gm: fx.GraphModule, released: set[str]) -> None:
    """Erase the get_attr nodes of replaced weights and delete those no node reads any more."""
    graph = gm.graph
    dropped: set[str] = set()
    for node in list(graph.nodes):
        if node.op == "get_attr" and str(node.target) in released and not node.users:
            dropped.add(str(node.target))
            graph.erase_node(node)
    still_used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for target in dropped - still_used:
        _drop_attr(gm, target)


def dense_weight(factors: nn.Sequential) -> torch.Tensor:
    """The dense weight a factor chain built by :func:`build_factors` is equal to (its scheme reconstructs it).

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> site = find_layers(trace(nn.Sequential(nn.Linear(4, 3))))[0][0]
        >>> bool(torch.allclose(dense_weight(build_factors(site, "svd", (3,))), site.weight, atol=1e-6))
        True
    """
    if not isinstance(factors, Factors):
        raise CstarTypeError(f"expected the factor chain of a transformed layer (a cstar_fx.schemes.Factors, made by "
                             f"build_factors or transform), got {type(factors).__name__}")
    with torch.no_grad():
        return get(factors.scheme).reconstruct(factors)
