"""The callback inside ordinary Lightning runs: torchmetrics logged at epoch end, ModelCheckpoint with
save_last, resumed fits, crashes and interrupts, a second fit, loggers, progress, argument errors.

Each test is one scenario of issue 23, run end to end on the CPU.
"""

import copy
import logging
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from quiet_trainer import quiet_trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from obc_lightning import compress_model
from obc_lightning.callback import OBCPrune, OBCQuantize
from obc_lightning.config import CompressionConfig, FinetuneConfig, QuantizationConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def loaders():
    return DataLoader(data(), batch_size=16), DataLoader(data(32, seed=1), batch_size=16)


class MetricsNet(pl.LightningModule):
    """The torchmetrics pattern: the metric updated in validation_step, logged in on_validation_epoch_end."""

    def __init__(self, fail_train_at_epoch=None, fail=RuntimeError):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)
        self.acc = MulticlassAccuracy(num_classes=3)
        self.fail_train_at_epoch, self.fail = fail_train_at_epoch, fail
        self.fail_validation_after = None  # raise in validation_step once this many more calls have run

    def forward(self, x, y=None):
        return self.fc2(self.fc1(x).relu())

    def training_step(self, batch, batch_idx):
        if self.fail_train_at_epoch is not None and self.current_epoch == self.fail_train_at_epoch:
            raise self.fail("boom in training_step")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if self.fail_validation_after is not None:
            if self.fail_validation_after == 0:
                raise RuntimeError("boom in validation_step")
            self.fail_validation_after -= 1
        x, y = batch
        logits = self(x)
        self.acc.update(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def on_validation_epoch_end(self):
        self.log("val_acc", self.acc.compute())
        self.acc.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(tmp_path, callbacks, model=None, max_epochs=1, **kw):
    model = model or MetricsNet()
    t = quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kw)
    t.fit(model, *loaders())
    return t, model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_reference(tmp_path, epochs):
    """The weights an uncompressed run has after ``epochs`` epochs (the runs are deterministic)."""
    _, ref = fit(tmp_path / "ref", [], max_epochs=epochs)
    return weights(ref)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def on_grid(model, names=("fc1", "fc2"), bits=4):
    for name in names:
        w = getattr(model, name).weight.detach()
        assert all(row.unique().numel() <= 2**bits for row in w), name


# ------------------------------------------------------------------------------ validation semantics
def test_metrics_logged_at_epoch_end_are_measured_as_lightning_validates(tmp_path):
    ref_trainer, ref = fit(tmp_path / "ref", [])
    (fp32,) = ref_trainer.validate(ref, loaders()[1], verbose=False)
    cb = OBCQuantize(bits=2, calibration_batches=2, plot=False)
    t, model = fit(tmp_path, [cb])
    (after,) = t.validate(model, loaders()[1], verbose=False)  # Lightning's own loop on the final weights
    assert cb.metrics["obc/val_acc_before"] == pytest.approx(fp32["val_acc"], abs=1e-7)
    assert cb.metrics["obc/val_acc_after"] == pytest.approx(after["val_acc"], abs=1e-7)
    assert cb.metrics["obc/val_loss_after"] == pytest.approx(after["val_loss"], rel=1e-6)
    assert cb.metrics["obc/val_loss_after"] != cb.metrics["obc/val_loss_before"]


def test_several_validation_dataloaders_get_lightnings_names(tmp_path):
    cb = OBCQuantize(bits=4, calibration_batches=2, plot=False)
    model = MetricsNet()
    t = quiet_trainer(tmp_path, callbacks=[cb])
    val = [loaders()[1], DataLoader(data(16, seed=2), batch_size=8)]
    t.fit(model, loaders()[0], val)
    results = t.validate(model, val, verbose=False)
    lightning_names = {k for r in results for k in r}
    ours = {k[4:-6] for k in cb.metrics if k.startswith("obc/val") and k.endswith("_after")}
    assert {"val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1"} <= ours
    assert ours <= lightning_names | {"val_acc"}


def test_misspelled_monitor_fails_at_the_first_validation(tmp_path):
    cb = OBCQuantize(bits=2, finetune="ste", finetune_epochs=1, monitor="val_accuracy", max_drop=0.01)
    with pytest.raises(ValueError, match=r"monitor='val_accuracy' is not among .* first validation .*val_acc"):
        t, _ = fit(tmp_path, [cb], max_epochs=4)
    assert cb.phase == "idle" and not cb.quantized_modules


def test_finetuning_decides_on_a_metric_logged_at_epoch_end(tmp_path):
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=1, monitor="val_acc",
                     max_drop=1.0, plot=False)
    t, model = fit(tmp_path, [cb], max_epochs=3)
    assert "obc/val_acc_before" in cb.metrics and "obc/val_acc_after" in cb.metrics
    assert cb.metrics["obc/finetune_epochs"] == 0 and t.current_epoch == 2  # within budget: stopped


# ------------------------------------------------------------------------------------- checkpoints
def test_last_checkpoint_holds_the_quantized_model_and_best_is_announced(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_last=True)
    cb = OBCQuantize(bits=3, calibration_batches=2, evaluate=False, plot=False)
    t, model = fit(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    last = MetricsNet.load_from_checkpoint(ckpt.last_model_path)
    assert_same(weights(last), weights(model))
    on_grid(last, bits=3)
    state = torch.load(ckpt.last_model_path, weights_only=True)["callbacks"][cb.state_key]
    assert state["quantized_modules"] == ["fc1", "fc2"]
    with pytest.warns(UserWarning, match="saved before this run compressed the model"):
        t.validate(model, loaders()[1], ckpt_path="best", verbose=False)
    assert cb.quantized_modules == []  # the model holds fp32 weights again, and the callback says so


def test_last_as_a_link_is_replaced_not_written_through(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_last="link")
    cb = OBCQuantize(bits=3, calibration_batches=2, evaluate=False, plot=False)
    t, model = fit(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    best = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    assert not torch.equal(best["fc1.weight"], model.fc1.weight)  # the top-k file keeps its fp32 weights
    assert torch.equal(torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]["fc1.weight"],
                       model.fc1.weight)


def test_checkpoints_written_during_finetuning_load_into_the_plain_module(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_last=True, save_top_k=-1)
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc", plot=False)
    t, model = fit(tmp_path, [cb, ckpt], max_epochs=4, enable_checkpointing=True)
    during = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"  # fine-tuning runs in epochs 2 and 3
    sd = torch.load(during, weights_only=True)["state_dict"]
    assert not [k for k in sd if "parametrizations" in k]
    loaded = MetricsNet.load_from_checkpoint(during)  # strict loading into the module as defined
    on_grid(loaded, bits=2)
    assert_same(weights(MetricsNet.load_from_checkpoint(ckpt.last_model_path)), weights(model))
    t.validate(model, loaders()[1], ckpt_path=during, verbose=False)  # Trainer(ckpt_path=...) loads it too


@pytest.mark.parametrize("from_epoch", [1, 2], ids=["compression-epoch", "mid-finetuning"])
def test_resuming_fit_continues_finetuning_to_the_same_weights(tmp_path, from_epoch):
    def run(path, ckpt_path=None):
        ckpt = ModelCheckpoint(dirpath=path / "ckpt", save_top_k=-1, filename="{epoch}")
        cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc",
                         plot=False)
        model = MetricsNet()
        t = quiet_trainer(path, max_epochs=4, callbacks=[cb, ckpt], enable_checkpointing=True)
        t.fit(model, *loaders(), ckpt_path=ckpt_path)
        return cb, model

    cb_a, whole = run(tmp_path / "a")
    cb_b, resumed = run(tmp_path / "b", tmp_path / "a" / "ckpt" / f"epoch={from_epoch}.ckpt")
    assert_same(weights(resumed), weights(whole))
    assert cb_b.phase == "done" and cb_b.metrics["obc/finetune_epochs"] == 2
    assert not parametrize.is_parametrized(resumed.fc1)


# ----------------------------------------------------------------------------------------- faults
def test_crash_during_finetuning_restores_the_trained_weights_and_a_second_fit_compresses(tmp_path):
    trained = trained_reference(tmp_path, 2)  # epochs 0 and 1: compression after epoch 1
    model = MetricsNet(fail_train_at_epoch=2)
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ste", finetune_epochs=2, monitor="val_acc", plot=False)
    with pytest.raises(RuntimeError, match="boom in training_step"), pytest.warns(UserWarning, match="back to"):
        fit(tmp_path, [cb], model, max_epochs=4)
    assert not parametrize.is_parametrized(model.fc1) and not parametrize.is_parametrized(model.fc2)
    assert_same(weights(model), trained)
    MetricsNet().load_state_dict(model.state_dict())  # plain modules
    assert (cb.phase, cb.quantized_modules, cb.metrics, cb.session) == ("idle", [], {}, None)

    model.fail_train_at_epoch = None
    fit(tmp_path / "again", [cb], model, max_epochs=4)
    assert cb.phase == "done" and cb.quantized_modules == ["fc1", "fc2"]
    on_grid(model, bits=2)


def test_keyboard_interrupt_during_finetuning_restores(tmp_path):
    trained = trained_reference(tmp_path, 2)
    model = MetricsNet(fail_train_at_epoch=2, fail=KeyboardInterrupt)
    cb = OBCQuantize(bits=2, calibration_batches=2, finetune="ternary", finetune_epochs=2,
                     ternary_skip_first_last=False, plot=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown
            fit(tmp_path, [cb], model, max_epochs=4)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not parametrize.is_parametrized(model.fc1)
    assert_same(weights(model), trained)
    assert cb.quantized_modules == [] and cb.phase == "idle"


def test_failing_export_restores_the_trained_weights(tmp_path, monkeypatch):
    import obc_lightning.export as export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_quantized", disk_full)
    trained = trained_reference(tmp_path, 1)
    cb = OBCQuantize(bits=4, calibration_batches=2, export_path=tmp_path / "m.safetensors", plot=False)
    model = MetricsNet()
    with pytest.raises(OSError, match="No space left"):
        fit(tmp_path, [cb], model)
    assert_same(weights(model), trained)
    assert cb.quantized_modules == [] and cb.report is None and cb.metrics == {}


def test_failing_evaluation_after_compression_restores(tmp_path):
    class Arm(pl.Callback):  # before OBCQuantize: its "before" evaluation runs 2 batches, then "after" fails
        def on_train_end(self, trainer, pl_module):
            pl_module.fail_validation_after = 2

    trained = trained_reference(tmp_path, 1)
    cb = OBCQuantize(bits=4, calibration_batches=2, plot=False)
    model = MetricsNet()
    with pytest.raises(RuntimeError, match="boom in validation_step"):
        fit(tmp_path, [Arm(), cb], model)
    assert_same(weights(model), trained)
    assert cb.quantized_modules == []


def test_batchnorm_statistics_are_restored_too(tmp_path, monkeypatch):
    """A failure after BatchNorm re-estimation puts the running statistics back as well."""

    class BNNet(MetricsNet):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x, y=None):
            return self.fc2(self.bn(self.fc1(x)).relu())

    import obc_lightning.export as export

    monkeypatch.setattr(export, "save_quantized", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    torch.manual_seed(0)
    model = BNNet()
    cb = OBCQuantize(bits=2, calibration_batches=2, recalibrate_bn=2, export_path=tmp_path / "m.safetensors",
                     evaluate=False, plot=False)

    class Remember(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.before = weights(pl_module)

    remember = Remember()
    with pytest.raises(OSError, match="disk full"):
        fit(tmp_path, [remember, cb], model)
    assert_same(weights(model), remember.before)


def test_a_second_fit_with_finetuning_compresses_again(tmp_path):
    cb = OBCQuantize(bits=4, calibration_batches=2, finetune="ste", finetune_epochs=1, monitor="val_acc",
                     max_drop=1.0, plot=False)
    model = MetricsNet()
    fit(tmp_path, [cb], model, max_epochs=2)
    first = cb.report
    fit(tmp_path / "second", [cb], model, max_epochs=2)
    assert cb.report is not first and cb.phase == "done" and "obc/val_acc_after" in cb.metrics


# ------------------------------------------------------------------------------------- user code
def test_a_type_error_inside_forward_is_the_users_error(tmp_path):
    class Buggy(MetricsNet):
        armed = False

        def forward(self, x, y=None):
            if self.armed:
                raise TypeError("unsupported operand in the user's forward")
            return super().forward(x)

    class Arm(pl.Callback):  # before OBCQuantize: forward breaks from calibration on
        def on_train_end(self, trainer, pl_module):
            pl_module.armed = True

    trained = trained_reference(tmp_path, 1)
    model = Buggy()
    cb = OBCQuantize(bits=4, calibration_batches=2, evaluate=False, plot=False)
    with pytest.raises(TypeError, match="unsupported operand"):  # raised, not taken as "no usable forward"
        fit(tmp_path, [Arm(), cb], model)
    assert_same(weights(model), trained)


def test_falling_back_from_forward_is_said_once_at_info_level_with_the_reason(tmp_path, caplog):
    class XOnly(MetricsNet):
        def forward(self, x):
            return super().forward(x)

    cb = OBCQuantize(bits=4, calibration_batches=2, plot=False)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        warnings.filterwarnings("error", message=".*calibrating")  # the ordinary (x, y) case: no warning
        fit(tmp_path, [cb], XOnly())
    said = [r.getMessage() for r in caplog.records if "calibrating through" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("OBCQuantize: calibrating through validation_step (forward(x) cannot")
    assert cb.quantized_modules == ["fc1", "fc2"]


# ------------------------------------------------------------------------------ loggers, progress
class ImageLogger(Logger):
    """A logger that takes images, as WandbLogger does (``log_image(key, images, step)``)."""

    def __init__(self):
        super().__init__()
        self.images, self.metrics = {}, {}

    name = "images"
    version = 0

    def log_image(self, key, images, step=None):
        self.images[key] = images

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_chart_goes_to_every_logger_that_takes_images_and_the_backend_is_untouched(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    images = ImageLogger()
    loggers = [CSVLogger(tmp_path), TensorBoardLogger(tmp_path), images]
    cb = OBCQuantize(bits=4, calibration_batches=2)
    fit(tmp_path, [cb], logger=loggers)
    assert matplotlib.get_backend() == backend
    assert "obc/rel_error" in images.images and "obc/fc1/loss" in images.metrics
    assert list(tmp_path.glob("**/events.out.tfevents.*"))
    assert (tmp_path / "lightning_logs" / "version_0" / "obc_rel_error.png").exists()


def test_progress_follows_the_trainers_bar(tmp_path, capsys):
    from lightning.pytorch.callbacks import TQDMProgressBar

    cb = OBCQuantize(bits=4, calibration_batches=2, verbose=False, plot=False)
    fit(tmp_path, [TQDMProgressBar(), cb], enable_progress_bar=True)
    err = capsys.readouterr()
    shown = err.out + err.err
    assert "OBCQuantize calibration" in shown and "OBCQuantize solving" in shown and "fc2" in shown


def test_without_a_bar_each_stage_is_announced(tmp_path, caplog):
    cb = OBCQuantize(bits=4, calibration_batches=2, plot=False)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [cb])
    assert "OBCQuantize: calibration (2 batches)" in caplog.text
    assert "OBCQuantize: solving (2 modules)" in caplog.text


def test_compress_model_progress_bar(capsys):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    compress_model(model, [torch.randn(16, 8)], bits=4, progress=True)
    shown = "".join(capsys.readouterr())
    assert "calibration" in shown and "solving" in shown


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: OBCQuantize(method="foo"), ValueError, "OBCQuantize: method must be one of"),
        (lambda: OBCQuantize(bits=1), ValueError, "OBCQuantize: bits must be an integer in"),
        (lambda: OBCPrune(sparsity=0.5, damp=-1), ValueError, "OBCPrune: damp must be"),
        (lambda: OBCQuantize(finetune="ste", finetune_epochs=0), ValueError, "OBCQuantize: finetune_epochs must"),
        (lambda: OBCQuantize(finetune="ste", mode="up"), ValueError, "OBCQuantize: mode must be 'max' or 'min'"),
        (lambda: OBCQuantize(bitz=4), TypeError, "unexpected keyword argument 'bitz'; did you mean 'bits'"),
        (lambda: compress_model(nn.Linear(4, 2), [torch.randn(2, 4)], method="foo"), ValueError,
         "compress_model: method must be"),
        (lambda: compress_model(nn.Linear(4, 2), [torch.randn(2, 4)], finetune="ste"), TypeError,
         "compress_model\\(\\) got an unexpected keyword argument 'finetune'"),
        (lambda: QuantizationConfig(method="foo"), ValueError, "QuantizationConfig: method must be"),
        (lambda: FinetuneConfig(epochs=0), ValueError, "FinetuneConfig: epochs must be"),
        (lambda: CompressionConfig(finetune=FinetuneConfig(mode="ternary"),
                                   quantization=QuantizationConfig(sparsity=0.5)), ValueError,
         "CompressionConfig: finetune.mode='ternary' .* quantization.sparsity"),
        (lambda: OBCQuantize(config=CompressionConfig(), bits=3), ValueError, "config=... or flat keywords"),
    ],
)
def test_errors_name_the_entry_point_and_the_argument_as_written(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_configuration_round_trips_through_the_checkpoint_state():
    cb = OBCQuantize(bits=3, group_size=64, finetune="noise", noise_group_size=8, monitor="val_acc", max_drop=0.02,
                     export_path="out/m.safetensors", include=["fc*"], product_dtype=torch.bfloat16)
    flat = copy.deepcopy(cb.state_dict()["config"])
    rebuilt = CompressionConfig.from_flat("test", **flat)
    assert rebuilt == cb.config and rebuilt.calibration.product_dtype == "bfloat16"
    assert OBCQuantize(config=rebuilt).config == cb.config


def test_progress_follows_a_rich_progress_bar(tmp_path, monkeypatch):
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from obc_lightning import trainer_glue

    seen = []
    real = trainer_glue.RichProgress.start

    def spy(self, stage, total):
        seen.append((stage, total))
        real(self, stage, total)

    monkeypatch.setattr(trainer_glue.RichProgress, "start", spy)
    cb = OBCQuantize(bits=4, calibration_batches=2, verbose=False, plot=False)
    fit(tmp_path, [RichProgressBar(), cb], enable_progress_bar=True)
    assert seen == [("calibration", 2), ("solving", 2)]


def test_lightning_cli_yaml_builds_the_configuration_and_every_field_has_help(tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    from dataclasses import fields

    from docstring_parser import parse
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from obc_lightning import config as cfg

    yaml = tmp_path / "config.yaml"
    yaml.write_text(
        "trainer:\n  callbacks:\n    - class_path: obc_lightning.OBCQuantize\n      init_args:\n        config:\n"
        "          quantization: {bits: 3, group_size: 16}\n"
        "          finetune: {mode: ste, epochs: 2, monitor: val_acc}\n"
    )
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(yaml)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OBCQuantize)]
    assert cb.config == CompressionConfig(quantization=QuantizationConfig(bits=3, group_size=16),
                                          finetune=FinetuneConfig(mode="ste", epochs=2, monitor="val_acc"))
    for kind in (cfg.QuantizationConfig, cfg.CalibrationConfig, cfg.FinetuneConfig, cfg.ExportConfig,
                 cfg.ReportingConfig, cfg.CompressionConfig):  # what --help prints for each field
        documented = {p.arg_name: p.description for p in parse(kind.__doc__).params}
        assert all(documented.get(f.name) for f in fields(kind)), kind.__name__
    with pytest.raises(SystemExit):
        LightningCLI(BoringModel, BoringDataModule, run=False, args=[
            "--config", str(yaml), "--trainer.callbacks.config.quantization.help",
            "obc_lightning.config.QuantizationConfig"])
    assert "bits per weight of the uniform grid" in capsys.readouterr().out


def test_finetuning_tied_weights_is_refused_before_training(tmp_path):
    class TiedNet(MetricsNet):
        def __init__(self):
            super().__init__()
            self.fc3 = nn.Linear(16, 16)
            self.fc4 = nn.Linear(16, 16)
            self.fc4.weight = self.fc3.weight

        def forward(self, x, y=None):
            return self.fc2(self.fc4(self.fc3(self.fc1(x).relu())).relu())

    cb = OBCQuantize(bits=4, finetune="ste", finetune_epochs=1)
    with pytest.raises(ValueError, match="shared by .*fc3.*fc4.*untie"):
        fit(tmp_path, [cb], TiedNet(), max_epochs=2)


def test_sequential_output_matching_then_ste_finetuning_ends_on_the_grid(tmp_path):
    # the callback's sequential default (output matching) feeds fine-tuning like any other compression
    cb = OBCQuantize(bits=2, calibration_batches=2, sequential=True, finetune="ste", finetune_epochs=1,
                     monitor="val_acc", plot=False)
    t, model = fit(tmp_path, [cb], max_epochs=2)
    assert cb.report.match_outputs and cb.report.calibration_passes == 3  # fc1 plain, fc2 two passes
    assert cb.report["fc2"].drift_loss is not None
    assert "obc/val_acc_finetuned" in cb.metrics
    on_grid(model, bits=2)
