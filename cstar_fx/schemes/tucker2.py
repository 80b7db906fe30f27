"""Tucker-2 (HOSVD on the two channel modes) of a kxk conv: a 1x1 conv to ``R_in``, the kxk core conv
``R_in -> R_out`` (with the original stride, padding and dilation), a 1x1 conv back to ``C_out`` with the bias.
The default form of kxk convs; exact at full ranks.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> from cstar_fx.passes.discover import find_layers
    >>> site = find_layers(trace(nn.Sequential(nn.Conv2d(4, 8, 3))))[0][0]
    >>> list(Tucker2().build(site, (4, 2))._modules)
    ['reduce', 'core', 'expand']
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..decompose import project, tucker2_factors, tucker2_factors_data, tucker2_reconstruct
from .base import LayerSpec, Op, Scheme, conv, register, site_conv_args, spec_conv_args
from ..errors import CstarValueError


class Tucker2(Scheme):
    """Tucker-2: ranks ``(R_out, R_in)``. Its kept energy is an estimate: the product of the two channel modes'
    kept fractions (the real one needs the factors; the transform report measures it).

    Example:
        >>> Tucker2().max_ranks(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()))
        (8, 4)
    """

    name = "tucker2"
    n_ranks = 2
    conv_choice = True
    exact_energy = False
    data_aware = True

    def applies(self, layer: LayerSpec) -> bool:
        return layer.is_conv

    def max_ranks(self, layer: LayerSpec) -> tuple[int, ...]:
        out, inp = layer.weight_shape[:2]
        area = layer.kernel_area
        return (min(out, inp * area), min(inp, out * area))

    def energy(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        kept = 1.0
        for spec, r in zip(layer.spectra, ranks):
            kept *= spec.kept_energy(r)
        return kept

    def weight_count(self, layer: LayerSpec, ranks: tuple[int, ...]) -> int:
        out, inp = layer.weight_shape[:2]
        r_out, r_in = ranks
        return inp * r_in + r_out * r_in * layer.kernel_area + out * r_out

    def macs(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        out, inp = layer.weight_shape[:2]
        r_out, r_in = ranks
        per_output = r_out * r_in * layer.kernel_area + out * r_out
        return float(inp * r_in * layer.in_positions + per_output * layer.out_positions)

    def ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        out, inp = layer.weight_shape[:2]
        r_out, r_in = ranks
        hw_in = tuple(layer.in_shape[-2:])
        return [Op("conv", inp, r_in, hw=hw_in),
                Op("conv", r_in, r_out, tuple(layer.weight_shape[2:]), hw=hw_in, **spec_conv_args(layer)),
                Op("conv", r_out, out, hw=tuple(layer.out_shape[-2:]), bias=layer.has_bias)]

    def project(self, weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return project(weight, ranks)

    def chain(self, site: object, ranks: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        if site.kind != "conv":
            raise CstarValueError(f"layer {site.name!r}: tucker2 needs a conv weight; use 'svd' for linear layers")
        w, (r_out, r_in) = site.weight, ranks
        return [("reduce", conv(w.shape[1], r_in, (1, 1), w)),
                ("core", conv(r_in, r_out, tuple(w.shape[2:]), w, **site_conv_args(site))),
                ("expand", conv(r_out, w.shape[0], (1, 1), w, site.bias is not None))]

    def factor_weights(self, weight: torch.Tensor, ranks: tuple[int, ...],
                       moment: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        r_out, r_in = ranks
        found = (tucker2_factors(weight, r_out, r_in) if moment is None
                 else tucker2_factors_data(weight, r_out, r_in, moment))
        u_in, core, u_out = found
        return u_in.T, core, u_out

    def reconstruct(self, factors: nn.Sequential) -> torch.Tensor:
        return tucker2_reconstruct(factors.reduce.weight.flatten(1).T, factors.core.weight,
                                   factors.expand.weight.flatten(1))

    def ranks_of(self, factors: nn.Sequential) -> tuple[int, ...]:
        return (int(factors.core.weight.shape[0]), int(factors.core.weight.shape[1]))


register(Tucker2())
