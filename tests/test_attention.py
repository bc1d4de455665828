"""ProjectedAttention against nn.MultiheadAttention itself (the reference), and what the split enables:
every projection of a TransformerEncoder calibrated, quantized and exported."""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

from obc_lightning import (
    CalibrationWarning,
    ProjectedAttention,
    compress_model,
    load_quantized,
    save_quantized,
    split_attention_projections,
)


def pair(batch_first=True, kdim=None, vdim=None, bias=True, heads=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases, so that their split is tested too
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha, ProjectedAttention.from_attention(mha)


def inputs(batch_first, kdim, vdim, unbatched=False, N=3, L=4, S=5):
    kdim, vdim = kdim or 8, vdim or 8
    shape = (lambda T, E: (T, E)) if unbatched else (lambda T, E: (N, T, E) if batch_first else (T, N, E))
    return torch.randn(shape(L, 8)), torch.randn(shape(S, kdim)), torch.randn(shape(S, vdim))


MASKS = ["none", "key_padding_bool", "key_padding_float", "attn_2d_float", "attn_3d_bool", "both"]


def masks(kind, N=3, L=4, S=5, heads=2, unbatched=False):
    kpm = torch.zeros(S if unbatched else (N, S), dtype=torch.bool)
    kpm[..., -2:] = True  # the last two keys are padding (every query keeps three)
    attn_2d = torch.randn(L, S)
    attn_3d = torch.rand((1 if unbatched else N) * heads, L, S) < 0.3
    attn_3d[..., 0] = False  # no row fully masked (its softmax would be NaN in both)
    return {
        "none": {},
        "key_padding_bool": {"key_padding_mask": kpm},
        "key_padding_float": {"key_padding_mask": torch.where(kpm, -1e4, 0.0)},
        "attn_2d_float": {"attn_mask": attn_2d},
        "attn_3d_bool": {"attn_mask": attn_3d},
        "both": {"attn_mask": attn_3d, "key_padding_mask": kpm},
    }[kind]


@pytest.mark.parametrize(
    "batch_first,dims,bias,mask", list(itertools.product([True, False], [(None, None), (6, 5)], [True, False], MASKS))
)
def test_same_outputs_weights_and_gradients_as_multihead_attention(batch_first, dims, bias, mask):
    mha, proj = pair(batch_first, *dims, bias=bias)
    q, k, v = inputs(batch_first, *dims)
    kw = masks(mask)
    for need_weights, average in [(True, True), (True, False), (False, True)]:
        ref, ref_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
        out, w = proj(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if need_weights:
            torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
        else:
            assert w is None and ref_w is None
    # the gradients of the projections are the row blocks of in_proj_weight's (or q/k/v_proj_weight's)
    ref.square().sum().backward()
    out.square().sum().backward()
    E = 8
    ref_grads = mha.in_proj_weight.grad.split(E) if mha._qkv_same_embed_dim else (
        mha.q_proj_weight.grad, mha.k_proj_weight.grad, mha.v_proj_weight.grad)
    for p, g in zip((proj.q_proj, proj.k_proj, proj.v_proj), ref_grads):
        torch.testing.assert_close(p.weight.grad, g, rtol=1e-4, atol=1e-5)
    if bias:
        torch.testing.assert_close(torch.cat([proj.q_proj.bias.grad, proj.k_proj.bias.grad, proj.v_proj.bias.grad]),
                                   mha.in_proj_bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj.out_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", ["none", "key_padding_bool", "attn_3d_bool"])
def test_unbatched_inputs(mask):
    mha, proj = pair(heads=2)
    q, k, v = inputs(True, None, None, unbatched=True)
    kw = masks(mask, unbatched=True)
    for average in (True, False):
        ref, ref_w = mha(q, k, v, average_attn_weights=average, **kw)
        out, w = proj(q, k, v, average_attn_weights=average, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training_and_causal_hint_needs_its_mask():
    mha, proj = pair(dropout=0.5)
    q, k, v = inputs(True, None, None)
    proj.eval(), mha.eval()
    torch.testing.assert_close(proj(q, k, v)[0], mha(q, k, v)[0], rtol=1e-5, atol=1e-5)
    proj.train()
    assert not torch.allclose(proj(q, k, v, need_weights=False)[0], proj.eval()(q, k, v, need_weights=False)[0])
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    torch.testing.assert_close(proj(q, q, q, attn_mask=causal, is_causal=True)[0],
                               mha(q, q, q, attn_mask=causal, is_causal=True)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        proj(q, q, q, is_causal=True)


def test_refuses_what_it_does_not_implement_and_leaves_the_model_alone():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    model.add_module("b", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="MultiheadAttention 'b' uses add_bias_kv"):
        split_attention_projections(model)
    assert type(model[0]) is nn.MultiheadAttention  # checked all before replacing any
    with pytest.raises(ValueError, match="divisible"):
        ProjectedAttention(8, 3)


def encoder(seed=0, layers=2):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, layers), nn.Linear(16, 3))


@pytest.mark.parametrize("train", [True, False])
def test_split_transformer_encoder_computes_the_same(train):
    model = encoder()
    split = copy.deepcopy(model)
    names = split_attention_projections(split)
    assert names == ["0.layers.0.self_attn", "0.layers.1.self_attn"]
    assert isinstance(split[0].layers[1].self_attn, ProjectedAttention) and not split[0].use_nested_tensor
    model.train(train), split.train(train)
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():  # eval + no_grad + a padding mask: the original takes its fused fast path
        ref = model[1](model[0](x, src_key_padding_mask=pad))
        out = split[1](split[0](x, src_key_padding_mask=pad))
    ref, out = ref.nan_to_num(0.0), out.nan_to_num(0.0)  # the nested fast path zeroes padded positions
    keep = ~pad[..., None].expand_as(ref)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_every_projection_quantized_and_exported_after_the_split(tmp_path):
    model = encoder()
    split_attention_projections(model)
    fresh = encoder(seed=1)
    split_attention_projections(fresh)  # the structure a packed file is loaded into
    xs = [torch.randn(4, 6, 16) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # nothing left in full precision
        report = compress_model(model, xs, bits=4, keep_results=True)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1",
                 "linear2"]
    assert report.quantized == [f"0.layers.{i}.{n}" for i in range(2) for n in per_layer] + ["1"]
    assert not report.skipped
    with pytest.warns(CalibrationWarning, match="in_proj_weight"):
        unsplit = compress_model(encoder(), xs, bits=4)
    assert report.compression_ratio > 2 * unsplit.compression_ratio  # x4.8 against x2.0 here (16-wide rows)
    for name in report.quantized:
        assert report[name].rel_error < 0.05, name
        assert len(torch.unique(model.get_submodule(name).weight[0])) <= 16, name
    save_quantized(model, tmp_path / "m.safetensors", report)
    load_quantized(tmp_path / "m.safetensors", fresh, packed=True)
    assert type(fresh[0].layers[0].self_attn.k_proj).__name__ == "QuantizedLinear"
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(xs[0]), model(xs[0]), rtol=0, atol=0)
