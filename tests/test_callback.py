"""OBCQuantize end to end: Trainer on CPU, loggers, calibration code paths, checkpoints, DDP."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from quiet_trainer import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from obc_lightning.batchnorm import reestimate_batchnorm
from obc_lightning.calibration import CalibrationWarning
from obc_lightning.callback import OBCQuantize

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


def data(n=32, dict_batches=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    if dict_batches:
        return [{"x": x[i], "y": y[i]} for i in range(n)]
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    """Conv + Linear classifier; forward(x, y=None) takes (x, y) batches as they come."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(64, 3)
        self.acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x, y=None):
        return self.head(self.conv(x).relu().flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.acc(logits, y)
        self.log("val_acc", self.acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, callback, **kw):
    return quiet_trainer(tmp_path, callbacks=[callback], **kw)


def on_grid(report, model):
    """Every row of a quantized weight takes at most 2**bits distinct values (exact grid membership of
    the codes is checked in test_compress.py)."""
    for name in report.quantized:
        w = model.get_submodule(name).weight.detach()
        for row in w.reshape(w.shape[0], -1):
            assert row.unique().numel() <= 2**report.bits, name


def test_end_to_end_metrics_in_csv(tmp_path):
    model = Net()
    w0 = model.head.weight.detach().clone()
    cb = OBCQuantize(bits=4, calibration_batches=3)
    t = trainer(tmp_path, cb)
    t.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))

    assert cb.quantized_modules == ["conv", "head"] and not cb.skipped_modules
    assert cb.report["head"].n_samples == 24  # 3 batches of 8
    assert not torch.equal(model.head.weight, w0)
    assert model.head.weight.device.type == "cpu" and model.training  # mode given back
    on_grid(cb.report, model)
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = {k for r in rows for k, v in r.items() if v not in ("", None)}
    for key in [
        "obc/conv/loss",
        "obc/conv/rel_error",
        "obc/conv/obc_rows",
        "obc/head/loss",
        "obc/size_mb_before",
        "obc/size_mb_after",
        "obc/compression_ratio",
        "obc/avg_bits",
        "obc/seconds",
        "obc/val_loss_before",
        "obc/val_loss_after",
        "obc/val_acc_before",
        "obc/val_acc_after",
    ]:
        assert key in logged, key
    assert "train_loss" in logged  # the user's own metrics still there
    assert 0 <= cb.metrics["obc/val_acc_after"] <= 1
    assert cb.metrics["obc/compression_ratio"] > 4
    with open(os.path.join(t.logger.log_dir, "obc_rel_error.png"), "rb") as f:  # the per-layer chart
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sample_fraction_and_product_dtype_reach_calibration(tmp_path, monkeypatch):
    import obc_lightning.calibration as calibration

    seen = []
    real = calibration.layer_inputs
    monkeypatch.setattr(calibration, "layer_inputs", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    model = Net()
    cb = OBCQuantize(
        bits=4, calibration_batches=3, sample_fraction=0.25, product_dtype=torch.bfloat16, evaluate=False, plot=False
    )
    trainer(tmp_path, cb, logger=False).fit(model, DataLoader(data(), batch_size=8))
    assert cb.report["head"].n_samples == 6  # a quarter of 3 batches x 8 samples
    assert seen and set(seen) == {torch.bfloat16}
    flat = cb.config.to_flat()
    assert flat["sample_fraction"] == 0.25 and flat["product_dtype"] == "bfloat16"  # a plain value
    on_grid(cb.report, model)


def test_error_chart_reaches_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import TensorBoardLogger

    cb = OBCQuantize(bits=4, calibration_batches=2, evaluate=False, verbose=False)
    t = trainer(tmp_path, cb, logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path)])
    t.fit(Net(), DataLoader(data(), batch_size=8))
    events = [f for f in os.listdir(t.loggers[0].log_dir) if f.startswith("events.out.tfevents")]
    assert events
    data_bytes = b"".join(open(os.path.join(t.loggers[0].log_dir, f), "rb").read() for f in events)
    assert b"obc/rel_error" in data_bytes and b"\x89PNG" in data_bytes  # the chart, as an image summary
    assert os.path.exists(os.path.join(t.loggers[0].log_dir, "obc_rel_error.png"))


class NoForward(pl.LightningModule):
    """No forward at all; dict batches; only the steps know how to run the layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(8, 3)
        self.val_calls = 0

    def _logits(self, batch):
        return self.fc(self.conv(batch["x"].flatten(2)[:, :, :4]).relu().flatten(1))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self._logits(batch), batch["y"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_calls += 1
        assert not self.training and not torch.is_grad_enabled()
        self.log_dict({"val_loss": nn.functional.cross_entropy(self._logits(batch), batch["y"])})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_forward_uses_validation_step(tmp_path):
    model = NoForward()
    cb = OBCQuantize(bits=3, calibration_batches=2, evaluate=False)
    t = trainer(tmp_path, cb, limit_val_batches=0)
    t.fit(model, DataLoader(data(dict_batches=True), batch_size=8))
    assert model.val_calls == 2  # calibration only (no validation loop, no evaluation)
    assert cb.quantized_modules == ["conv", "fc"] and cb.report["fc"].n_samples == 16
    assert "val_loss" not in t.callback_metrics  # the muted self.log calls did not leak
    on_grid(cb.report, model)


class Pair:
    """A custom batch: neither a tensor nor a collection."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets


class PairNet(Net):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch.inputs), batch.targets)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch.inputs), batch.targets), batch_size=4)


def test_custom_batch_object_with_calibration_step(tmp_path):
    def collate(items):
        xs, ys = zip(*items)
        return Pair(torch.stack(xs), torch.stack(ys))

    seen = []

    def step(module, batch):
        seen.append(type(batch))
        module(batch.inputs)

    loader = DataLoader(data(), batch_size=8, collate_fn=collate)
    cb = OBCQuantize(
        bits=4, calibration_step=step, calibration_dataloader=loader, calibration_batches=2, include="head"
    )
    model = PairNet()
    t = trainer(tmp_path, cb)
    t.fit(model, loader, DataLoader(data(8), batch_size=8, collate_fn=collate))
    assert seen == [Pair] * 2 and cb.quantized_modules == ["head"]
    assert model.conv.weight.unique().numel() == model.conv.weight.numel()  # trained, not quantized
    assert "obc/val_loss_after" in cb.metrics


def test_checkpoint_round_trip(tmp_path):
    model = Net()
    cb = OBCQuantize(bits=3, group_size=16, calibration_batches=2, evaluate=False)
    t = trainer(tmp_path, cb)
    t.fit(model, DataLoader(data(), batch_size=8))
    path = tmp_path / "quantized.ckpt"
    t.save_checkpoint(path)

    loaded = Net.load_from_checkpoint(path)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    ckpt = torch.load(path, weights_only=True)  # the callback state is plain data
    state = ckpt["callbacks"][cb.state_key]
    assert state["quantized_modules"] == ["conv", "head"]
    assert state["config"]["bits"] == 3 and state["config"]["group_size"] == 16
    fresh = OBCQuantize(bits=3, group_size=16, calibration_batches=2, evaluate=False)
    fresh.load_state_dict(state)
    assert fresh.quantized_modules == cb.quantized_modules and fresh.state_dict()["config"] == cb.config.to_flat()
    assert fresh.loaded_report["modules"][1]["name"] == "head"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, "OBCQuantize: bits must be an integer"),
        ({"bits": "4"}, "OBCQuantize: bits must be an integer"),
        ({"group_size": 0}, "group_size"),
        ({"solver": "best"}, "solver"),
        ({"damp": float("nan")}, "damp"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"calibration_dataloader": torch.ones(3)}, "calibration_dataloader"),
        ({"calibration_step": "fn"}, "calibration_step"),
        ({"include": 3}, "include"),
        ({"sequential": 1}, "sequential"),
        ({"split_attention": "yes"}, "split_attention must be a bool"),
        ({"sample_fraction": 0}, "sample_fraction"),
        ({"sample_fraction": 2.0}, "sample_fraction"),
        ({"product_dtype": "fp16"}, "OBCQuantize: product_dtype must be"),
        ({"recalibrate_bn": -1}, "recalibrate_bn"),
        ({"recalibrate_bn": True}, "recalibrate_bn"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBCQuantize(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"finetune": "qat"}, "finetune must be one of"),
        ({"finetune": "ste", "mode": "up"}, "mode must be"),
        ({"finetune": "ste", "monitor": "val_acc", "max_drop": -0.1}, "max_drop must be"),
        ({"monitor": "val_acc", "max_drop": 0.01}, "set finetune"),
        ({"finetune": "ste", "max_drop": 0.01}, "needs monitor"),
        ({"finetune": "ste", "monitor": "val_acc", "max_drop": 0.01, "evaluate": False}, "needs evaluate"),
        ({"finetune": "ste", "finetune_epochs": 0}, "finetune_epochs"),
        ({"finetune": "ternary", "ternary_threshold": 1.5}, "ternary_threshold"),
        ({"finetune": "noise", "noise_group_size": 0}, "noise_group_size"),
        ({"finetune": "noise", "noise_min_bits": 8, "noise_max_bits": 4}, "noise_min_bits"),
        ({"finetune": "noise", "noise_penalty": -1}, "noise_penalty"),
        ({"finetune": "noise", "noise_max_bits": 12, "export_path": "m.safetensors"}, "export_path packs DiffQ"),
    ],
)
def test_constructor_rejects_bad_finetune_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBCQuantize(**kwargs)


def test_finetune_ste_exports_fine_tuned_codes(tmp_path):
    from obc_lightning.export import load_quantized

    model = Net()
    path = tmp_path / "m.safetensors"
    cb = OBCQuantize(
        bits=3, calibration_batches=2, finetune="ste", finetune_epochs=1, export_path=path, plot=False
    )
    t = trainer(tmp_path, cb, max_epochs=2)
    t.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    assert cb.metrics["obc/finetune_epochs"] == 1 and "obc/val_acc_finetuned" in cb.metrics
    loaded = load_quantized(path, Net())
    for name in ("conv", "head"):
        assert torch.equal(getattr(loaded, name).weight, getattr(model, name).weight), name


def test_include_typo_fails_before_training(tmp_path):
    model = Net()
    w0 = model.head.weight.detach().clone()
    t = trainer(tmp_path, OBCQuantize(include="haed"))
    with pytest.raises(ValueError, match="include pattern 'haed'"):
        t.fit(model, DataLoader(data(), batch_size=8))
    assert torch.equal(model.head.weight, w0)


class TinyTransformer(pl.LightningModule):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x, y=None):
        return self.enc(x.reshape(x.shape[0], 8, 4)).mean()

    def training_step(self, batch, batch_idx):
        return self(*batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_transformer_encoder_every_linear_quantized(tmp_path):
    cb = OBCQuantize(calibration_batches=1, evaluate=False)
    with pytest.warns(CalibrationWarning, match="enc.layers.0.self_attn.in_proj_weight"):
        trainer(tmp_path, cb).fit(TinyTransformer(), DataLoader(data(), batch_size=8))
    assert cb.quantized_modules == ["enc.layers.0.self_attn.out_proj", "enc.layers.0.linear1", "enc.layers.0.linear2"]
    assert list(cb.skipped_modules) == ["enc.layers.0.self_attn.in_proj_weight"]  # a bare Parameter, named


def test_split_attention_every_projection_quantized_by_the_callback(tmp_path):
    from obc_lightning import split_attention_projections

    class Split(TinyTransformer):
        def __init__(self):
            super().__init__()
            split_attention_projections(self)  # where the model is built, before the optimizer

    cb = OBCQuantize(calibration_batches=1, evaluate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        trainer(tmp_path, cb).fit(Split(), DataLoader(data(), batch_size=8))
    attn = [f"enc.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert cb.quantized_modules == [*attn, "enc.layers.0.linear1", "enc.layers.0.linear2"]
    assert not cb.skipped_modules


def test_split_attention_option_quantizes_q_k_v_and_its_checkpoint_loads_back(tmp_path):
    from obc_lightning import ProjectedAttention

    class Evaluated(TinyTransformer):
        def validation_step(self, batch, batch_idx):
            self.log("out", self(*batch))

    model = Evaluated()
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    cb = OBCQuantize(calibration_batches=1, evaluate=False, split_attention=True)
    t = trainer(tmp_path, cb)
    t.fit(model, DataLoader(data(), batch_size=8))
    assert isinstance(model.enc.layers[0].self_attn, ProjectedAttention)
    attn = [f"enc.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert cb.quantized_modules == [*attn, "enc.layers.0.linear1", "enc.layers.0.linear2"]
    assert not cb.skipped_modules and cb.config.to_flat()["split_attention"] is True
    on_grid(cb.report, model)
    path = tmp_path / "split.ckpt"
    t.save_checkpoint(path)

    # a fresh, unsplit model: the callback splits it in setup, so the checkpoint loads into it
    fresh = Evaluated()
    t2 = trainer(tmp_path, OBCQuantize(calibration_batches=1, evaluate=False, split_attention=True))
    t2.validate(fresh, DataLoader(data(8), batch_size=8), ckpt_path=path, verbose=False)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    # the split itself changed nothing: before training, split and unsplit models compute the same
    unsplit, split = Evaluated(), Evaluated()
    loader = DataLoader(data(8), batch_size=8)
    trainer(tmp_path, OBCQuantize(split_attention=True)).validate(split, loader, verbose=False)
    assert isinstance(split.enc.layers[0].self_attn, ProjectedAttention)
    with torch.no_grad():
        torch.testing.assert_close(split(x), unsplit(x))
        torch.testing.assert_close(unsplit(x), before)


def test_split_attention_projections_fine_tuned_ternary(tmp_path):
    from obc_lightning import split_attention_projections

    model = TinyTransformer()
    split_attention_projections(model)
    cb = OBCQuantize(finetune="ternary", finetune_epochs=1, ternary_skip_first_last=False, evaluate=False, plot=False)
    trainer(tmp_path, cb, max_epochs=2).fit(model, DataLoader(data(), batch_size=8))
    assert cb.quantized_modules[:3] == [f"enc.layers.0.self_attn.{p}_proj" for p in "qkv"] and not cb.skipped_modules
    for p in "qkv":
        assert len(model.enc.layers[0].self_attn.get_submodule(f"{p}_proj").weight.unique()) <= 3  # {-w_n, 0, w_p}


def test_ternary_fine_tuning_names_attention_projections_it_leaves(tmp_path):
    cb = OBCQuantize(finetune="ternary", finetune_epochs=1, ternary_skip_first_last=False, evaluate=False, plot=False)
    model = TinyTransformer()
    with pytest.warns(UserWarning, match="1 layer weight.s. left in full precision:\n  enc.layers.0.self_attn.in_proj"):
        trainer(tmp_path, cb, max_epochs=2).fit(model, DataLoader(data(), batch_size=8))
    attn = model.enc.layers[0].self_attn
    in_proj = 4 * (attn.in_proj_weight.numel() + attn.in_proj_bias.numel())
    linears = 4 * sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert cb.metrics["obc/size_mb_before"] * 2**20 == pytest.approx(linears + in_proj)  # counted at fp32
    assert cb.quantized_modules == ["enc.layers.0.self_attn.out_proj", "enc.layers.0.linear1", "enc.layers.0.linear2"]
    assert list(cb.skipped_modules) == ["enc.layers.0.self_attn.in_proj_weight"]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests_dir!r})
    from test_callback import Net, data
    from obc_lightning.callback import OBCQuantize

    out, runs = sys.argv[1], json.loads(sys.argv[2])
    for name, (max_epochs, kwargs) in runs.items():  # one launch, one fit after the other in the same two processes
        cb = OBCQuantize(bits=3, calibration_batches=2, **kwargs)
        model = Net()
        trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                             callbacks=[cb],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=out)
        trainer.fit(model, DataLoader(data(), batch_size=4), DataLoader(data(16), batch_size=4))
        n = cb.report["head"].n_samples if cb.report is not None else -1
        torch.save({{"state_dict": model.state_dict(), "n": n, "metrics": cb.metrics}},
                   os.path.join(out, f"{{name}}.rank{{trainer.global_rank}}.pt"))
    # as torch asks of every DDP script: left to interpreter shutdown, gloo's threads can abort the process
    torch.distributed.destroy_process_group()
    """
)

FINETUNED = dict(finetune_epochs=1, ternary_skip_first_last=False, noise_penalty=1e5, noise_bits_lr=0.5, plot=False,
                 verbose=False)
DDP_RUNS = {  # name: (max_epochs, OBCQuantize options)
    "post_training": (1, {}),
    "sequential": (1, dict(sequential=True, plot=False, verbose=False)),
    **{mode: (2, dict(finetune=mode, **FINETUNED)) for mode in ("ste", "ternary", "noise")},
}


def run_ddp(out, runs):
    """Fit ``Net`` with ``OBCQuantize(bits=3, calibration_batches=2, **options)`` in two DDP processes (gloo)
    for each of ``runs`` ({name: (max_epochs, options)}), one fit after the other in one launch (starting
    the processes is most of a run's time); return {name: (rank 0's, rank 1's) state_dict, calibration
    samples and metrics}."""
    script = out / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests_dir=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(runs)], env=env, cwd=out,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: tuple(torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)) for name in runs}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_ddp(tmp_path_factory.mktemp("ddp"), DDP_RUNS)


@pytest.mark.slow
def test_ddp_two_processes_identical_weights(ddp):
    r0, r1 = ddp["post_training"]
    # each rank calibrated 2 batches of 4 of its own shard; the all-reduced sums cover both ranks
    assert r0["n"] == r1["n"] == 16
    for name, p in r0["state_dict"].items():
        assert torch.equal(p, r1["state_dict"][name]), name
    # evaluation metrics are reduced over ranks too
    assert r0["metrics"]["obc/val_loss_after"] == pytest.approx(r1["metrics"]["obc/val_loss_after"])


@pytest.mark.slow
def test_ddp_sequential_calibration_ends_with_identical_weights(ddp):
    r0, r1 = ddp["sequential"]
    assert r0["n"] == r1["n"] == 16
    for name, p in r0["state_dict"].items():
        assert torch.equal(p, r1["state_dict"][name]), name


def test_finetune_refuses_strategies_that_shard_the_weights():
    class ShardingStrategy:  # stands in for FSDP / DeepSpeed, which need a GPU
        pass

    fake = types.SimpleNamespace(strategy=ShardingStrategy(), max_epochs=3, min_epochs=None)
    with pytest.raises(ValueError, match="finetune='ste'.*single-device and DDP strategies, not ShardingStrategy"):
        OBCQuantize(finetune="ste").setup(fake, Net(), "fit")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ste", "ternary", "noise"])
def test_ddp_finetuning_ends_with_identical_weights(ddp, mode):
    # each rank trains on its own shard: the quantizer parameters added after DDP wrapped the model (TTQ
    # scales, DiffQ bit logits) only stay equal if the callback averages their gradients over the ranks
    r0, r1 = ddp[mode]
    assert r0["metrics"]["obc/finetune_epochs"] == 1
    for name, p in r0["state_dict"].items():
        assert torch.equal(p, r1["state_dict"][name]), name
    w = r0["state_dict"]["head.weight"]
    if mode == "ste":  # 3 bits: at most 8 values per row (per-row grid)
        assert all(len(row.unique()) <= 8 for row in w)
    elif mode == "ternary":
        assert len(w.unique()) <= 3
    if mode == "noise":  # the bits moved (penalty) the same way on both ranks
        assert r0["metrics"]["obc/noise_bits"] == r1["metrics"]["obc/noise_bits"] < 3


def test_obcprune_n_m_end_to_end(tmp_path):
    from obc_lightning import OBCPrune

    model = Net()  # its conv has 2 input channels, no groups of 4: excluded
    w0 = model.head.weight.detach().clone()
    cb = OBCPrune(n_m=(2, 4), exclude="conv", calibration_batches=3, plot=False)
    t = trainer(tmp_path, cb)
    t.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    W = model.head.weight.detach()
    assert (W.view(W.shape[0], -1, 4) != 0).sum(dim=2).max() <= 2  # at most 2 of every 4 kept
    assert cb.report.sparsity == pytest.approx(0.5) and cb.quantized_modules == ["head"]
    kept = W != 0
    assert not torch.equal(W[kept], w0[kept])  # OBS compensated the kept weights
    assert cb.metrics["obc/sparsity"] == pytest.approx(0.5) and "obc/head/sparsity" in cb.metrics
    assert "obc/val_acc_after" in cb.metrics


def test_obcquantize_joint_sparsity_and_bits(tmp_path):
    model = Net()
    cb = OBCQuantize(bits=4, sparsity=0.5, calibration_batches=3, evaluate=False, plot=False)
    trainer(tmp_path, cb, logger=False).fit(model, DataLoader(data(), batch_size=8))
    W = model.head.weight.detach()
    assert cb.report.sparsity == pytest.approx(0.5, abs=0.01)
    assert (W == 0).float().mean() >= 0.49  # the pruned weights stay exactly 0 through quantization
    on_grid(cb.report, model)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: __import__("obc_lightning").OBCPrune(), "exactly one"),
        (lambda: __import__("obc_lightning").OBCPrune(sparsity=1.0), "sparsity"),
        (lambda: __import__("obc_lightning").OBCPrune(n_m=(4, 4)), "n_m"),
        (lambda: __import__("obc_lightning").OBCPrune(sparsity=0.5, bits=4), "bits"),
        (lambda: OBCQuantize(bits=4, n_m=(2, 4), finetune="ternary"), "cannot keep a pruning mask"),
    ],
)
def test_prune_arguments_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_n_m_not_dividing_inputs_fails_before_training(tmp_path):
    model = Net()  # conv has 2 input channels
    cb = OBCQuantize(bits=4, n_m=(2, 4), calibration_batches=1)
    with pytest.raises(ValueError, match="conv"):
        trainer(tmp_path, cb, logger=False).fit(model, DataLoader(data(), batch_size=8))
    assert not model.conv.weight.eq(0).any()


def test_obcquantize_n_m_export_is_stored_sparse(tmp_path):
    from obc_lightning.export import load_quantized, read_metadata

    path = tmp_path / "nm.safetensors"
    cb = OBCQuantize(bits=4, n_m=(2, 4), include="head", export_path=path, plot=False, verbose=False)
    model = Net()
    trainer(tmp_path, cb).fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    assert read_metadata(path)["head"]["n_m"] == [2, 4]
    fresh = Net()
    load_quantized(path, fresh)
    assert torch.equal(fresh.head.weight, model.head.weight)


@pytest.mark.parametrize("kwargs", [{"n_m": (2, 4)}, {"sparsity": 0.5}], ids=["2:4", "unstructured"])
def test_obcprune_export_is_the_sparse_float_file(tmp_path, kwargs):
    from obc_lightning import OBCPrune
    from obc_lightning.export import load_quantized, read_metadata

    path = tmp_path / "pruned.safetensors"
    cb = OBCPrune(**kwargs, include="head", calibration_batches=2, export_path=path, plot=False, verbose=False)
    model = Net()
    trainer(tmp_path, cb, logger=False).fit(model, DataLoader(data(), batch_size=8))
    meta = read_metadata(path)["head"]
    assert meta["scheme"] == "sparse" and meta.get("n_m") == ([2, 4] if "n_m" in kwargs else None)
    assert cb.metrics["obc/size_mb_after"] == pytest.approx(os.path.getsize(path) / 2**20)
    fresh = Net()
    load_quantized(path, fresh)  # float16 values: the pruned weights rounded to fp16, zeros exact
    torch.testing.assert_close(fresh.head.weight, model.head.weight.half().float(), rtol=0, atol=0)
    assert torch.equal(fresh.head.weight == 0, model.head.weight == 0)


class BNNet(Net):
    """Net with a BatchNorm after the conv."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y=None):
        return self.head(self.bn(self.conv(x)).relu().flatten(1))


@pytest.mark.parametrize("finetune", [None, "ste"])
def test_recalibrate_bn_uses_the_first_training_batches_with_the_final_weights(tmp_path, finetune):
    train = DataLoader(data(), batch_size=8)  # unshuffled: its first batches are known
    kw = dict(finetune=finetune, finetune_epochs=1) if finetune else {}
    stats = {}
    for n in (0, 3):
        model = BNNet()
        cb = OBCQuantize(bits=2, recalibrate_bn=n, calibration_batches=2, plot=False, verbose=False, **kw)
        trainer(tmp_path, cb, max_epochs=2).fit(model, train, DataLoader(data(16), batch_size=8))
        stats[n] = model.bn.running_mean.clone(), model.bn.running_var.clone()
    assert cb.metrics["obc/bn_recalibrated"] == 1 and "obc/val_acc_after" in cb.metrics
    reestimate_batchnorm(model, [b for _, b in zip(range(3), train)])  # the same batches and weights
    torch.testing.assert_close(stats[3], (model.bn.running_mean, model.bn.running_var))
    assert not torch.allclose(stats[0][0], stats[3][0])  # without it: the statistics of training
