"""Input statistics of the factorizable layers on calibration data, for data-aware factorization.

Read-only: this pass runs the GraphModule (eval mode, no gradients) on calibration batches and
accumulates, for every layer site, the second moment ``E[p p^T]`` of what the layer multiplies by
its weight: the input vector of a linear layer, the unfolded ``C_in x kh x kw`` patch of a conv
(zero padding, the layer's stride and dilation). :func:`cstar_fx.decompose.svd_factors_data` and
:func:`~cstar_fx.decompose.tucker2_factors_data` turn these into factors that preserve the layer's
outputs on such inputs.

Example:
    >>> import torch, torch.nn as nn
    >>> from cstar_fx.passes.trace import trace
    >>> from cstar_fx.passes.discover import find_layers
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 4)))
    >>> moments = input_moments(gm, find_layers(gm)[0], [torch.rand(5, 3, 4, 4)])
    >>> {k: tuple(v.shape) for k, v in moments.items()}
    {'0': (27, 27), '2': (128, 128)}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import CstarError
from ..torchutil import eval_mode
from .discover import LayerSite

__all__ = ["input_moments", "CalibrationError"]

# Positions sampled per conv layer and batch: bounds the cost of a full-resolution layer while
# keeping thousands of samples for a moment matrix of a few hundred dimensions.
_MAX_POSITIONS = 32768


class CalibrationError(CstarError, ValueError):
    """Calibration data that cannot drive the model (wrong type, shape, or no batch at all).

    Example:
        >>> isinstance(CalibrationError("x"), ValueError)
        True
    """


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _patches(site: LayerSite, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Rows of what the layer's weight multiplies: ``(positions, in_features)``."""
    if site.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    # String paddings ("same") and non-zero padding modes are approximated by the unpadded interior.
    padding = _pair(site.padding) if not isinstance(site.padding, str) and site.padding_mode == "zeros" else (0, 0)
    cols = F.unfold(x, kernel, dilation=_pair(site.dilation), padding=padding, stride=_pair(site.stride))
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if rows.shape[0] > _MAX_POSITIONS:
        step = -(-rows.shape[0] // _MAX_POSITIONS)
        rows = rows[::step]
    return rows


class _Collector(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sites: list[LayerSite]) -> None:
        super().__init__(gm)
        self.by_node = {n: s for s in sites for n in s.nodes}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        site = self.by_node.get(n)
        if site is not None:
            arg = n.args[0] if n.args else n.kwargs.get("input")
            x = self.env.get(arg) if isinstance(arg, fx.Node) else None
            if isinstance(x, torch.Tensor):
                w = site.weight
                rows = _patches(site, x.detach(), tuple(w.shape[2:]) if site.kind == "conv" else (1, 1))
                rows = rows.to(torch.float64)
                acc = rows.T @ rows
                self.sums[site.name] = self.sums[site.name] + acc if site.name in self.sums else acc
                self.counts[site.name] = self.counts.get(site.name, 0) + rows.shape[0]
        return super().run_node(n)


def _batches(calibration: Any) -> Iterable[tuple[Any, ...]]:
    if isinstance(calibration, torch.Tensor):
        yield (calibration,)
        return
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be a tensor of inputs or an iterable of batches (tensors, or "
                               f"(inputs, labels) pairs), got {type(calibration).__name__}")
    for batch in calibration:
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            yield (batch[0],)  # (inputs, labels): the model takes the inputs
        else:
            raise CalibrationError(f"each calibration batch must be an input tensor or an (inputs, labels) pair, "
                                   f"got {type(batch).__name__}")


def input_moments(gm: fx.GraphModule, sites: list[LayerSite], calibration: Any) -> dict[str, torch.Tensor]:
    """``{site name: E[p p^T]}`` (float64) over the calibration inputs; sites the data never reaches are absent.

    The uncentred moment, so the factors also preserve the outputs' mean (the layers that follow,
    batch norm included, see the same mean as before).

    ``calibration``: a tensor of model inputs, or an iterable of batches (tensors or ``(inputs, labels)``).
    The model runs in eval mode without gradients; its weights, buffers and flags are unchanged.
    """
    collector = _Collector(gm, sites)
    seen = 0
    with torch.no_grad(), eval_mode(gm):
        for args in _batches(calibration):
            if args[0].numel() == 0:
                continue
            try:
                collector.run(*args)
            except Exception as exc:
                raise CalibrationError(f"the model cannot run on the calibration batch of shape "
                                       f"{tuple(args[0].shape)}: {type(exc).__name__}: {exc}; pass inputs shaped "
                                       f"like the training data") from exc
            seen += 1
    if seen == 0:
        raise CalibrationError("the calibration data holds no non-empty batch; pass e.g. a few hundred training images")
    return {name: total / collector.counts[name] for name, total in collector.sums.items()}
