"""The scheme type and its registry: what a factorized form of a layer is, and where its factors live.

A scheme (dense, SVD, Tucker-2, spatial SVD, ...) owns everything that depends on the form: which layers
it applies to and its rank limits, its kept energy (the allocator's objective), parameter and FLOP counts,
the primitive ops it runs (timed by :mod:`cstar_fx.latency`), the low-rank projection (ADMM's Z step), the
factor chain it builds, and how ranks and the dense weight are read back from a built chain. The allocator,
the cost models, the rewrite pass, save/load and pruning ask :func:`get` for the scheme by name; adding a
scheme is one file that subclasses :class:`Scheme` and calls :func:`register` (imported by
``cstar_fx/schemes/__init__.py``).

Factor layout: a factorized layer becomes a :class:`Factors` container (an ``nn.Sequential`` that records
its scheme) of plain ``nn.Conv2d``/``nn.Linear`` children called one after another, the first named
``reduce`` and the last ``expand`` (it carries the layer's bias). It lives where :func:`factor_path` says.

Example:
    >>> from cstar_fx.schemes import get
    >>> spec = LayerSpec("fc", "linear", (10, 64), True, ())
    >>> get("svd").params(spec, (4,)), get("dense").params(spec, ())
    (306.0, 650.0)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.utils import skip_init

from ..decompose import Spectrum, mode_spectra
from ..errors import CstarTypeError, CstarValueError

__all__ = ["LayerSpec", "Op", "Scheme", "Factors", "register", "get", "names", "conv_scheme_names", "candidates",
           "layer_spectra", "factor_path", "DENSE", "AUTO", "DEFAULT_CONV"]

DENSE = "dense"
"""The scheme of a layer left as it is."""
AUTO = "auto"
"""``conv_scheme`` value: the allocator picks among every scheme registered for kxk convs."""
_MATRIX = "svd"  # every layer that is not a kxk conv is factorized as a matrix
DEFAULT_CONV = "tucker2"
"""The default ``conv_scheme``: the form kxk convs take, and the first that ``"auto"`` starts them in."""


@dataclass(frozen=True)
class LayerSpec:
    """What the allocator knows of one factorizable layer.

    ``in_positions``/``out_positions`` are the number of spatial positions (times batch, summed over
    call sites) the layer reads and writes on the example input; ``None`` when no example input was
    given. For a linear layer they are the number of rows it is applied to. ``in_shape``/``out_shape``
    are the tensor shapes at the first call site, and ``stride``/``padding``/``dilation`` the conv
    settings, for cost models that rebuild the layer (e.g. to time it). ``importance`` weighs the
    layer in the allocator's objective (1.0: spectral energy alone; e.g. a measured sensitivity of
    the adversarial loss, see :func:`cstar_fx.robust.layer_sensitivity`). ``spectra`` are the mode
    spectra (:func:`cstar_fx.decompose.mode_spectra`); ``scheme_spectra`` holds, by scheme name, the
    spectra of schemes that need others (see :func:`layer_spectra`).

    Example:
        >>> spec = LayerSpec("fc", "linear", (10, 64), True, (Spectrum((1.0,)),))
        >>> spec.is_conv
        False
    """

    name: str
    kind: Literal["conv", "linear"]
    weight_shape: tuple[int, ...]
    has_bias: bool
    spectra: tuple[Spectrum, ...]
    in_positions: int | None = None
    out_positions: int | None = None
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    importance: float = 1.0
    scheme_spectra: Mapping[str, tuple[Spectrum, ...]] = field(default_factory=dict, hash=False)

    @property
    def is_conv(self) -> bool:
        """True for a conv weight ``(C_out, C_in, kh, kw)``."""
        return self.kind == "conv"

    @property
    def kernel_area(self) -> int:
        """``kh * kw`` for a conv, 1 for a linear layer."""
        return self.weight_shape[2] * self.weight_shape[3] if self.is_conv else 1


@dataclass(frozen=True)
class Op:
    """One primitive op to time: a 2-D conv or a linear layer, with its per-sample input geometry.

    Example:
        >>> Op("conv", 16, 32, (3, 3), hw=(8, 8)).key()
        'conv 16->32 k3x3 s1x1 p0x0 d1x1 hw8x8 bias0'
    """

    kind: str
    c_in: int
    c_out: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    hw: tuple[int, ...] = ()
    bias: bool = False

    def key(self) -> str:
        """A stable text key for the cache."""
        if self.kind == "linear":
            return f"linear {self.c_in}->{self.c_out} rows{'x'.join(map(str, self.hw)) or 1} bias{int(self.bias)}"
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, self.padding))
        return (f"conv {self.c_in}->{self.c_out} k{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]}x{self.stride[1]} "
                f"p{pad} d{self.dilation[0]}x{self.dilation[1]} hw{self.hw[0]}x{self.hw[1]} bias{int(self.bias)}")

    def with_channels(self, c_in: int, c_out: int) -> "Op":
        """The same op with other channel counts."""
        return Op(self.kind, c_in, c_out, self.kernel, self.stride, self.padding, self.dilation, self.hw, self.bias)

    def module(self) -> nn.Module:
        """A randomly initialised module that runs this op."""
        if self.kind == "linear":
            return nn.Linear(self.c_in, self.c_out, bias=self.bias)
        return nn.Conv2d(self.c_in, self.c_out, self.kernel, self.stride, self.padding, self.dilation, bias=self.bias)

    def input(self, batch: int) -> torch.Tensor:
        """A random input of the op's shape at a batch size."""
        return torch.randn(batch, self.c_in, *self.hw) if self.kind == "conv" else torch.randn(batch, *self.hw, self.c_in)


class Factors(nn.Sequential):
    """The factor chain of one layer: its children run in order, and ``scheme`` names the form that built it.

    Example:
        >>> f = Factors("svd", [("reduce", nn.Linear(4, 2)), ("expand", nn.Linear(2, 3))])
        >>> f.scheme, list(f._modules)
        ('svd', ['reduce', 'expand'])
    """

    def __init__(self, scheme: str, children: list[tuple[str, nn.Module]]) -> None:
        super().__init__(OrderedDict(children))
        self.scheme = scheme

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}"


def factor_path(name: str, param: str, form: str) -> str:
    """Where a layer's :class:`Factors` live: the layer's own path in module form, ``<weight>_factors`` for a
    functional ``F.conv2d``/``F.linear`` call (its weight is a parameter, not a module to replace).

    Example:
        >>> factor_path("fc", "fc.weight", "module"), factor_path("w1", "w1", "function")
        ('fc', 'w1_factors')
    """
    return name if form == "module" else f"{param}_factors"


def conv(c_in: int, c_out: int, kernel: tuple[int, int], like: torch.Tensor, bias: bool = False, *,
         stride: Any = 1, padding: Any = 0, dilation: Any = 1, padding_mode: str = "zeros") -> nn.Conv2d:
    """An uninitialised ``nn.Conv2d`` on ``like``'s device and dtype (:meth:`Scheme.build` fills it)."""
    return skip_init(nn.Conv2d, c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=padding_mode, device=like.device, dtype=like.dtype)


def linear(c_in: int, c_out: int, like: torch.Tensor, bias: bool = False) -> nn.Linear:
    """An uninitialised ``nn.Linear`` on ``like``'s device and dtype (:meth:`Scheme.build` fills it)."""
    return skip_init(nn.Linear, c_in, c_out, bias=bias, device=like.device, dtype=like.dtype)


def site_conv_args(site: Any) -> dict[str, Any]:
    """The conv settings of a layer site (stride, padding, dilation, padding mode) as ``nn.Conv2d`` keywords."""
    return dict(stride=site.stride, padding=site.padding, dilation=site.dilation, padding_mode=site.padding_mode)


def spec_conv_args(layer: LayerSpec) -> dict[str, Any]:
    """The conv settings of a layer spec as :class:`Op` keywords."""
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


class Scheme:
    """One factorized (or dense) form of a conv/linear layer. Subclass it and :func:`register` an instance.

    A subclass sets ``name``, ``n_ranks`` (how many ranks a plan gives it), ``conv_choice`` (whether
    ``conv_scheme=`` may name it for kxk convs), ``exact_energy`` (whether :meth:`energy` is exact or an
    estimate), ``data_aware`` (whether :meth:`factor_weights` uses calibration moments) and ``own_spectra``
    (whether :meth:`energy` reads spectra of its own, from :meth:`spectra`, rather than the mode spectra), and
    implements the hooks below: :meth:`applies`, :meth:`max_ranks`, :meth:`energy`, :meth:`weight_count`,
    :meth:`macs`, :meth:`ops`, :meth:`project`, :meth:`chain`, :meth:`factor_weights`, :meth:`reconstruct` (and
    :meth:`spectra` with ``own_spectra``, :meth:`ranks_of` where the default does not fit). ``layer`` is a :class:`LayerSpec`; ``site`` a
    :class:`cstar_fx.passes.discover.LayerSite` (``weight``, ``bias``, ``kind`` and the conv settings).

    Example:
        >>> s = get("tucker2")
        >>> s.n_ranks, s.max_ranks(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()))
        (2, (8, 4))
    """

    name: str = ""
    n_ranks: int = 1
    factorizes: bool = True
    conv_choice: bool = False
    exact_energy: bool = True
    data_aware: bool = False
    own_spectra: bool = False

    # --- hooks a scheme implements -------------------------------------------------------------------------
    def applies(self, layer: LayerSpec) -> bool:
        """Whether this form can replace ``layer``."""
        raise NotImplementedError

    def max_ranks(self, layer: LayerSpec) -> tuple[int, ...]:
        """The full ranks of ``layer`` in this form (where it is exact)."""
        raise NotImplementedError

    def spectra(self, weight: torch.Tensor) -> tuple[Spectrum, ...]:
        """Where ``own_spectra``: the spectra :meth:`energy` reads from ``layer.scheme_spectra[name]`` (the
        others read the mode spectra, ``layer.spectra``)."""
        raise NotImplementedError

    def energy(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        """The kept fraction of ``||W||_F^2`` at ``ranks`` (exact, or an estimate where ``exact_energy`` is False)."""
        raise NotImplementedError

    def weight_count(self, layer: LayerSpec, ranks: tuple[int, ...]) -> int:
        """Weights of the form, bias not counted."""
        raise NotImplementedError

    def macs(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        """Multiply-adds of the form on the example input (positions are known when this is called)."""
        raise NotImplementedError

    def ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        """The primitive ops the form runs, in order (shapes are known when this is called)."""
        raise NotImplementedError

    def project(self, weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        """The dense weight of the best form at ``ranks`` this scheme finds for ``weight`` (ADMM's Z step)."""
        raise NotImplementedError

    def chain(self, site: Any, ranks: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        """The factor modules (uninitialised, from :func:`conv`/:func:`linear`), input side first."""
        raise NotImplementedError

    def factor_weights(self, weight: torch.Tensor, ranks: tuple[int, ...],
                       moment: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """One weight per :meth:`chain` module (reshaped into it), computed from ``weight``; with ``moment``
        (the layer's input second moment) the data-aware ones where ``data_aware``."""
        raise NotImplementedError

    def reconstruct(self, factors: nn.Sequential) -> torch.Tensor:
        """The dense weight a built chain equals."""
        raise NotImplementedError

    def ranks_of(self, factors: nn.Sequential) -> tuple[int, ...]:
        """The ranks of a built chain (default: the first module's output channels)."""
        return (int(factors[0].weight.shape[0]),)

    # --- what the rest of the package calls ----------------------------------------------------------------
    def has_spectra(self, layer: LayerSpec) -> bool:
        """Whether ``layer`` carries the spectra :meth:`energy` needs (a scheme with its own spectra gets them
        only when it was a candidate at analysis time)."""
        return not self.own_spectra or self.name in layer.scheme_spectra

    def params(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        """Parameters of the form, bias included."""
        return float(self.weight_count(layer, ranks) + (layer.weight_shape[0] if layer.has_bias else 0))

    def flops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        """FLOPs on the example input (2 per multiply-add, bias not counted, as ``FlopCounterMode`` counts)."""
        if layer.in_positions is None or layer.out_positions is None:
            raise CstarValueError(f"layer {layer.name!r} has no shape information; "
                                  "pass example_inputs for a FLOP budget")
        return 2.0 * self.macs(layer, ranks)

    def latency_ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        """:meth:`ops`, after checking the layer's shapes are known."""
        if layer.in_shape is None or layer.out_shape is None:
            raise CstarValueError(f"layer {layer.name!r} has no shape information; "
                                  "pass example_inputs for a latency budget")
        return self.ops(layer, ranks)

    def build(self, site: Any, ranks: tuple[int, ...], *, decompose: bool = True,
              moment: torch.Tensor | None = None) -> Factors:
        """The :class:`Factors` replacing ``site`` at ``ranks``, initialised from its weight (``decompose=False``:
        zero weights, to load saved ones into)."""
        if not self.factorizes:
            raise CstarValueError(f"layer {site.name!r}: scheme {self.name!r} "
                                  "keeps the layer as it is; nothing to build")
        seq = Factors(self.name, self.chain(site, ranks))
        children = list(seq._modules)
        if children[0] != "reduce" or children[-1] != "expand":
            raise CstarTypeError(f"scheme {self.name!r} built the chain {children}; a chain starts with 'reduce' "
                                 "and ends with 'expand' (the layout transform, save/load and pruning rely on)")
        with torch.no_grad():
            if decompose:
                found = self.factor_weights(site.weight.detach(), ranks, moment if self.data_aware else None)
                for module, w in zip(seq, found):
                    module.weight.copy_(w.reshape(module.weight.shape))
            else:
                for module in seq:
                    module.weight.zero_()
            if site.bias is not None:
                seq[-1].bias.copy_(site.bias.detach())
        seq.requires_grad_(site.weight.requires_grad)
        return seq

    def read_back(self, factors: nn.Sequential, kernel: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """``(dense weight shape, ranks, has bias)`` of a built chain as it is now (e.g. after pruning);
        ``kernel`` is the layer's spatial kernel (``()`` for a linear layer)."""
        shape = (int(factors[-1].weight.shape[0]), int(factors[0].weight.shape[1]), *kernel)
        return shape, tuple(int(r) for r in self.ranks_of(factors)), factors[-1].bias is not None


_REGISTRY: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Make ``scheme`` available by its name to plans, the allocator and every pass; returns it.

    Example:
        >>> "svd" in names()
        True
    """
    if not isinstance(scheme, Scheme) or not scheme.name:
        raise CstarTypeError(f"register takes a named Scheme instance, got {scheme!r}")
    if scheme.name in _REGISTRY or scheme.name == AUTO:
        raise CstarValueError(f"a scheme named {scheme.name!r} is already registered; choose another name")
    _REGISTRY[scheme.name] = scheme
    return scheme


def get(name: str) -> Scheme:
    """The registered scheme called ``name``.

    Example:
        >>> get("svd").n_ranks
        1
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CstarValueError(f"unknown scheme {name!r}; the registered schemes are {names()}") from None


def names() -> tuple[str, ...]:
    """Every registered scheme's name, in registration order.

    Example:
        >>> names()[:3]
        ('dense', 'svd', 'tucker2')
    """
    return tuple(_REGISTRY)


def conv_scheme_names() -> tuple[str, ...]:
    """The values ``conv_scheme=`` accepts: every scheme registered for kxk convs, and ``"auto"``.

    Example:
        >>> conv_scheme_names()
        ('svd', 'tucker2', 'spatial_svd', 'auto')
    """
    return tuple(n for n, s in _REGISTRY.items() if s.conv_choice) + (AUTO,)


def _is_kxk(layer: LayerSpec) -> bool:
    return layer.is_conv and layer.kernel_area > 1


def candidates(layer: LayerSpec, conv_scheme: str) -> tuple[Scheme, ...]:
    """The forms the allocator considers for ``layer``, the one it starts in first: SVD for linear layers and
    1x1 convs; for kxk convs ``conv_scheme``, or with ``"auto"`` Tucker-2 then every other kxk scheme.

    Example:
        >>> conv = LayerSpec("c", "conv", (8, 4, 3, 3), False, ())
        >>> [s.name for s in candidates(conv, "auto")]
        ['tucker2', 'svd', 'spatial_svd']
    """
    if not _is_kxk(layer):
        return (get(_MATRIX),)
    if conv_scheme != AUTO:
        return (get(conv_scheme),)
    first = get(DEFAULT_CONV)
    return (first, *(s for s in _REGISTRY.values() if s.conv_choice and s is not first and s.applies(layer)))


def layer_spectra(weight: torch.Tensor, kind: str, conv_scheme: str
                  ) -> tuple[tuple[Spectrum, ...], dict[str, tuple[Spectrum, ...]]]:
    """The mode spectra of ``weight``, and the spectra of the candidate schemes that need their own
    (computed only for those: a scheme's extra eigen-solve costs nothing when it is not considered).

    Example:
        >>> w = torch.randn(8, 4, 3, 3)
        >>> modes, own = layer_spectra(w, "conv", "auto")
        >>> len(modes), sorted(own)
        (2, ['spatial_svd'])
    """
    modes = mode_spectra(weight)
    layer = LayerSpec("", kind, tuple(weight.shape), False, ())  # type: ignore[arg-type]
    return modes, {s.name: s.spectra(weight) for s in candidates(layer, conv_scheme) if s.own_spectra}

