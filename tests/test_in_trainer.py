"""OBCQuantize among whatever else is in a Trainer: other callbacks that change the weights at the end of fit
(weight averaging, pruning) in either order, every precision Lightning accepts on CPU, torch.compile'd
modules, an empty calibration loader."""

import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning, StochasticWeightAveraging, WeightAveraging
from quiet_trainer import quiet_trainer
from test_callback import Net, data
from torch import nn
from torch.nn.utils import prune
from torch.optim.swa_utils import get_ema_avg_fn
from torch.utils.data import DataLoader

from obc_lightning import compress_model, save_quantized
from obc_lightning.callback import OBCQuantize
from obc_lightning.formats.record import format_of

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore:.*does not have many workers",
)

BITS = 3


def fit(tmp_path, callbacks, model=None, **kw):
    model = model or Net()
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    args.update(kw)
    quiet_trainer(tmp_path, callbacks=callbacks, logger=False, **args).fit(
        model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8)
    )
    return model


def quantize(**kw):
    return OBCQuantize(**{"bits": BITS, "calibration_batches": 2, "evaluate": False, "plot": False, "verbose": False,
                          **kw})


def assert_compressed_as_reported(cb, model, tmp_path, names=("conv", "head")):
    """The model is what the callback says: the reported modules carry a 3-bit format their weights are on
    (save_quantized re-derives every code from the weight and refuses one off its recorded grid)."""
    assert cb.quantized_modules == list(names) and cb.report is not None
    for name in names:
        w = model.get_submodule(name).weight.detach()
        assert format_of(model.get_submodule(name)) is not None, name
        assert all(row.unique().numel() <= 2**BITS for row in w.reshape(w.shape[0], -1)), name
    save_quantized(model, tmp_path / "model.safetensors")


# ------------------------------------------------------------------ 1. callbacks that change the weights
def weight_averaging(kind):
    if kind == "swa":
        return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.5)  # averages from epoch 0
    return WeightAveraging(avg_fn=get_ema_avg_fn(0.5))


@pytest.mark.parametrize("kind", ["swa", "ema"])
@pytest.mark.parametrize("obc_first", [True, False])
def test_weight_averaging_in_either_order_is_compressed_after_it(tmp_path, kind, obc_first):
    # SWA / EMA copy their float average into the model in on_train_end: the compression must come after
    cb, avg = quantize(), weight_averaging(kind)
    averaged = {}

    class Spy(pl.Callback):  # the model as weight averaging leaves it, before compression
        def on_train_end(self, trainer, pl_module):
            averaged.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    callbacks = [cb, avg] if obc_first else [avg, cb]
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = fit(tmp_path, [*callbacks, Spy(), last], enable_checkpointing=True)
    assert_compressed_as_reported(cb, model, tmp_path)
    # the 'last' checkpoint holds the compressed model (WeightAveraging would store its average there)
    saved = torch.load(last.last_model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[n], p) for n, p in model.state_dict().items())
    # what was compressed is the average: compressing it again gives the same weights, bit for bit
    again = Net()
    again.load_state_dict({**again.state_dict(), **averaged})
    compress_model(again, list(DataLoader(data(), batch_size=8))[:2], bits=BITS)  # the calibration batches
    for name in ("conv", "head"):
        assert torch.equal(again.get_submodule(name).weight, model.get_submodule(name).weight), name


@pytest.mark.parametrize("obc_first", [True, False])
def test_model_pruning_in_either_order_is_made_permanent_then_compressed(tmp_path, obc_first):
    cb = quantize()
    pruning = ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"], verbose=0)
    model = fit(tmp_path, [cb, pruning] if obc_first else [pruning, cb])
    assert not cb.skipped_modules
    assert_compressed_as_reported(cb, model, tmp_path)


@pytest.mark.parametrize("obc_first", [True, False])
def test_a_callback_that_makes_torch_pruning_permanent_in_either_order(tmp_path, obc_first):
    class MakePermanent(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            prune.remove(pl_module.head, "weight")

    model = Net()
    prune.l1_unstructured(model.head, "weight", amount=0.5)
    cb = quantize()
    fit(tmp_path, [cb, MakePermanent()] if obc_first else [MakePermanent(), cb], model=model)
    assert_compressed_as_reported(cb, model, tmp_path)


def test_torch_pruning_left_active_is_reported_full_precision(tmp_path):
    model = Net()
    prune.l1_unstructured(model.head, "weight", amount=0.5)
    cb = quantize()
    with pytest.warns(UserWarning, match="head: weight is not a Parameter .*torch.nn.utils.prune"):
        fit(tmp_path, [cb], model=model)
    assert cb.quantized_modules == ["conv"] and "head" in cb.skipped_modules
    assert (model.head.weight == 0).float().mean() == 0.5  # the pruned weight as it was, in full precision
    assert model.head.weight.unique().numel() > 2**BITS


def test_weights_changed_after_every_callback_fail_loudly(tmp_path):
    class Rewrites(Net):  # a LightningModule hook runs after every callback's on_train_end
        def on_fit_end(self):
            with torch.no_grad():
                self.head.weight.add_(1e-3)

    cb = quantize()
    with pytest.raises(RuntimeError, match="weights of head changed after compression.*report is withdrawn"):
        fit(tmp_path, [cb], model=Rewrites())
    assert cb.report is None and not cb.quantized_modules


def test_weights_changed_by_another_callback_after_compression_for_finetuning_are_compressed_again(tmp_path):
    # fine-tuning planned, the budget met at the end of epoch 0: compressed there and fit stops; a callback's
    # on_train_end then writes weights it kept (the best epoch's, say): the callback compresses those again
    class RestoresEpochZero(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.kept = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                for n, p in pl_module.named_parameters():
                    p.copy_(self.kept[n])

    cb = quantize(finetune="ste", finetune_epochs=1, monitor="val_loss", max_drop=10.0, evaluate=True)
    with pytest.warns(UserWarning, match="weights of conv, head were changed after compression"):
        model = fit(tmp_path, [cb, RestoresEpochZero()], max_epochs=2)
    assert_compressed_as_reported(cb, model, tmp_path)


@pytest.mark.parametrize("other", ["swa", "ema", "pruning"])
def test_finetuning_beside_weight_averaging_or_pruning_is_refused_before_training(tmp_path, other):
    # both work on the same weights (averaged copies paired by position, torch.nn.utils.prune): the fit would
    # fail once fine-tuning starts, after the epochs before it
    second = (ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"], verbose=0)
              if other == "pruning" else weight_averaging(other))
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = quantize(finetune="ste", finetune_epochs=1)
    name = type(second).__name__
    with pytest.raises(ValueError, match=rf"OBCQuantize: finetune='ste' reparametrizes .* and {name} .* cannot train"):
        fit(tmp_path, [cb, second], model=model, max_epochs=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cb.report is None


# ------------------------------------------------------------------ 2. precisions
PRECISIONS = ["32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_cpu_precision_calibrates_and_evaluates_as_lightning_runs_the_model(tmp_path, precision):
    cb = OBCQuantize(bits=BITS, calibration_batches=2, plot=False, verbose=False)
    model = Net()
    trainer = quiet_trainer(tmp_path, callbacks=[cb], logger=False, precision=precision, limit_train_batches=2,
                            limit_val_batches=2)
    trainer.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    dtype = {"64": torch.float64, "bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    true = precision.endswith("-true") and precision != "32-true"
    assert model.head.weight.dtype == (dtype if true else torch.float32)
    assert cb.quantized_modules == ["conv", "head"]
    assert all(m.n_samples > 0 and torch.isfinite(torch.tensor(m.loss)) for m in cb.report.modules)
    # the replayed validation before compression is the fit's own last validation (same weights, same
    # precision, same batches)
    assert cb.metrics["obc/val_loss_before"] == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-6)
    save_quantized(model, tmp_path / "model.safetensors")


# ------------------------------------------------------------------ 3. torch.compile
class CompiledBody(Net):
    # backend="eager": dynamo captures the graph (what makes the hooks miss) without inductor's C++
    # compilation, which takes tens of seconds on a CPU
    def __init__(self):
        super().__init__()
        self.body = torch.compile(nn.Sequential(self.conv, nn.ReLU(), nn.Flatten(), self.head), backend="eager")
        del self.conv, self.head

    def forward(self, x, y=None):
        return self.body(x)


def test_compiled_module_is_calibrated_and_keeps_running_compiled(tmp_path):
    cb = quantize()
    model = fit(tmp_path, [cb], model=CompiledBody())  # the graph is built in training and validation
    names = ("body._orig_mod.0", "body._orig_mod.3")
    assert_compressed_as_reported(cb, model, tmp_path, names)
    x = data(8).tensors[0]
    with torch.no_grad():  # the compiled graph runs on the quantized weights
        torch.testing.assert_close(model(x), model.body._orig_mod(x), rtol=0, atol=0)


def test_compress_model_on_a_compiled_module():
    model = CompiledBody()
    x = data(8).tensors[0]
    before = model(x).detach()
    report = compress_model(model, [x], bits=BITS)  # after the graph was built
    assert report.quantized == ["body._orig_mod.0", "body._orig_mod.3"]
    with torch.no_grad():
        assert not torch.equal(model(x), before)
        torch.testing.assert_close(model(x), model.body._orig_mod(x), rtol=0, atol=0)


def test_without_set_stance_a_compiled_module_is_named_as_compiled(monkeypatch):
    model = CompiledBody()
    x = data(8).tensors[0]
    model(x)
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.warns(UserWarning, match="inside the torch.compile'd module 'body'"):
        report = compress_model(model, [x], bits=BITS)
    assert not report.quantized


# ------------------------------------------------------------------ 9. input
@pytest.mark.parametrize("loader", [[], DataLoader(data(0), batch_size=4)], ids=["list", "DataLoader"])
def test_empty_calibration_dataloader_is_refused(loader):
    with pytest.raises(ValueError, match="OBCQuantize: calibration_dataloader is empty"):
        OBCQuantize(calibration_dataloader=loader)


def test_calibration_dataloader_yielding_nothing_is_an_error(tmp_path):
    cb = quantize(calibration_dataloader=iter(()))
    model = Net()
    with pytest.raises(ValueError, match=r"calibration_dataloader \(tuple_iterator\) gave no batch"):
        fit(tmp_path, [cb], model=model, limit_train_batches=1)
    assert not cb.quantized_modules and all(format_of(m) is None for m in model.modules())


# ------------------------------------------------------------------ 5. what stays in full precision
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.kind = nn.Embedding(3, 8)
        self.pos = nn.Parameter(torch.randn(4, 8))
        self.norm = nn.LayerNorm(8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 50)
        self.head.weight = self.emb.weight  # tied: quantized with the head, so not left in full precision

    def forward(self, x):
        h = self.norm(self.emb(x) + self.kind(torch.zeros_like(x)) + self.pos)
        return self.head(self.proj(self.rnn(h)[0]))


def test_report_lists_every_module_left_in_full_precision_with_its_share():
    model = Tokens()
    x = torch.randint(0, 50, (4, 4), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning):  # the tied Embedding: a user of the quantized weight no Hessian measured
        report = compress_model(model, [x], bits=BITS, exclude="proj")
    assert report.quantized == ["head"]
    fp = report.full_precision
    assert list(fp) == ["<model>", "kind", "norm", "rnn", "proj"]  # model order; not emb (tied to head)
    assert {n: (kind, size) for n, (kind, _, size) in fp.items()} == {
        "<model>": ("Tokens", 4 * 32), "kind": ("Embedding", 4 * 24), "norm": ("LayerNorm", 4 * 16),
        "rnn": ("GRU", 4 * (2 * 3 * 8 * 8 + 2 * 3 * 8)), "proj": ("Linear", 4 * (64 + 8)),
    }
    assert "embedding table" in fp["kind"][1] and "recurrent" in fp["rnn"][1] and "exclude" in fp["proj"][1]
    total = 4 * sum(p.numel() for p in model.parameters())  # the tied weight once
    assert report.model_bytes == total
    assert report.full_precision_share == pytest.approx(sum(size for _, _, size in fp.values()) / total)
    assert report.metrics()["obc/full_precision_share"] == report.full_precision_share
    table = report.table()
    share = fp["rnn"][2] / total
    assert f"full precision rnn: {share:.1%} of the model's parameters; a recurrent layer (GRU" in table
    assert f"full precision outside the targets: {sum(s for *_, s in fp.values()) / 2**20:.3f} MB" in table


# ------------------------------------------------------------------ 4. ddp_spawn
SPAWN_SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile, warnings
    sys.path.insert(0, {tests_dir!r})
    sys.path.insert(0, os.path.dirname({tests_dir!r}))  # this checkout's obc_lightning
    warnings.simplefilter("ignore")
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader
    from test_callback import Net, data
    from obc_lightning.callback import OBCQuantize
    from obc_lightning.trainer_glue import state_file

    if __name__ == "__main__":
        cb = OBCQuantize(bits=3, calibration_batches=2, plot=False, verbose=False)
        model = Net()
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=2,
                             strategy="ddp_spawn", callbacks=[cb], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[1])
        trainer.fit(model, DataLoader(data(), batch_size=4), DataLoader(data(16), batch_size=4))
        sent = os.path.exists(state_file(cb._token))
        report = cb.report  # read here, in the main process
        torch.save({{"sent": sent, "left": os.path.exists(state_file(cb._token)),
                    "quantized": cb.quantized_modules, "metrics": cb.metrics,
                    "report": None if report is None else report.to_dict(), "head": model.head.weight.detach()}},
                   os.path.join(sys.argv[1], "main.pt"))
    """
)


@pytest.mark.slow
def test_ddp_spawn_results_reach_the_main_process(tmp_path):
    script = tmp_path / "spawn_run.py"
    script.write_text(SPAWN_SCRIPT.format(tests_dir=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = torch.load(tmp_path / "main.pt", weights_only=True)
    assert out["sent"] and not out["left"]  # rank zero sent its results, the main process took them
    assert out["quantized"] == ["conv", "head"] and out["report"]["bits"] == 3
    assert [m["name"] for m in out["report"]["modules"]] == ["conv", "head"]
    assert out["metrics"]["obc/modules_quantized"] == 2 and "obc/head/loss" in out["metrics"]
    assert all(row.unique().numel() <= 2**3 for row in out["head"])  # the weights came back quantized
