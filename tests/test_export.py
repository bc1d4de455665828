"""Packed export: bit packing, safetensors round trips, sizes, corrupted files, atomic writes, packed
modules, Lightning checkpoints, and OBCQuantize(export_path=...)."""

import copy
import csv
import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from classifier_steps import ClassifierSteps
from quiet_trainer import quiet_trainer
from safetensors_edit import rewrite
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import obc_lightning.export.write as export_write
from obc_lightning.callback import OBCQuantize
from obc_lightning.compress import compress_model
from obc_lightning.export import (
    load_quantized,
    pack_model,
    prepare_for_load,
    save_quantized,
    theoretical_bytes,
    unpack_model,
)
from obc_lightning.grids import fit_grid
from obc_lightning.packed import QuantizedConv2d, QuantizedLinear, pack_bits, unpack_bits
from obc_lightning.solvers.common import QuantResult

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


# ------------------------------------------------------------------ bit packing
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13, 1001])
def test_pack_round_trip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 2**bits, (n,), generator=g)
    v[: min(n, 2)] = 2**bits - 1  # the extreme code is always present
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(n * bits / 8)  # dense, not one byte per value
    assert torch.equal(unpack_bits(p, bits, n).long(), v)


def test_pack_bit_order_is_lsb_first():
    # the bytes read as one little-endian integer are sum_i v_i << (3 i)
    v = [5, 3, 7, 1, 6]
    as_int = int.from_bytes(bytes(pack_bits(torch.tensor(v), 3).tolist()), "little")
    assert as_int == sum(x << (3 * i) for i, x in enumerate(v))


def test_pack_rejects_out_of_range_and_bad_length():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="take 4 bytes, got 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)


# ------------------------------------------------------------------ a tiny model quantized by compress_model
class Tiny(nn.Module):
    """Linear + Conv2d + a grouped Conv2d + BatchNorm (buffers that must survive the round trip)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.gconv(self.bn(self.conv(x)).relu()).flatten(1))


def calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 2, 4, 4, generator=g) for _ in range(2)]


def quantized_tiny(bits=4, group_size=None, symmetric=False, scale_dtype=torch.float16):
    model = Tiny()
    model.train()
    for x in calibration():  # non-trivial BatchNorm statistics
        model(x)
    model.eval()
    report = compress_model(
        model, calibration(), bits, group_size=group_size, symmetric=symmetric, keep_results=True,
        scale_dtype=scale_dtype,
    )
    assert report.quantized == ["conv", "gconv", "fc"]
    return model, report


def fresh_tiny():
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1)
    m.eval()
    return m


def expected_weight(report, name, weight, scale_dtype):
    """s * (code - zero) from the results, with s rounded to the stored dtype (computed independently)."""
    res = report.results[name]
    codes = torch.cat([r.codes for r in res]).float()
    s = torch.cat([r.scales for r in res]).to(scale_dtype).float()
    z = torch.cat([r.rounded_zeros for r in res]).float()
    gs, cols = res[0].grid.group_size, codes.shape[1]
    g = torch.arange(cols) // gs if gs else torch.zeros(cols, dtype=torch.long)
    return (s[:, g] * (codes - z[:, g])).reshape(weight.shape)


CONFIGS = [(2, None, False), (3, 4, False), (4, 8, True), (5, 5, False), (8, None, True)]


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_round_trip_fp32_scales_is_bit_exact(tmp_path, bits, group_size, symmetric):
    model, report = quantized_tiny(bits, group_size, symmetric)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report, scale_dtype=torch.float32)
    loaded = load_quantized(path, fresh_tiny())
    for k, v in model.state_dict().items():  # quantized weights, biases, BatchNorm statistics
        assert torch.equal(loaded.state_dict()[k], v), k
    x = calibration()[0]
    assert torch.equal(loaded(x), model(x))

    packed = load_quantized(path, fresh_tiny(), packed=True)
    assert isinstance(packed.conv, QuantizedConv2d) and isinstance(packed.fc, QuantizedLinear)
    assert isinstance(packed.gconv, QuantizedConv2d) and packed.gconv.groups == 2
    assert torch.equal(packed(x), model(x))  # forward of the packed modules == the dense model


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS[:3])
@pytest.mark.parametrize("grid_scale_dtype", [torch.float16, None])
def test_round_trip_fp16_scales(tmp_path, bits, group_size, symmetric, grid_scale_dtype):
    model, report = quantized_tiny(bits, group_size, symmetric, scale_dtype=grid_scale_dtype)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report)
    loaded = load_quantized(path, fresh_tiny())
    for name in report.quantized:
        w, q = loaded.get_submodule(name).weight, model.get_submodule(name).weight
        assert torch.equal(w, expected_weight(report, name, q, torch.float16)), name
        if grid_scale_dtype == torch.float16:  # compress_model's default: the file is the model, bit for bit
            assert torch.equal(w, q), name
        else:  # fp32 grid: |fp16(s) - s| <= 2**-11 |s|, so each weight moves by at most 2**-11 of itself
            assert ((w - q).abs() <= q.abs() * 2**-11).all(), name
            assert not torch.equal(w, q), name
    assert torch.equal(loaded.bn.running_var, model.bn.running_var)
    assert torch.equal(loaded.conv.bias, model.conv.bias)
    packed = load_quantized(path, fresh_tiny(), packed=True)
    x = calibration()[0]
    assert torch.equal(packed(x), loaded(x))


def test_weight_changed_after_compress_is_refused(tmp_path):
    model, report = quantized_tiny(3)
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="'fc'.*not on the grid"):
        save_quantized(model, tmp_path / "m.safetensors", report)
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="keep_results=True"):
        save_quantized(model, tmp_path / "m.safetensors", compress_model(Tiny(), calibration(), 4))


# ------------------------------------------------------------------ file size
def rtn(weight, bits, group_size):
    grid = fit_grid(weight, bits, group_size=group_size, mse=False)
    codes = grid.codes(weight)
    return QuantResult(grid.dequantize(codes), grid.scales, grid.zeros, codes, torch.zeros(weight.shape[0]), grid)


def test_file_size_within_two_percent_of_packed_payload(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 256), nn.BatchNorm1d(256), nn.Linear(256, 10))
    results = {}
    for name, bits, gs in (("0", 3, 128), ("2", 4, None)):
        m = model.get_submodule(name)
        results[name] = [rtn(m.weight.detach(), bits, gs)]
        with torch.no_grad():
            m.weight.copy_(results[name][0].quantized_matrix)
    size = save_quantized(model, tmp_path / "m.safetensors", results)
    theory = (
        1024 * 256 * 3 // 8
        + 256 * 8 * (2 + 1)  # 3-bit codes; fp16 scale + uint8 zero per row and group
        + 10 * 256 * 4 // 8
        + 10 * 1 * (2 + 1)
        + (256 + 10) * 4  # biases
        + 4 * 256 * 4
        + 8  # BatchNorm weight, bias, running mean / var, num_batches_tracked
    )
    assert theoretical_bytes(tmp_path / "m.safetensors") == theory
    assert size == os.path.getsize(tmp_path / "m.safetensors")
    # the file is the payload plus the safetensors header, nothing else; the header (names, shapes,
    # the module descriptions and a SHA-256 per tensor since format_version 2) stays a few hundred bytes
    # per tensor: 2.4 % of this 110 kB model, 0.02 % of a 10 MB one
    head = int.from_bytes((tmp_path / "m.safetensors").read_bytes()[:8], "little")
    assert size == theory + 8 + head
    assert head <= 250 * 12, head  # 12 tensors
    # and far below fp32
    assert size < sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 7


# ------------------------------------------------------------------ corrupted and mismatched files
@pytest.fixture
def saved(tmp_path):
    model, report = quantized_tiny(4, 8)
    path = tmp_path / "m.safetensors"
    save_quantized(model, path, report)
    return path


def snapshot(model):
    return copy.deepcopy(model.state_dict())  # packed modules add their description (a dict)


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def flip_header(path):
    data = bytearray(path.read_bytes())
    for i in range(20, 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_json(path):
    rewrite(path, meta_fn=lambda m: m.update(modules=m["modules"][:-5]))


def bad_bits(path):
    def f(meta):
        mods = json.loads(meta["modules"])
        mods["fc"]["bits"] = 9
        meta["modules"] = json.dumps(mods)

    rewrite(path, meta_fn=f)


def short_codes(path):
    rewrite(path, tensors_fn=lambda t: t.update({"fc.weight_codes": t["fc.weight_codes"][:-1].clone()}))


def wrong_scales(path):
    rewrite(path, tensors_fn=lambda t: t.update({"conv.weight_scales": t["conv.weight_scales"].float()}))


def not_ours(path):
    rewrite(path, meta_fn=lambda m: m.update(format="something-else"))


def missing_bias(path):
    rewrite(path, tensors_fn=lambda t: t.pop("fc.bias"))


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (truncate, "not a readable safetensors file"),
        (flip_header, "not a readable safetensors file"),
        (bad_json, "'modules' is not valid JSON"),
        (bad_bits, "module 'fc'.*bits must be an integer in \\[2, 8\\], got 9"),
        (short_codes, "module 'fc'.*weight_codes must be uint8 of shape \\(160,\\)"),
        (wrong_scales, "module 'conv'.*weight_scales must be float16"),
        (not_ours, "not an obc_lightning export"),
        (missing_bias, r"missing from the file: \['fc.bias'\]"),
    ],
)
def test_corrupted_file_is_refused_and_model_untouched(saved, corrupt, match):
    corrupt(saved)
    for packed in (False, True):
        model = fresh_tiny()
        before = snapshot(model)
        with pytest.raises(ValueError, match=match):
            load_quantized(saved, model, packed=packed)
        assert_untouched(model, before)
        assert isinstance(model.fc, nn.Linear)


class NoFc(nn.Module):
    def __init__(self, fc=None):
        super().__init__()
        t = Tiny()
        self.conv, self.bn, self.gconv = t.conv, t.bn, t.gconv
        if fc is not None:
            self.fc = fc


class BiggerBn(Tiny):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, affine=False)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: NoFc(), "quantizes module 'fc', which the model does not have"),
        (lambda: NoFc(nn.Linear(64, 6)), "module 'fc' has a weight of shape \\[6, 64\\], the file holds \\[5, 64\\]"),
        (lambda: NoFc(nn.Conv1d(64, 5, 1)), "module 'fc' is a Conv1d, the file holds a Linear"),
        (BiggerBn, r"not in the model: \['bn.bias', 'bn.weight'\]"),
    ],
)
def test_mismatched_model_is_refused_and_untouched(saved, make, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_quantized(saved, model)
    assert_untouched(model, before)


# ------------------------------------------------------------------ atomic writes
def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model, report = quantized_tiny(3)
    path = tmp_path / "m.safetensors"
    real_save = export_write._write_safetensors

    def dies_mid_write(f, header, tensors):
        f.write(b"\x00" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_write, "_write_safetensors", dies_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, path, report)
    assert os.listdir(tmp_path) == []  # no final file, no temporary file

    monkeypatch.setattr(export_write, "_write_safetensors", real_save)
    save_quantized(model, path, report)
    old = path.read_bytes()
    monkeypatch.setattr(export_write, "_write_safetensors", dies_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, path, report, scale_dtype=torch.float32)
    assert os.listdir(tmp_path) == ["m.safetensors"] and path.read_bytes() == old
    load_quantized(path, fresh_tiny())  # still the complete old file


# ------------------------------------------------------------------ packed modules in memory
def test_pack_model_state_dict_and_dtype_moves():
    model, report = quantized_tiny(3, 4)
    dense = copy.deepcopy(model)
    pack_model(model, report, scale_dtype=torch.float32)
    x = calibration()[0]
    assert torch.equal(model(x), dense(x))
    assert model.fc.weight_codes.dtype == torch.uint8 and model.fc.weight_codes.numel() == math.ceil(5 * 64 * 3 / 8)
    assert "fc.weight" not in model.state_dict()

    # state_dict round trip into a dense model of the same architecture, through torch's safe loader
    sd = model.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = fresh_tiny()
    assert sorted(prepare_for_load(other, sd)) == ["conv", "fc", "gconv"]
    other.load_state_dict(sd)
    assert torch.equal(other(x), dense(x))

    # .double() changes the compute dtype, never the stored scales; back to float32 is still exact
    other.double()
    assert other.fc.weight_scales.dtype == torch.float32 and other.fc.weight.dtype == torch.float64
    assert other(x.double()).dtype == torch.float64
    other.float()
    assert torch.equal(other(x), dense(x))
    other.fc.cache_weight = True
    assert other.fc.weight is other.fc.weight

    # a packed module refuses the state of another layout
    wrong = quantized_tiny(2)[0]
    pack_model(wrong, quantized_tiny(2)[1])
    before = snapshot(wrong)
    with pytest.raises(ValueError, match="saved for .*'bits': 3.*prepare_for_load"):
        wrong.load_state_dict(sd)
    assert_untouched(wrong, before)

    # save from the packed model (no results needed), and unpack back to dense modules
    unpack_model(other)
    assert type(other.fc) is nn.Linear and type(other.gconv) is nn.Conv2d and other.gconv.groups == 2
    assert torch.equal(other(x), dense(x))


def test_save_from_packed_model_equals_save_from_results(tmp_path):
    model, report = quantized_tiny(4, 8)
    save_quantized(model, tmp_path / "a.safetensors", report)
    pack_model(model, report)
    save_quantized(model, tmp_path / "b.safetensors")
    a, b = (
        load_quantized(tmp_path / "a.safetensors", fresh_tiny()),
        load_quantized(tmp_path / "b.safetensors", fresh_tiny()),
    )
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


# ------------------------------------------------------------------ Lightning
class LitTiny(ClassifierSteps, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Tiny()

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_load_checkpoint(self, checkpoint):
        prepare_for_load(self, checkpoint)  # packed modules must exist before the weights are loaded


def lit_data(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, 4, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())


def test_lightning_checkpoint_of_packed_model_loads_back(tmp_path):
    model = LitTiny().eval()
    report = compress_model(model, calibration(), 3, keep_results=True)
    pack_model(model, report)
    t = quiet_trainer(tmp_path)
    val = DataLoader(lit_data(16), batch_size=8)
    t.validate(model, val, verbose=False)
    ckpt = tmp_path / "packed.ckpt"
    t.save_checkpoint(ckpt)
    x = calibration()[0]

    restored = LitTiny.load_from_checkpoint(ckpt).eval()
    assert isinstance(restored.net.fc, QuantizedLinear)
    assert torch.equal(restored(x), model(x))

    fresh = LitTiny()
    out = quiet_trainer(tmp_path).validate(fresh, val, ckpt_path=ckpt, verbose=False)
    assert isinstance(fresh.net.gconv, QuantizedConv2d) and torch.equal(fresh.eval()(x), model(x))
    assert out[0]["val_loss"] == pytest.approx(t.callback_metrics["val_loss"].item())


def test_callback_export_path_end_to_end(tmp_path):
    model = LitTiny()
    path = tmp_path / "out" / "model.safetensors"
    cb = OBCQuantize(bits=4, calibration_batches=2, evaluate=False, plot=False, verbose=False, export_path=path)
    t = quiet_trainer(tmp_path, callbacks=[cb])
    t.fit(model, DataLoader(lit_data(), batch_size=8))

    file_mb = os.path.getsize(path) / 2**20
    assert cb.metrics["obc/file_mb"] == cb.metrics["obc/size_mb_after"] == pytest.approx(file_mb)
    assert cb.report.results is None  # the codes are not kept twice
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("obc/file_mb")]
    assert float(rows[-1]["obc/file_mb"]) == pytest.approx(file_mb)
    assert float(rows[-1]["obc/size_mb_after"]) == pytest.approx(file_mb)

    loaded = load_quantized(path, LitTiny().eval())
    x = calibration()[0]
    for name in ("net.conv", "net.gconv", "net.fc"):
        w, q = loaded.get_submodule(name).weight, model.get_submodule(name).weight
        assert ((w - q).abs() <= q.abs() * 2**-11).all(), name  # only the fp16 rounding of the scales
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-3)


@pytest.mark.parametrize("bad", [3, "", b"x.safetensors"])
def test_callback_rejects_bad_export_path(bad):
    with pytest.raises(ValueError, match="export_path"):
        OBCQuantize(export_path=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_model_moves_to_cuda():
    model, report = quantized_tiny(3, 8)
    pack_model(model, report)
    dense = unpack_model(copy.deepcopy(model)).cuda()
    model.cuda()
    assert model.fc.weight_codes.is_cuda and model.fc.weight_scales.dtype == torch.float16
    x = calibration()[0].cuda()
    assert torch.equal(model.fc.weight, dense.fc.weight) and torch.allclose(model(x), dense(x))
    model.cpu()
    assert torch.equal(model.fc.weight, dense.fc.weight.cpu())
