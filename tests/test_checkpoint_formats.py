"""Issue 32, item 2: the compressed model survives every way users save it. A checkpoint written after
compression carries the modules' quantization formats beside its (plain) state dict, so a model restored
from it (``load_from_checkpoint`` + ``load_checkpoint_formats``, or ``fit`` / ``test(ckpt_path=...)`` with
the callback) exports the same bytes as the model in memory; a run that leaves nothing compressed on disk
says where the model is. Item 4: no validation data with ``monitor`` is an error before training, without
it one line."""

import logging

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from quiet_trainer import quiet_trainer
from test_callback import Net as LitNet
from test_callback import data
from test_carried_state import CASES, Net, batches
from torch.utils.data import DataLoader

from obc_lightning import FinetuneSession, compress_model, load_checkpoint_formats, save_quantized
from obc_lightning.callback import OBCQuantize
from obc_lightning.formats.record import CHECKPOINT_KEY, format_of, formats_state, load_formats_state

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore::obc_lightning.calibration.CalibrationWarning",
)


def noise_finetuned():
    """A model whose modules carry DiffQ's mixed format (the one scheme compress_model does not make)."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session = FinetuneSession.begin(model, "noise", names=["conv", "fc"], optimizer=opt)
    for x in batches(2):
        model(x).square().mean().backward()
        session.after_backward()
        session.before_optimizer_step()
        opt.step()
        opt.zero_grad()
    session.finish(export=False)
    return model


@pytest.mark.parametrize("case", [*CASES, "noise"])
def test_formats_as_plain_data_restore_the_same_export(tmp_path, case):
    if case == "noise":
        model = noise_finetuned()
    else:
        model = Net()
        compress_model(model, batches(), **CASES[case])
    torch.save({"state_dict": model.state_dict(), CHECKPOINT_KEY: formats_state(model)}, tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain data only

    restored = Net()
    restored.load_state_dict(checkpoint["state_dict"])  # the state dict stays plain: a strict load
    names = load_checkpoint_formats(restored, checkpoint)
    assert sorted(names) == sorted(formats_state(model))
    for name in names:
        assert type(format_of(restored.get_submodule(name))) is type(format_of(model.get_submodule(name)))
    value_dtype = torch.float32 if case == "noise" else torch.float16
    save_quantized(model, tmp_path / "memory.safetensors", value_dtype=value_dtype)
    save_quantized(restored, tmp_path / "restored.safetensors", value_dtype=value_dtype)
    assert (tmp_path / "restored.safetensors").read_bytes() == (tmp_path / "memory.safetensors").read_bytes()


def test_unknown_modules_and_classes_are_refused_naming_the_caller():
    model = Net()
    compress_model(model, batches(), bits=4)
    state = formats_state(model)
    with pytest.raises(ValueError, match=r"load_checkpoint_formats: .*modules that this model does not have: \['x'\]"):
        load_checkpoint_formats(Net(), {CHECKPOINT_KEY: {"x": state["fc"]}})
    state["fc"]["class"] = "os.system"  # nothing but the known format classes is instantiated
    with pytest.raises(ValueError, match="unknown format class 'os.system'"):
        load_formats_state(Net(), state)
    assert load_checkpoint_formats(Net(), {"state_dict": {}}) == []  # written before compression


def fit(tmp_path, callback, **kw):
    t = quiet_trainer(tmp_path, callbacks=[callback, *kw.pop("callbacks", [])], **kw)
    model = LitNet()
    t.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    return t, model


def test_last_checkpoint_restores_an_identical_export(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = OBCQuantize(bits=3, calibration_batches=2, verbose=False, plot=False)
    t, model = fit(tmp_path, cb, callbacks=[ckpt], enable_checkpointing=True)
    save_quantized(model, tmp_path / "memory.safetensors")
    expected = (tmp_path / "memory.safetensors").read_bytes()

    restored = LitNet.load_from_checkpoint(ckpt.last_model_path)  # a plain, strict load
    assert load_checkpoint_formats(restored, ckpt.last_model_path) == ["conv", "head"]
    save_quantized(restored, tmp_path / "loaded.safetensors")
    assert (tmp_path / "loaded.safetensors").read_bytes() == expected

    fresh = LitNet()  # validate(ckpt_path=...) with the callback: the formats come back by themselves
    tester = quiet_trainer(tmp_path, callbacks=[OBCQuantize(bits=3, calibration_batches=2, verbose=False, plot=False)])
    tester.validate(fresh, DataLoader(data(16), batch_size=8), ckpt_path=ckpt.last_model_path, verbose=False)
    save_quantized(fresh, tmp_path / "validated.safetensors")
    assert (tmp_path / "validated.safetensors").read_bytes() == expected


def test_a_run_with_nothing_on_disk_says_where_the_model_is(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(tmp_path, OBCQuantize(bits=4, calibration_batches=1, verbose=False, plot=False))
    said = [r.getMessage() for r in caplog.records if "in memory only" in r.getMessage()]
    assert len(said) == 1 and "save_quantized" in said[0] and "export_path" in said[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(tmp_path / "b", OBCQuantize(bits=4, calibration_batches=1, verbose=False, plot=False,
                                        export_path=str(tmp_path / "m.safetensors")))
    assert not [r for r in caplog.records if "in memory only" in r.getMessage()]


# ------------------------------------------------------------------ item 4: validation data
def test_monitor_without_validation_data_is_an_error_before_training(tmp_path):
    model = LitNet()
    w0 = model.head.weight.detach().clone()
    cb = OBCQuantize(bits=4, finetune="ste", finetune_epochs=1, monitor="val_acc", max_drop=0.01)
    t = quiet_trainer(tmp_path, callbacks=[cb], max_epochs=2)
    with pytest.raises(ValueError, match=r"OBCQuantize: monitor='val_acc' needs validation data \(no val_dataloaders"):
        t.fit(model, DataLoader(data(), batch_size=8))
    assert t.global_step == 0 and torch.equal(model.head.weight, w0)


def test_without_monitor_one_line_says_there_is_nothing_to_compare(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        t = quiet_trainer(tmp_path, callbacks=[OBCQuantize(bits=4, calibration_batches=1, plot=False)])
        t.fit(LitNet(), DataLoader(data(), batch_size=8))
    said = [r.getMessage() for r in caplog.records if "no validation data" in r.getMessage()]
    assert len(said) == 1 and "nothing to compare" in said[0]
