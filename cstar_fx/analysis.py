"""Model analysis: trace a model as :class:`TraceConfig` says, find its factorizable layers and describe each one
as a :class:`~cstar_fx.schemes.LayerSpec` (shape, spectra, the positions it is applied to), with the whole model's parameter and
FLOP counts. Planning, costs and pruning read an :class:`Analysis`; nothing here decides a rank.

Example:
    >>> import torch, torch.nn as nn
    >>> a = analyse(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), TraceConfig(), torch.randn(1, 8))
    >>> [spec.name for spec in a.eligible], a.dense_params, a.dense_flops
    (['0', '2'], 46, 80.0)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import CstarTypeError, CstarValueError
from .passes.attention import unpack_attention
from .passes.calibrate import input_moments
from .passes.discover import LayerSite, find_layers
from .passes.shapes import record_shapes
from .passes.trace import check_leaf_patterns, trace
from .schemes import DEFAULT_CONV, LayerSpec, layer_spectra
from .torchutil import as_tuple, eval_mode, pair

__all__ = ["TraceConfig", "TRACE_OPTIONS", "check_trace_options", "Analysis", "analyse", "count_flops",
           "count_params", "positions", "check_devices"]


@dataclass(frozen=True)
class TraceConfig:
    """What is traced and which layers are candidates: the half of :class:`cstar_fx.CstarConfig` that reads
    the model (the other half, the budget, decides what to do with it).

    * ``leaf_modules``: module names/patterns/types fx should not trace into.
    * ``concrete_args``: forward() arguments to fix while tracing (for control flow on them).
    * ``autowrap_functions``: module-level functions fx should call opaquely rather than trace into.
    * ``unpack_attention``: replace each ``nn.MultiheadAttention`` by plain q/k/v/out ``nn.Linear`` layers first.
    * ``skip``: layer names or glob patterns kept dense.

    Example:
        >>> TraceConfig(skip="fc").skip
        ('fc',)
    """

    leaf_modules: tuple[Any, ...] = ()
    concrete_args: dict[str, Any] | None = field(default=None, compare=False)
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    unpack_attention: bool = False
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("skip", "leaf_modules"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (tuple, list)):
                raise CstarTypeError(f"{name} must be a tuple of names/patterns, got {type(v).__name__}")
            object.__setattr__(self, name, tuple(v))
        if any(not isinstance(s, str) for s in self.skip):
            raise CstarTypeError(f"skip entries must be layer names or glob patterns (str), got {self.skip!r}")
        if any(not isinstance(x, (str, type)) for x in self.leaf_modules):
            raise CstarTypeError(f"leaf_modules entries must be module names/glob patterns (str) or nn.Module classes, "
                                 f"got {self.leaf_modules!r}")
        if self.concrete_args is not None and not isinstance(self.concrete_args, dict):
            raise CstarTypeError(f"concrete_args must be a dict of forward() argument name -> value, "
                                 f"got {type(self.concrete_args).__name__}")
        funcs = self.autowrap_functions
        funcs = (funcs,) if callable(funcs) else funcs
        if not isinstance(funcs, (tuple, list)) or any(not callable(f) or isinstance(f, type) for f in funcs):
            raise CstarTypeError(f"autowrap_functions entries must be functions fx should call opaquely, e.g. "
                                 f"autowrap_functions=(my_helper,), got {self.autowrap_functions!r}")
        object.__setattr__(self, "autowrap_functions", tuple(funcs))
        if not isinstance(self.unpack_attention, bool):
            raise CstarTypeError(f"unpack_attention must be True or False, got {self.unpack_attention!r}")

    def trace(self, model: nn.Module) -> fx.GraphModule:
        """``model`` as a GraphModule, traced with these leaves, concrete arguments and opaque functions.

        Example:
            >>> [n.op for n in TraceConfig().trace(nn.Sequential(nn.Linear(2, 2))).graph.nodes]
            ['placeholder', 'call_module', 'output']
        """
        if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):  # a GraphModule is not traced again
            check_leaf_patterns(model, self.leaf_modules)
        return trace(model, leaf_modules=self.leaf_modules, concrete_args=self.concrete_args,
                     autowrap_functions=self.autowrap_functions)


# The options that say how to trace a model again (skip only steers planning): what load and refold take.
TRACE_OPTIONS = tuple(f.name for f in fields(TraceConfig) if f.name != "skip")


def check_trace_options(options: dict[str, Any], verb: str, fixed_by: str) -> None:
    """Refuse any of ``options`` that is not a trace option: ``verb`` (e.g. ``"load"``) takes only those, and
    ``fixed_by`` (e.g. ``"the saved plan"``) fixes everything else.

    Example:
        >>> check_trace_options({"leaf_modules": ()}, "load", "the saved plan")
    """
    unknown = sorted(set(options) - set(TRACE_OPTIONS))
    if unknown:
        raise CstarTypeError(f"unknown option(s) {unknown}; {verb} takes the trace options {list(TRACE_OPTIONS)} "
                             f"({fixed_by} fixes everything else)")


@dataclass
class Analysis:
    """A traced model and what was found in it: the layer sites, their specs, what is skipped or
    unsupported (with the reason), the dense totals, and input moments when calibration data was given.

    Example:
        >>> a = analyse(nn.Sequential(nn.Linear(8, 4)), TraceConfig(skip=("0",)))
        >>> a.skipped, a.eligible
        ({'0': "skipped (matches '0')"}, [])
    """

    gm: fx.GraphModule
    sites: list[LayerSite]
    unsupported: dict[str, str]
    specs: dict[str, LayerSpec]
    skipped: dict[str, str]
    dense_params: int
    dense_flops: float | None
    moments: dict[str, torch.Tensor]
    example_inputs: Any = None

    @property
    def eligible(self) -> list[LayerSpec]:
        """The specs of the layers a plan may factorize (found, supported, not skipped), in graph order."""
        return [self.specs[s.name] for s in self.sites if s.name not in self.skipped]

    def require_shapes(self, what: str) -> None:
        """Raise ``ValueError`` unless the analysis ran on example inputs; ``what`` names what needs them.

        Example:
            >>> analyse(nn.Linear(2, 2), TraceConfig()).require_shapes("budget='flops'")
            Traceback (most recent call last):
            cstar_fx.errors.CstarValueError: budget='flops' needs example_inputs for the layer shapes; pass e.g. example_inputs=torch.randn(1, 3, 32, 32)
        """
        if self.example_inputs is None:
            raise CstarValueError(f"{what} needs example_inputs for the layer shapes; pass e.g. "
                                  "example_inputs=torch.randn(1, 3, 32, 32)")

    def more_layers_advice(self) -> str:
        """Where more factorizable layers could come from, for this model (not a generic list).

        Example:
            >>> analyse(nn.Sequential(nn.Linear(8, 4)), TraceConfig(skip=("0",))).more_layers_advice()
            " To factorize more layers: remove ['0'] from skip=."
        """
        ways = []
        if self.skipped:
            ways.append(f"remove {sorted(self.skipped)[:5]} from skip=")
        leaves = sorted({why.split("'")[1] for why in self.unsupported.values() if why.startswith("hidden inside")})
        if leaves:
            ways.append(f"stop calling {leaves[:5]} as leaves, which hides the layers inside them")
        return (" To factorize more layers: " + "; or ".join(ways) + ".") if ways else ""


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once).

    Example:
        >>> count_params(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> float:
    """FLOPs of one forward pass on ``example_inputs`` (``torch.utils.flop_counter``, eval mode).

    Example:
        >>> count_flops(nn.Linear(4, 2, bias=False), torch.randn(1, 4))
        16.0
    """
    # nn.MultiheadAttention's fused inference path hides its matmuls from the counter; count the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def positions(shape: tuple[int, ...], kind: str) -> int:
    """How many positions a layer is applied to in a tensor of ``shape``: batch and spatial positions for a
    conv, every row (all but the last dimension) for a linear layer.

    Example:
        >>> positions((2, 16, 8, 8), "conv"), positions((2, 10, 64), "linear")
        (128, 20)
    """
    if not shape:
        return 0
    kept = shape[:-3] + shape[-2:] if kind == "conv" else shape[:-1]  # a conv's channels are not positions
    return math.prod(kept)


def check_devices(model: nn.Module) -> None:
    """Factorizing needs real values on one device: reject meta tensors and models split across devices.

    Example:
        >>> check_devices(nn.Linear(2, 2))  # one device, real values: nothing to say
    """
    where: dict[torch.device, str] = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        where.setdefault(t.device, name)
    meta = ("; tensors on the meta device have no values: materialise them first, e.g. "
            "model.to_empty(device='cpu') then model.load_state_dict(weights)")
    if len(where) > 1:
        found = ", ".join(f"{name!r} on {dev}" for dev, name in where.items())
        fix = "model.to('cpu') or model.to('cuda')" + (meta if torch.device("meta") in where else "")
        raise CstarValueError(f"the model's tensors are on several devices ({found}); move the whole model to one "
                              f"device first, e.g. {fix}")
    if torch.device("meta") in where:
        raise CstarValueError("the model is on the meta device and has no values to factorize" + meta)


def _skip_reason(name: str, patterns: tuple[str, ...]) -> str | None:
    for pat in patterns:
        if name == pat or fnmatch.fnmatchcase(name, pat):
            return f"skipped (matches {pat!r})"
    return None


def _hidden_layers(gm: fx.GraphModule, known: dict[str, str]) -> dict[str, str]:
    """Conv/linear layers inside modules the graph calls opaquely (leaves): listed, so the plan and report
    account for every layer and advice can name the leaf that hides them."""
    hidden: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = str(node.target)
        mod = gm.get_submodule(leaf)
        if isinstance(mod, (nn.Conv2d, nn.Linear)) or leaf in known:
            continue
        for sub, child in mod.named_modules():
            name = f"{leaf}.{sub}" if sub else leaf
            if sub and isinstance(child, (nn.Conv2d, nn.Linear)) and name not in known and name not in hidden:
                hidden[name] = (f"hidden inside {leaf!r} ({type(mod).__name__}), which is called as a leaf "
                                f"(leaf_modules=, a registered or timm leaf), so it is not factorized; drop that "
                                f"module from the leaves to factorize it")
    return hidden


def _check_skip(skip: tuple[str, ...], names: list[str]) -> None:
    unmatched = [pat for pat in skip if not any(_skip_reason(n, (pat,)) for n in names)]
    if unmatched:
        shown = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
        raise CstarValueError(f"skip pattern(s) {unmatched} match no layer of this model, so they would skip nothing; "
                              f"the layers are named {shown or 'nothing'} (a wrapped model's names carry its prefix, "
                              f"e.g. 'model.conv1' or '*conv1')")


def _check_sensitivity(sensitivity: Any, sites: list[LayerSite]) -> dict[str, float]:
    if sensitivity is None:
        return {}
    if not isinstance(sensitivity, dict):
        raise CstarTypeError(f"sensitivity must be a dict of layer name -> positive weight "
                             f"(e.g. from cstar_fx.robust.layer_sensitivity), got {type(sensitivity).__name__}")
    names = {s.name for s in sites}  # a skipped layer's weight is simply unused
    unknown = sorted(set(sensitivity) - names)
    if unknown:
        raise CstarValueError("sensitivity names layers that are not factorizable "
                              f"layers of this model: {unknown[:5]}; measure it on this "
                              "model with cstar_fx.robust.layer_sensitivity(model, ...)")
    bad = {k: v for k, v in sensitivity.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    if bad:
        raise CstarValueError(f"sensitivity weights must be finite numbers > 0, got {dict(list(bad.items())[:3])}")
    return {k: float(v) for k, v in sensitivity.items()}


def analyse(model: nn.Module, config: TraceConfig, example_inputs: Any = None, *, need_spectra: bool = True,
            calibration: Any = None, sensitivity: dict[str, float] | None = None,
            conv_scheme: str = DEFAULT_CONV) -> Analysis:
    """Trace ``model`` and describe its factorizable layers.

    ``example_inputs`` give the layer shapes and FLOPs (without them both are ``None``); ``need_spectra=False``
    skips the eigen-solves (for a plan that fixes the ranks), and ``conv_scheme`` says which schemes' own spectra
    to compute besides the mode spectra (:func:`cstar_fx.schemes.layer_spectra`: e.g. spatial SVD's with
    ``"spatial_svd"`` or ``"auto"``); ``calibration`` inputs give each eligible
    layer's input moments (data-aware factors); ``sensitivity`` (layer name -> weight > 0) becomes each
    spec's ``importance``.

    Example:
        >>> a = analyse(nn.Sequential(nn.Conv2d(3, 8, 3)), TraceConfig(), torch.randn(1, 3, 8, 8))
        >>> a.specs["0"].out_positions, len(a.specs["0"].spectra)
        (36, 2)
    """
    if config.unpack_attention:
        model = unpack_attention(model)
    gm = config.trace(model)
    check_devices(gm)
    sites, unsupported = find_layers(gm)
    for site in [s for s in sites if s.weight.numel() == 0]:
        unsupported[site.name] = f"weight of shape {site.weight_shape} has no entries (a zero-width layer); kept dense"
        sites.remove(site)
    unsupported.update(_hidden_layers(gm, unsupported))
    _check_skip(config.skip, [s.name for s in sites] + list(unsupported))
    shapes = record_shapes(gm, example_inputs, {n for s in sites for n in s.nodes}) if example_inputs is not None else {}
    eligible = [s for s in sites if not _skip_reason(s.name, config.skip)]
    importance = _check_sensitivity(sensitivity, sites)
    moments = input_moments(gm, eligible, calibration) if calibration is not None else {}
    specs: dict[str, LayerSpec] = {}
    skipped: dict[str, str] = {}
    for site in sites:
        why = _skip_reason(site.name, config.skip)
        if why:
            skipped[site.name] = why
        spectra, own = (), {}
        if need_spectra and not why:
            try:
                spectra, own = layer_spectra(site.weight, site.kind, conv_scheme)
            except ValueError as exc:
                raise CstarValueError(f"layer {site.name!r}: {exc}") from exc
        p_in = p_out = in_shape = out_shape = None
        if shapes:
            p_in = sum(positions(shapes[n][0], site.kind) for n in site.nodes)
            p_out = sum(positions(shapes[n][1], site.kind) for n in site.nodes)
            in_shape, out_shape = shapes[site.nodes[0]]
        specs[site.name] = LayerSpec(site.name, site.kind, site.weight_shape, site.bias is not None, spectra, p_in, p_out,
                                     in_shape, out_shape, pair(site.stride), site.padding if isinstance(site.padding, str)
                                     else pair(site.padding), pair(site.dilation), importance.get(site.name, 1.0), own)
    flops = count_flops(gm, example_inputs) if example_inputs is not None else None
    return Analysis(gm, sites, unsupported, specs, skipped, count_params(gm), flops, moments, example_inputs)
