"""The dense form: the layer stays as it is (what the allocator falls back to, and the baseline of every cost).

Example:
    >>> from cstar_fx.schemes import get
    >>> get("dense").factorizes
    False
"""

from __future__ import annotations

import torch

from .base import DENSE, LayerSpec, Op, Scheme, register, spec_conv_args


class Dense(Scheme):
    """The layer unchanged: no ranks, all its energy, one op.

    Example:
        >>> Dense().energy(LayerSpec("fc", "linear", (4, 4), False, ()), ())
        1.0
    """

    name = DENSE
    n_ranks = 0
    factorizes = False

    def applies(self, layer: LayerSpec) -> bool:
        return True

    def max_ranks(self, layer: LayerSpec) -> tuple[int, ...]:
        return ()

    def energy(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        return 1.0

    def weight_count(self, layer: LayerSpec, ranks: tuple[int, ...]) -> int:
        out, inp = layer.weight_shape[:2]
        return out * inp * layer.kernel_area

    def macs(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        return float(self.weight_count(layer, ranks)) * layer.out_positions

    def ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        out, inp = layer.weight_shape[:2]
        if not layer.is_conv:
            return [Op("linear", inp, out, hw=tuple(layer.in_shape[1:-1]), bias=layer.has_bias)]
        return [Op("conv", inp, out, tuple(layer.weight_shape[2:]), hw=tuple(layer.in_shape[-2:]), bias=layer.has_bias,
                   **spec_conv_args(layer))]

    def project(self, weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return weight


register(Dense())
