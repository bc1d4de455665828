"""Packed export of product-quantized modules: round trips (dense and packed), sizes, models mixing scalar
and PQ modules, Lightning-style checkpoints, and bad inputs refused before anything is written."""

import copy
import functools
import io
import math
import os

import pytest
import torch
from model_state import assert_load_refused, assert_same_state
from safetensors_edit import rewrite
from torch import nn

from obc_lightning.compress import compress_model
from obc_lightning.export import (
    load_quantized,
    pack_model,
    prepare_for_load,
    read_metadata,
    save_quantized,
    theoretical_bytes,
    unpack_model,
)
from obc_lightning.packed import PQ_KEYS, SCALAR_KEYS, QuantizedConv1d, QuantizedConv2d, QuantizedLinear
from obc_lightning.solvers.pq import PQResult, product_quantize


class PQNet(nn.Module):
    """Conv2d + BatchNorm + Conv1d + Linear, each with enough sub-vectors for 256 centroids."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 32, 3, padding=1)  # d = 72: 8 blocks of one 3x3 kernel
        self.bn = nn.BatchNorm2d(32)
        self.conv1 = nn.Conv1d(32, 16, 3, padding=1)  # d = 96
        self.fc = nn.Linear(256, 8)  # d = 256

    def forward(self, x):  # (N, 8, 4, 4)
        h = self.bn(self.conv(x)).relu().flatten(2)  # (N, 32, 16)
        return self.fc(self.conv1(h).relu().flatten(1))


BLOCKS = {"conv": 9, "conv1": 4, "fc": 8}
PQ_MODULES = ("conv", "conv1", "fc")


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, 4, 4, generator=g) for _ in range(2)]


def trained_net():
    model = PQNet()
    model.train()
    for x in batches():  # non-trivial BatchNorm statistics
        model(x)
    return model.eval()


def fresh_net():
    m = PQNet()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1)
    return m.eval()


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * d, d, generator=g)
    return a.T @ a / (2 * d)


def quantize(m, n_centroids, block_size, hessian=None, **kw) -> PQResult:
    """Product-quantize the module's weight and write ``codebook[codes]`` into it."""
    W = m.weight.detach().reshape(m.weight.shape[0], -1)
    res = product_quantize(W, hessian, block_size=block_size, n_centroids=n_centroids, n_iter=8, n_rounds=1, **kw)
    with torch.no_grad():
        m.weight.copy_(res.quantized_matrix.reshape(m.weight.shape))
    return res


def pq_net(n_centroids, names=PQ_MODULES, model=None):
    """(model, {name: [PQResult]}) with ``names`` product-quantized (a fresh copy every call)."""
    if model is None and tuple(names) == PQ_MODULES:
        return copy.deepcopy(_pq_net_once(n_centroids))
    return _pq_net(n_centroids, names, trained_net() if model is None else model)


@functools.cache
def _pq_net_once(n_centroids):
    return _pq_net(n_centroids, PQ_MODULES, trained_net())


def _pq_net(n_centroids, names, model):
    results = {}
    for name in names:
        m = model.get_submodule(name)
        H = spd(m.weight[0].numel()) if name == "fc" else None  # one Hessian-aware module
        results[name] = [quantize(m, n_centroids, BLOCKS[name], H)]
    return model, results


def expected(res: PQResult, shape):
    """codebook[codes] with the codebook as stored (float16), computed independently of the library."""
    return res.codebook.to(torch.float16).float()[res.codes].reshape(shape)


def pq_payload(m, K, b, entry_bytes=2):
    rows, d = m.weight.shape[0], m.weight[0].numel()
    return math.ceil(math.ceil(math.log2(K)) * rows * (d // b) / 8) + K * b * entry_bytes


def other_bytes(model, quantized):
    return sum(
        t.numel() * t.element_size()
        for k, t in model.state_dict().items()
        if k.rpartition(".")[0] not in quantized or k.rpartition(".")[2] != "weight"
    )


def header_bytes(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")



# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("n_centroids", [256, 16])
def test_pq_round_trip_dense_and_packed(tmp_path, n_centroids):
    model, results = pq_net(n_centroids)
    results["conv1"] = results["conv1"][0]  # a bare PQResult is accepted too
    path = tmp_path / "m.safetensors"
    size = save_quantized(model, path, results)

    meta = read_metadata(path)
    bits = math.ceil(math.log2(n_centroids))
    for name in PQ_MODULES:
        assert tuple(meta[name]) == PQ_KEYS
        assert meta[name]["scheme"] == "pq" and meta[name]["bits"] == bits
        assert (meta[name]["block_size"], meta[name]["n_centroids"]) == (BLOCKS[name], n_centroids)
        assert meta[name]["scale_dtype"] == "float16" and meta[name]["dtype"] == "float32"

    # size: packed codes + fp16 codebook + the other tensors, plus the header, exactly
    theory = sum(pq_payload(model.get_submodule(n), n_centroids, BLOCKS[n]) for n in PQ_MODULES)
    theory += other_bytes(model, PQ_MODULES)
    assert theoretical_bytes(path) == theory
    assert size == os.path.getsize(path) == theory + header_bytes(path)

    x = batches()[0]
    dense = load_quantized(path, fresh_net())
    for name in PQ_MODULES:
        res = results[name] if isinstance(results[name], PQResult) else results[name][0]
        w = dense.get_submodule(name).weight
        assert torch.equal(w, expected(res, w.shape)), name  # bit-exact: the codebook is fp16 already
        assert torch.equal(w, model.get_submodule(name).weight), name
    assert_same_state(dense, model)  # biases and BatchNorm statistics too
    assert torch.equal(dense(x), model(x))

    packed = load_quantized(path, fresh_net(), packed=True)
    assert isinstance(packed.conv, QuantizedConv2d) and isinstance(packed.conv1, QuantizedConv1d)
    assert isinstance(packed.fc, QuantizedLinear)
    for name in PQ_MODULES:
        q = packed.get_submodule(name)
        assert q.scheme == "pq" and q.bits == bits and q.block_size == BLOCKS[name] and q.n_centroids == n_centroids
        assert q.group_size is None
        assert sorted(dict(q.named_buffers())) == ["weight_codebook", "weight_codes"]
        rows, J = q.weight.shape[0], q.weight[0].numel() // BLOCKS[name]
        assert q.weight_codes.dtype == torch.uint8 and q.weight_codes.numel() == math.ceil(bits * rows * J / 8)
        assert q.weight_codebook.dtype == torch.float16 and q.weight_codebook.shape == (n_centroids, BLOCKS[name])
        assert torch.equal(q.weight, model.get_submodule(name).weight), name
        assert f"block_size={BLOCKS[name]}, n_centroids={n_centroids}" in repr(q)
        assert "scheme=pq" in repr(q) and "codebook_dtype=float16" in repr(q)
    assert torch.equal(packed(x), model(x))  # forward of the packed modules == the dense quantized model

    # pack_model in memory, and saving from the packed model, give the same file contents
    in_memory = pack_model(copy.deepcopy(model), results)
    assert torch.equal(in_memory(x), model(x))
    save_quantized(in_memory, tmp_path / "b.safetensors")
    assert_same_state(load_quantized(tmp_path / "b.safetensors", fresh_net()), dense)
    assert theoretical_bytes(tmp_path / "b.safetensors") == theory
    unpack_model(in_memory)
    assert type(in_memory.fc) is nn.Linear and torch.equal(in_memory(x), model(x))


def test_pq_codebook_in_float32_round_trips_with_float32_storage(tmp_path):
    model = trained_net()
    results = {"fc": [quantize(model.fc, 16, 8, codebook_dtype=None)]}  # fp32 codebook, not fp16-representable
    assert not torch.equal(results["fc"][0].codebook.half().float(), results["fc"][0].codebook)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results, scale_dtype=torch.float32)
    assert read_metadata(path)["fc"]["scale_dtype"] == "float32"
    assert theoretical_bytes(path) == pq_payload(model.fc, 16, 8, 4) + other_bytes(model, ["fc"])
    assert torch.equal(load_quantized(path, fresh_net()).fc.weight, model.fc.weight)
    packed = load_quantized(path, fresh_net(), packed=True)
    assert packed.fc.weight_codebook.dtype == torch.float32
    assert torch.equal(packed.fc.weight, model.fc.weight)


# ------------------------------------------------------------------ scalar and PQ modules in one model
def test_mixed_scalar_and_pq_modules(tmp_path):
    model = trained_net()
    report = compress_model(model, batches(), bits=4, include=["conv"], keep_results=True)
    assert report.quantized == ["conv"]
    results = dict(report.results)
    results.update(pq_net(16, names=["conv1", "fc"], model=model)[1])
    path = tmp_path / "m.safetensors"
    size = save_quantized(model, path, results)

    meta = read_metadata(path)
    assert tuple(meta["conv"]) == SCALAR_KEYS and meta["conv"]["scheme"] == "affine"  # unchanged format
    assert tuple(meta["fc"]) == PQ_KEYS
    theory = (
        math.ceil(4 * 32 * 72 / 8)  # 4-bit codes
        + 32 * (2 + 1)  # fp16 scale + uint8 zero per row
        + pq_payload(model.conv1, 16, BLOCKS["conv1"])
        + pq_payload(model.fc, 16, BLOCKS["fc"])
        + other_bytes(model, ["conv", "conv1", "fc"])
    )
    assert theoretical_bytes(path) == theory and size == theory + header_bytes(path)

    x = batches()[0]
    dense = load_quantized(path, fresh_net())
    assert_same_state(dense, model)  # compress_model's fp16 scales: the scalar module is bit-exact too
    packed = load_quantized(path, fresh_net(), packed=True)
    assert packed.conv.scheme == "affine" and packed.conv.bits == 4 and packed.conv.group_size is None
    assert packed.conv.block_size is None and "weight_codebook" not in dict(packed.conv.named_buffers())
    assert packed.conv1.scheme == packed.fc.scheme == "pq"
    assert torch.equal(packed(x), model(x))

    pack_model(model, results)
    assert torch.equal(model(x), packed(x))
    save_quantized(model, tmp_path / "b.safetensors")
    assert_same_state(load_quantized(tmp_path / "b.safetensors", fresh_net()), dense)


# ------------------------------------------------------------------ Lightning-style checkpoints
def test_checkpoint_of_packed_pq_model_loads_back():
    model, results = pq_net(16)
    dense = copy.deepcopy(model)
    pack_model(model, results)
    buf = io.BytesIO()
    torch.save({"epoch": 0, "state_dict": model.state_dict()}, buf)  # what Lightning writes, in short
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["state_dict"]["fc._extra_state"]["scheme"] == "pq"

    other = fresh_net()
    assert sorted(prepare_for_load(other, ckpt)) == ["conv", "conv1", "fc"]
    other.load_state_dict(ckpt["state_dict"])
    x = batches()[0]
    assert isinstance(other.conv1, QuantizedConv1d) and torch.equal(other(x), dense(x))
    assert prepare_for_load(other, ckpt) == []  # already packed with that layout

    # .double() changes the compute dtype, never the stored codebook; back to float32 is exact again
    other.double()
    assert other.fc.weight_codebook.dtype == torch.float16 and other.fc.weight.dtype == torch.float64
    other.float()
    assert torch.equal(other(x), dense(x))

    # a module packed with another layout refuses the state before any buffer is copied
    wrong, wrong_results = pq_net(256)
    pack_model(wrong, wrong_results)
    before = copy.deepcopy(wrong)
    with pytest.raises(ValueError, match="saved for .*'n_centroids': 16.*prepare_for_load"):
        wrong.load_state_dict(ckpt["state_dict"])
    assert_same_state(wrong, before)


# ------------------------------------------------------------------ bad inputs
def too_many_centroids(model, results):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(512, 8, generator=g).half().float()
    codes = torch.arange(8 * 32).reshape(8, 32) * 2
    with torch.no_grad():
        model.fc.weight.copy_(codebook[codes].reshape(8, 256))
    results["fc"] = [PQResult(model.fc.weight.detach().clone(), codes, codebook, torch.zeros(8), 8, 512, False)]


def weight_changed(model, results):
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3


def fp32_codebook(model, results):
    with torch.no_grad():
        model.fc.weight.copy_(PQNet().fc.weight)  # unquantized again: 16 distinct centroids to find
    results["fc"] = [quantize(model.fc, 16, 8, codebook_dtype=None)]


def wrong_module(model, results):
    results["fc"] = results["conv1"]


def two_results(model, results):
    results["fc"] = results["fc"] * 2


@pytest.mark.parametrize(
    "spoil,match",
    [
        (too_many_centroids, r"module 'fc': n_centroids=512 cannot be exported.*\[2, 256\]"),
        (weight_changed, r"module 'fc': its weight is not codebook\[codes\] of the given PQResult"),
        (fp32_codebook, r"module 'fc': scale_dtype=float16 cannot represent its float32 codebook exactly"),
        (wrong_module, r"module 'fc': block_size=4 does not divide|module 'fc': a PQResult .* does not fit"),
        (two_results, r"module 'fc': a product-quantized module takes one PQResult, got 2"),
    ],
)
def test_bad_results_are_refused_before_anything_is_written(tmp_path, spoil, match):
    model, results = pq_net(16)
    spoil(model, results)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "m.safetensors", results)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=match):
        pack_model(model, results)
    assert all(type(model.get_submodule(n)) is type(before.get_submodule(n)) for n in PQ_MODULES)
    assert_same_state(model, before)


def test_grouped_conv_round_trips(tmp_path):
    # the codes index rows of weight.reshape(out, -1) = (8, 2 * 9): nothing in the format depends on groups
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    res = quantize(model[0], 4, 9)
    save_quantized(model, tmp_path / "m.safetensors", {"0": [res]})
    other = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    load_quantized(tmp_path / "m.safetensors", other, packed=True)
    x = torch.randn(2, 4, 5, 5)
    assert isinstance(other[0], QuantizedConv2d) and torch.equal(other(x), model(x))


def no_block_size(path):
    rewrite(path, modules_fn=lambda m: m["fc"].pop("block_size"))


def bad_block_size(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(block_size=7))


def bits_not_log2(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(bits=8))


def too_many_in_file(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(n_centroids=512, bits=9))


def short_codebook(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_codebook": t["fc.weight_codebook"][:-1].clone()}))


def codebook_transposed(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_codebook": t["fc.weight_codebook"].T.contiguous()}))


def codebook_fp32(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_codebook": t["fc.weight_codebook"].float()}))


def no_codebook(path):
    rewrite(path, tensors_fn=lambda t: t.pop("fc.weight_codebook"))


def scalar_tensors_added(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_scales": torch.ones(8, 1, dtype=torch.float16)}))


def code_beyond_codebook(path):  # 12 centroids still take 4-bit codes; codes 12 ... 15 name none
    rewrite(
        path,
        tensors_fn=lambda t: t.update({"fc.weight_codebook": t["fc.weight_codebook"][:12].clone()}),
        modules_fn=lambda m: m["fc"].update(n_centroids=12),
    )


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (no_block_size, r"module 'fc': metadata lacks \['block_size'\]"),
        (bad_block_size, r"module 'fc': block_size must be an integer that divides the 256 inputs"),
        (bits_not_log2, r"module 'fc': bits must be ceil\(log2 n_centroids\) = 4 for n_centroids=16, got 8"),
        (too_many_in_file, r"module 'fc': n_centroids must be an integer in \[2, 256\], got 512"),
        (short_codebook, r"module 'fc'.*weight_codebook must be float16 of shape \(16, 8\).*got float16 of shape \(15"),
        (codebook_transposed, r"module 'fc'.*weight_codebook must be float16 of shape \(16, 8\)"),
        (codebook_fp32, r"module 'fc'.*weight_codebook must be float16 of shape \(16, 8\).*got float32"),
        (no_codebook, r"module 'fc' lacks the tensors \['fc.weight_codebook'\]"),
        (scalar_tensors_added, r"not in the model: \['fc.weight_scales'\]"),
        (code_beyond_codebook, r"module 'fc': weight_codes holds code 1[2-5], beyond the n_centroids=12"),
    ],
)
def test_corrupted_pq_file_is_refused_and_model_untouched(tmp_path, corrupt, match):
    model, results = pq_net(16)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results)
    if corrupt is code_beyond_codebook:
        # make sure a code >= 12 is in the file: the largest code of the 16-centroid result
        assert int(results["fc"][0].codes.max()) >= 12
    corrupt(path)
    assert_load_refused(path, fresh_net(), match)
    if corrupt not in (scalar_tensors_added,):  # prepare_for_load reads the same checks from a file path
        target = fresh_net()
        with pytest.raises(ValueError, match=match):
            prepare_for_load(target, path)
        assert type(target.fc) is nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_pq_model_moves_to_cuda():
    model, results = pq_net(16)
    pack_model(model, results)
    dense = unpack_model(copy.deepcopy(model)).cuda()
    model.cuda()
    assert model.fc.weight_codes.is_cuda and model.fc.weight_codebook.dtype == torch.float16
    x = batches()[0].cuda()
    assert torch.equal(model.fc.weight, dense.fc.weight) and torch.allclose(model(x), dense(x))
    model.cpu()
    assert torch.equal(model.conv.weight, dense.conv.weight.cpu())
