"""The fx rewrite: replace planned conv/linear nodes by chains of plain ``nn.Conv2d``/``nn.Linear``.

Each factorized layer becomes an ``nn.Sequential`` container with readable children — ``reduce``,
``core``, ``expand`` for Tucker-2, ``reduce``, ``expand`` for SVD — stored where the layer was (module
form) or at ``<weight>_factors`` (functional form). The graph calls each child as its own
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

from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn as nn

from ..decompose import svd_factors, svd_factors_data, tucker2_factors, tucker2_factors_data
from .discover import LayerSite

__all__ = ["build_factors", "factorize", "dense_weight", "factors_path"]


def _conv(c_in: int, c_out: int, kernel: tuple[int, int], site: LayerSite | None, bias: bool,
          weight: torch.Tensor) -> nn.Conv2d:
    kw = {} if site is None else dict(stride=site.stride, padding=site.padding, dilation=site.dilation,
                                      padding_mode=site.padding_mode)
    conv = nn.Conv2d(c_in, c_out, kernel, bias=bias, device=weight.device, dtype=weight.dtype, **kw)
    conv.weight.data.copy_(weight.reshape(conv.weight.shape))
    return conv


def _linear(c_in: int, c_out: int, bias: bool, weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(c_in, c_out, bias=bias, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    return lin


def build_factors(site: LayerSite, scheme: str, ranks: tuple[int, ...], decompose: bool = True,
                  moment: torch.Tensor | None = None) -> nn.Sequential:
    """The factorized replacement of one layer, initialised from its weights (``decompose=False``: the same
    modules with zero weights, when the weights will be loaded from elsewhere). With ``moment`` (the
    second moment of the layer's inputs, from :func:`cstar_fx.passes.calibrate.input_moments`) the
    factors are the data-aware ones that preserve the layer's outputs rather than its weights.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> site = find_layers(trace(nn.Sequential(nn.Conv2d(4, 8, 3))))[0][0]
        >>> [type(m).__name__ for m in build_factors(site, "tucker2", (4, 2))]
        ['Conv2d', 'Conv2d', 'Conv2d']
    """
    w = site.weight.detach()
    has_bias = site.bias is not None
    if scheme == "svd":
        (r,) = ranks
        flat = w.reshape(w.shape[0], -1)
        if not decompose:
            first, second = w.new_zeros(r, w[0].numel()), w.new_zeros(w.shape[0], r)
        else:
            first, second = svd_factors(flat, r) if moment is None else svd_factors_data(flat, r, moment)
        if site.kind == "linear":
            parts = [("reduce", _linear(w.shape[1], r, False, first)), ("expand", _linear(r, w.shape[0], has_bias, second))]
        else:
            kernel = (w.shape[2], w.shape[3])
            parts = [("reduce", _conv(w.shape[1], r, kernel, site, False, first)),
                     ("expand", _conv(r, w.shape[0], (1, 1), None, has_bias, second))]
    elif scheme == "tucker2":
        if site.kind != "conv":
            raise ValueError(f"layer {site.name!r}: tucker2 needs a conv weight; use 'svd' for linear layers")
        r_out, r_in = ranks
        if not decompose:
            u_in, core, u_out = (w.new_zeros(w.shape[1], r_in), w.new_zeros(r_out, r_in, *w.shape[2:]),
                                 w.new_zeros(w.shape[0], r_out))
        elif moment is None:
            u_in, core, u_out = tucker2_factors(w, r_out, r_in)
        else:
            u_in, core, u_out = tucker2_factors_data(w, r_out, r_in, moment)
        parts = [("reduce", _conv(w.shape[1], r_in, (1, 1), None, False, u_in.T.contiguous())),
                 ("core", _conv(r_in, r_out, (w.shape[2], w.shape[3]), site, False, core)),
                 ("expand", _conv(r_out, w.shape[0], (1, 1), None, has_bias, u_out))]
    else:
        raise ValueError(f"layer {site.name!r}: unknown scheme {scheme!r}; expected 'svd' or 'tucker2'")
    seq = nn.Sequential(OrderedDict(parts))
    if has_bias:
        seq.expand.bias.data.copy_(site.bias.detach())
    seq.requires_grad_(site.weight.requires_grad)
    return seq


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
    return site.name if site.form == "module" else f"{site.param}_factors"


def factorize(gm: fx.GraphModule, sites: list[LayerSite], choices: dict[str, tuple[str, tuple[int, ...]]],
              decompose: bool = True, moments: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place: every site whose choice is not ``"dense"`` becomes its factor chain.

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
        scheme, ranks = choices.get(site.name, ("dense", ()))
        if scheme == "dense":
            continue
        seq = build_factors(site, scheme, ranks, decompose, (moments or {}).get(site.name))
        path = factors_path(site)
        if site.form == "module" and not path:
            raise ValueError("cannot factorize the root module itself; wrap it in an nn.Sequential first")
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
    """The dense weight a factor chain built by :func:`build_factors` is equal to.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> from cstar_fx.passes.discover import find_layers
        >>> site = find_layers(trace(nn.Sequential(nn.Linear(4, 3))))[0][0]
        >>> bool(torch.allclose(dense_weight(build_factors(site, "svd", (3,))), site.weight, atol=1e-6))
        True
    """
    with torch.no_grad():
        if "core" in factors._modules:
            u_in = factors.reduce.weight.flatten(1).T
            u_out = factors.expand.weight.flatten(1)
            return torch.einsum("rshw,or,is->oihw", factors.core.weight, u_out, u_in)
        first, second = factors.reduce.weight, factors.expand.weight
        w = second.flatten(1) @ first.flatten(1)
        return w.reshape(second.shape[0], *first.shape[1:])
