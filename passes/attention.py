"""Unpack ``nn.MultiheadAttention`` into plain ``nn.Linear`` projections that torch.fx traces into.

torch.fx calls ``nn.MultiheadAttention`` as one opaque leaf, so its packed q/k/v projection
(``in_proj_weight``) and its output projection stay dense: in a ViT that is a third of the weights.
:func:`unpack_attention` swaps every such module for an :class:`ExplicitAttention` with the same
weights, signature and outputs, built from four ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``) and ``F.scaled_dot_product_attention``, which cstar_fx then factorizes like any linear layer.

Example:
    >>> import torch, torch.nn as nn
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
    >>> explicit = unpack_attention(nn.Sequential(mha))[0]
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(explicit(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import glob
import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CstarNotImplementedError, CstarRuntimeError, CstarTypeError, CstarValueError
from .trace import CstarTracer

__all__ = ["ExplicitAttention", "unpack_attention"]


def _additive_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = masked out) as the additive float mask nn.MultiheadAttention uses."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise CstarTypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


def _merge_masks(key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, q: torch.Tensor,
                 k: torch.Tensor) -> torch.Tensor | None:
    """One additive mask that broadcasts against the scores ``(*batch, heads, L, S)``, or None."""
    batch_heads, (tgt_len, src_len) = q.shape[:-2], (q.shape[-2], k.shape[-2])
    am = _additive_mask(attn_mask, "attn_mask", q.dtype)
    if am is not None:
        if am.dim() == 3 and am.shape[1:] == (tgt_len, src_len) and am.shape[0] == math.prod(batch_heads):
            am = am.reshape(*batch_heads, tgt_len, src_len)  # (N*heads, L, S) -> (N, heads, L, S)
        elif am.shape != (tgt_len, src_len):
            raise CstarRuntimeError(f"attn_mask has shape {tuple(am.shape)}; expected {(tgt_len, src_len)} or "
                                    f"{(math.prod(batch_heads), tgt_len, src_len)} (batch * num_heads, L, S)")
    kpm = _additive_mask(key_padding_mask, "key_padding_mask", q.dtype)
    if kpm is not None:
        expected = (*q.shape[:-3], src_len)
        if kpm.shape != expected:
            raise CstarRuntimeError(f"key_padding_mask has shape {tuple(kpm.shape)}; expected {expected} (batch, S)")
        kpm = kpm[..., None, None, :]  # broadcast over heads and target positions
    if am is None:
        return kpm
    return am if kpm is None else am + kpm


def _add_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return scores if mask is None else scores + mask


# Wrapped for torch.fx: when a mask is a graph input these run as opaque nodes, so the branches on the
# masks (None or not, dtype, rank) are taken at run time, not at trace time.
fx.wrap("_merge_masks")
fx.wrap("_add_mask")


class ExplicitAttention(nn.Module):
    """Multi-head attention with separate ``nn.Linear`` q/k/v/out projections; a drop-in for
    ``nn.MultiheadAttention`` (same ``forward`` signature, inputs and ``(output, weights)`` return).

    Layout follows ``batch_first`` for batched inputs; unbatched ``(L, E)`` inputs work too. Masks
    follow nn.MultiheadAttention: ``key_padding_mask`` ``(N, S)``, ``attn_mask`` ``(L, S)`` or
    ``(N * num_heads, L, S)``, bool (True = masked out) or additive float. ``is_causal`` is the same
    hint as there: it needs ``attn_mask`` and the result is computed from ``attn_mask``. Without
    ``need_weights`` and without dropout the core is ``F.scaled_dot_product_attention``; otherwise it
    is written out (softmax of scaled scores, then ``attn_drop``, an ``nn.Dropout`` module, so the
    ``training`` flag still switches dropout after torch.fx has traced the module). A new instance is
    initialised like ``nn.Linear``; :meth:`from_mha` copies the weights of an ``nn.MultiheadAttention``.

    ``in_proj_weight`` / ``in_proj_bias`` are ``None`` (there is no packed projection), which also keeps
    ``nn.TransformerEncoderLayer`` on its regular path, where it calls this module.

    Example:
        >>> import torch
        >>> attn = ExplicitAttention(32, 4, batch_first=True)
        >>> x = torch.randn(2, 7, 32)
        >>> out, weights = attn(x, x, x)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 7, 32), (2, 7, 7))
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False  # as nn.MultiheadAttention says when q/k/v have separate weights

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise CstarValueError(f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                                  f"num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise CstarValueError(f"dropout must be in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attn_drop = nn.Dropout(self.dropout)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "ExplicitAttention":
        """The exact equivalent of ``mha``, sharing no storage with it (weights are copied).

        Raises ``NotImplementedError`` for ``add_bias_kv=True``, ``add_zero_attn=True``, or a subclass
        that overrides ``forward``.

        Example:
            >>> import torch.nn as nn
            >>> attn = ExplicitAttention.from_mha(nn.MultiheadAttention(8, 2, kdim=4, vdim=6))
            >>> attn.k_proj.weight.shape, attn.v_proj.in_features
            (torch.Size([8, 4]), 6)
        """
        _check_supported(mha, type(mha).__name__)
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device="meta",
                  dtype=mha.out_proj.weight.dtype)  # meta: the parameters are replaced by copies just below
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = (mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:])
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            _set(proj, "weight", w)
            if b is not None:
                _set(proj, "bias", b)
        _set(new.out_proj, "weight", mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            _set(new.out_proj, "bias", mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (N, L, E) if batch_first else (L, N, E), or unbatched (L, E)  ->  (N, heads, L, head_dim) / (heads, L, d);
        # negative dims make one code path serve batched and unbatched inputs without branching on x.dim()
        return x.unflatten(-1, (self.num_heads, self.head_dim)).movedim(-3 if self.batch_first else 0, -2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-2, -3 if self.batch_first else 0).flatten(-2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; returns ``(output, weights or None)`` as
        ``nn.MultiheadAttention.forward`` does."""
        if is_causal and attn_mask is None:
            raise CstarRuntimeError("is_causal=True is a hint that attn_mask is causal and needs "
                                    "attn_mask too (as in nn.MultiheadAttention); pass e.g. "
                                    "attn_mask=nn.Transformer.generate_square_subsequent_mask(L)")
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        mask = None
        if key_padding_mask is not None or attn_mask is not None:
            mask = _merge_masks(key_padding_mask, attn_mask, q, k)
        if not need_weights and self.dropout == 0.0:
            return self.out_proj(self._merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))), None
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if mask is not None:
            scores = _add_mask(scores, mask)
        weights = self.attn_drop(torch.softmax(scores, dim=-1))
        out = self.out_proj(self._merge_heads(torch.matmul(weights, v)))
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, batch_first={self.batch_first}, dropout={self.dropout}"


def _set(module: nn.Module, name: str, source: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(source.detach().clone(), requires_grad=source.requires_grad))


def _check_supported(mha: nn.Module, where: str) -> None:
    if type(mha).forward is not nn.MultiheadAttention.forward:
        raise CstarNotImplementedError(f"{where}: {type(mha).__name__} overrides nn.MultiheadAttention.forward, so an "
                                       "equivalent cannot be built from its weights; keep unpack_attention=False")
    for feature, present in (("add_bias_kv=True", mha.bias_k is not None or mha.bias_v is not None),
                             ("add_zero_attn=True", mha.add_zero_attn)):
        if present:
            raise CstarNotImplementedError(f"{where}: nn.MultiheadAttention with {feature} is not supported by "
                                           "unpack_attention; keep unpack_attention=False for this model")


def _retrace(gm: fx.GraphModule, unpacked: set[str]) -> fx.GraphModule:
    """Trace a GraphModule again so the unpacked attention modules are traced into, while every other
    module it called as a leaf stays a leaf."""
    leaves = tuple(glob.escape(str(n.target)) for n in gm.graph.nodes
                   if n.op == "call_module" and str(n.target) not in unpacked)
    graph = CstarTracer(leaf_modules=leaves).trace(gm)
    return fx.GraphModule(gm, graph, type(gm).__name__)


def unpack_attention(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.MultiheadAttention`` replaced by an exactly equivalent
    :class:`ExplicitAttention`, whose q/k/v/out projections torch.fx sees as ``nn.Linear`` layers.

    The input model is not modified. A shared attention module stays shared. A ``torch.fx.GraphModule``
    comes back traced again (its other leaf modules stay leaves). Raises ``NotImplementedError`` naming
    the module for ``add_bias_kv``, ``add_zero_attn`` or a subclass that overrides ``forward``.

    Example:
        >>> import torch, torchvision, cstar_fx
        >>> vit = torchvision.models.VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=32,
        ...                                            mlp_dim=64, num_classes=10)
        >>> plan = cstar_fx.plan_ranks(unpack_attention(vit), ratio=2)
        >>> sorted(n.rsplit(".", 1)[1] for n in plan.layers if ".self_attention." in n)
        ['k_proj', 'out_proj', 'q_proj', 'v_proj']
    """
    if not isinstance(model, nn.Module):
        raise CstarTypeError(f"unpack_attention expects an nn.Module, got {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, nn.MultiheadAttention)]
    for name, m in found:  # refuse before copying anything
        _check_supported(m, f"module {name!r}" if name else "the top-level module")
    if isinstance(model, nn.MultiheadAttention):
        return ExplicitAttention.from_mha(model)
    new = copy.deepcopy(model)
    made: dict[int, ExplicitAttention] = {}
    for name, m in [(n, m) for n, m in new.named_modules(remove_duplicate=False)
                    if isinstance(m, nn.MultiheadAttention)]:
        parent, _, child = name.rpartition(".")
        if id(m) not in made:
            made[id(m)] = ExplicitAttention.from_mha(m)
        setattr(new.get_submodule(parent), child, made[id(m)])
    for m in new.modules():
        # nn.TransformerEncoder's nested-tensor fast path reads the packed in_proj weights, which no longer exist
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(a, ExplicitAttention) for a in m.modules()):
            m.use_nested_tensor = False
    if isinstance(new, fx.GraphModule) and found:
        new = _retrace(new, {name for name, _ in found})
    return new
