"""Sparse export of pruned float weights (scheme "sparse"): N:M values plus their positions (convs grouped
along the input channels at each kernel position) or a bitmask plus the non-zero values; round trips,
sizes, packed modules, prune-only compress_model runs, and bad inputs refused before anything changes."""

import copy
import io
import math
import os

import pytest
import torch
from model_state import assert_load_refused, assert_same_state
from safetensors import safe_open
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
from obc_lightning.grids import fit_grid
from obc_lightning.packed import (
    SPARSE_KEYS,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedLinear,
    pack_bits,
    unpack_bits,
)
from obc_lightning.solvers.common import QuantResult

MODULES = {  # name -> (module factory, input shape)
    "linear": (lambda: nn.Linear(16, 6), (4, 16)),
    "conv1d": (lambda: nn.Conv1d(8, 5, 3, padding=1), (4, 8, 7)),
    "conv2d": (lambda: nn.Conv2d(8, 6, 3, padding=1), (4, 8, 5, 5)),
    "grouped_conv2d": (lambda: nn.Conv2d(8, 6, 3, padding=1, groups=2), (4, 8, 5, 5)),
}
PACKED = {"linear": QuantizedLinear, "conv1d": QuantizedConv1d, "conv2d": QuantizedConv2d}
PACKED["grouped_conv2d"] = QuantizedConv2d


# ------------------------------------------------------------------ plain references
def reference_nm(w, N, M):
    """(values, positions) of the stored entries by a plain loop: rows, then groups in group-id order
    (group of input channel i at kernel position k: k * (C / M) + i // M), then increasing position i % M;
    each group keeps its non-zeros, padded with zeros at its smallest remaining positions."""
    w3 = w.reshape(w.shape[0], w.shape[1], -1)  # (rows, C = inputs per conv group, K); a Linear has K = 1
    rows, C, K = w3.shape
    values, positions = [], []
    for r in range(rows):
        for k in range(K):
            for g in range(C // M):
                members = [w3[r, g * M + p, k].item() for p in range(M)]
                kept = [p for p in range(M) if members[p] != 0]
                padding = [p for p in range(M) if members[p] == 0][: N - len(kept)]
                for p in sorted(kept + padding):
                    values.append(members[p])
                    positions.append(p)
    return values, positions


def reference_mask(w):
    """(mask bits, non-zero values) of ``w.reshape(-1)``, by a plain loop."""
    flat = w.reshape(-1).tolist()
    return [int(v != 0) for v in flat], [v for v in flat if v != 0]


def max_nonzeros_per_channel_group(w, M):
    w3 = w.reshape(w.shape[0], w.shape[1], -1)
    return max(
        sum(w3[r, g * M + p, k].item() != 0 for p in range(M))
        for r in range(w3.shape[0])
        for g in range(w3.shape[1] // M)
        for k in range(w3.shape[2])
    )


def sparse_payload(numel, n_m, nnz, value_bytes):
    """The size formula of the module docstring."""
    if n_m is None:
        return math.ceil(numel / 8) + nnz * value_bytes
    N, M = n_m
    stored = numel * N // M
    return stored * value_bytes + math.ceil(math.ceil(math.log2(M)) * stored / 8)


def file_tensor_bytes(path):
    with safe_open(path, framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def file_tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------ sparse weights
def prune(w, n_m, seed):
    """N:M along the input channels at each kernel position (the N largest |w|; one group left empty,
    one with fewer than N), or, for ``n_m=None``, about half of the weights at random."""
    g = torch.Generator().manual_seed(seed)
    if n_m is None:
        return w * (torch.rand(w.shape, generator=g) < 0.5)
    N, M = n_m
    w4 = w.reshape(w.shape[0], w.shape[1] // M, M, -1).clone()  # (rows, C / M, M, K)
    keep = torch.zeros_like(w4, dtype=torch.bool).scatter_(2, w4.abs().topk(N, dim=2).indices, True)
    keep[0, 0, :, 0] = False  # no non-zero at all
    keep[1, 0, w4[1, 0, :, 0].abs().argmax(), 0] = False  # one fewer than N
    return (w4 * keep).reshape(w.shape)


def sparse_module(kind, n_m, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(MODULES[kind][0]())
    with torch.no_grad():
        model[0].weight.copy_(prune(model[0].weight, n_m, seed))
    return model


def fresh(kind):
    torch.manual_seed(99)
    return nn.Sequential(MODULES[kind][0]())


def x_for(kind):
    return torch.randn(MODULES[kind][1], generator=torch.Generator().manual_seed(2))


class Net(nn.Module):
    """Conv2d + BatchNorm + grouped Conv2d + Linear, every input count a multiple of 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.gconv(torch.relu(self.bn(self.conv(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, 6, 6, generator=g) for _ in range(2)]


def trained_net(seed=0):
    torch.manual_seed(seed)
    model = Net()
    model.train()
    for x in batches():  # non-trivial BatchNorm statistics
        model(x)
    return model.eval()


def pruned_net(n_m=(2, 4), seed=0):
    model = trained_net(seed)
    with torch.no_grad():
        for m in (model.conv, model.gconv, model.fc):
            m.weight.copy_(prune(m.weight, n_m, seed))
    return model



# ------------------------------------------------------------------ layout
def test_layout_of_a_tiny_linear():
    # one row of 8 inputs: 2:4 keeps columns 1, 3 of group 0 and 6 of group 1 (padded with column 4)
    w = torch.tensor([[0.0, 1.5, 0.0, -2.25, 0.0, 0.0, 3.0, 0.0]])
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    nm = pack_model(copy.deepcopy(model), sparse=True, n_m=(2, 4), value_dtype=torch.float32)[0]
    assert nm.weight_values.tolist() == [1.5, -2.25, 0.0, 3.0]
    assert unpack_bits(nm.weight_positions, 2, 4).tolist() == [1, 3, 0, 2]
    assert reference_nm(w, 2, 4) == ([1.5, -2.25, 0.0, 3.0], [1, 3, 0, 2])

    bitmask = pack_model(copy.deepcopy(model), sparse=True, value_dtype=torch.float32)[0]
    # bit i of the little-endian byte stream is weight i: 0b01001010
    assert bitmask.weight_mask.tolist() == [0b01001010] and bitmask.config["nnz"] == 3
    assert bitmask.weight_values.tolist() == [1.5, -2.25, 3.0]
    for packed in (nm, bitmask):
        assert torch.equal(packed.weight, w) and packed.bits is None and packed.scheme == "sparse"


def test_conv_groups_run_along_input_channels():
    model = sparse_module("conv2d", (2, 4))
    w = model[0].weight.detach()
    assert max_nonzeros_per_channel_group(w, 4) == 2
    assert max_nonzeros_per_channel_group(w.reshape(w.shape[0], -1), 4) > 2  # not 2:4 along in * kh * kw
    packed = pack_model(copy.deepcopy(model), sparse=True, n_m=(2, 4), value_dtype=torch.float32)[0]
    values, positions = reference_nm(w, 2, 4)
    assert packed.weight_values.tolist() == values
    assert unpack_bits(packed.weight_positions, 2, len(positions)).tolist() == positions


# ------------------------------------------------------------------ round trips and sizes
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), None])
@pytest.mark.parametrize("kind", list(MODULES))
def test_round_trip_dense_and_packed(tmp_path, kind, n_m, value_dtype):
    model = sparse_module(kind, n_m)
    w = model[0].weight.detach()
    stored = w.to(value_dtype)
    if value_dtype == torch.float32:
        assert torch.equal(stored, w)
    else:
        assert not torch.equal(stored.float(), w)  # the fp16 case really rounds
    path = tmp_path / "m.safetensors"
    size = save_quantized(model, path, sparse=True, n_m=n_m, value_dtype=value_dtype)
    assert size == os.path.getsize(path)

    meta = read_metadata(path)["0"]
    assert tuple(meta) == (*SPARSE_KEYS, "n_m" if n_m else "nnz")
    assert meta["scheme"] == "sparse" and meta["value_dtype"] == str(value_dtype).removeprefix("torch.")
    tensors = file_tensors(path)
    if n_m is None:
        bits, values = reference_mask(stored)
        assert meta["nnz"] == len(values) == int((w != 0).sum())
        assert unpack_bits(tensors["0.weight_mask"], 1, w.numel()).tolist() == bits
    else:
        values, positions = reference_nm(stored, *n_m)
        assert unpack_bits(tensors["0.weight_positions"], 2, len(positions)).tolist() == positions
    assert tensors["0.weight_values"].dtype == value_dtype and tensors["0.weight_values"].tolist() == values

    expected = sparse_payload(w.numel(), n_m, meta.get("nnz"), stored.element_size()) + 4 * w.shape[0]  # + bias
    assert theoretical_bytes(path) == file_tensor_bytes(path) == expected

    loaded = load_quantized(path, fresh(kind))
    assert torch.equal(loaded[0].weight, stored.float()) and torch.equal(loaded[0].bias, model[0].bias)
    packed = load_quantized(path, fresh(kind), packed=True)
    assert type(packed[0]) is PACKED[kind] and packed[0].n_m == n_m
    assert torch.equal(packed[0].weight, stored.float())
    x = x_for(kind)
    assert torch.equal(packed(x), loaded(x))  # packed forward == dense forward
    if value_dtype == torch.float32:
        assert torch.equal(packed(x), model(x))


def test_2_4_float16_payload_below_0_6_of_dense_float16(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(prune(model[0].weight, (2, 4), 0))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, sparse=True, n_m=(2, 4))
    dense_fp16 = 256 * 128 * 2
    # half of the weights at 2 bytes, plus 2 bits of position per stored value
    assert theoretical_bytes(path) == 256 * 128 // 2 * 2 + 256 * 128 // 2 * 2 // 8 == 0.5625 * dense_fp16
    assert theoretical_bytes(path) < 0.6 * dense_fp16
    loaded = load_quantized(path, nn.Sequential(nn.Linear(256, 128, bias=False)))
    assert torch.equal(loaded[0].weight, model[0].weight.half().float())


def test_a_dense_weight_is_still_written_correctly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 3))  # no zero at all
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, sparse=True, value_dtype=torch.float32)
    assert read_metadata(path)["0"]["nnz"] == 36
    assert theoretical_bytes(path) == math.ceil(36 / 8) + 36 * 4 + 3 * 4
    assert_same_state(load_quantized(path, nn.Sequential(nn.Linear(12, 3))), model)


# ------------------------------------------------------------------ prune-only compress_model, end to end
@pytest.mark.parametrize("prune_args", [{"n_m": (2, 4)}, {"sparsity": 0.5}], ids=["2:4", "50%"])
def test_compress_model_prune_only_then_export_and_load(tmp_path, prune_args):
    model = trained_net()
    report = compress_model(model, batches(), bits=None, keep_results=True, **prune_args)
    assert report.quantized == ["conv", "gconv", "fc"] and report.results == {n: [] for n in report.quantized}
    n_m = prune_args.get("n_m")
    x = batches()[0]

    # the report itself (no codes needed), float32 values: the pruned model, bit for bit
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report, n_m=n_m, value_dtype=torch.float32)
    meta = read_metadata(path)
    assert sorted(meta) == ["conv", "fc", "gconv"] and all(c["scheme"] == "sparse" for c in meta.values())
    for name, cfg in meta.items():
        w = model.get_submodule(name).weight
        if n_m is None:
            assert cfg["nnz"] == int((w != 0).sum()) == w.numel() // 2
        else:
            assert cfg["n_m"] == [2, 4] and max_nonzeros_per_channel_group(w.detach(), 4) <= 2
    loaded = load_quantized(path, trained_net(seed=5))
    assert_same_state(loaded, model)
    assert torch.equal(loaded(x), model(x))
    packed = load_quantized(path, trained_net(seed=5), packed=True)
    assert isinstance(packed.gconv, QuantizedConv2d) and packed.gconv.groups == 2
    assert torch.equal(packed(x), model(x))

    # report.results ({name: []}), float16 values by default: the weights rounded to float16
    half = tmp_path / "half.safetensors"
    save_quantized(model, half, report.results, n_m=n_m)
    assert theoretical_bytes(half) < theoretical_bytes(path)
    loaded = load_quantized(half, trained_net(seed=5))
    for name in report.quantized:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight.half().float())


def test_prune_only_report_without_kept_results(tmp_path):
    model = trained_net()
    report = compress_model(model, batches(), bits=None, n_m=(2, 4))
    assert report.results is None
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report, n_m=(2, 4), value_dtype=torch.float32)
    assert_same_state(load_quantized(path, trained_net(seed=5)), model)


# ------------------------------------------------------------------ packed modules in memory
def test_packed_state_dict_round_trip_and_dtype_moves():
    model = pruned_net((2, 4))
    dense = copy.deepcopy(model)
    pack_model(model, sparse=["conv", "gconv"], n_m=(2, 4), value_dtype=torch.float32)
    pack_model(model, sparse="fc", value_dtype=torch.float32)  # the bitmask layout; conv / gconv stay N:M
    assert model.conv.n_m == (2, 4) and model.fc.n_m is None and "fc.weight" not in model.state_dict()
    assert "scheme=sparse, value_dtype=float32, nnz=" in repr(model.fc) and "n_m=(2, 4)" in repr(model.gconv)
    x = batches()[0]
    assert torch.equal(model(x), dense(x))

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = trained_net(seed=5)
    assert sorted(prepare_for_load(other, sd)) == ["conv", "fc", "gconv"]
    other.load_state_dict(sd)
    assert torch.equal(other(x), dense(x))

    # .double() changes the compute dtype, never the stored values; back to float32 is still exact
    other.double()
    assert other.fc.weight_values.dtype == torch.float32 and other.fc.weight.dtype == torch.float64
    assert other(x.double()).dtype == torch.float64
    other.float()
    assert torch.equal(other(x), dense(x))
    assert torch.equal(other.fc.to_dense().weight, dense.fc.weight)


def test_save_from_packed_model_and_repack_bitmask_to_n_m(tmp_path):
    model = pruned_net((2, 4))
    pack_model(model, sparse=True, value_dtype=torch.float32)  # bitmask layout although 2:4
    assert model.conv.n_m is None
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, n_m=(2, 4))  # packed modules re-packed N:M, the same values
    assert all(c["n_m"] == [2, 4] and c["value_dtype"] == "float32" for c in read_metadata(path).values())
    assert_same_state(load_quantized(path, trained_net(seed=5)), unpack_model(copy.deepcopy(model)))
    pack_model(model, n_m=(2, 4))
    assert model.fc.n_m == (2, 4) and torch.equal(model.fc.weight, pruned_net((2, 4)).fc.weight)


def test_quantized_and_sparse_modules_in_one_file(tmp_path):
    model = pruned_net(None)
    grid = fit_grid(model.conv.weight.detach().reshape(8, -1), 4, mse=False)
    codes = grid.codes(model.conv.weight.detach().reshape(8, -1))
    res = QuantResult(grid.dequantize(codes), grid.scales, grid.zeros, codes, torch.zeros(8), grid)
    with torch.no_grad():
        model.conv.weight.copy_(res.quantized_matrix.reshape(model.conv.weight.shape))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, {"conv": [res]}, scale_dtype=torch.float32, sparse=True, value_dtype=torch.float32)
    meta = read_metadata(path)
    assert meta["conv"]["scheme"] == "affine" and meta["gconv"]["scheme"] == meta["fc"]["scheme"] == "sparse"
    x = batches()[0]
    assert torch.equal(load_quantized(path, trained_net(seed=5), packed=True)(x), model(x))


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flattened", [False, True])
def test_violating_module_is_refused_before_anything_is_written(tmp_path, flattened):
    model = pruned_net((2, 4))
    with torch.no_grad():
        if flattened:  # 2:4 along the flattened (in * kh * kw) axis, not along the input channels
            w = prune(torch.randn(8, 36, 1), (2, 4), 0).reshape(8, 4, 3, 3)
            assert max_nonzeros_per_channel_group(w, 4) > 2
            model.gconv.weight.copy_(w)
            match = r"module 'gconv'.*not 2:4 sparse: row \d+, group \d+ .*has [34] non-zero"
        else:
            model.fc.weight[3, 4:8] = torch.tensor([0.5, -0.25, 0.75, 0.0])  # 3 non-zeros in group 1 of row 3
            match = r"module 'fc'.*not 2:4 sparse: row 3, group 1 .*has 3 non-zero"
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "m.safetensors", sparse=True, n_m=(2, 4))
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        pack_model(model, sparse=True, n_m=(2, 4))
    assert type(model.fc) is nn.Linear and type(model.gconv) is nn.Conv2d
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def big_weight(m):
    m.weight.data[0, 0] = 1e6  # beyond float16


def nan_weight(m):
    m.weight.data[0, 0] = float("nan")


@pytest.mark.parametrize(
    "kwargs, spoil, match",
    [
        ({"sparse": "nothing"}, None, r"sparse: 'nothing' matches no float Linear / Conv1d / Conv2d"),
        ({"sparse": 3}, None, "sparse must be True, a module name"),
        ({"sparse": True, "value_dtype": torch.int8}, None, "value_dtype must be one of"),
        ({"sparse": "fc"}, big_weight, r"module 'fc': value_dtype=float16 cannot represent its weights"),
        ({"sparse": "fc"}, nan_weight, r"module 'fc': its weight contains NaN or Inf"),
        ({"sparse": True, "n_m": (2, 16)}, None, r"module 'conv'.*M=16 does not divide the 8 input channels"),
        ({}, None, "nothing to export"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, spoil, match):
    model = pruned_net((2, 4))
    if spoil:
        spoil(model.fc)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "m.safetensors", **kwargs)
    assert not os.listdir(tmp_path)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)


def test_a_quantized_module_is_not_selected_by_sparse(tmp_path):
    model = pruned_net((2, 4))
    grid = fit_grid(model.fc.weight.detach(), 4, mse=False)
    codes = grid.codes(model.fc.weight.detach())
    res = QuantResult(grid.dequantize(codes), grid.scales, grid.zeros, codes, torch.zeros(5), grid)
    with torch.no_grad():
        model.fc.weight.copy_(res.quantized_matrix)
    with pytest.raises(ValueError, match=r"sparse: 'fc' matches no float .*available: conv, gconv"):
        save_quantized(model, tmp_path / "m.safetensors", {"fc": [res]}, sparse="fc")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ corrupted files
def edit_fc_config(edit):
    """A corruption of the saved file: ``edit`` applied to the config of module 'fc'."""
    return lambda path: rewrite(path, modules_fn=lambda modules: edit(modules["fc"]))


def flip_mask_bit(t):
    bits = unpack_bits(t["fc.weight_mask"], 1, 160).clone()
    bits[0] ^= 1
    t["fc.weight_mask"] = pack_bits(bits, 1)


def nan_value(t):
    t["fc.weight_values"][0] = float("nan")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: rewrite(p, tensors_fn=flip_mask_bit), r"module 'fc'.*weight_mask has \d+ bits set, nnz=\d+"),
        (lambda p: rewrite(p, tensors_fn=nan_value), r"module 'fc'.*weight_values contains NaN"),
        (edit_fc_config(lambda c: c.update(nnz=c["nnz"] + 1)), r"module 'fc'.*weight_values must be"),
        (edit_fc_config(lambda c: c.update(nnz=161)), r"module 'fc'.*nnz, an integer in \[0, 160\]"),
        (edit_fc_config(lambda c: c.pop("nnz")), r"module 'fc'.*needs nnz"),
        (edit_fc_config(lambda c: c.update(n_m=[2, 4])), r"module 'fc'.*either n_m .* or nnz"),
        (edit_fc_config(lambda c: c.update(value_dtype="int8")), r"module 'fc'.*value_dtype must"),
        (lambda p: rewrite(p, tensors_fn=lambda t: t.pop("fc.weight_mask")), r"lacks the tensors \['fc.weight_mask'\]"),
    ],
)
def test_corrupted_sparse_file_is_refused_and_model_untouched(tmp_path, corrupt, match):
    path = tmp_path / "m.safetensors"
    save_quantized(pruned_net(None), path, sparse=True)
    corrupt(path)
    target = trained_net(seed=5)
    before = copy.deepcopy(target.state_dict())
    assert_load_refused(path, target, match)
    with pytest.raises(ValueError, match=match):
        prepare_for_load(target, path)
    assert type(target.fc) is nn.Linear
    torch.testing.assert_close(target.state_dict(), before, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_sparse_model_moves_to_cuda():
    model = pruned_net((2, 4))
    dense = copy.deepcopy(model)
    pack_model(model, sparse=["conv", "gconv"], n_m=(2, 4))
    pack_model(model, sparse="fc")
    model.cuda()
    assert model.fc.weight_mask.is_cuda and model.fc.weight_values.dtype == torch.float16
    for name in ("conv", "gconv", "fc"):
        expected = dense.get_submodule(name).weight.half().float()
        assert torch.equal(model.get_submodule(name).weight.cpu(), expected), name
