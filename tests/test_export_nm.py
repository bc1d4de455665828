"""N:M-sparse packed export: save_quantized / pack_model(..., n_m=(N, M)) store the codes of N entries per
group of M inputs and their positions (convs grouped along the input channels at each kernel position)."""

import copy
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
)
from obc_lightning.grids import fit_grid
from obc_lightning.packed import QuantizedConv2d, QuantizedLinear, pack_bits, unpack_bits
from obc_lightning.solvers.common import QuantResult
from obc_lightning.solvers.prune import conv_nm_group_index

BITS = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(24, 8)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, 5, 5, generator=g) for _ in range(2)]


def group_index(m, M):
    if isinstance(m, nn.Conv2d):
        return conv_nm_group_index(m.in_channels // m.groups, math.prod(m.kernel_size), M)
    return torch.arange(m.in_features) // M


def sparsify(w2d, group, N, M, seed):
    """Keep the N largest |w| of every group (group ids per column); then, in a few groups, fewer."""
    rows, d = w2d.shape
    order = torch.argsort(group, stable=True).view(-1, M)  # (G, M) columns of each group
    vals = w2d[:, order]  # (rows, G, M)
    keep = torch.zeros_like(vals, dtype=torch.bool)
    keep.scatter_(2, vals.abs().topk(N, dim=2).indices, True)
    keep[0, 0] = False  # a group with no non-zero at all
    keep[1, 1, keep[1, 1].nonzero()[0]] = False  # one fewer than N
    out = torch.zeros_like(w2d)
    out[:, order] = torch.where(keep, vals, torch.zeros_like(vals))
    return out


def rtn(weight):
    grid = fit_grid(weight, BITS, mse=False)
    codes = grid.codes(weight)
    return QuantResult(grid.dequantize(codes), grid.scales, grid.zeros, codes, torch.zeros(weight.shape[0]), grid)


def sparse_net(N, M, seed=0):
    """(model, results): conv and fc N:M sparse with the right grouping, quantized (pruned weights 0)."""
    torch.manual_seed(seed)
    model = Net()
    model.train()
    for x in batches():  # non-trivial BatchNorm statistics
        model(x)
    model.eval()
    results = {}
    with torch.no_grad():
        for name in ("conv", "fc"):
            m = model.get_submodule(name)
            w = sparsify(m.weight.reshape(m.weight.shape[0], -1), group_index(m, M), N, M, seed)
            res = rtn(w)
            m.weight.copy_(res.quantized_matrix.reshape(m.weight.shape))
            results[name] = [res]
    return model, results


def nonzeros_per_group(w2d, group):
    G = int(group.max()) + 1
    return torch.zeros(w2d.shape[0], G, dtype=torch.long).index_add_(1, group, (w2d != 0).long())


def payload(m, N, M, scale_bytes):
    rows, d = m.weight.shape[0], m.weight[0].numel()
    n = rows * d * N // M
    return math.ceil(BITS * n / 8) + math.ceil(math.ceil(math.log2(M)) * n / 8) + rows * (scale_bytes + 1)


def other_bytes(model):
    return sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in ("conv.weight", "fc.weight")
    )



# ------------------------------------------------------------------ layout
def test_entry_order_and_padding_of_a_tiny_linear(tmp_path):
    # one row, 8 inputs, 2:4: group 0 keeps columns 1 and 3, group 1 only column 6 (padded with column 4)
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    w = torch.tensor([[0.0, 1.0, 0.0, -2.0, 0.0, 0.0, 3.0, 0.0]])
    res = rtn(w)
    with torch.no_grad():
        model[0].weight.copy_(res.quantized_matrix)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, {"0": [res]}, scale_dtype=torch.float32, n_m=(2, 4))
    with safe_open(path, framework="pt") as f:
        codes = unpack_bits(f.get_tensor("0.weight_codes"), BITS, 4).tolist()
        positions = unpack_bits(f.get_tensor("0.weight_positions"), 2, 4).tolist()
    z = int(res.rounded_zeros[0, 0])
    assert positions == [1, 3, 0, 2]  # row-major: group 0 then group 1, increasing position in a group
    assert codes == [int(res.codes[0, 1]), int(res.codes[0, 3]), z, int(res.codes[0, 6])]
    assert read_metadata(path)["0"]["n_m"] == [2, 4]
    fresh = nn.Sequential(nn.Linear(8, 1, bias=False))
    assert torch.equal(load_quantized(path, fresh)[0].weight, model[0].weight)


def test_conv_groups_run_along_input_channels():
    N, M = 2, 4
    model, _ = sparse_net(N, M)
    w = model.conv.weight.reshape(6, -1)
    # the pattern holds per kernel position (channel groups) but not along the flattened axis
    assert nonzeros_per_group(w, group_index(model.conv, M)).max() <= N
    assert nonzeros_per_group(w, torch.arange(w.shape[1]) // M).max() > N


# ------------------------------------------------------------------ round trips and sizes
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4)])
def test_round_trip_dense_and_packed_bit_exact(tmp_path, n_m):
    N, M = n_m
    model, results = sparse_net(N, M)
    for name in ("conv", "fc"):
        m = model.get_submodule(name)
        counts = nonzeros_per_group(m.weight.reshape(m.weight.shape[0], -1), group_index(m, M))
        assert counts.max() == N and counts.min() == 0  # full groups and groups below N
    dense_path, nm_path = tmp_path / "dense.safetensors", tmp_path / "nm.safetensors"
    save_quantized(model, dense_path, results, scale_dtype=torch.float32)
    nm_size = save_quantized(model, nm_path, results, scale_dtype=torch.float32, n_m=n_m)
    assert theoretical_bytes(nm_path) < theoretical_bytes(dense_path)  # (a tiny model: headers dominate)
    expected = payload(model.conv, N, M, 4) + payload(model.fc, N, M, 4) + other_bytes(model)
    assert theoretical_bytes(nm_path) == expected
    with safe_open(nm_path, framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert stored == expected
    meta = read_metadata(nm_path)
    assert meta["conv"]["n_m"] == [N, M] and meta["fc"]["n_m"] == [N, M]
    assert "n_m" not in read_metadata(dense_path)["conv"]  # dense files unchanged

    x = batches()[0]
    dense = load_quantized(nm_path, copy.deepcopy(sparse_net(N, M, seed=5)[0]))
    assert_same_state(dense, model)
    packed = load_quantized(nm_path, sparse_net(N, M, seed=5)[0], packed=True)
    assert isinstance(packed.conv, QuantizedConv2d) and isinstance(packed.fc, QuantizedLinear)
    assert packed.conv.n_m == (N, M) and packed.fc.n_m == (N, M)
    assert torch.equal(packed.conv.weight, model.conv.weight) and torch.equal(packed.fc.weight, model.fc.weight)
    assert torch.equal(packed(x), model(x))
    assert "n_m=(" in repr(packed.conv)

    # in memory: pack_model, re-export as it is, checkpoint -> prepare_for_load -> load_state_dict
    pm = pack_model(copy.deepcopy(model), results, scale_dtype=torch.float32, n_m=n_m)
    assert torch.equal(pm.fc.weight, model.fc.weight) and pm.fc.weight_positions.numel() > 0
    again = tmp_path / "again.safetensors"
    assert save_quantized(pm, again) == nm_size
    sd = pm.state_dict()
    target = sparse_net(N, M, seed=5)[0]
    assert sorted(prepare_for_load(target, sd)) == ["conv", "fc"]
    target.load_state_dict(sd)
    assert torch.equal(target.conv.weight, model.conv.weight) and torch.equal(target(x), model(x))
    # a densely packed model is re-packed N:M by pack_model(n_m=...), same weights
    dp = pack_model(copy.deepcopy(model), results, scale_dtype=torch.float32)
    assert dp.fc.n_m is None
    pack_model(dp, n_m=n_m)
    assert dp.fc.n_m == (N, M) and torch.equal(dp.fc.weight, model.fc.weight)


def test_sizes_of_a_2_4_export_with_float16_scales(tmp_path):
    model, results = sparse_net(2, 4)
    save_quantized(model, tmp_path / "d.safetensors", results)
    save_quantized(model, tmp_path / "n.safetensors", results, n_m=(2, 4))
    assert theoretical_bytes(tmp_path / "n.safetensors") == (
        payload(model.conv, 2, 4, 2) + payload(model.fc, 2, 4, 2) + other_bytes(model)
    )
    assert theoretical_bytes(tmp_path / "n.safetensors") < theoretical_bytes(tmp_path / "d.safetensors")
    # float16 scales: the loaded weights are those of the dense export, bit for bit
    a = load_quantized(tmp_path / "d.safetensors", sparse_net(2, 4, seed=5)[0])
    b = load_quantized(tmp_path / "n.safetensors", sparse_net(2, 4, seed=5)[0])
    assert_same_state(a, b)


def test_file_of_a_larger_2_4_linear_is_smaller(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    w = sparsify(model[0].weight.detach(), torch.arange(256) // 4, 2, 4, 0)
    res = rtn(w)
    with torch.no_grad():
        model[0].weight.copy_(res.quantized_matrix)
    dense = save_quantized(model, tmp_path / "d.safetensors", {"0": [res]})
    nm = save_quantized(model, tmp_path / "n.safetensors", {"0": [res]}, n_m=(2, 4))
    # codes 16384 -> 8192 bytes, + 4096 bytes of positions: 3 bits per weight instead of 4
    assert dense - nm > 4096 - 200
    assert theoretical_bytes(tmp_path / "n.safetensors") == payload(model[0], 2, 4, 2) + 128 * 4


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flattened", [False, True])
def test_violating_module_is_refused_before_anything_is_written(tmp_path, flattened):
    N, M = 2, 4
    model, results = sparse_net(N, M)
    if flattened:
        # a conv weight that is 2:4 along the flattened axis but not along the input channels
        name, m = "conv", model.conv
        w = sparsify(torch.randn(6, 72), torch.arange(72) // M, N, M, 0)
        assert nonzeros_per_group(w, group_index(m, M)).max() > N
    else:
        name, m = "fc", model.fc
        w = m.weight.detach().clone()
        w[3, 4:8] = torch.tensor([0.5, -0.25, 0.75, 0.0])  # 3 non-zeros in group 1 of row 3
    res = rtn(w)
    with torch.no_grad():
        m.weight.copy_(res.quantized_matrix.reshape(m.weight.shape))
    results[name] = [res]
    before = copy.deepcopy(model.state_dict())
    if flattened:
        match = r"module 'conv'.*not 2:4 sparse: row \d+, group \d+ .*has [34] non-zero"
    else:
        match = r"module 'fc'.*not 2:4 sparse: row 3, group 1 .*has 3 non-zero"
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "m.safetensors", results, n_m=(N, M))
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        pack_model(model, results, n_m=(N, M))
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.fc, nn.Linear)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("n_m", [(0, 4), (4, 4), (2, 1), "2:4", (2.0, 4)])
def test_bad_n_m_argument(tmp_path, n_m):
    model, results = sparse_net(2, 4)
    with pytest.raises(ValueError, match="n_m"):
        save_quantized(model, tmp_path / "m.safetensors", results, n_m=n_m)
    assert not os.listdir(tmp_path)


def test_m_not_dividing_the_inputs_is_refused(tmp_path):
    model, results = sparse_net(2, 4)
    with pytest.raises(ValueError, match=r"module 'conv'.*M=16 does not divide the 8 input channels"):
        save_quantized(model, tmp_path / "m.safetensors", results, n_m=(2, 16))
    assert not os.listdir(tmp_path)


def set_fc(key, value):
    return lambda p: rewrite(p, modules_fn=lambda mods: mods["fc"].__setitem__(key, value))


def drop_n_m(path):
    rewrite(path, modules_fn=lambda mods: mods["fc"].pop("n_m"))


def swap_positions(path):  # positions of the first group of fc no longer increasing
    def fn(t):
        pos = unpack_bits(t["fc.weight_positions"], 2, 8 * 24 // 2).clone()
        pos[0], pos[1] = 3, 1
        t["fc.weight_positions"] = pack_bits(pos, 2)

    rewrite(path, tensors_fn=fn)


def no_positions(path):
    rewrite(path, tensors_fn=lambda t: t.pop("fc.weight_positions"))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (set_fc("n_m", [4, 4]), r"module 'fc'.*n_m must be a pair"),
        (set_fc("n_m", [0, 4]), r"module 'fc'.*n_m must be a pair"),
        (set_fc("n_m", [2, 5]), r"module 'fc'.*M=5 does not divide the 24 inputs"),
        (set_fc("n_m", None), r"module 'fc'.*n_m must be a pair"),
        (set_fc("n_m", "2:4"), r"module 'fc'.*n_m must be a pair"),
        (set_fc("n_m", [1, 4]), r"module 'fc'.*weight_codes must be uint8 of shape"),
        (drop_n_m, r"module 'fc'.*weight_codes must be uint8 of shape \(96,\)"),
        (no_positions, r"module 'fc' lacks the tensors \['fc.weight_positions'\]"),
        (swap_positions, r"module 'fc'.*strictly increasing"),
    ],
)
def test_corrupted_nm_file_is_refused_and_model_untouched(tmp_path, corrupt, match):
    model, results = sparse_net(2, 4)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results, n_m=(2, 4))
    corrupt(path)
    target = sparse_net(2, 4, seed=5)[0]
    before = copy.deepcopy(target.state_dict())
    assert_load_refused(path, target, match)
    with pytest.raises(ValueError, match=match):
        prepare_for_load(target, path)
    assert isinstance(target.fc, nn.Linear)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------ end to end
def test_compress_model_2_4_then_export_and_load(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    report = compress_model(model, batches(), bits=4, n_m=(2, 4), keep_results=True)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report, scale_dtype=torch.float32, n_m=(2, 4))
    save_quantized(model, tmp_path / "d.safetensors", report, scale_dtype=torch.float32)
    assert theoretical_bytes(path) < theoretical_bytes(tmp_path / "d.safetensors")
    assert read_metadata(path)["conv"]["n_m"] == [2, 4]
    x = batches()[0]
    torch.manual_seed(3)
    loaded = load_quantized(path, Net().eval())
    assert_same_state(loaded, model)
    torch.manual_seed(3)
    packed = load_quantized(path, Net().eval(), packed=True)
    assert torch.equal(packed(x), model(x))
