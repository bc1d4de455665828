"""ONNX export (issue 31): every storage scheme runs in ONNX Runtime with the PyTorch compressed model's
outputs (1e-5 relative, float32), the file passes onnx.checker's full check and is within 10 % of
save_quantized's file where the codes keep their width (the wider containers are named and counted), and
bad input fails before anything is written, the model left as it was."""

import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from obc_lightning import compress_model, export_onnx, inference_session, pack_model, save_quantized  # noqa: E402
from obc_lightning.export import packed_entries  # noqa: E402
from obc_lightning.export.onnx import container_bits  # noqa: E402
from obc_lightning.formats import MixedScheme, scheme_of, set_format  # noqa: E402
from obc_lightning.grids import MixedGrid  # noqa: E402
from obc_lightning.models import CifarResNet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def small_resnet():
    """ResNet-20 (3x3 stem, option-A shortcuts, stages of 16 / 32 / 64 channels, pooled Linear) with one
    block per stage instead of three."""
    torch.manual_seed(0)
    return CifarResNet((16, 32, 64), (1, 1, 1), shortcut="A").eval()


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_ort(path, *inputs, **kw):
    session = inference_session(path, threads=1, **kw)
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feed)[0])


def rel_error(y, ref):
    return float((y - ref).norm() / ref.norm())


def container_extra(model, containers):
    """Bytes the wider containers add: the codes dense at their container's width against the packed
    codes (and N:M positions) of save_quantized."""
    extra = 0
    for name, (config, _, _) in packed_entries(model).items():
        if name in containers and config["scheme"] in ("affine", "symmetric"):
            buffers = scheme_of(config).buffers(config)
            packed = sum(buffers[k].nbytes for k in ("weight_codes", "weight_positions") if k in buffers)
            extra += math.prod(config["shape"]) * container_bits(config["bits"]) // 8 - packed
    return extra


def check_export(model, tmp_path, x, name, size=True, **kw):
    """Export, full check, ORT equal to PyTorch within 1e-5, size against save_quantized; the report."""
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, x, **kw)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with torch.no_grad():
        ref = model(*x) if isinstance(x, tuple) else model(x)
    y = run_ort(path, *(x if isinstance(x, tuple) else (x,)))
    assert rel_error(y, ref) < 1e-5
    assert report.nbytes == os.path.getsize(path)
    packed = save_quantized(model, tmp_path / f"{name}.safetensors")
    if size:  # a few kB of graph are the whole file of a tiny model
        assert report.nbytes <= 1.10 * (packed + container_extra(model, report.containers)), (report.nbytes, packed)
    return report, path


def test_resnet_at_2_3_4_8_bits_and_fast_mode(tmp_path):
    model = small_resnet()
    compress_model(model, [images(16)], bits={"conv1": 8, "layer1*": 2, "layer2*": 3, "layer3*": 4, "fc": 3},
                   solver="gptq", progress=False)
    report, path = check_export(model, tmp_path, images(), "widths")
    assert report.opset == 25  # uint2 codes
    assert report.modules["layer1.0.conv1"] == "Cast-Sub-Mul uint2 + Conv"
    assert report.modules["fc"].startswith("MatMulNBits 4-bit")  # 3-bit codes in a 4-bit MatMulNBits
    assert set(report.containers) == {"layer2.0.conv1", "layer2.0.conv2", "fc"}
    assert "3-bit codes in 4-bit containers" in report.containers["fc"]
    # fast: int8 activations inside MatMulNBits, the file unchanged; the same predictions here
    with torch.no_grad():
        ref = model(images())
    fast = run_ort(path, images(), mode="fast")
    assert rel_error(fast, ref) < 5e-2
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def test_size_target_mixed_widths(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    report = compress_model(model, [torch.randn(64, 32)], target_bits=3.0, bits=(2, 4, 8), solver="gptq",
                            progress=False)
    assert len(set(report.bits.values())) > 1, report.bits  # the widths differ per module
    export = check_export(model, tmp_path, torch.randn(5, 32), "target", size=False)[0]
    served = {n for n, form in export.modules.items() if form.startswith("MatMulNBits")}
    assert served == {n for n, b in report.bits.items() if b <= 4}  # 8-bit Linears fold to float in exact mode


def test_two_four_sparse_quantized(tmp_path):
    model = small_resnet()
    compress_model(model, [images(16)], bits=4, n_m=(2, 4), exclude=["conv1"], solver="gptq",
                   progress=False)
    report, path = check_export(model, tmp_path, images(), "nm")
    assert "2:4 sparse codes stored dense" in report.containers["layer1.0.conv1"]


def test_product_quantization(tmp_path):
    model = small_resnet()
    compress_model(model, [images(16)], method="pq", block_size=4, n_centroids=16, exclude=["conv1", "fc"],
                   progress=False)
    report, _ = check_export(model, tmp_path, images(), "pq")
    assert report.modules["layer1.0.conv1"].startswith("Gather of a codebook by uint4 codes")


class ConvZoo(nn.Module):
    """The conv attributes torch has: stride, reflect / circular padding, 'same', dilation, depthwise and
    grouped convs, Conv1d; grouped grids (group_size) on them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 16, (1, 3), padding=(0, 1), groups=2)
        self.seq = nn.Conv1d(16, 16, 3, padding=1, padding_mode="circular")
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.depthwise(F.relu(self.stem(x))))))
        x = F.relu(self.seq(x.mean(dim=3)))
        return self.head(x.flatten(1))


def test_conv_attributes_and_groups(tmp_path):
    model = ConvZoo().eval()
    compress_model(model, [images(16)], bits={"head": 4, "*": 3}, group_size=24, solver="gptq", progress=False)
    report, _ = check_export(model, tmp_path, images(), "zoo", size=False)
    assert report.modules["head"] == "Cast-Sub-Mul uint4 + MatMul"  # groups of 24: no MatMulNBits block
    assert report.modules["depthwise"] == "Cast-Sub-Mul uint4 + Conv"
    # the QDQ form: DequantizeLinear on uint4 weights (blocked by the groups of 24), folded by the session
    # inference_session opens
    qdq = export_onnx(model, tmp_path / "qdq.onnx", images(), qdq=True)
    assert qdq.modules["depthwise"] == "DequantizeLinear uint4 + Conv"
    assert qdq.modules["head"] == "DequantizeLinear uint4 + MatMul"
    onnx.checker.check_model(onnx.load(tmp_path / "qdq.onnx"), full_check=True)
    with torch.no_grad():
        assert rel_error(run_ort(tmp_path / "qdq.onnx", images()), model(images())) < 1e-5


class Encoder(nn.Module):
    """A MiniLM-shaped encoder layer (hidden 384, 12 heads, intermediate 1536, post-LayerNorm, GELU,
    key-padding mask, mean pooling): the shapes and ops of all-MiniLM-L6-v2, one layer, random weights."""

    def __init__(self, vocab=512, hidden=384, heads=12, inter=1536):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, inter), nn.Linear(inter, hidden)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        B, T, D = h.shape
        q, k, v = (lin(h).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.bool()[:, None, None, :])
        h = self.norm1(h + self.attn_out(ctx.transpose(1, 2).reshape(B, T, D)))
        h = self.norm2(h + self.down(F.gelu(self.up(h))))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_shaped_encoder_4_bit(tmp_path):
    model = Encoder().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0
    compress_model(model, [{"input_ids": ids, "attention_mask": mask}], bits=4, solver="gptq", progress=False)
    auto = torch.export.Dim.AUTO
    report, path = check_export(model, tmp_path, (ids, mask), "encoder", dynamic_shapes=({0: auto, 1: auto},) * 2)
    assert all(form.startswith("MatMulNBits 4-bit") for form in report.modules.values())
    assert not report.containers
    # another batch size and sequence length than traced
    ids2, mask2 = torch.randint(0, 512, (3, 9), generator=g), torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        assert rel_error(run_ort(path, ids2, mask2), model(ids2, mask2)) < 1e-5


# ------------------------------------------------------------------ bad input
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_never_compressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="export_onnx: nothing to export.*compress_model"):
        export_onnx(tiny(), tmp_path / "m.onnx", torch.randn(2, 32))
    assert not os.listdir(tmp_path)


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_unsupported_module_is_named_with_its_remedy(tmp_path):
    model = nn.Sequential(Doubled(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    compress_model(model, [torch.randn(8, 32)], bits=4, solver="gptq", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module '0' is a Doubled whose forward is not nn.Linear's.*exclude=\['0'\]"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], Doubled) and not os.listdir(tmp_path)


def test_opset_too_old_names_the_module_and_the_opset(tmp_path):
    model = small_resnet()
    compress_model(model, [images(4)], bits=4, solver="gptq", progress=False)
    with pytest.raises(ValueError, match=r"opset=18 is too old for module 'conv1'.*uint4.*opset 21; pass opset=21"):
        export_onnx(model, tmp_path / "m.onnx", images(2), opset=18)
    assert not os.listdir(tmp_path)


def test_failing_write_leaves_the_existing_file_and_the_model(tmp_path, monkeypatch):
    model = tiny()
    compress_model(model, [torch.randn(8, 32)], bits=4, group_size=16, solver="gptq", progress=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous file")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(model, path, torch.randn(2, 32))
    assert path.read_bytes() == b"the previous file" and os.listdir(tmp_path) == ["m.onnx"]
    assert isinstance(model[0], nn.Linear)  # the markers are gone again
    monkeypatch.undo()
    with torch.no_grad():
        x = torch.randn(3, 32)
        assert export_onnx(model, path, x).modules == {"0": "MatMulNBits 4-bit, block 16",  # two groups
                                                       "2": "MatMulNBits 4-bit, block 16"}
        assert rel_error(run_ort(path, x), model(x)) < 1e-5
        pack_model(model)  # packed modules export from their own buffers (float16 scales: their outputs)
        assert export_onnx(model, path, x).modules["0"] == "MatMulNBits 4-bit, block 16"
        assert rel_error(run_ort(path, x), model(x)) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        export_onnx(tiny(), "m.onnx", torch.randn(2, 32), mode="quick")
    with pytest.raises(ValueError, match="example_input must be a tensor or a tuple of tensors"):
        export_onnx(tiny(), "m.onnx", [1, 2])
    with pytest.raises(ValueError, match="directory .* does not exist"):
        export_onnx(tiny(), "/nonexistent/dir/m.onnx", torch.randn(2, 32))


# ------------------------------------------------------------------ the callback
def test_callback_export_path_onnx_runs_in_onnxruntime(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from quiet_trainer import quiet_trainer

    from obc_lightning import OBCQuantize

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = MLP()
    path = tmp_path / "out" / "model.onnx"  # the example input: the first calibration batch's x
    cb = OBCQuantize(bits=4, export_path=str(path), calibration_batches=2, evaluate=False, verbose=False,
                     plot=False, solver="gptq")
    quiet_trainer(tmp_path, callbacks=[cb]).fit(model, loader)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with torch.no_grad():
        ref = model(x)
    y_ort = run_ort(path, x)
    assert rel_error(y_ort, ref) < 1e-5 and torch.equal(y_ort.argmax(1), ref.argmax(1))


def test_pruned_float_and_mixed_precision_modules(tmp_path):
    """A 2:4 OBS-pruned float Linear (stored dense at float16) and a DiffQ Linear (2 ... 5 bits per group)."""
    model = tiny()
    compress_model(model, [torch.randn(16, 32)], bits=None, n_m=(2, 4), include=["0"], progress=False)
    with torch.no_grad():  # the values as the file keeps them (value_dtype float16): the comparison is exact
        model[0].weight.copy_(model[0].weight.half().float())
    w = model[2].weight.detach()
    widths = torch.tensor([[2.0, 3.0], [4.0, 5.0], [5.0, 2.0], [3.0, 3.0]])
    grid = MixedGrid.from_weight(w, widths, 8, torch.float16)
    with torch.no_grad():
        model[2].weight.copy_(grid.dequantize(grid.codes(w)))
    set_format(model[2], MixedScheme(grid, 2, 5, torch.float16))
    x = torch.randn(5, 32)
    report, _ = check_export(model, tmp_path, x, "pruned_mixed", size=False)
    assert report.modules == {"0": "dense float16 + Cast + MatMul", "2": "Cast-Mul-Add uint8 + MatMul"}
    assert report.containers["0"] == "pruned weights stored dense in float16"


def test_eight_bit_linears_matmulnbits_in_fast_mode_only(tmp_path):
    model = tiny()
    compress_model(model, [torch.randn(16, 32)], bits=8, progress=False)
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
    exact = export_onnx(model, tmp_path / "exact.onnx", x)
    fast = export_onnx(model, tmp_path / "fast.onnx", x, mode="fast")
    assert exact.modules["0"] == "Cast-Sub-Mul uint8 + MatMul" and not exact.containers
    assert fast.modules["0"] == "MatMulNBits 8-bit, block 32"
    assert rel_error(run_ort(tmp_path / "exact.onnx", x), ref) < 1e-5
    assert rel_error(run_ort(tmp_path / "fast.onnx", x, mode="exact"), ref) < 1e-5  # the 8-bit packing, exact
    assert rel_error(run_ort(tmp_path / "fast.onnx", x), ref) < 5e-2
