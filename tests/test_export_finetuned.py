"""Packed export of fine-tuned models: trained ternary weights (TTQ) as a 3-entry scalar codebook, DiffQ
weights in the "mixed" scheme (a bit width per group, a range per row). The format against bytes
worked out by hand, round trips (dense, packed, checkpoint), sizes, and bad inputs refused before
anything is written or changed."""

import copy
import io
import math
import os

import pytest
import torch
from model_state import assert_load_refused, assert_same_state
from safetensors_edit import rewrite
from torch import nn

from obc_lightning.export import (
    load_quantized,
    pack_model,
    prepare_for_load,
    read_metadata,
    save_quantized,
    theoretical_bytes,
)
from obc_lightning.finetune import (
    NoiseQuantizer,
    TernaryQuantizer,
    attach,
    finalize_all,
)
from obc_lightning.grids import MixedGrid
from obc_lightning.packed import MIXED_KEYS, QuantizedConv2d, QuantizedLinear, payload_nbytes


class Net(nn.Module):
    """Conv2d (d = 27: 16-weight groups end with a short one) + BatchNorm + grouped Conv2d + Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # d = 36
        self.fc = nn.Linear(128, 4)

    def forward(self, x):  # (N, 3, 4, 4)
        h = self.bn(self.conv(x)).relu()
        return self.fc(self.gconv(h).relu().flatten(1))


MODULES = ("conv", "gconv", "fc")


def batch():
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def fresh_net():
    return Net().eval()


def finetuned(make, modules=MODULES):
    """A Net whose ``modules`` got the quantizer ``make(weight)``, finalized: (model, results)."""
    model = fresh_net()
    model.train()
    model(batch())  # non-trivial BatchNorm statistics
    model.eval()
    quantizers = {n: attach(model.get_submodule(n), make(model.get_submodule(n).weight)) for n in modules}
    results = {n: [q.result(model.get_submodule(n).parametrizations.weight.original)] for n, q in quantizers.items()}
    finalize_all(model, modules)
    return model, results, quantizers


def spread_widths(q: NoiseQuantizer, seed=0) -> NoiseQuantizer:
    """Bit logits drawn so that the rounded widths cover min_bits ... max_bits."""
    with torch.no_grad():
        q.logits.uniform_(-6, 6, generator=torch.Generator().manual_seed(seed))
    return q


def noise_net(**kw):
    return finetuned(lambda w: spread_widths(NoiseQuantizer(w, **kw)))



# ------------------------------------------------------------------ the format, by hand
def test_mixed_bytes_by_hand(tmp_path):
    # one row, range [0, 3]; groups of 2 at widths 2, 3, 2 (the last one short):
    # 2 bits: step 1 → 0, 0.4 → codes 0, 0; 3.0 → 3;  3 bits: step 3/7 → 1.3 → 3, 2.9 → 7
    model = nn.Sequential(nn.Linear(5, 1, bias=False))
    w = torch.tensor([[0.0, 0.4, 1.3, 2.9, 3.0]])
    with torch.no_grad():
        model[0].weight.copy_(w)
    q = NoiseQuantizer(w, group_size=2, min_bits=2, max_bits=4, init_bits=3)
    with torch.no_grad():
        q.logits.copy_(torch.tensor([[-3.0, 0.3, -3.0]]))  # b ≈ 2.09, 3.15, 2.09
    res = q.result(w)
    assert res.codes.tolist() == [[0, 0, 3, 7, 3]]
    assert torch.allclose(res.quantized_matrix, torch.tensor([[0.0, 0.0, 9 / 7, 3.0, 3.0]]))
    with torch.no_grad():
        model[0].weight.copy_(res.quantized_matrix)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, {"0": [res]})
    cfg = read_metadata(path)["0"]
    assert cfg == {
        "kind": "Linear", "scheme": "mixed", "shape": [1, 5], "group_size": 2, "min_bits": 2, "max_bits": 4,
        "bit_counts": [3, 2, 0], "scale_dtype": "float16", "dtype": "float32",
    }
    assert set(cfg) == set(MIXED_KEYS)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        # width 2: codes 0, 0, 3 → 0 | 0 << 2 | 3 << 4 = 48;  width 3: codes 3, 7 → 3 | 7 << 3 = 59
        assert f.get_tensor("0.weight_codes").tolist() == [48, 59]
        # widths − 2 = 0, 1, 0 at ceil(log2 3) = 2 bits → 0 | 1 << 2 | 0 << 4 = 4
        assert f.get_tensor("0.weight_bits").tolist() == [4]
        assert f.get_tensor("0.weight_range").tolist() == [[0.0, 3.0]]
    other = nn.Sequential(nn.Linear(5, 1, bias=False))
    load_quantized(path, other)
    assert torch.equal(other[0].weight, model[0].weight)


def test_mixed_grid_clamps_to_a_rounded_range_and_flat_rows_give_lo():
    w = torch.tensor([[0.1, 0.2, 0.30000001], [0.5, 0.5, 0.5]])
    grid = MixedGrid.from_weight(w, torch.tensor([[2.0], [3.0]]), group_size=3, range_dtype=torch.float16)
    assert grid.lo[0, 0] == torch.tensor(0.1).half().float() and grid.hi[0, 0] == torch.tensor(0.3).half().float()
    codes = grid.codes(w)
    assert codes.min() >= 0 and codes[0].max() <= 3  # w beyond the rounded range clamps, never 4 or -1
    assert codes[1].tolist() == [0, 0, 0]  # hi == lo: every code 0, every value lo
    assert torch.equal(grid.dequantize(codes)[1], torch.tensor(0.5).half().float().expand(3))


# ------------------------------------------------------------------ round trips and sizes
def test_noise_round_trip_dense_and_packed(tmp_path):
    model, results, quantizers = noise_net()
    widths = torch.cat([q.rounded_bits().flatten() for q in quantizers.values()])
    assert widths.unique().numel() == 7  # 2 ... 8 bits all in use
    path = tmp_path / "m.safetensors"
    size = save_quantized(model, path, results)
    configs = read_metadata(path)
    for name, q in quantizers.items():
        cfg = configs[name]
        w = model.get_submodule(name).weight
        rows, cols = w.shape[0], w[0].numel()
        per_entry = q.rounded_bits()[:, torch.arange(cols) // q.group_size].long()
        counts = [int((per_entry == b).sum()) for b in range(2, 9)]
        assert cfg["scheme"] == "mixed" and cfg["bit_counts"] == counts and sum(counts) == w.numel()
        # codes at their widths, byte-aligned per width + 3-bit widths per group + fp16 (lo, hi) per row
        expected = sum(math.ceil(n * b / 8) for n, b in zip(counts, range(2, 9)))
        expected += math.ceil(3 * rows * q.n_groups / 8) + rows * 2 * 2
        assert payload_nbytes(cfg) == expected
        assert abs(expected * 8 - q.storage_bits(w.numel())) < 8 * 7  # the estimate, but for byte padding
    # the payload is smaller than fp32 (this net is tiny: the header, with a SHA-256 per tensor, is not)
    head = int.from_bytes(path.read_bytes()[:8], "little")
    assert size == theoretical_bytes(path) + 8 + head
    assert theoretical_bytes(path) < sum(p.numel() * 4 for p in model.parameters())

    x = batch()
    dense = fresh_net()
    load_quantized(path, dense)
    assert_same_state(dense, model)  # bit for bit: the file holds exactly the finalized weights
    packed = fresh_net()
    load_quantized(path, packed, packed=True)
    assert isinstance(packed.conv, QuantizedConv2d) and isinstance(packed.fc, QuantizedLinear)
    assert packed.fc.scheme == "mixed" and "scheme=mixed, bits=2...8" in repr(packed.fc)
    assert torch.equal(packed(x), model(x))


def test_noise_round_trip_with_float32_ranges(tmp_path):
    model, results, _ = finetuned(lambda w: spread_widths(NoiseQuantizer(w, range_dtype=torch.float32), 1))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results, scale_dtype=torch.float32)
    assert read_metadata(path)["fc"]["scale_dtype"] == "float32"
    dense = fresh_net()
    load_quantized(path, dense)
    assert_same_state(dense, model)


def test_ternary_round_trip_as_three_entry_codebook(tmp_path):
    model, results, quantizers = finetuned(lambda w: TernaryQuantizer(w), modules=("gconv", "fc"))
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results)
    configs = read_metadata(path)
    assert sorted(configs) == ["fc", "gconv"]  # conv stays in full precision
    for name, q in quantizers.items():
        cfg = configs[name]
        assert (cfg["scheme"], cfg["block_size"], cfg["n_centroids"], cfg["bits"]) == ("pq", 1, 3, 2)
        numel = model.get_submodule(name).weight.numel()
        assert payload_nbytes(cfg) == math.ceil(2 * numel / 8) + 3 * 2 == q.storage_bits(numel) // 8
        w_p, w_n = q.stored_scales()
        assert set(model.get_submodule(name).weight.unique().tolist()) == {-w_n.item(), 0.0, w_p.item()}
    x = batch()
    for packed in (False, True):
        other = fresh_net()
        load_quantized(path, other, packed=packed)
        assert torch.equal(other(x), model(x))
    assert isinstance(other.gconv, QuantizedConv2d) and other.gconv.n_centroids == 3


def test_checkpoint_of_packed_mixed_model_loads_back():
    model, results, _ = noise_net()
    dense = copy.deepcopy(model)
    pack_model(model, results)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    other = fresh_net()
    assert sorted(prepare_for_load(other, ckpt)) == sorted(MODULES)  # placeholders of every layout
    other.load_state_dict(ckpt["state_dict"])
    x = batch()
    assert torch.equal(other(x), dense(x))


# ------------------------------------------------------------------ bad inputs
def weight_changed(model, results):
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3


def two_results(model, results):
    results["fc"] = results["fc"] * 2


@pytest.mark.parametrize(
    "spoil,kw,match",
    [
        (weight_changed, {}, r"module 'fc': its weight is not the dequantized MixedResult"),
        (two_results, {}, r"module 'fc': a mixed-precision module takes one MixedResult, got 2"),
        (None, {"scale_dtype": torch.bfloat16}, r"module '\w+': scale_dtype=bfloat16 cannot represent its ranges"),
    ],
)
def test_bad_noise_results_are_refused_before_anything_is_written(tmp_path, spoil, kw, match):
    model, results, _ = noise_net()
    if spoil:
        spoil(model, results)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "m.safetensors", results, **kw)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=match):
        pack_model(model, results, **kw)
    assert all(type(model.get_submodule(n)) is type(before.get_submodule(n)) for n in MODULES)
    assert_same_state(model, before)


def test_widths_above_8_bits_are_refused(tmp_path):
    model, results, _ = finetuned(lambda w: NoiseQuantizer(w, max_bits=12, init_bits=11))
    with pytest.raises(ValueError, match=r"module 'conv': mixed-precision codes are packed at 1 \.\.\. 8 bits"):
        save_quantized(model, tmp_path / "m.safetensors", results)
    assert os.listdir(tmp_path) == []


def test_ranges_beyond_float16_stay_exact_and_export_asks_for_a_wider_dtype(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1e5, 0.0, 3.0, 7e4], [0.5, 1.0, 1.5, 2.0]]))
    q = attach(model[0], NoiseQuantizer(model[0].weight, group_size=2, init_bits=4))
    results = {"0": [q.result(model[0].parametrizations.weight.original)]}
    finalize_all(model, ["0"])
    w = model[0].weight
    assert torch.isfinite(w).all() and w[0, 0] == -1e5 and w[0, 3] == 7e4  # row 0's range kept in float32
    assert w[1, 0] == 0.5 and w[1, 3] == 2.0  # row 1's range is exact in float16 anyway
    with pytest.raises(ValueError, match=r"module '0': scale_dtype=float16 cannot represent its ranges"):
        save_quantized(model, tmp_path / "m.safetensors", results)
    save_quantized(model, tmp_path / "m.safetensors", results, scale_dtype=torch.float32)
    other = nn.Sequential(nn.Linear(4, 2, bias=False))
    load_quantized(tmp_path / "m.safetensors", other)
    assert torch.equal(other[0].weight, w)


def one_width_changed(path):
    def edit(t):
        bits = t["fc.weight_bits"].clone()
        bits[0] ^= 1  # the first group's width moves by one: its weights change segment
        t["fc.weight_bits"] = bits

    rewrite(path, tensors_fn=edit)


def range_inverted(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_range": t["fc.weight_range"].flip(1).contiguous()}))


def min_not_below_max(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(min_bits=8))


def n_m_on_mixed(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(n_m=[2, 4]))


def counts_short(path):
    rewrite(path, modules_fn=lambda m: m["fc"].update(bit_counts=m["fc"]["bit_counts"][:-1]))


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (one_width_changed, r"module 'fc'.*weight_bits gives \[.*\] weights per width, the metadata says bit_counts"),
        (range_inverted, r"module 'fc'.*weight_range must hold finite \(lo, hi\) with lo <= hi"),
        (min_not_below_max, r"module 'fc': need integers 1 <= min_bits < max_bits <= 8, got 8, 8"),
        (n_m_on_mixed, r"module 'fc': n_m applies to the scalar and sparse schemes only, not to scheme 'mixed'"),
        (counts_short, r"module 'fc': bit_counts must be 7 non-negative integers"),
    ],
)
def test_corrupted_mixed_file_is_refused_and_model_untouched(tmp_path, corrupt, match):
    model, results, _ = noise_net()
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, results)
    corrupt(path)
    assert_load_refused(path, fresh_net(), match)
