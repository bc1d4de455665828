"""Issue 25, item 3 and 4: the compressed model carries its quantization state. After compress_model (no
keep_results) or fine-tuning, save_quantized(model, path) and pack_model(model) need no report; the
report's sizes are the payload of the file for every scheme; a weight no longer in its recorded format
is refused, naming the module; the records stay out of the state dict and follow the model's lifecycle."""

import copy
import os

import pytest
import torch
from torch import nn

import obc_lightning.scheduling as scheduling
from obc_lightning import (
    CompressionConfig,
    FinetuneSession,
    ModelSnapshot,
    compress_model,
    compress_stage,
    export_stage,
    load_quantized,
    pack_model,
    save_quantized,
    unpack_model,
)
from obc_lightning.export import read_metadata
from obc_lightning.formats import (
    MixedScheme,
    PQScheme,
    ScalarNMScheme,
    ScalarScheme,
    SparseMaskScheme,
    SparseNMScheme,
    format_of,
)
from obc_lightning.formats.schemes import payload_bits, payload_nbytes
from obc_lightning.packed import QuantizedConv2d, QuantizedLinear

pytestmark = pytest.mark.filterwarnings("ignore::obc_lightning.calibration.CalibrationWarning")


class Net(nn.Module):
    """A conv, a grouped conv and a Linear; every input count divisible by 4 (N:M groups) and by the PQ
    block size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(self.gconv(self.conv(x).relu()).flatten(1))


def batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 4, 4, 4, generator=g) for _ in range(n)]


CASES = {
    "scalar": dict(bits=4),
    "grouped": dict(bits=3, group_size=8),
    "symmetric": dict(bits=5, symmetric=True),
    "n:m codes": dict(bits=4, n_m=(2, 4)),
    "sparse codes": dict(bits=4, sparsity=0.5),
    "n:m floats": dict(bits=None, n_m=(2, 4)),
    "bitmask floats": dict(bits=None, sparsity=0.5),
    "pq": dict(method="pq", block_size=4, n_centroids=8, exclude="gconv"),
}
FORMATS = {
    "scalar": ScalarScheme, "grouped": ScalarScheme, "symmetric": ScalarScheme, "n:m codes": ScalarNMScheme,
    "sparse codes": ScalarScheme, "n:m floats": SparseNMScheme, "bitmask floats": SparseMaskScheme, "pq": PQScheme,
}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_save_needs_no_report_and_the_report_sizes_are_the_files_payload(tmp_path, case):
    model = Net()
    report = compress_model(model, batches(), **CASES[case])
    assert report.results is None  # nothing kept: the modules carry their formats
    for r in report.modules:
        assert type(format_of(model.get_submodule(r.name))) is FORMATS[case], r.name

    size = save_quantized(model, tmp_path / "m.safetensors")
    assert size == os.path.getsize(tmp_path / "m.safetensors")
    configs = read_metadata(tmp_path / "m.safetensors")
    assert sorted(configs) == sorted(report.quantized)
    for r in report.modules:  # one size formula: the report's is the file's, byte for byte
        cfg, bias = configs[r.name], model.get_submodule(r.name).bias.numel() * 4
        assert r.bytes_after == payload_nbytes(cfg) + bias, r.name
        assert r.weight_bits == payload_bits(cfg), r.name
        assert "n_m" not in cfg if "n:m" not in case else cfg["n_m"] == [2, 4]

    loaded = load_quantized(tmp_path / "m.safetensors", Net())
    floats = CASES[case].get("bits", 0) is None  # pruned float weights are stored in float16
    for k, v in model.state_dict().items():
        expected = v.half().float() if floats and k.endswith("weight") else v
        assert torch.equal(loaded.state_dict()[k], expected), k


@pytest.mark.parametrize("case", ["grouped", "n:m codes", "n:m floats", "bitmask floats", "pq"])
def test_the_file_is_the_one_the_results_give(tmp_path, case):
    # the codes recomputed from the weight are the solver's codes: the same bytes as the report path
    model = Net()
    report = compress_model(model, batches(), keep_results=True, **CASES[case])
    save_quantized(model, tmp_path / "carried.safetensors")
    save_quantized(model, tmp_path / "results.safetensors", report, n_m=CASES[case].get("n_m"))
    assert (tmp_path / "carried.safetensors").read_bytes() == (tmp_path / "results.safetensors").read_bytes()


def test_pack_model_needs_no_report():
    model = Net()
    compress_model(model, batches(), bits=4, group_size=8)
    dense = copy.deepcopy(model)
    pack_model(model)
    assert isinstance(model.conv, QuantizedConv2d) and isinstance(model.gconv, QuantizedConv2d)
    assert isinstance(model.fc, QuantizedLinear) and model.fc.group_size == 8
    x = batches(1)[0]
    assert torch.equal(model(x), dense(x))  # fp16 scales: compress_model rounded them already


def test_a_weight_no_longer_in_its_format_is_refused_naming_the_module(tmp_path):
    model = Net()
    compress_model(model, batches(), bits=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # trained further after compression
    model(batches(1)[0]).square().mean().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"module 'conv': its weight is not on the grid of its recorded 4-bit format"):
        save_quantized(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="module 'conv'"):
        pack_model(model)
    assert not os.listdir(tmp_path) and isinstance(model.conv, nn.Conv2d)

    pq = Net()
    compress_model(pq, batches(), method="pq", block_size=4, n_centroids=8, include="fc")
    with torch.no_grad():
        pq.fc.weight[2, 5] += 0.01
    with pytest.raises(ValueError, match=r"module 'fc': .* sub-vector 1 of row 2 \(inputs 4 ... 7\) is none of its 8"):
        save_quantized(pq, tmp_path / "m.safetensors")

    nm = Net()
    compress_model(nm, batches(), bits=None, n_m=(2, 4), include="fc")
    with torch.no_grad():
        nm.fc.weight[0, :4] = 1.0
    with pytest.raises(ValueError, match=r"module 'fc': the weight is not 2:4 sparse: row 0, group 0"):
        save_quantized(nm, tmp_path / "m.safetensors")
    assert not os.listdir(tmp_path)


def test_the_record_is_small_and_outside_the_state_dict():
    model, plain = Net(), Net()
    compress_model(model, batches(), bits=4, group_size=8)
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay plain
    fmt = format_of(model.fc)
    # grid scales and zero points per row and group, no codes: rows x n_groups each, on the CPU
    assert fmt.scales.shape == fmt.zeros.shape == (6, 16) and fmt.scales.device.type == "cpu"
    assert format_of(model.gconv).scales.shape == (8, 5)  # both conv groups' rows, 36 inputs in groups of 8
    pq = Net()
    compress_model(pq, batches(), method="pq", block_size=4, n_centroids=8, include="fc")
    assert format_of(pq.fc).codebook.shape == (8, 4) and format_of(pq.conv) is None
    copied = copy.deepcopy(model)
    assert torch.equal(format_of(copied.fc).scales, fmt.scales)


def test_tied_weights_carry_one_format_under_every_name(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x).relu())

    model = Tied()
    compress_model(model, [torch.randn(16, 8) for _ in range(2)], bits=3)
    assert format_of(model.a) is format_of(model.b) is not None
    save_quantized(model, tmp_path / "m.safetensors", scale_dtype=torch.float32)
    fresh = Tied()
    load_quantized(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh.a.weight, model.a.weight) and fresh.b.weight is fresh.a.weight


def test_a_failed_compression_records_nothing_and_keeps_earlier_records(monkeypatch):
    model = Net()
    compress_model(model, batches(), bits=4, include="conv")
    earlier = format_of(model.conv)
    real, calls = scheduling.quantize_weights, []  # compress_model solves through this name

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduling, "quantize_weights", fails_second)
    with pytest.raises(RuntimeError, match="solver failed"):
        compress_model(model, batches(), bits=3, exclude="conv")
    assert format_of(model.conv) is earlier and format_of(model.gconv) is None and format_of(model.fc) is None


def test_snapshot_restores_the_records_it_saw(tmp_path):
    model = Net()
    snapshot = ModelSnapshot(model)
    compress_model(model, batches(), bits=4)
    snapshot.restore()
    assert format_of(model.fc) is None
    with pytest.raises(ValueError, match="nothing to export: no module carries a quantization format"):
        save_quantized(model, tmp_path / "m.safetensors")
    compress_model(model, batches(), bits=4)
    fmt = format_of(model.fc)
    snapshot = ModelSnapshot(model)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    FinetuneSession.begin(model, "ternary", names=["fc"]).abort()  # the latent weights are in no format
    assert format_of(model.fc) is None
    snapshot.restore()
    assert format_of(model.fc) is fmt
    save_quantized(model, tmp_path / "m.safetensors")


def test_load_and_unpack_carry_the_files_formats(tmp_path):
    model = Net()
    compress_model(model, batches(), bits=4, n_m=(2, 4), exclude="fc")
    compress_model(model, batches(), method="pq", block_size=4, n_centroids=8, include="fc")
    first = tmp_path / "first.safetensors"
    save_quantized(model, first)
    loaded = load_quantized(first, Net())
    save_quantized(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == first.read_bytes()
    packed = load_quantized(first, Net(), packed=True)
    unpack_model(packed)
    assert type(format_of(packed.conv)) is ScalarNMScheme and type(format_of(packed.fc)) is PQScheme
    save_quantized(packed, tmp_path / "unpacked.safetensors")
    assert (tmp_path / "unpacked.safetensors").read_bytes() == first.read_bytes()


# ------------------------------------------------------------------ fine-tuning records what it leaves
FINETUNED = {  # mode: (compress_model keywords, the format fine-tuning leaves, the file's scheme)
    "ste": (dict(bits=3), ScalarScheme, "affine"),
    "ste n:m": (dict(bits=3, n_m=(2, 4)), ScalarNMScheme, "affine"),
    "pq": (dict(method="pq", block_size=4, n_centroids=8, exclude="gconv"), PQScheme, "pq"),
    "masked": (dict(bits=None, n_m=(2, 4)), SparseNMScheme, "sparse"),
    "ternary": (None, PQScheme, "pq"),
    "noise": (None, MixedScheme, "mixed"),
}


@pytest.mark.parametrize("mode", list(FINETUNED))
def test_a_finished_session_records_its_formats_and_saves_without_results(tmp_path, mode):
    kwargs, scheme, stored = FINETUNED[mode]
    model = Net()
    names = ["conv", "fc"]
    if kwargs is not None:
        report = compress_model(model, batches(), **kwargs)
        names = report.quantized
    finetune = mode.split()[0]
    masks = {n: model.get_submodule(n).weight.detach() != 0 for n in names} if "n_m" in (kwargs or {}) else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session = FinetuneSession.begin(model, finetune, names=[] if finetune == "masked" else names, masks=masks,
                                    optimizer=opt)
    for x in batches(3):
        model(x).square().mean().backward()
        session.after_backward()
        session.before_optimizer_step()
        opt.step()
        opt.zero_grad()
    assert session.finish(export=False) == {}
    quantizers = session.quantizers
    for name in names:
        fmt = format_of(model.get_submodule(name))
        assert type(fmt) is scheme, (name, fmt)
    save_quantized(model, tmp_path / "m.safetensors", value_dtype=torch.float32)
    configs = read_metadata(tmp_path / "m.safetensors")
    assert {configs[n]["scheme"] for n in names} == {stored}
    fresh = load_quantized(tmp_path / "m.safetensors", Net())
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for name in names:  # the quantizers' sizes are their schemes' sizes: the file's payload before padding
        numel = model.get_submodule(name).weight.numel()
        if mode != "ste n:m" and mode != "masked":  # the quantizers count dense codes / a bitmask
            assert quantizers[name].storage_bits(numel) == payload_bits(configs[name]), name


def test_pipeline_exports_what_the_modules_carry(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = CompressionConfig.from_flat("test", bits=3, export_path=str(tmp_path / "m.safetensors"))
    stage = compress_stage(model, [torch.randn(16, 8) for _ in range(2)], config)
    assert stage.report.results is None
    metrics = export_stage(model, config)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    load_quantized(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert metrics["obc/file_mb"] * 2**20 == os.path.getsize(tmp_path / "m.safetensors")


def test_pq_codes_from_a_weight_are_exact_with_equal_and_almost_equal_rows():
    g = torch.Generator().manual_seed(0)
    book = torch.randn(16, 4, generator=g).half().float()
    book[7] = book[3]  # equal rows: the first is the code
    book[9] = book[4]
    book[9, 0] = torch.nextafter(book[4, 0], torch.tensor(10.0))  # a rounding near-tie for the distances
    codes = torch.randint(0, 16, (6, 10), generator=g)
    weight = book[codes].reshape(6, 40)
    found = PQScheme(book, 4).codes("m", weight)
    assert torch.equal(found, torch.where(codes == 7, 3, codes))


def test_a_module_registered_twice_is_written_under_both_names_as_with_results(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.c = nn.Linear(8, 4)

        def forward(self, x):
            return self.c(self.b(self.a(x).relu()).relu())

    model = Twice()
    report = compress_model(model, [torch.randn(32, 8) for _ in range(2)], bits=3, keep_results=True)
    save_quantized(model, tmp_path / "carried.safetensors")
    save_quantized(model, tmp_path / "results.safetensors", report)
    assert sorted(read_metadata(tmp_path / "carried.safetensors")) == ["a", "b", "c"]
    assert (tmp_path / "carried.safetensors").read_bytes() == (tmp_path / "results.safetensors").read_bytes()
