"""Cost models for the global rank allocator: what one layer costs, dense or factorized.

A cost model is any callable ``cost(layer, scheme, ranks) -> float``; ``scheme`` is ``"dense"``
(``ranks == ()``), ``"svd"`` (one rank) or ``"tucker2"`` (``(rank_out, rank_in)``). The allocator only
compares sums of these numbers, so any additive cost works: parameters, FLOPs, or measured latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from .decompose import Spectrum

__all__ = ["LayerSpec", "CostModel", "ParamCost", "FlopCost", "cost_model_for"]

Scheme = Literal["dense", "svd", "tucker2"]


@dataclass(frozen=True)
class LayerSpec:
    """What the allocator knows of one factorizable layer.

    ``in_positions``/``out_positions`` are the number of spatial positions (times batch, summed over
    call sites) the layer reads and writes on the example input; ``None`` when no example input was
    given. For a linear layer they are the number of rows it is applied to. ``in_shape``/``out_shape``
    are the tensor shapes at the first call site, and ``stride``/``padding``/``dilation`` the conv
    settings, for cost models that rebuild the layer (e.g. to time it). ``importance`` weighs the
    layer in the allocator's objective (1.0: spectral energy alone; e.g. a measured sensitivity of
    the adversarial loss, see :func:`cstar_fx.robust.layer_sensitivity`).

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

    @property
    def is_conv(self) -> bool:
        """True for a conv weight ``(C_out, C_in, kh, kw)``."""
        return self.kind == "conv"

    @property
    def kernel_area(self) -> int:
        """``kh * kw`` for a conv, 1 for a linear layer."""
        return self.weight_shape[2] * self.weight_shape[3] if self.is_conv else 1


class CostModel(Protocol):
    """The allocator's cost interface (parameters, FLOPs, latency, ...).

    Example:
        >>> cost: CostModel = ParamCost()
        >>> cost.name
        'params'
    """

    name: str

    def __call__(self, layer: LayerSpec, scheme: Scheme, ranks: tuple[int, ...]) -> float: ...


def _bias(layer: LayerSpec) -> int:
    return layer.weight_shape[0] if layer.has_bias else 0


@dataclass(frozen=True)
class ParamCost:
    """Cost = number of parameters (weights and bias) of the layer's dense or factorized form.

    Example:
        >>> spec = LayerSpec("fc", "linear", (10, 64), True, ())
        >>> ParamCost()(spec, "dense", ()), ParamCost()(spec, "svd", (4,))
        (650.0, 306.0)
    """

    name: str = "params"

    def __call__(self, layer: LayerSpec, scheme: Scheme, ranks: tuple[int, ...]) -> float:
        out, inp = layer.weight_shape[:2]
        area = layer.kernel_area
        if scheme == "dense":
            return float(out * inp * area + _bias(layer))
        if scheme == "svd":
            (r,) = ranks
            return float(r * inp * area + out * r + _bias(layer))
        r_out, r_in = ranks
        return float(inp * r_in + r_out * r_in * area + out * r_out + _bias(layer))


@dataclass(frozen=True)
class FlopCost:
    """Cost = floating-point operations on the example input (2 per multiply-add, bias not counted),
    the convention of :class:`torch.utils.flop_counter.FlopCounterMode`.

    Example:
        >>> spec = LayerSpec("fc", "linear", (10, 64), False, (), in_positions=1, out_positions=1)
        >>> FlopCost()(spec, "dense", ())
        1280.0
    """

    name: str = "flops"

    def __call__(self, layer: LayerSpec, scheme: Scheme, ranks: tuple[int, ...]) -> float:
        if layer.in_positions is None or layer.out_positions is None:
            raise ValueError(f"layer {layer.name!r} has no shape information; pass example_inputs for a FLOP budget")
        out, inp = layer.weight_shape[:2]
        area = layer.kernel_area
        p_in, p_out = layer.in_positions, layer.out_positions
        if scheme == "dense":
            return 2.0 * out * inp * area * p_out
        if scheme == "svd":
            (r,) = ranks
            return 2.0 * (r * inp * area + out * r) * p_out
        r_out, r_in = ranks
        return 2.0 * (inp * r_in * p_in + r_out * r_in * area * p_out + out * r_out * p_out)


def cost_model_for(budget: str) -> CostModel:
    """The built-in cost model for a budget name (``"params"`` or ``"flops"``).

    Example:
        >>> cost_model_for("flops").name
        'flops'
    """
    if budget == "params":
        return ParamCost()
    if budget == "flops":
        return FlopCost()
    raise ValueError(f"budget must be 'params' or 'flops' (or pass cost_model=...), got {budget!r}")
