"""Find the conv and linear layers of a traced model, in module and functional form.

The functional form covers ``F.conv2d`` / ``F.linear`` on parameters and the aten overloads that
``torch.export.export(model, args).module()`` graphs call (``aten.conv2d``, ``aten.linear``, and
``aten.convolution`` after ``run_decompositions()``); such a layer is named after its weight
(``"layer1.0.conv1.weight"``).

Read-only: this pass inspects a GraphModule and never changes it.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> sites, unsupported = find_layers(trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(3, 3, 1))))
    >>> [s.name for s in sites], unsupported
    (['0'], {'1': 'Conv1d is not supported (only 2-D convs and linear layers are factorized)'})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerSite", "find_layers", "reads_metadata_only", "CONV_FNS", "LINEAR_FNS"]

_aten = torch.ops.aten
# torch.export graphs (``torch.export.export(model, args).module()``) call the aten overloads on get_attr
# parameters, with the same positional hyper-parameters as F.conv2d / F.linear; aten.convolution is what
# they become after run_decompositions().
CONV_FNS = frozenset({F.conv2d, torch.conv2d, _aten.conv2d.default, _aten.conv2d.padding})
LINEAR_FNS = frozenset({F.linear, torch._C._nn.linear, _aten.linear.default})
_CONVOLUTION_FNS = frozenset({_aten.convolution.default})
_OTHER_CONV_FNS = {
    F.conv1d: "conv1d", F.conv3d: "conv3d", F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d", F.conv_transpose3d: "conv_transpose3d",
    _aten.conv1d.default: "conv1d", _aten.conv1d.padding: "conv1d", _aten.conv3d.default: "conv3d",
    _aten.conv3d.padding: "conv3d", _aten.conv_transpose1d.default: "conv_transpose1d",
    _aten.conv_transpose2d.input: "conv_transpose2d", _aten.conv_transpose3d.input: "conv_transpose3d",
}
_UNSUPPORTED_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerSite:
    """One factorizable layer: where it is in the graph and its hyper-parameters.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> site = find_layers(trace(nn.Sequential(nn.Linear(4, 2))))[0][0]
        >>> site.name, site.kind, site.form, site.param
        ('0', 'linear', 'module', '0.weight')
    """

    name: str
    kind: str  # "conv" | "linear"
    form: str  # "module" | "function"
    param: str  # qualified name of the weight
    weight: torch.Tensor
    bias: torch.Tensor | None
    nodes: list[fx.Node] = field(default_factory=list)
    bias_target: str | None = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    padding_mode: str = "zeros"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return tuple(self.weight.shape)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
_LINEAR_ARGS = ("input", "weight", "bias")


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _module_site(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> LayerSite | str:
    if isinstance(mod, _UNSUPPORTED_MODULES):
        return f"{type(mod).__name__} is not supported (only 2-D convs and linear layers are factorized)"
    base = nn.Conv2d if isinstance(mod, nn.Conv2d) else nn.Linear
    if type(mod).forward is not base.forward:
        return f"{type(mod).__name__} overrides forward(); its weight may not be used as a plain {base.__name__}"
    if hasattr(mod, "parametrizations"):
        return "parametrized weight (e.g. weight_norm / spectral_norm) is not factorized"
    if isinstance(mod.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet; run one forward pass first"
    name = str(node.target)
    prefix = f"{name}." if name else ""
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels == mod.out_channels else "grouped"
            return f"{kind} conv (groups={mod.groups}) stays dense"
        return LayerSite(name, "conv", "module", prefix + "weight", mod.weight, mod.bias, [node],
                         stride=mod.stride, padding=mod.padding, dilation=mod.dilation, padding_mode=mod.padding_mode)
    return LayerSite(name, "linear", "module", prefix + "weight", mod.weight, mod.bias, [node])


def _hyper(value: Any) -> Any:
    # aten graphs carry int lists ([2, 2]); tuples compare equal across the call forms and hash.
    return tuple(value) if isinstance(value, list) else value


def _function_site(gm: fx.GraphModule, node: fx.Node) -> tuple[str, LayerSite | str]:
    convolution = node.target in _CONVOLUTION_FNS
    is_conv = convolution or node.target in CONV_FNS
    args = _bind(node, _CONVOLUTION_ARGS if convolution else _CONV_ARGS if is_conv else _LINEAR_ARGS)
    w = args.get("weight")
    label = f"{node.name} ({'conv2d' if is_conv else 'linear'})"
    if convolution and args.get("transposed"):
        return label, "transposed convolution is not supported"
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return label, "weight is computed in the graph, not a parameter; cannot factorize"
    name = str(w.target)
    weight = _fetch(gm, name)
    b = args.get("bias")
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return name, "bias is computed in the graph, not a parameter; cannot factorize"
    bias = _fetch(gm, str(b.target)) if b is not None else None
    hyper = {k: _hyper(args.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
    if any(isinstance(v, fx.Node) for v in hyper.values()):
        return name, "conv hyper-parameters are computed in the graph; cannot factorize"
    if convolution and weight.ndim != 4:
        return name, f"conv{weight.ndim - 2}d is not supported (only 2-D convs and linear layers are factorized)"
    if is_conv and weight.ndim != 4:
        return name, f"conv2d weight of shape {tuple(weight.shape)} is not 4-D"
    if is_conv and hyper["groups"] != 1:
        return name, f"grouped conv (groups={hyper['groups']}) stays dense"
    if not is_conv and weight.ndim != 2:
        return name, f"linear weight of shape {tuple(weight.shape)} is not 2-D"
    site = LayerSite(name, "conv" if is_conv else "linear", "function", name, weight, bias, [node],
                     bias_target=str(b.target) if b is not None else None)
    if is_conv:
        site.stride, site.padding, site.dilation = hyper["stride"], hyper["padding"], hyper["dilation"]
    return name, site


def _same_call(a: LayerSite, b: LayerSite) -> bool:
    return (a.bias_target, a.stride, a.padding, a.dilation) == (b.bias_target, b.stride, b.padding, b.dilation)


def _readers(gm: fx.GraphModule) -> dict[int, set[fx.Node]]:
    """Every node that reads each parameter or buffer (by identity): module calls that own it, and the
    users of ``get_attr`` nodes that fetch it."""
    readers: dict[int, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            for t in (*mod.parameters(), *mod.buffers()):
                readers.setdefault(id(t), set()).add(node)
        elif node.op == "get_attr":
            value = _fetch(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                readers.setdefault(id(value), set()).update(u for u in node.users if not reads_metadata_only(u))
    return readers


_METADATA_ATTRS = frozenset({"dtype", "device", "is_cuda"})
_METADATA_METHODS = frozenset({"is_floating_point", "is_complex", "get_device"})


def reads_metadata_only(node: fx.Node) -> bool:
    """True for a node that reads only a tensor's dtype or device (``self.fc.weight.dtype``), which any factor
    weight of the same layer answers alike: such a read does not share the weight.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.fc(x.to(self.fc.weight.dtype))
        >>> [reads_metadata_only(n) for n in trace(M()).graph.nodes if n.op == "call_function"][:1]
        [True]
    """
    import builtins

    if node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _drop_shared(gm: fx.GraphModule, sites: dict[str, LayerSite], unsupported: dict[str, str]) -> None:
    """A layer whose weight or bias is also read elsewhere (tied weights, ``self.conv.weight`` used in
    forward, an embedding reused as a head) stays dense: replacing it would break the other reader or
    keep both copies, which breaks the parameter budget."""
    readers = _readers(gm)
    for name, site in list(sites.items()):
        own = set(site.nodes)
        others = {n for t in (site.weight, site.bias) if t is not None for n in readers.get(id(t), ()) if n not in own}
        if others:
            where = sorted(str(n.target) if n.op == "call_module" else n.name for n in others)
            unsupported[name] = (f"weight/bias is shared with {', '.join(where[:3])}"
                                 f"{' ...' if len(where) > 3 else ''}; kept dense so the sharing still holds")
            del sites[name]


def find_layers(gm: fx.GraphModule) -> tuple[list[LayerSite], dict[str, str]]:
    """All conv/linear layers of ``gm``: factorizable sites and ``{name: reason}`` for the rest.

    A layer called several times (a shared module or weight) is one site with several nodes.

    Example:
        >>> import torch.nn as nn
        >>> from cstar_fx.passes.trace import trace
        >>> len(find_layers(trace(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))))[0])
        2
    """
    sites: dict[str, LayerSite] = {}
    unsupported: dict[str, str] = {}
    for node in gm.graph.nodes:
        found: LayerSite | str | None = None
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, (nn.Conv2d, nn.Linear) + _UNSUPPORTED_MODULES):
                name, found = str(node.target), _module_site(gm, node, mod)
            elif isinstance(mod, nn.MultiheadAttention):
                name, found = str(node.target), ("nn.MultiheadAttention keeps its packed q/k/v and output projections "
                                                 "internal; they stay dense (pass unpack_attention=True to "
                                                 "factorize them)")
        elif node.op == "call_function" and (node.target in CONV_FNS or node.target in LINEAR_FNS
                                             or node.target in _CONVOLUTION_FNS):
            name, found = _function_site(gm, node)
        elif node.op == "call_function" and node.target in _OTHER_CONV_FNS:
            name, found = node.name, f"{_OTHER_CONV_FNS[node.target]} is not supported"
        if found is None:
            continue
        if isinstance(found, str):
            unsupported.setdefault(name, found)
            continue
        if name in sites:
            if not _same_call(sites[name], found):
                unsupported[name] = "the same weight is used with different bias or conv settings"
                del sites[name]
                continue
            sites[name].nodes.extend(found.nodes)
        elif name not in unsupported:
            sites[name] = found
    _drop_shared(gm, sites, unsupported)
    return list(sites.values()), unsupported
