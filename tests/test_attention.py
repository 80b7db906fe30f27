"""unpack_attention: ExplicitAttention is an exact, fx-traceable stand-in for nn.MultiheadAttention."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import cstar_fx
from cstar_fx.api import PlanMismatchError
from cstar_fx.config import CstarConfig
from cstar_fx.passes.attention import ExplicitAttention, unpack_attention
from cstar_fx.passes.trace import trace
from cstar_fx.plan import RankPlan

E, H, N, L, S = 12, 3, 2, 4, 6
TOL = 1e-12


def _mha(**kw) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(E, H, **kw).double()
    with torch.no_grad():
        for p in mha.parameters():  # non-zero biases too, so a misplaced bias shows
            p.normal_(0.0, 0.4)
    return mha


def _inputs(batch_first: bool, kdim: int, vdim: int, batched: bool = True):
    def make(length: int, dim: int) -> torch.Tensor:
        if not batched:
            return torch.randn(length, dim, dtype=torch.float64)
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(shape, dtype=torch.float64)

    return make(L, E), make(S, kdim), make(S, vdim)


def _masks(batched: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    lead = (N,) if batched else ()
    bool_kpm = torch.zeros(*lead, S, dtype=torch.bool)
    bool_kpm[..., -2:] = True  # pad the last two keys; no row is fully masked
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1)
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": bool_kpm},
        "kpm_float": {"key_padding_mask": torch.randn(*lead, S, dtype=torch.float64)},
        "attn_bool_2d": {"attn_mask": causal},
        "attn_float_3d": {"attn_mask": torch.randn((N if batched else 1) * H, L, S, dtype=torch.float64)},
        "both_bool": {"attn_mask": causal, "key_padding_mask": bool_kpm},
        "both_float": {"attn_mask": torch.randn(L, S, dtype=torch.float64),
                       "key_padding_mask": torch.randn(*lead, S, dtype=torch.float64)},
    }


def _assert_same(ref, got) -> None:
    assert got[0].shape == ref[0].shape
    torch.testing.assert_close(got[0], ref[0], atol=TOL, rtol=0)
    assert (got[1] is None) == (ref[1] is None)
    if ref[1] is not None:
        assert got[1].shape == ref[1].shape
        torch.testing.assert_close(got[1], ref[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("batch_first,dims,bias",
                         list(itertools.product((True, False), ((E, E), (5, 7)), (True, False))))
def test_matches_multihead_attention(batch_first, dims, bias):
    kdim, vdim = dims
    mha = _mha(batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
    explicit = ExplicitAttention.from_mha(mha)
    q, k, v = _inputs(batch_first, kdim, vdim)
    for (label, masks), need_weights, average in itertools.product(_masks().items(), (True, False), (True, False)):
        call = dict(masks, need_weights=need_weights, average_attn_weights=average)
        for grad in (True, False):  # without grad (eval) nn.MultiheadAttention may take its fused fast path
            with torch.set_grad_enabled(grad):
                ref, got = mha.eval()(q, k, v, **call), explicit.eval()(q, k, v, **call)
            try:
                _assert_same(ref, got)
            except AssertionError as exc:
                raise AssertionError(f"masks={label} need_weights={need_weights} average={average} "
                                     f"grad={grad}") from exc


@pytest.mark.parametrize("batch_first", (True, False))
def test_unbatched_inputs(batch_first):
    mha = _mha(batch_first=batch_first, kdim=5, vdim=7)
    explicit = ExplicitAttention.from_mha(mha)
    q, k, v = _inputs(batch_first, 5, 7, batched=False)
    for masks, need_weights in itertools.product(_masks(batched=False).values(), (True, False)):
        _assert_same(mha(q, k, v, need_weights=need_weights, **masks),
                     explicit(q, k, v, need_weights=need_weights, **masks))


def test_self_attention_shares_weights_split_from_in_proj():
    mha = _mha(batch_first=True)
    explicit = ExplicitAttention.from_mha(mha)
    w = torch.cat([explicit.q_proj.weight, explicit.k_proj.weight, explicit.v_proj.weight])
    assert torch.equal(w, mha.in_proj_weight)
    assert explicit.q_proj.weight.data_ptr() != mha.in_proj_weight.data_ptr()  # a copy, not a view
    x = torch.randn(N, L, E, dtype=torch.float64)
    _assert_same(mha(x, x, x, need_weights=False), explicit(x, x, x, need_weights=False))


def test_is_causal_hint_follows_multihead_attention():
    mha = _mha(batch_first=True)
    explicit = ExplicitAttention.from_mha(mha)
    x = torch.randn(N, L, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    for need_weights in (True, False):
        _assert_same(mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights),
                     explicit(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights))
    with pytest.raises(RuntimeError, match="needs attn_mask"):
        explicit(x, x, x, is_causal=True)


def test_bad_mask_shape_and_dtype_are_named():
    explicit = ExplicitAttention.from_mha(_mha(batch_first=True))
    x = torch.randn(N, L, E, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="attn_mask has shape"):
        explicit(x, x, x, attn_mask=torch.zeros(L + 1, L, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_padding_mask has shape"):
        explicit(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating-point"):
        explicit(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))


@pytest.mark.parametrize("kwargs,feature", [({"add_bias_kv": True}, "add_bias_kv"),
                                            ({"add_zero_attn": True}, "add_zero_attn")])
def test_unsupported_features_raise(kwargs, feature):
    model = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, H, **kwargs))
    with pytest.raises(NotImplementedError, match=rf"module '1'.*{feature}"):
        unpack_attention(model)
    with pytest.raises(NotImplementedError, match=feature):
        cstar_fx.plan_ranks(model, ratio=2, unpack_attention=True)


def test_subclass_overriding_forward_raises():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return 2 * out, w

    with pytest.raises(NotImplementedError, match="overrides nn.MultiheadAttention.forward"):
        unpack_attention(nn.Sequential(Custom(E, H)))


def test_dropout_follows_training_flag_after_tracing():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Block().eval()
    gm = trace(unpack_attention(model))  # traced in eval mode
    x = torch.randn(N, L, E)
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)
    gm.train()
    assert not torch.allclose(gm(x), model(x), atol=1e-3)  # dropout on the attention weights is active again
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in gm.modules())


def test_masks_as_graph_inputs_are_handled_at_run_time():
    class Block(nn.Module):
        def __init__(self, need_weights: bool) -> None:
            super().__init__()
            self.attn, self.need_weights = _mha(batch_first=True), need_weights

        def forward(self, x, key_padding_mask, attn_mask):
            return self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                             need_weights=self.need_weights)

    x = torch.randn(N, S, E, dtype=torch.float64)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[:, -2:] = True
    cases = [(None, None), (kpm, None), (torch.randn(N, S, dtype=torch.float64), None),
             (None, torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)),
             (None, torch.randn(N * H, S, S, dtype=torch.float64)),
             (kpm, torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1))]
    for need_weights in (True, False):
        model = Block(need_weights)
        gm = trace(unpack_attention(model))
        assert any(n.op == "call_function" and n.target.__name__ == "_merge_masks" for n in gm.graph.nodes)
        for key_padding_mask, attn_mask in cases:  # one graph serves masks of any kind, and none
            _assert_same(model(x, key_padding_mask, attn_mask), gm(x, key_padding_mask, attn_mask))


def test_unpack_copies_and_keeps_sharing():
    shared = nn.MultiheadAttention(E, H, batch_first=True)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = shared, shared

        def forward(self, x):
            return self.a(x, x, x)[0] + self.b(x, x, x)[0]

    model = Twice()
    before = copy.deepcopy(model.state_dict())
    new = unpack_attention(model)
    assert isinstance(model.a, nn.MultiheadAttention)  # input untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(new.a, ExplicitAttention) and new.a is new.b
    x = torch.randn(N, L, E)
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(unpack_attention(nn.MultiheadAttention(E, H)), ExplicitAttention)
    with pytest.raises(TypeError, match="nn.Module"):
        unpack_attention("model")


def test_graph_module_is_retraced_keeping_its_leaves():
    class Opaque(nn.Module):  # not traceable by fx: must stay a leaf when retraced
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(E, E)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.attn = Opaque(), nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            x = self.pre(x)
            return self.attn(x, x, x, need_weights=False)[0]

    model = Net().eval()
    gm = trace(model, leaf_modules=("pre",))
    new = unpack_attention(gm)
    assert isinstance(new, fx.GraphModule)
    called = {str(n.target) for n in new.graph.nodes if n.op == "call_module"}
    assert "pre" in called and "attn.q_proj" in called and "attn.out_proj" in called
    x = torch.randn(N, L, E)
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)


def test_transformer_encoder_matches():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double().eval()
    new = unpack_attention(enc)
    x = torch.randn(N, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 4 + [True]] * N)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(new(x), enc(x), atol=TOL, rtol=0)
            # torch's nested-tensor fast path zeroes padded positions while its regular path does not:
            # compare the real positions only
            torch.testing.assert_close(new(x, src_key_padding_mask=pad)[:, :4],
                                       enc(x, src_key_padding_mask=pad)[:, :4], atol=TOL, rtol=0)


# --- the tiny torchvision ViT -------------------------------------------------------------------------------


def _tiny_vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: outputs would all be 0
    nn.init.normal_(vit.heads.head.bias, std=0.5)
    return vit.double().eval()


_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def test_tiny_vit_unpacked_is_equal_and_fully_factorizable():
    vit = _tiny_vit()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    unpacked = unpack_attention(vit)
    assert vit(x).abs().max() > 0.1
    torch.testing.assert_close(unpacked(x), vit(x), atol=TOL, rtol=0)

    plan = cstar_fx.plan_ranks(unpacked, ratio=2)
    for i in range(2):
        for proj in _PROJ:
            name = f"encoder.layers.encoder_layer_{i}.self_attention.{proj}"
            assert name in plan.layers and plan.layers[name].kind == "linear"
    assert not plan.unsupported
    assert any(".self_attention." in n for n in plan.factorized)
    dense_plan = cstar_fx.plan_ranks(vit, ratio=1.5)
    assert any("unpack_attention=True" in why for why in dense_plan.unsupported.values())

    gm = cstar_fx.transform(unpacked, plan=RankPlan.full_rank(unpacked))
    assert {f"encoder.layers.encoder_layer_0.self_attention.{p}.reduce" for p in _PROJ} <= {
        str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    torch.testing.assert_close(gm(x), vit(x), atol=1e-10, rtol=0)


def test_tiny_vit_training_step_reaches_attention_factors():
    vit = _tiny_vit().float()
    gm = cstar_fx.transform(vit, ratio=2, unpack_attention=True).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(gm(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
    attn = [n for n in grads if ".self_attention." in n and n.split(".")[-3] in _PROJ]
    assert attn and all(grads[n].abs().sum() > 0 for n in attn)
    assert losses[-1] < losses[0]


def test_config_option_in_plan_ranks_and_transform():
    vit = _tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plan = cstar_fx.plan_ranks(vit, CstarConfig(ratio=2, unpack_attention=True))
    assert any(n.endswith("self_attention.q_proj") for n in plan.factorized)
    gm = cstar_fx.transform(vit, plan=plan, unpack_attention=True)
    assert isinstance(vit.encoder.layers[0].self_attention, nn.MultiheadAttention)  # input untouched
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    report = cstar_fx.get_report(gm)
    assert report.ratio_params == pytest.approx(plan.ratio_params)
    assert report.ratio_params >= 2
    assert cstar_fx.get_plan(gm) is plan
    assert gm(x).shape == vit(x).shape and torch.isfinite(gm(x)).all()
    with pytest.raises(PlanMismatchError, match="self_attention.q_proj"):
        cstar_fx.transform(vit, plan=plan)
    traced = cstar_fx.transform(fx.symbolic_trace(vit), ratio=2, unpack_attention=True)
    assert cstar_fx.get_report(traced).ratio_params == pytest.approx(plan.ratio_params)
    with pytest.raises(TypeError, match="unpack_attention must be True or False"):
        CstarConfig(unpack_attention="yes")
