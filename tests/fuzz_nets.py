"""Random conv/linear networks for property-based tests: a hypothesis strategy and the model it describes.

A :class:`NetSpec` is plain data (printed by hypothesis when a property fails, so a failure can be
rebuilt with ``FuzzNet(spec)``); :class:`FuzzNet` turns it into a module mixing ``nn.Conv2d``/``nn.Linear``
modules and ``F.conv2d``/``F.linear`` calls on ``nn.Parameter`` s, with residual adds and channel concats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_CHANNELS = 32


@dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: int | tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool
    form: str  # "module" | "function" (F.conv2d, positional) | "keywords" (torch.conv2d, keyword arguments)
    padding_mode: str
    wrap: str  # "plain" | "residual" | "concat"
    act: bool


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out: int
    bias: bool
    form: str


@dataclass(frozen=True)
class NetSpec:
    in_ch: int
    size: tuple[int, int]
    convs: tuple[ConvSpec, ...]
    reduce: str  # how the conv stack meets the head: "none" (no head) | "pool" | "flatten"
    head: tuple[LinearSpec, ...]
    seed: int
    share: str = "none"  # "none" | "reread" (first layer's weight also read in forward) | "tied" (head 0 tied)

    @property
    def shared(self) -> set[str]:
        """Layers whose weight is also used elsewhere: they must stay dense, reported unsupported."""
        if self.share == "tied":
            return {linear_name(0, self.head[0]), "tied"}
        if self.share == "reread":
            return {conv_name(0, self.convs[0]) if self.convs else linear_name(0, self.head[0])}
        return set()

    def example(self, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A deterministic input batch for this network."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(batch, self.in_ch, *self.size, generator=gen, dtype=dtype)


def _side_pads(padding: int | tuple[int, int] | str, kernel: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[int, int]:
    """The largest padding applied on one side, per spatial dim."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return tuple(math.ceil(d * (k - 1) / 2) for k, d in zip(kernel, dilation))
    if isinstance(padding, int):
        return (padding, padding)
    return padding


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_specs(draw, in_ch: int, size: tuple[int, int]) -> tuple[ConvSpec, tuple[int, int]]:
    wrap = draw(st.sampled_from(["plain", "plain", "residual", "concat"]))
    if wrap == "concat" and in_ch >= MAX_CHANNELS:
        wrap = "plain"
    form = draw(st.sampled_from(["module", "function", "keywords"]))
    kind = draw(st.sampled_from(["dense", "dense", "dense", "depthwise", "grouped"]))
    cap = MAX_CHANNELS - in_ch if wrap == "concat" else MAX_CHANNELS
    divisors = [g for g in range(2, in_ch + 1) if in_ch % g == 0]
    if kind == "depthwise" and in_ch > 1:
        groups = in_ch
    elif kind == "grouped" and divisors:
        groups = draw(st.sampled_from(divisors))
    else:
        groups = 1
    if wrap == "residual":
        out = in_ch
    else:
        out = groups * draw(st.integers(1, max(1, cap // groups)))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if wrap != "plain":
        stride, padding = (1, 1), "same"  # the add/concat needs the input's spatial size
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        choices = ["int", "pair", "valid"] + (["same"] if stride == (1, 1) else [])
        how = draw(st.sampled_from(choices))
        if how == "int":
            padding = draw(st.integers(0, 2))
        elif how == "pair":
            padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        else:
            padding = how
        pads = _side_pads(padding, kernel, dilation)
        if padding != "same":
            # keep the output non-empty: drop dilation, then shrink the kernel to what fits
            if any(_out_size(n, k, s, p, d) < 1 for n, k, s, p, d in zip(size, kernel, stride, pads, dilation)):
                dilation = (1, 1)
            kernel = tuple(min(k, n + 2 * p) for k, n, p in zip(kernel, size, pads))
    pads = _side_pads(padding, kernel, dilation)
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])) if form == "module" else "zeros"
    if mode == "reflect" and any(p >= n for p, n in zip(pads, size)):
        mode = "zeros"
    if mode == "circular" and any(p > n for p, n in zip(pads, size)):
        mode = "zeros"
    spec = ConvSpec(in_ch, out, kernel, stride, padding, dilation, groups, draw(st.booleans()), form, mode, wrap,
                    draw(st.booleans()))
    if padding == "same":
        new_size = size
    else:
        new_size = tuple(_out_size(n, k, s, p, d) for n, k, s, p, d in zip(size, kernel, stride, pads, dilation))
    return spec, new_size


@st.composite
def net_specs(draw, max_convs: int = 4) -> NetSpec:
    """A random network: 0..max_convs conv blocks, then no head, or pool/flatten and 1-2 linear layers."""
    in_ch = draw(st.integers(1, 8))
    size = (draw(st.integers(3, 12)), draw(st.integers(3, 12)))
    convs, ch, hw = [], in_ch, size
    for _ in range(draw(st.integers(0, max_convs))):
        spec, hw = draw(conv_specs(ch, hw))
        convs.append(spec)
        ch = ch + spec.out if spec.wrap == "concat" else spec.out
    reduce = draw(st.sampled_from(["none", "pool", "flatten"] if convs else ["flatten"]))
    head: list[LinearSpec] = []
    if reduce != "none":
        features = ch * hw[0] * hw[1] if reduce == "flatten" else ch
        for _ in range(draw(st.integers(1, 2))):
            out = draw(st.integers(1, 32))
            form = draw(st.sampled_from(["module", "function", "keywords"]))
            head.append(LinearSpec(features, out, draw(st.booleans()), form))
            features = out
    share = draw(st.sampled_from(["none"] * 3 + ["reread"] + (["tied"] if head else [])))
    if share == "reread" and not convs and not head:
        share = "none"
    return NetSpec(in_ch, size, tuple(convs), reduce, tuple(head), draw(st.integers(0, 2**16)), share)


def conv_name(i: int, spec: ConvSpec) -> str:
    """The layer's name in a rank plan (module path, or weight parameter for the functional form)."""
    return f"convs.c{i}" if spec.form == "module" else f"cw{i}"


def linear_name(i: int, spec: LinearSpec) -> str:
    return f"heads.h{i}" if spec.form == "module" else f"hw{i}"


class FuzzNet(nn.Module):
    """The network a :class:`NetSpec` describes (weights from ``spec.seed``)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.convs = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for i, c in enumerate(spec.convs):
            conv = nn.Conv2d(c.in_ch, c.out, c.kernel, c.stride, c.padding, c.dilation, c.groups, c.bias,
                             c.padding_mode)
            if c.form == "module":
                self.convs[f"c{i}"] = conv
            else:
                self.register_parameter(f"cw{i}", conv.weight)
                self.register_parameter(f"cb{i}", conv.bias)
        for i, h in enumerate(spec.head):
            lin = nn.Linear(h.in_features, h.out, h.bias)
            if h.form == "module":
                self.heads[f"h{i}"] = lin
            else:
                self.register_parameter(f"hw{i}", lin.weight)
                self.register_parameter(f"hb{i}", lin.bias)
        if spec.share == "tied":
            h = spec.head[0]
            self.tied = nn.Linear(h.in_features, h.out, bias=False)
            self.tied.weight = self.heads["h0"].weight if h.form == "module" else self.hw0

    def _first_weight(self) -> torch.Tensor:
        if self.spec.convs:
            return self.convs["c0"].weight if self.spec.convs[0].form == "module" else self.cw0
        return self.heads["h0"].weight if self.spec.head[0].form == "module" else self.hw0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = self._first_weight().mean() if self.spec.share == "reread" else None
        for i, c in enumerate(self.spec.convs):
            w, b = getattr(self, f"cw{i}", None), getattr(self, f"cb{i}", None)
            if c.form == "module":
                y = self.convs[f"c{i}"](x)
            elif c.form == "function":
                y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
            else:
                y = torch.conv2d(input=x, weight=w, bias=b, stride=c.stride, padding=c.padding, dilation=c.dilation,
                                 groups=c.groups)
            x = x + y if c.wrap == "residual" else torch.cat([x, y], 1) if c.wrap == "concat" else y
            if c.act:
                x = torch.relu(x)
        if self.spec.reduce == "pool":
            x = x.mean((2, 3))
        elif self.spec.reduce == "flatten":
            x = torch.flatten(x, 1)
        for i, h in enumerate(self.spec.head):
            if i:
                x = torch.relu(x)
            w, b = getattr(self, f"hw{i}", None), getattr(self, f"hb{i}", None)
            if h.form == "module":
                y = self.heads[f"h{i}"](x)
            elif h.form == "function":
                y = F.linear(x, w, b)
            else:
                y = F.linear(input=x, weight=w, bias=b)
            x = y + self.tied(x) if i == 0 and self.spec.share == "tied" else y
        return x if shift is None else x + shift
