"""Truncated SVD of the weight as a matrix ``(out, in*kh*kw)``: a layer to rank ``r`` (a kxk conv keeps its
kernel, stride, padding and dilation), then a linear/1x1 layer back to ``out`` with the bias. The default form
of linear layers and 1x1 convs; exact at full rank, with the Eckart-Young error when truncated.

Example:
    >>> import torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> from cstar_fx.passes.discover import find_layers
    >>> site = find_layers(trace(nn.Sequential(nn.Linear(6, 4))))[0][0]
    >>> [type(m).__name__ for m in SVD().build(site, (2,))]
    ['Linear', 'Linear']
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..decompose import project, svd_factors, svd_factors_data
from .base import LayerSpec, Op, Scheme, conv, linear, register, site_conv_args, spec_conv_args


class SVD(Scheme):
    """Matrix SVD: ``W (out, in) ~= B A``, one rank.

    Example:
        >>> SVD().max_ranks(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()))
        (8,)
    """

    name = "svd"
    conv_choice = True
    data_aware = True

    def applies(self, layer: LayerSpec) -> bool:
        return True

    def max_ranks(self, layer: LayerSpec) -> tuple[int, ...]:
        out, inp = layer.weight_shape[:2]
        return (min(out, inp * layer.kernel_area),)

    def energy(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        return layer.spectra[0].kept_energy(ranks[0])

    def weight_count(self, layer: LayerSpec, ranks: tuple[int, ...]) -> int:
        out, inp = layer.weight_shape[:2]
        (r,) = ranks
        return r * inp * layer.kernel_area + out * r

    def macs(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        return float(self.weight_count(layer, ranks)) * layer.out_positions

    def ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        out, inp = layer.weight_shape[:2]
        (r,) = ranks
        if not layer.is_conv:
            rows = tuple(layer.in_shape[1:-1])
            return [Op("linear", inp, r, hw=rows), Op("linear", r, out, hw=rows, bias=layer.has_bias)]
        kernel = tuple(layer.weight_shape[2:])
        return [Op("conv", inp, r, kernel, hw=tuple(layer.in_shape[-2:]), **spec_conv_args(layer)),
                Op("conv", r, out, hw=tuple(layer.out_shape[-2:]), bias=layer.has_bias)]

    def project(self, weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return project(weight, ranks)

    def chain(self, site: object, ranks: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        w, (r,) = site.weight, ranks
        if site.kind == "linear":
            return [("reduce", linear(w.shape[1], r, w)), ("expand", linear(r, w.shape[0], w, site.bias is not None))]
        return [("reduce", conv(w.shape[1], r, tuple(w.shape[2:]), w, **site_conv_args(site))),
                ("expand", conv(r, w.shape[0], (1, 1), w, site.bias is not None))]

    def factor_weights(self, weight: torch.Tensor, ranks: tuple[int, ...],
                       moment: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        flat = weight.reshape(weight.shape[0], -1)
        return svd_factors(flat, ranks[0]) if moment is None else svd_factors_data(flat, ranks[0], moment)

    def reconstruct(self, factors: nn.Sequential) -> torch.Tensor:
        first, second = factors.reduce.weight, factors.expand.weight
        return (second.flatten(1) @ first.flatten(1)).reshape(second.shape[0], *first.shape[1:])


register(SVD())
