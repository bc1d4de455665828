"""The callback's flow without a Trainer: configuration, compress_stage, a FinetuneSession driven by a
plain PyTorch loop, export; snapshots and session state."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from obc_lightning import (
    CompressionConfig,
    FinetuneSession,
    ModelSnapshot,
    compress_stage,
    export_stage,
    load_quantized,
    restored_on_failure,
    start_finetuning,
)
from obc_lightning.formats.record import model_formats
from obc_lightning.pipeline import (
    compressed_modules,
    compression_epoch,
    finish_finetuning,
    settle_without_finetuning,
)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 8, generator=g) for _ in range(n)]
    return [(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()) for x in xs]


def accuracy(model):
    with torch.no_grad():
        return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in batches(2, seed=1)) / 2


@pytest.mark.parametrize("mode", ["ste", "ternary", "noise"])
def test_a_plain_loop_does_what_the_callback_does(tmp_path, mode):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = CompressionConfig.from_flat(
        "test", bits=2, finetune=mode, monitor="acc", max_drop=0.0, ternary_skip_first_last=False,
        export_path=str(tmp_path / "m.safetensors"),
    )
    snapshot = ModelSnapshot(model)
    with restored_on_failure(snapshot):
        stage = compress_stage(model, [x for x, _ in batches()], config, evaluate=lambda: {"acc": accuracy(model)})
        assert "obc/acc_before" in stage.metrics and "obc/acc_after" in stage.metrics
        session = start_finetuning(model, config, stage, optimizer=opt)
        assert parametrize.is_parametrized(model[0])
        for x, y in batches():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            session.after_backward()
            session.before_optimizer_step()
            opt.step()
            opt.zero_grad()
        results = session.finish()
        metrics = export_stage(model, config, results)
    assert not parametrize.is_parametrized(model[0]) and len(opt.param_groups) == 1
    assert metrics["obc/file_mb"] > 0
    other = mlp()
    load_quantized(tmp_path / "m.safetensors", other)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_snapshot_restores_tied_weights_and_buffers_in_place():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param = model[0].weight
    snapshot = ModelSnapshot(model)
    with pytest.raises(RuntimeError, match="fails"), restored_on_failure(snapshot):
        with torch.no_grad():
            model[0].weight.mul_(3)
            model[1].running_mean.add_(1)
        model.train()(torch.randn(8, 4))
        raise RuntimeError("the work fails")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[0].weight is param and model[2].weight is param
    assert snapshot.nbytes == sum(v.numel() * v.element_size() for v in before.values())


@pytest.mark.parametrize("mode", ["ste", "ternary", "noise", "masked"])
def test_session_state_round_trips_and_checkpoint_weights_are_plain(mode):
    model = mlp()
    config = CompressionConfig.from_flat(
        "test", bits=None if mode == "masked" else 3, sparsity=0.5 if mode == "masked" else None, finetune=mode,
        ternary_skip_first_last=False,
    )
    stage = compress_stage(model, [x for x, _ in batches()], config)
    session = start_finetuning(model, config, stage)
    with torch.no_grad():  # the latent weights move during training
        model[0].parametrizations.weight.original.add_(0.01)
    plain = session.plain_state_dict(model.state_dict())
    assert not [k for k in plain if "parametrizations" in k]
    fresh = mlp()
    fresh.load_state_dict(plain)  # strict: the module as defined
    state = session.state_dict()
    expected = session.quantized_weights()
    resumed = FinetuneSession.resume(fresh, state)
    assert resumed.quantized_weights().keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(resumed.quantized_weights()[name], w), name
        assert torch.equal(fresh.get_submodule(name).parametrizations.weight.original,
                           model.get_submodule(name).parametrizations.weight.original)


def test_abort_leaves_the_latent_weights_and_the_optimizer_as_it_was():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = CompressionConfig.from_flat("test", finetune="ternary", ternary_skip_first_last=False)
    stage = compress_stage(model, [], config)
    session = start_finetuning(model, config, stage, optimizer=opt)
    latent = model[0].parametrizations.weight.original.detach().clone()
    assert len(opt.param_groups) == 2
    session.abort()
    assert not parametrize.is_parametrized(model[0]) and torch.equal(model[0].weight, latent)
    assert len(opt.param_groups) == 1


def eval_accuracy(model):
    model.eval()
    try:
        return accuracy(model)
    finally:
        model.train()


@pytest.mark.parametrize("mode", ["ste", "noise"])
def test_finish_finetuning_ends_the_session_reestimates_batchnorm_and_measures(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = CompressionConfig.from_flat("test", bits=2, finetune=mode, monitor="acc", max_drop=0.0,
                                         recalibrate_bn=2)
    inputs = [x for x, _ in batches()]
    stage = compress_stage(model, inputs, config, evaluate=lambda: {"acc": eval_accuracy(model)})
    session = start_finetuning(model, config, stage, optimizer=opt)
    for x, y in batches():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    metrics, lines = finish_finetuning(model, config, session, stage.metrics, epochs=1, who="test",
                                       evaluate=lambda: {"acc": eval_accuracy(model)}, bn_batches=inputs[:2])
    assert not parametrize.is_parametrized(model[0]) and len(opt.param_groups) == 1
    assert set(model_formats(model)) == {"0", "3"}
    with torch.no_grad():  # update_bn's cumulative average over two equal batches: the mean of both
        expected = model[0](torch.cat(inputs[:2])).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected)
    assert metrics["obc/acc_before"] == stage.metrics["obc/acc_before"]
    assert metrics["obc/acc_finetuned"] == eval_accuracy(model) and metrics["obc/finetune_epochs"] == 1.0
    assert metrics["obc/bn_recalibrated"] == 1.0 and ("obc/noise_bits" in metrics) == (mode == "noise")
    assert lines[:2] == [f"test: fine-tuned ({mode}) for 1 epoch(s)",
                         "BatchNorm statistics of 1 layer(s) re-estimated over 2 training batches"]


def test_a_stage_within_budget_is_the_result():
    model = mlp()
    config = CompressionConfig.from_flat("test", finetune="ternary", ternary_skip_first_last=False,
                                         finetune_epochs=2, monitor="acc", max_drop=1.0)
    stage = compress_stage(model, [], config, evaluate=lambda: {"acc": accuracy(model)})
    assert not stage.needs_finetuning and parametrize.is_parametrized(model[0])
    assert settle_without_finetuning(stage).keys() == {"0", "2"}
    assert not parametrize.is_parametrized(model[0]) and set(model_formats(model)) == {"0", "2"}
    assert compressed_modules(stage, config) == (["0", "2"], {})
    assert compression_epoch(config, max_epochs=5) == 2  # epochs 3 and 4 fine-tune


def test_a_failure_after_ternary_quantizers_are_attached_leaves_a_restorable_model():
    # the budget check fails after compress_stage attached the quantizers: they come off, so the snapshot
    # restores the model (and the user sees their own error, not a state_dict mismatch)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CompressionConfig.from_flat("test", finetune="ternary", ternary_skip_first_last=False, monitor="acc",
                                         max_drop=0.1)
    with pytest.raises(ValueError, match="monitor='acc' is not among"), restored_on_failure(ModelSnapshot(model)):
        compress_stage(model, [], config, evaluate=lambda: {"loss": 1.0})
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_resume_that_fails_partway_takes_off_what_it_attached():
    model = mlp()
    config = CompressionConfig.from_flat("test", bits=3, finetune="ste")
    session = start_finetuning(model, config, compress_stage(model, [x for x, _ in batches()], config))
    state = session.state_dict()
    shorter = nn.Sequential(nn.Linear(8, 16), nn.ReLU())  # the state's second module ("2") is missing
    opt = torch.optim.SGD(shorter.parameters(), lr=0.1)
    with pytest.raises(AttributeError, match="2"):
        FinetuneSession.resume(shorter, state, optimizer=opt)
    assert not parametrize.is_parametrized(shorter[0]) and len(opt.param_groups) == 1
    assert not model_formats(shorter)
