"""Spatial SVD (AIMET's) of a kxk conv: the kernel ``W (C_out, C_in, kh, kw)`` read as the matrix
``M[(c_in, y), (c_out, x)] = W[c_out, c_in, y, x]`` of shape ``(C_in*kh, C_out*kw)``, truncated to rank ``r``:
a ``kh x 1`` conv ``C_in -> r`` (the height half of the stride, padding and dilation) then a ``1 x kw`` conv
``r -> C_out`` (the width half, and the bias). The two convs compose to the rank-``r`` kernel, so the form is
exact at full rank ``min(C_in*kh, C_out*kw)`` and its weight error is the Eckart-Young error of ``M``: its kept
energy is exact. Padding modes carry to both convs (zero, reflect, replicate and circular padding are each
separable by axis). With calibration the factors preserve the layer's outputs instead
(:func:`~cstar_fx.decompose.spatial_svd_factors_data`); the plan's kept energy is still the weight's.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> from cstar_fx.passes.discover import find_layers
    >>> site = find_layers(trace(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1))))[0][0]
    >>> chain = SpatialSVD().build(site, (12,))
    >>> [(m.kernel_size, m.stride, m.padding) for m in chain]
    [((3, 1), (2, 1), (1, 0)), ((1, 3), (1, 2), (0, 1))]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..decompose import Spectrum, mode_spectra, spatial_svd_factors_data, svd_factors, svd_reconstruct
from ..errors import CstarValueError
from ..torchutil import pair
from .base import LayerSpec, Op, Scheme, conv, register


def _to_matrix(weight: torch.Tensor) -> torch.Tensor:
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def _from_matrix(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    c_out, c_in, kh, kw = shape
    return matrix.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3)


def _halves(stride: object, padding: object, dilation: object) -> tuple[dict[str, object], dict[str, object]]:
    """A conv's stride, padding and dilation split into the height conv's and the width conv's keywords (the
    other axis gets stride 1, no padding, dilation 1; a padding string such as 'same' holds for each axis)."""
    (s_h, s_w), (d_h, d_w) = pair(stride), pair(dilation)
    p_h, p_w = (padding, padding) if isinstance(padding, str) else ((pair(padding)[0], 0), (0, pair(padding)[1]))
    return (dict(stride=(s_h, 1), padding=p_h, dilation=(d_h, 1)),
            dict(stride=(1, s_w), padding=p_w, dilation=(1, d_w)))


def _positions_between(layer: LayerSpec) -> float:
    """Positions of the tensor between the two convs: the output's height times the input's width (from the
    shapes when known, else the geometric mean of input and output positions, exact when both axes scale alike)."""
    if layer.in_shape and layer.out_shape:
        return layer.out_positions * layer.in_shape[-1] / layer.out_shape[-1]
    return math.sqrt(layer.in_positions * layer.out_positions)


class SpatialSVD(Scheme):
    """Spatial SVD: a kx1 conv to rank ``r``, then a 1xk conv; one rank.

    Example:
        >>> SpatialSVD().max_ranks(LayerSpec("c", "conv", (8, 4, 3, 3), False, ()))
        (12,)
    """

    name = "spatial_svd"
    conv_choice = True
    own_spectra = True
    data_aware = True

    def applies(self, layer: LayerSpec) -> bool:
        return layer.is_conv and layer.kernel_area > 1

    def max_ranks(self, layer: LayerSpec) -> tuple[int, ...]:
        c_out, c_in, kh, kw = layer.weight_shape
        return (min(c_in * kh, c_out * kw),)

    def spectra(self, weight: torch.Tensor) -> tuple[Spectrum, ...]:
        return mode_spectra(_to_matrix(weight))

    def energy(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        if not self.has_spectra(layer):
            raise CstarValueError(f"layer {layer.name!r} has no spatial-SVD spectrum; plan "
                                  "with conv_scheme='spatial_svd' or 'auto', or build the "
                                  "LayerSpec with scheme_spectra=layer_spectra(weight, ...)[1]")
        return layer.scheme_spectra[self.name][0].kept_energy(ranks[0])

    def weight_count(self, layer: LayerSpec, ranks: tuple[int, ...]) -> int:
        c_out, c_in, kh, kw = layer.weight_shape
        return ranks[0] * (c_in * kh + c_out * kw)

    def macs(self, layer: LayerSpec, ranks: tuple[int, ...]) -> float:
        c_out, c_in, kh, kw = layer.weight_shape
        (r,) = ranks
        return r * c_in * kh * _positions_between(layer) + c_out * r * kw * layer.out_positions

    def ops(self, layer: LayerSpec, ranks: tuple[int, ...]) -> list[Op]:
        c_out, c_in, kh, kw = layer.weight_shape
        (r,) = ranks
        height, width = _halves(layer.stride, layer.padding, layer.dilation)
        between = (layer.out_shape[-2], layer.in_shape[-1])
        return [Op("conv", c_in, r, (kh, 1), hw=tuple(layer.in_shape[-2:]), **height),
                Op("conv", r, c_out, (1, kw), hw=between, bias=layer.has_bias, **width)]

    def project(self, weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        return _from_matrix(svd_reconstruct(*svd_factors(_to_matrix(weight), ranks[0])), weight.shape)

    def chain(self, site: object, ranks: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
        if site.kind != "conv":
            raise CstarValueError(f"layer {site.name!r}: spatial_svd needs a "
                                  "kxk conv weight; use 'svd' for linear layers")
        w, (r,) = site.weight, ranks
        c_out, c_in, kh, kw = w.shape
        height, width = _halves(site.stride, site.padding, site.dilation)
        mode = site.padding_mode
        return [("reduce", conv(c_in, r, (kh, 1), w, padding_mode=mode, **height)),
                ("expand", conv(r, c_out, (1, kw), w, site.bias is not None, padding_mode=mode, **width))]

    def factor_weights(self, weight: torch.Tensor, ranks: tuple[int, ...],
                       moment: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if moment is not None:
            return spatial_svd_factors_data(weight, ranks[0], moment)
        c_out, c_in, kh, kw = weight.shape
        first, second = svd_factors(_to_matrix(weight), ranks[0])  # M ~= second (C_in*kh, r) @ first (r, C_out*kw)
        return second.T, first.reshape(ranks[0], c_out, kw).transpose(0, 1)

    def reconstruct(self, factors: nn.Sequential) -> torch.Tensor:
        height, width = factors.reduce.weight, factors.expand.weight  # (r, C_in, kh, 1), (C_out, r, 1, kw)
        return torch.einsum("riy,orx->oiyx", height[..., 0], width[:, :, 0])


register(SpatialSVD())
