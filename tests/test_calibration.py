"""collect_hessians: H = 2/N X^T X against direct computations, errors, reporting, hook hygiene."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obc_lightning.calibration import CalibrationWarning, call_model, collect_hessians, hessian_bytes

torch.manual_seed(0)


def direct_patches_2d(x, k, stride, padding, dilation):
    """Patches by explicit indexing: (B * Ho * Wo, C * kh * kw), channel-major like weight.reshape."""
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    B, _, Hp, Wp = x.shape
    Ho = (Hp - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    Wo = (Wp - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                r0, c0 = i * stride[0], j * stride[1]
                patch = x[
                    b,
                    :,
                    r0 : r0 + dilation[0] * (k[0] - 1) + 1 : dilation[0],
                    c0 : c0 + dilation[1] * (k[1] - 1) + 1 : dilation[1],
                ]
                rows.append(patch.reshape(-1))
    return torch.stack(rows).double()


@torch.no_grad()
def quadratic_form_check(module, hess, xs):
    """For any dW: 1/2 sum_rows dw H dw^T == 1/N ||conv(x; dW)||^2 (N = output positions): the defining
    property of the layer Hessian, checked with the layer's own forward and random dW."""
    for _ in range(3):
        dW = torch.randn_like(module.weight, dtype=torch.float64)
        probe = type(module)(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=False,
            padding_mode=module.padding_mode,
        ).double()
        probe.weight.data.copy_(dW)
        outs = [probe(x.double()) for x in xs]
        n = sum(o.shape[0] * o[0, 0].numel() for o in outs)
        lhs = sum(float(o.square().sum()) for o in outs) / n
        rhs = 0.0
        for Wb, H in zip(hess.weight_blocks(dW), hess.hessians):
            rhs += 0.5 * float(((Wb @ H) * Wb).sum())
        assert rhs == pytest.approx(lhs, rel=1e-6)  # per-batch X^T X is float32 for float32 activations


def test_linear_3d_input_every_token_is_a_sample():
    lin = nn.Linear(6, 4)
    model = nn.Sequential(lin)
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    res = collect_hessians(model, xs, {"0": lin})
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    lh = res["0"]
    assert lh.n_samples == 30 and lh.n_calls == 3 and lh.hessians.dtype == torch.float64
    torch.testing.assert_close(lh.hessians[0], 2 / 30 * X.T @ X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv2d_stride_padding_dilation(padding_mode):
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), padding_mode=padding_mode)
    xs = [torch.randn(2, 3, 9, 7) for _ in range(2)]
    res = collect_hessians(conv, xs, {"conv": conv})
    lh = res["conv"]
    if padding_mode == "zeros":
        P = torch.cat([direct_patches_2d(x, (3, 2), (2, 1), (1, 2), (2, 1)) for x in xs])
        assert lh.n_samples == P.shape[0]
        torch.testing.assert_close(lh.hessians[0], 2 / P.shape[0] * P.T @ P, rtol=1e-5, atol=1e-6)
    quadratic_form_check(conv, lh, xs)


def test_convs_sharing_the_reused_patch_buffers_get_their_own_exact_hessians():
    # collect_hessians builds every conv's padded input and patches in one reused workspace: conv "b"
    # (zero padding) reads a buffer that conv "a" (no padding, a larger input) has just filled, so its
    # border must be zeroed again; "c" (reflect padding) reuses it once more, in another shape
    model = nn.Sequential(
        nn.Conv2d(8, 8, 5), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
    )
    xs = [torch.randn(3, 8, 20, 20) for _ in range(2)]
    inputs = {name: [] for name in "012"}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n, m in model.named_children()]
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in handles:
        h.remove()
    res = collect_hessians(model, xs, dict(model.named_children()))
    for name, k, pad in [("0", 5, 0), ("1", 3, 1)]:
        P = torch.cat([direct_patches_2d(x, (k, k), (1, 1), (pad, pad), (1, 1)) for x in inputs[name]])
        torch.testing.assert_close(res[name].hessians[0], 2 / P.shape[0] * P.T @ P, rtol=1e-5, atol=1e-5)
    reflect = [F.pad(x, (1, 1, 1, 1), mode="reflect") for x in inputs["2"]]
    P = torch.cat([direct_patches_2d(x, (3, 3), (1, 1), (0, 0), (1, 1)) for x in reflect])
    torch.testing.assert_close(res["2"].hessians[0], 2 / P.shape[0] * P.T @ P, rtol=1e-5, atol=1e-5)
    # channels_last activations (strided, read in place by the unpadded conv "0") give the same Hessians
    model = model.to(memory_format=torch.channels_last)
    last = collect_hessians(model, [x.to(memory_format=torch.channels_last) for x in xs], dict(model.named_children()))
    for name in "012":
        torch.testing.assert_close(last[name].hessians, res[name].hessians, rtol=1e-5, atol=1e-5)


def test_conv2d_same_padding():
    conv = nn.Conv2d(2, 3, 4, padding="same", dilation=1)  # even kernel: asymmetric padding
    xs = [torch.randn(2, 2, 6, 5)]
    quadratic_form_check(conv, collect_hessians(conv, xs, {"c": conv})["c"], xs)


# grouped, depthwise, x2, d = 288 (two block rows)
@pytest.mark.parametrize("groups,in_ch,out_ch", [(2, 4, 6), (4, 4, 4), (4, 4, 8), (2, 64, 4)])
def test_grouped_and_depthwise_conv_one_hessian_per_group(groups, in_ch, out_ch):
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, groups=groups)
    xs = [torch.randn(3, in_ch, 5, 5) for _ in range(2)]
    lh = collect_hessians(conv, xs, {"c": conv})["c"]
    d = in_ch // groups * 9
    assert lh.hessians.shape == (groups, d, d) and lh.groups == groups
    P = torch.cat([direct_patches_2d(x, (3, 3), (1, 1), (1, 1), (1, 1)) for x in xs])  # (N, in*9)
    for g in range(groups):
        Pg = P[:, g * d : (g + 1) * d]  # this group's input channels
        torch.testing.assert_close(lh.hessians[g], 2 / P.shape[0] * Pg.T @ Pg, rtol=1e-5, atol=1e-6)
    blocks = lh.weight_blocks(conv.weight)
    assert len(blocks) == groups and blocks[0].shape == (out_ch // groups, d)
    quadratic_form_check(conv, lh, xs)


def test_conv1d():
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
    xs = [torch.randn(2, 3, 11), torch.randn(1, 3, 11)]
    lh = collect_hessians(conv, xs, {"c": conv})["c"]
    # Conv1d == Conv2d of height 1: direct patches of the unsqueezed input
    P = torch.cat([direct_patches_2d(x.unsqueeze(2), (1, 3), (1, 2), (0, 1), (1, 2)) for x in xs])
    torch.testing.assert_close(lh.hessians[0], 2 / P.shape[0] * P.T @ P, rtol=1e-5, atol=1e-6)
    quadratic_form_check(conv, lh, xs)


def test_float64_sums_over_many_batches():
    # a large mean and a tiny variance: a float32 sum of X^T X would lose the variance part
    lin = nn.Linear(2, 1)
    xs = [1000 + 1e-3 * torch.randn(64, 2, dtype=torch.float64) for _ in range(200)]
    lin.double()
    lh = collect_hessians(lin, xs, {"l": lin})["l"]
    X = torch.cat(xs)
    torch.testing.assert_close(lh.hessians[0], 2 / X.shape[0] * X.T @ X, rtol=1e-13, atol=0)


def test_nan_activation_names_module_and_hooks_removed():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"module '0'.*NaN or Inf.*batch 1"):
        collect_hessians(model, [torch.randn(4, 3), x], dict(model.named_children()))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_small_batches_are_buffered_until_d_samples_then_folded():
    # batches of 3 tokens < d = 16: products of the buffered samples, equal to folding every batch
    # (offload) and to the direct X^T X; the buffer holds copies, so changing x in place later is harmless
    class InPlaceAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, x):
            y = self.lin(x)
            x.mul_(0)  # the caller's activations change after the Linear ran
            return y

    model = InPlaceAfter()
    xs = [torch.randn(3, 16) for _ in range(13)]  # 39 samples: folds of 18 at batches 6 and 12, 3 left at the end
    X = torch.cat(xs).double()
    buffered = collect_hessians(model, [x.clone() for x in xs], {"lin": model.lin})["lin"]
    folded = collect_hessians(model, [x.clone() for x in xs], {"lin": model.lin}, offload=True)["lin"]
    direct = 2 / X.shape[0] * X.T @ X
    assert buffered.n_samples == folded.n_samples == 39
    torch.testing.assert_close(buffered.hessians[0], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.hessians[0], direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [255, 256, 300, 513, 1100])  # 1, 2, 2, 4 and 8 block rows
def test_wide_layers_sum_the_block_lower_triangle_and_mirror_it(d):
    # from 2 * SYMMETRIC_MIN_BLOCK inputs on, only the block-lower triangle of X^T X is multiplied; the
    # result must still be the full symmetric 2/N X^T X, buffered (small batches) or not
    lin = nn.Linear(d, 3).double()
    xs = [torch.randn(n, d, dtype=torch.float64) for n in (7, 2 * d, 40, 5)]
    X = torch.cat(xs)
    lh = collect_hessians(lin, xs, {"lin": lin})["lin"]
    torch.testing.assert_close(lh.hessians[0], 2 / X.shape[0] * X.T @ X, rtol=1e-12, atol=1e-12)
    assert torch.equal(lh.hessians[0], lh.hessians[0].T)


def test_nan_in_a_buffered_batch_names_module_and_batch():
    lin = nn.Linear(16, 2)
    xs = [torch.randn(2, 16) for _ in range(4)]
    xs[2][1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"module 'lin'.*NaN or Inf.*batch 2"):
        collect_hessians(lin, xs, {"lin": lin})


def test_never_ran_module_skipped_listed_warned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.idle_attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, s):
            return self.used(x), self.attn(s, s, s)[0]

    m = M()
    targets = {"used": m.used, "unused": m.unused, "attn.out_proj": m.attn.out_proj,
               "idle_attn.out_proj": m.idle_attn.out_proj}
    with pytest.warns(CalibrationWarning, match="unused"):
        res = collect_hessians(m, [(torch.randn(2, 3), torch.randn(2, 5, 4))], targets)
    assert list(res.hessians) == ["used", "attn.out_proj"]  # out_proj through its attention
    assert set(res.skipped) == {"unused", "idle_attn.out_proj"}
    assert "not called as a module" in res.skipped["unused"]
    assert "MultiheadAttention 'idle_attn'" in res.skipped["idle_attn.out_proj"]
    assert "was not called" in res.skipped["idle_attn.out_proj"]


def heads_before_out_proj(mha: nn.MultiheadAttention, q, k, v, key_padding_mask=None):
    """The attention heads, concatenated, written out from the definition (the input of out_proj):
    softmax(Q K^T / sqrt(d_h) + mask) V per head with [Q, K, V] = x W_in^T + b_in."""
    if not mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    E, h = mha.embed_dim, mha.num_heads
    Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    Q = F.linear(q, Wq, bq).reshape(B, L, h, E // h).transpose(1, 2)
    K = F.linear(k, Wk, bk).reshape(B, S, h, E // h).transpose(1, 2)
    V = F.linear(v, Wv, bv).reshape(B, S, h, E // h).transpose(1, 2)
    scores = Q @ K.transpose(-1, -2) / (E // h) ** 0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    heads = (scores.softmax(-1) @ V).transpose(1, 2).reshape(B, L, E)
    return heads if mha.batch_first else heads.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_out_proj_hessian_is_that_of_the_attention_heads(batch_first):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()
    shape = (3, 5, 8) if batch_first else (5, 3, 8)
    calls = []
    for i in range(3):
        q, kv = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[0, -2:] = True  # padded keys in the first sequence
        calls.append(((q, kv, kv), {"key_padding_mask": mask, "need_weights": bool(i % 2)}))
    # the reference is the input of out_proj: out_proj of it is the attention's output
    heads = [heads_before_out_proj(mha, *a, key_padding_mask=kw["key_padding_mask"]) for a, kw in calls]
    for (a, kw), h in zip(calls, heads):
        torch.testing.assert_close(mha.out_proj(h), mha(*a, **kw)[0], rtol=1e-12, atol=1e-12)
    proj = mha.out_proj
    outputs = []
    res = collect_hessians(
        mha, calls, {"out_proj": mha.out_proj}, forward_fn=lambda m, c: outputs.append(m(*c[0], **c[1])[0])
    )
    X = torch.cat([h.reshape(-1, 8) for h in heads])
    assert res["out_proj"].n_samples == 45 and res["out_proj"].n_calls == 3
    torch.testing.assert_close(res["out_proj"].hessians[0], 2 / 45 * X.T @ X, rtol=1e-12, atol=1e-12)
    assert mha.out_proj is proj and not mha._forward_hooks  # swapped back, hook removed
    for (a, kw), out in zip(calls, outputs):  # the model's own outputs untouched by the hook
        torch.testing.assert_close(out, mha(*a, **kw)[0], rtol=0, atol=0)


def test_memory_budget_refusal_before_allocation():
    lin = nn.Linear(512, 2)
    assert hessian_bytes(lin) == 512 * 512 * 8
    # the float64 sum (2 MiB) and up to 2 MiB of buffered float32 samples (1024 > d samples); offloaded:
    # the sum alone
    with pytest.raises(MemoryError, match=r"4\.0 MiB on cpu.*budget of 2\.5 MiB.*'big'"):
        collect_hessians(lin, [torch.randn(1, 512)], {"big": lin}, max_memory=5 << 19)
    wide = nn.Linear(1024, 2)  # sum 8 MiB; d buffered samples (4 MiB) are more than 2 MiB
    with pytest.raises(MemoryError, match=r"12\.0 MiB on cpu.*budget of 11\.0 MiB.*'wide'"):
        collect_hessians(wide, [torch.randn(1, 1024)], {"wide": wide}, max_memory=11 << 20)
    res = collect_hessians(lin, [torch.randn(1, 512)], {"big": lin}, max_memory=5 << 19, offload=True)
    assert res["big"].n_samples == 1
    with pytest.raises(MemoryError, match=r"2\.0 MiB on cpu.*budget of 1\.0 MiB.*'big'"):
        collect_hessians(lin, [torch.randn(1, 512)], {"big": lin}, max_memory=1 << 20, offload=True)


def test_modes_restored_hooks_removed_and_calling_conventions():
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
            self.drop = nn.Dropout(0.5)

        def forward(self, x, y=None):
            assert not self.training, "calibration must run in eval mode"
            return self.a(x) + (self.b(y) if y is not None else 0)

    m = Three()
    m.train()
    m.b.eval()  # a mixed state must come back as it was
    x = torch.randn(3, 2)
    batches = [x, (x, x), [x, x], {"x": x, "y": x}]
    res = collect_hessians(m, batches, {"a": m.a, "b": m.b})
    assert res["a"].n_calls == 4 and res["b"].n_calls == 3 and res.n_batches == 4
    assert m.training and m.a.training and not m.b.training and m.drop.training
    assert all(not mod._forward_pre_hooks for mod in m.modules())
    # forward_fn replaces the convention
    seen = []
    collect_hessians(
        m, [{"inp": x}], {"a": m.a}, forward_fn=lambda model, b: seen.append(1) or model(b["inp"])
    )
    assert seen == [1]
    assert call_model(lambda *a, **k: (a, k), {"q": 1}) == ((), {"q": 1})


def test_errors_restore_state():
    m = nn.Sequential(nn.Linear(2, 2))
    m.train()

    def boom(model, batch):
        model(batch)
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        collect_hessians(m, [torch.randn(1, 2)], {"0": m[0]}, forward_fn=boom)
    assert m.training and not m[0]._forward_pre_hooks
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_hessians(m, [], {"0": m[0]})
    with pytest.raises(ValueError, match="ReLU"):
        collect_hessians(m, [torch.randn(1, 2)], {"r": nn.ReLU()})


def test_reduce_fn_sums_counts_and_hessians():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    calls = []

    def double(t):  # what all_reduce does with two identical ranks
        calls.append(t.shape)
        t.mul_(2)

    lh = collect_hessians(lin, [x], {"l": lin}, reduce_fn=double)["l"]
    assert lh.n_samples == 8 and len(calls) == 2
    X = x.double()
    torch.testing.assert_close(lh.hessians[0], 2 / 4 * X.T @ X)  # same H: sums and N both doubled


def test_transformer_encoder_slow_path_reaches_every_linear():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    targets = {n: m for n, m in enc.named_modules() if isinstance(m, nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        res = collect_hessians(enc, [torch.randn(2, 3, 8)], targets)
    assert set(res.hessians) == {"layers.0.self_attn.out_proj", "layers.0.linear1", "layers.0.linear2"}
    assert not res.skipped


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        nn.Conv2d(4, 6, (4, 3), stride=(1, 2), padding=(2, 0)),
        nn.Conv2d(4, 6, 4, padding="same", dilation=(1, 2)),  # uneven zero padding
        nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
        nn.Linear(5, 3),
    ],
    ids=["conv2d-strided", "conv2d-rows-only-padded", "conv2d-same", "conv2d-grouped-reflect",
         "conv2d-circular", "conv1d", "linear"],
)
def test_sampled_units_are_the_full_samples_of_those_units(conv):
    from obc_lightning.calibration import layer_inputs, sample_count, sample_units

    x = torch.randn(3, 4, 9, 7) if isinstance(conv, nn.Conv2d) else torch.randn(3, 3, 11)
    if isinstance(conv, nn.Linear):
        x = torch.randn(3, 4, 5)
    full = layer_inputs(conv, x)  # (g, d, N)
    units, per_unit = sample_units(conv, x)
    assert sample_count(conv, x) == full.shape[2] == units * per_unit
    if isinstance(conv, nn.Conv2d):
        assert full.shape[2] == conv(x).shape[0] * conv(x).shape[2] * conv(x).shape[3]
        assert units == conv(x).shape[0] * conv(x).shape[2]  # a conv's unit is one output row
    drawn = torch.cat([torch.tensor([0, units - 1, units - 1]), torch.randint(units, (5,))])  # repeats too
    samples = (drawn[:, None] * per_unit + torch.arange(per_unit)).flatten()
    torch.testing.assert_close(layer_inputs(conv, x, drawn), full[:, :, samples], rtol=0, atol=0)


def test_sample_fraction_counts_samples_is_deterministic_and_unbiased():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    xs = [torch.randn(4, 2, 8, 8) for _ in range(3)]  # 3 x 256 positions
    exact = collect_hessians(conv, xs, {"c": conv})["c"]
    a = collect_hessians(conv, xs, {"c": conv}, sample_fraction=0.25)["c"]
    b = collect_hessians(conv, xs, {"c": conv}, sample_fraction=0.25)["c"]
    assert a.n_samples == 3 * 64 and exact.n_samples == 3 * 256
    torch.testing.assert_close(a.hessians, b.hessians, rtol=0, atol=0)  # seeded
    # the mean over seeds approaches the exact H (unbiased): 40 draws, error well below one draw's
    draws = torch.stack(
        [collect_hessians(conv, xs, {"c": conv}, sample_fraction=0.25, seed=s)["c"].hessians for s in range(40)]
    )
    one = (draws[0] - exact.hessians).norm()
    assert (draws.mean(0) - exact.hessians).norm() < 0.35 * one


@pytest.mark.parametrize("sample_fraction", [1.0, 0.25])
def test_half_activations_whose_sum_overflows_are_not_taken_for_nan(sample_fraction):
    # 4096 x 64 float16 activations of ~2 sum to ~5e5, past float16's 65504: finite all the same
    lin = nn.Linear(64, 8).half()
    x = (2 + torch.rand(4096, 64)).half()
    assert not torch.isfinite(x.sum())
    res = collect_hessians(lin, [x], {"l": lin}, sample_fraction=sample_fraction)["l"]
    assert torch.isfinite(res.hessians).all()
    if sample_fraction == 1.0:
        X = x.double()
        torch.testing.assert_close(res.hessians[0], 2 / 4096 * X.T @ X, rtol=1e-6, atol=0)
    x[4000, 3] = float("inf")
    with pytest.raises(ValueError, match="'l'.*NaN or Inf"):
        collect_hessians(lin, [x], {"l": lin}, sample_fraction=sample_fraction)


def test_sample_fraction_still_catches_nan_and_rejects_bad_fraction():
    lin = nn.Linear(4, 2)
    x = torch.randn(100, 4)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="'lin'.*NaN"):
        collect_hessians(lin, [x], {"lin": lin}, sample_fraction=0.01)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="sample_fraction"):
            collect_hessians(lin, [torch.randn(3, 4)], {"lin": lin}, sample_fraction=bad)


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (3, 2, 9, 7)),
        (nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 6, 5)),
        (nn.Conv2d(2, 3, 3, padding="valid", padding_mode="reflect"), (2, 2, 6, 5)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6, 5)),  # unbatched
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 2, 11)),
    ],
)
def test_sample_count_is_the_conv_output_positions(conv, shape):
    from obc_lightning.calibration import sample_count

    x = torch.randn(shape)
    out = conv(x)
    positions = out.numel() // conv.out_channels
    assert sample_count(conv, x) == positions


BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits: |fl(v) - v| <= 2^-8 |v|


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Linear(40, 3), (6, 7, 40)),  # d = 40, every token
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (3, 4, 9, 7)),
        (nn.Conv2d(32, 4, 3, padding=1), (2, 32, 6, 6)),  # d = 288: two block rows of the product
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), (3, 4, 5, 5)),  # grouped: one batched product
    ],
    ids=["linear", "conv2d-strided", "conv2d-two-blocks", "conv2d-grouped"],
)
@pytest.mark.parametrize("sample_fraction", [1.0, 0.5])
def test_bfloat16_products_are_within_the_rounding_bound_of_the_exact_hessian(module, shape, sample_fraction):
    """product_dtype="bfloat16" rounds every sample entry (u = 2^-8) and every entry of each batch's
    product once more: |H^ - H| <= (3u + O(u^2)) 2/N |X|^T|X| elementwise,
    with H the float64 Hessian of the same samples (the same units are drawn: the generator is seeded
    alike, and one batch's samples come from it whatever the dtype)."""
    from obc_lightning.calibration import layer_inputs

    xs = [3 * torch.randn(shape) + 1 for _ in range(3)]  # a mean: entries of both signs and sizes
    kw = dict(sample_fraction=sample_fraction, seed=5)
    fast = collect_hessians(module, xs, {"m": module}, product_dtype="bfloat16", **kw)["m"]
    exact = collect_hessians(module.double(), [x.double() for x in xs], {"m": module}, **kw)["m"]
    module.float()
    assert fast.n_samples == exact.n_samples and fast.hessians.dtype == torch.float64
    # |X|^T |X| over the same samples: the exact Hessian's absolute counterpart
    absolute = collect_hessians(module.double(), [x.double().abs() for x in xs], {"m": module}, **kw)["m"]
    module.float()
    # (2u + u^2) from the rounded samples, u (1 + u)^2 from the rounded product, n 2^-24 from its
    # float32 accumulation over at most n samples; the per-batch |X_b^T X_b| sum to |X|^T |X|
    u, n = BF16_UNIT_ROUNDOFF, fast.n_samples
    bound = (3 * u + 4 * u * u + n * 2.0**-24) * absolute.hessians
    assert ((fast.hessians - exact.hessians).abs() <= bound).all()
    # and it is a real rounding, not the float32 product: the error is of the order of u
    rel = (fast.hessians - exact.hessians).norm() / exact.hessians.norm()
    assert 1e-5 < rel < 4 * BF16_UNIT_ROUNDOFF
    # the samples themselves are the float32 samples rounded once to bfloat16, in either sampling path
    x = xs[0]
    units = None if sample_fraction == 1 else torch.tensor([0, 2, 2, 1])
    torch.testing.assert_close(
        layer_inputs(module, x, units, torch.bfloat16),
        layer_inputs(module, x, units).to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


def test_product_dtype_default_keeps_the_activations_precision_and_bad_values_are_refused():
    from obc_lightning.calibration import PRODUCT_DTYPES

    lin = nn.Linear(4, 2).double()
    xs = [torch.randn(50, 4, dtype=torch.float64)]
    X = xs[0]
    # float64 activations: float64 products by default, so the sum is exact to float64 rounding (of
    # entries the size of H's largest: the summation order is the BLAS kernel's)
    H = 2 / 50 * X.T @ X
    torch.testing.assert_close(collect_hessians(lin, xs, {"l": lin})["l"].hessians[0], H,
                               rtol=1e-14, atol=1e-14 * float(H.abs().max()))
    as_name = collect_hessians(lin, xs, {"l": lin}, product_dtype="float32")["l"].hessians
    as_dtype = collect_hessians(lin, xs, {"l": lin}, product_dtype=torch.float32)["l"].hessians
    torch.testing.assert_close(as_name, as_dtype, rtol=0, atol=0)
    torch.testing.assert_close(as_name[0], 2 / 50 * X.T @ X, rtol=1e-6, atol=1e-6)
    assert set(PRODUCT_DTYPES) == {"float32", "bfloat16", "float64"}
    for bad in (torch.float16, "half", "int8", torch.int32, 3):
        with pytest.raises(ValueError, match="collect_hessians: product_dtype must be None .*bfloat16"):
            collect_hessians(lin, xs, {"l": lin}, product_dtype=bad)
