"""Product quantization at the model level: compress_model(method="pq"), centroid fine-tuning, the callback."""

import math

import lightning.pytorch as pl
import pytest
import torch
from classifier_steps import ClassifierSteps
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from obc_lightning import compress_model
from obc_lightning.finetune import CentroidQuantizer, attach, finalize
from obc_lightning.solvers.common import layer_objective
from obc_lightning.solvers.pq import PQResult

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.conv(x).relu()).relu().flatten(1))


def smooth_images(n=32, seed=0):
    """Spatially correlated inputs (blurred noise), so the Hessians are far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    k = torch.ones(4, 1, 3, 3) / 9
    return nn.functional.conv2d(x, k, padding=1, groups=4)


def batches():
    x = smooth_images(64)
    return [x[i : i + 16] for i in range(0, 64, 16)]


def subvectors_in_codebook(w, res: PQResult):
    q = w.reshape(w.shape[0], -1)
    expect = res.codebook[res.codes].reshape(q.shape).to(q.dtype)
    return torch.equal(q, expect)


# ------------------------------------------------------------------------------------------ compress_model
def test_compress_pq_writes_codebook_entries_and_reports_size():
    model = ConvNet()
    report = compress_model(
        model, batches(), method="pq", block_size={"conv": 4, "*": 8}, n_centroids=32, keep_results=True
    )
    assert report.method == "pq" and report.bits is None
    for name in ("conv", "conv2", "fc"):
        m = model.get_submodule(name)
        (res,) = report.results[name]
        assert isinstance(res, PQResult) and res.codes.device.type == "cpu"
        assert subvectors_in_codebook(m.weight.detach(), res)
        rep = report[name]
        assert (rep.method, rep.block_size, rep.n_centroids) == ("pq", 4 if name == "conv" else 8, 32)
        numel = m.weight.numel()
        bits = numel // rep.block_size * 5 + 32 * rep.block_size * 16  # 5-bit codes + fp16 codebook
        assert rep.weight_bits == bits and rep.bits_per_weight == pytest.approx(bits / numel)
        assert rep.bytes_after == math.ceil(bits / 8) + m.bias.numel() * 4
    assert report.avg_bits == pytest.approx(sum(r.weight_bits for r in report.modules) / report.quantized_weights)
    assert "pq4x32" in report.table() and "pq8x32" in report.table()
    assert report.metrics()["obc/conv2/bits_per_weight"] == pytest.approx(report["conv2"].bits_per_weight)


def test_compress_pq_loss_is_the_layer_objective_and_beats_kmeans():
    from obc_lightning.calibration import collect_hessians

    base = ConvNet()
    calib = collect_hessians(base, batches(), {"conv2": base.conv2})
    H = calib.hessians["conv2"].hessians[0].float()
    W = base.conv2.weight.detach().reshape(16, -1).clone()
    losses = {}
    for method in ("pq", "pq-kmeans"):
        model = ConvNet()
        rep = compress_model(model, batches(), method=method, include="conv2", block_size=8, n_centroids=32)
        Q = model.conv2.weight.detach().reshape(16, -1)
        losses[method] = float(layer_objective(W, Q, H).sum())
        assert rep["conv2"].loss == pytest.approx(losses[method], rel=1e-4)
        assert rep["conv2"].rel_error == pytest.approx(2 * losses[method] / float((W @ H * W).sum()), rel=1e-4)
    assert losses["pq"] < 0.5 * losses["pq-kmeans"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=5), r"block_size=5 must divide the 36 inputs .*'conv'"),
        (dict(n_centroids=256), r"'conv' .* only 144 sub-vectors of 4 for n_centroids=256"),
        (dict(bits=3), r"bits=3 does not apply to method='pq'"),
        (dict(n_m=(2, 4)), r"n_m does not apply"),
        (dict(group_size=8), r"group_size does not apply"),
        (dict(block_size={"conv2": 8}), r"gives no value for module 'conv'"),
        (dict(block_size={"nothing*": 8, "*": 4}), r"pattern 'nothing\*' matches no target"),
        (dict(method="vq"), r"method must be one of"),
    ],
)
def test_compress_pq_bad_arguments_leave_model_intact(kwargs, match):
    model = ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dict(method="pq", block_size=4, n_centroids=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compress_model(model, batches(), **args)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compress_pq_refuses_grouped_conv():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"'0' is a grouped convolution \(groups=2\)"):
        compress_model(model, [torch.randn(2, 4, 6, 6)], method="pq", block_size=2, n_centroids=4)


# ------------------------------------------------------------------------------------ centroid fine-tuning
def test_centroid_quantizer_forward_and_gradients_by_hand():
    codebook = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    codes = torch.tensor([[0, 2], [0, 0]])  # row 0: c0 c2, row 1: c0 c0; c1 unused
    q = CentroidQuantizer(codebook, codes, codebook_dtype=None)
    w = torch.zeros(2, 4, requires_grad=True)
    out = q(w)
    assert torch.equal(out.detach(), torch.tensor([[1.0, 2.0, 5.0, 6.0], [1.0, 2.0, 1.0, 2.0]]))
    g = torch.arange(8.0).reshape(2, 4)
    out.backward(g)
    # a centroid's gradient sums its sub-vectors' gradients: c0 <- (0,1) + (4,5) + (6,7); c2 <- (2,3)
    assert torch.equal(q.codebook.grad, torch.tensor([[10.0, 13.0], [0.0, 0.0], [2.0, 3.0]]))
    assert w.grad is None or torch.equal(w.grad, torch.zeros(2, 4))  # the latent weight is not used


def test_centroid_quantizer_noise_mixes_latent_and_centroids():
    torch.manual_seed(0)
    codebook = torch.randn(4, 2)
    codes = torch.randint(0, 4, (64, 8))
    q = CentroidQuantizer(codebook, codes, noise_rate=0.5, codebook_dtype=None)
    w = torch.randn(64, 16, requires_grad=True)
    out = q(w).reshape(64, 8, 2)
    from_centroid = (out == codebook[codes]).all(-1)
    from_latent = (out == w.detach().reshape(64, 8, 2)).all(-1)
    assert bool((from_centroid | from_latent).all())
    assert 0.35 < float(from_centroid.float().mean()) < 0.65
    out.sum().backward()
    # the latent weight gets gradient exactly where its sub-vector was kept
    kept = from_latent & ~from_centroid
    assert torch.equal(w.grad.reshape(64, 8, 2).bool().all(-1), kept)
    q.eval()
    assert torch.equal(q(w).detach(), codebook[codes].reshape(64, 16))


def test_centroid_quantizer_eval_rounds_codebook_and_finalize_keeps_parameter():
    layer = nn.Linear(4, 3)
    codebook = torch.tensor([[0.1, 0.2], [0.3, 1.0 / 3]])
    codes = torch.tensor([[0, 1], [1, 1], [0, 0]])
    param = layer.weight
    attach(layer, CentroidQuantizer(codebook, codes))
    finalize(layer)
    assert layer.weight is param
    assert torch.equal(layer.weight.detach(), codebook.half().float()[codes].reshape(3, 4))


# -------------------------------------------------------------------------------------------- callback
class LitNet(ClassifierSteps, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ConvNet()

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def loaders():
    x = smooth_images(64, seed=1)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1, 0, 0] > 0).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32)


def run(tmp_path, cb, max_epochs=3):
    t = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = LitNet()
    t.fit(model, *loaders())
    return t, model


def test_callback_pq_post_training_metrics(tmp_path):
    from obc_lightning import OBCQuantize

    cb = OBCQuantize(method="pq", block_size=4, n_centroids=16, calibration_batches=2, plot=False, verbose=False)
    _, model = run(tmp_path, cb, max_epochs=1)
    assert cb.quantized_modules == ["net.conv", "net.conv2", "net.fc"]
    m = cb.metrics
    for key in ("obc/avg_bits", "obc/net.conv2/bits_per_weight", "obc/val_acc_before", "obc/val_acc_after"):
        assert key in m
    w = model.net.conv2.weight.detach().reshape(16, -1, 4)
    assert w.reshape(-1, 4).unique(dim=0).shape[0] <= 16
    assert cb.config.to_flat()["method"] == "pq" and cb.config.to_flat()["block_size"] == 4


def test_callback_pq_finetune_trains_codebooks_with_fixed_codes(tmp_path):
    from obc_lightning import OBCQuantize

    cb = OBCQuantize(
        method="pq", block_size=4, n_centroids=16, calibration_batches=2, finetune="pq", finetune_epochs=2,
        plot=False, verbose=False,
    )
    seen = {}

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            seen.setdefault("groups", []).append(len(opt.param_groups))
            if cb.quantizers:
                seen["codebook0"] = {n: q.stored_codebook().clone() for n, q in cb.quantizers.items()}
                seen["codes"] = {n: q.codes.clone() for n, q in cb.quantizers.items()}

    t = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, callbacks=[Spy(), cb], logger=CSVLogger(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    model = LitNet()
    t.fit(model, *loaders())
    # compressed after epoch 0; epochs 1 and 2 train with the codebooks as an extra parameter group
    assert seen["groups"] == [1, 2, 2]
    assert len(t.optimizers[0].param_groups) == 1  # the extra group is removed at the end
    for name, q in cb.quantizers.items():
        w = model.get_submodule(name).weight.detach()
        cb_now = q.stored_codebook()
        assert torch.equal(w.reshape(w.shape[0], -1), cb_now[seen["codes"][name]].reshape(w.shape[0], -1))
        assert not torch.equal(cb_now, seen["codebook0"][name])  # trained
    assert "obc/val_acc_finetuned" in cb.metrics and cb.metrics["obc/finetune_epochs"] == 2


def test_callback_pq_noise_starts_latent_from_uncompressed_weights(tmp_path):
    from obc_lightning import OBCQuantize

    cb = OBCQuantize(
        method="pq", block_size=4, n_centroids=16, calibration_batches=2, finetune="pq", finetune_epochs=1,
        pq_noise_rate=0.5, plot=False, verbose=False, include="net.conv2",
    )
    weights = {}

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:  # runs before OBCQuantize's hook: the fp32 weights
                weights["fp32"] = pl_module.net.conv2.weight.detach().clone()

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                weights["latent"] = pl_module.net.conv2.parametrizations.weight.original.detach().clone()

    t = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[Spy(), cb], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    model = LitNet()
    t.fit(model, *loaders())
    assert torch.equal(weights["latent"], weights["fp32"])
    w = model.net.conv2.weight.detach().reshape(-1, 4)
    assert w.unique(dim=0).shape[0] <= 16  # finalized on the codebook


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="pq", finetune="ste"), r"method='pq' fine-tunes its codebooks with finetune='pq'"),
        (dict(finetune="pq"), r"finetune='pq' trains product-quantization codebooks"),
        (dict(method="pq", pq_noise_rate=0.0), r"pq_noise_rate must be in \(0, 1\]"),
        (dict(method="pq", bits=2), r"bits=2 does not apply"),
        (dict(method="pq", sparsity=0.5), r"sparsity does not apply"),
    ],
)
def test_callback_pq_bad_arguments(kwargs, match):
    from obc_lightning import OBCQuantize

    with pytest.raises(ValueError, match=match):
        OBCQuantize(**kwargs)


def test_callback_pq_layout_checked_before_training(tmp_path):
    from obc_lightning import OBCQuantize

    cb = OBCQuantize(method="pq", block_size=5, n_centroids=16)
    t = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = LitNet()
    before = model.net.conv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"block_size=5 must divide the 36 inputs"):
        t.fit(model, *loaders())
    assert torch.equal(model.net.conv.weight.detach(), before) and t.global_step == 0


def test_callback_pq_finetune_exports_trained_codebooks(tmp_path):
    from obc_lightning import OBCQuantize, load_quantized
    from obc_lightning.export import read_metadata, theoretical_bytes

    path = tmp_path / "pq.safetensors"
    cb = OBCQuantize(
        method="pq", block_size={"net.conv": 4, "*": 8}, n_centroids=16, calibration_batches=2, finetune="pq",
        finetune_epochs=1, export_path=path, plot=False, verbose=False,
    )
    _, model = run(tmp_path, cb, max_epochs=2)
    fresh = LitNet()
    load_quantized(path, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    meta = read_metadata(path)
    assert meta["net.conv"]["scheme"] == "pq" and meta["net.conv"]["block_size"] == 4
    assert meta["net.fc"]["n_centroids"] == 16 and meta["net.fc"]["bits"] == 4
    # the report's size is the file's payload
    assert cb.metrics["obc/file_mb"] * 2**20 == path.stat().st_size
    payload = theoretical_bytes(path)
    others = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if not k.endswith("weight"))
    assert payload - others == sum(r.bytes_after - 4 * model.get_submodule(r.name).bias.numel()
                                   for r in cb.report.modules)


def test_callback_pq_mapping_values_checked_at_construction():
    from obc_lightning import OBCQuantize

    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1 .* got 0"):
        OBCQuantize(method="pq", block_size={"*conv*": 9, "*": 0})
    with pytest.raises(ValueError, match=r"n_centroids must be an integer >= 2 .* got 1"):
        OBCQuantize(method="pq", n_centroids=1)
