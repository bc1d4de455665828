"""Mixed precision to a size target: per-module widths, the loss database, the exact allocation, the
weighting search, the callback, the export of mixed widths, and sparsity allocated per layer."""

import copy
import csv
import itertools
import os
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from obc_lightning import compress_model
from obc_lightning.allocation import OutputError, pareto_allocate, pruned_cost, quantized_cost
from obc_lightning.config import CompressionConfig, QuantizationConfig
from obc_lightning.formats.bits import FP32_BYTES
from obc_lightning.solvers.prune import obs_prune, obs_prune_trace

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------- the allocation
def brute_force(costs, losses, budget):
    best = None
    for a in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[k] for c, k in zip(costs, a)) <= budget:
            e = sum(x[k] for x, k in zip(losses, a))
            best = e if best is None else min(best, e)
    return best


def test_pareto_allocation_is_the_exact_optimum():
    rng = random.Random(0)
    for _ in range(300):
        L, K = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.randint(0, 12) for _ in range(K)] for _ in range(L)]
        losses = [[rng.choice([rng.random(), 0.5]) for _ in range(K)] for _ in range(L)]  # ties included
        budget = rng.randint(0, 40)
        opt = brute_force(costs, losses, budget)
        if opt is None:
            with pytest.raises(ValueError, match="cheapest assignment"):
                pareto_allocate(costs, losses, budget)
            continue
        choice, total, exact = pareto_allocate(costs, losses, budget)
        assert exact
        assert sum(c[k] for c, k in zip(costs, choice)) <= budget
        assert total == pytest.approx(opt, abs=1e-12)
        assert sum(x[k] for x, k in zip(losses, choice)) == pytest.approx(opt, abs=1e-12)


def test_bucketed_allocation_stays_feasible_and_within_its_bound():
    # with a frontier cap the costs are merged in buckets of u <= ceil((budget + 1) / max_points): the result
    # fits the budget and is no worse than the exact optimum for budget - L * u
    rng = random.Random(1)
    for _ in range(50):
        L, K, max_points = 6, 4, 3
        costs = [[rng.randint(0, 30) for _ in range(K)] for _ in range(L)]
        losses = [[rng.random() for _ in range(K)] for _ in range(L)]
        budget = rng.randint(60, 150)
        if brute_force(costs, losses, budget) is None:
            continue
        choice, total, _ = pareto_allocate(costs, losses, budget, max_points=max_points)
        assert sum(c[k] for c, k in zip(costs, choice)) <= budget
        u = -(-(budget + 1) // max_points)
        relaxed = brute_force(costs, losses, budget - L * u)
        if relaxed is not None:
            assert total <= relaxed + 1e-12


# ------------------------------------------------------------------------------------ the costs
@pytest.mark.parametrize("group_size", [None, 8, 100])
def test_cost_formulas_are_the_reports(group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    data = [torch.randn(8, 4, 6, 6) for _ in range(2)]
    for bits in (2, 3):
        m = copy.deepcopy(model)
        report = compress_model(m, data, bits, group_size=group_size)
        for name in ("0", "2"):
            mod, rep = m.get_submodule(name), report[name]
            assert quantized_cost(mod, bits, group_size, "bits") == rep.weight_bits
            bias = mod.bias.numel() * FP32_BYTES
            assert quantized_cost(mod, bits, group_size, "bytes") == rep.bytes_after - bias
    for s in (0.3, 0.5):
        m = copy.deepcopy(model)
        report = compress_model(m, data, None, sparsity=s)
        for name in ("0", "2"):
            mod, rep = m.get_submodule(name), report[name]
            assert pruned_cost(mod, s, "kept") == mod.weight.numel() - round(rep.sparsity * mod.weight.numel())
            assert pruned_cost(mod, s, "bytes") == rep.bytes_after - mod.bias.numel() * FP32_BYTES


def test_prune_trace_gives_obs_prune_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 20, generator=g)
    X = torch.randn(64, 20, generator=g)
    H = 2 / 64 * X.T @ X
    W[0, :3] = 0  # pre-zeroed weights are removed first
    trace = obs_prune_trace(W, H, damp=0.01)
    for s in (0.0, 0.25, 0.5, 0.9):
        a, b = trace.at(s), obs_prune(W, H, sparsity=s, damp=0.01)
        assert torch.equal(a.pruned_matrix, b.pruned_matrix) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.loss, b.loss)
    assert trace.loss(0.0) == 0 and trace.loss(0.25) <= trace.loss(0.5) <= trace.loss(0.9)


# ------------------------------------------------------------------------------ per-module bits
def test_bits_by_pattern_equal_the_uniform_runs_module_by_module():
    model, data = mlp(), batches()
    mixed = copy.deepcopy(model)
    report = compress_model(mixed, data, bits={"2": 8, "0": 2, "*": 3})
    assert report.bits == {"0": 2, "2": 8, "4": 3}
    assert [m.bits for m in report.modules] == [2, 8, 3]
    for bits, names in ((2, ["0"]), (8, ["2"]), (3, ["4"])):
        uniform = copy.deepcopy(model)
        compress_model(uniform, data, bits)  # one-pass Hessians: a module's result does not depend on the others
        for n in names:
            assert torch.equal(mixed.get_submodule(n).weight, uniform.get_submodule(n).weight), n
    metrics = report.metrics()
    assert metrics["obc/0/bits"] == 2 and metrics["obc/2/bits"] == 8 and metrics["obc/4/bits"] == 3
    n = [m.weight.numel() for m in (mixed[0], mixed[2], mixed[4])]
    assert report.avg_bits == pytest.approx(sum(r.weight_bits for r in report.modules) / sum(n))


def test_bits_mapping_errors_name_the_pattern():
    with pytest.raises(ValueError, match=r"bits pattern 'nope' matches no target"):
        compress_model(mlp(), batches(), bits={"nope": 4, "*": 3})
    with pytest.raises(ValueError, match=r"gives no value for module '4'"):
        compress_model(mlp(), batches(), bits={"0": 4, "2": 3})
    with pytest.raises(ValueError, match=r"compress_model: bits must be an integer >= 2 and <= 8"):
        compress_model(mlp(), batches(), bits={"*": 9})


def test_mixed_widths_export_round_trip(tmp_path):
    from obc_lightning.export import load_quantized, save_quantized

    model = mlp()
    report = compress_model(model, batches(), bits={"0": 2, "2": 5, "*": 8}, keep_results=True)
    path = tmp_path / "mixed.safetensors"
    save_quantized(model, path, report.results)
    loaded = load_quantized(path, mlp(seed=3))
    for n in ("0", "2", "4"):
        assert torch.equal(loaded.get_submodule(n).weight, model.get_submodule(n).weight), n
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    assert {n: modules[n]["bits"] for n in ("0", "2", "4")} == {"0": 2, "2": 5, "4": 8}


# ----------------------------------------------------------------------------------- size targets
def output_error(model, ref, data, metric="mse"):
    num = den = 0.0
    with torch.no_grad():
        for x in data:
            y, y0 = model(x).double(), ref(x).double()
            if metric == "mse":
                num, den = num + float((y - y0).square().sum()), den + float(y0.square().sum())
            else:
                p0 = torch.softmax(y0, -1)
                num += float((p0 * (p0.log() - torch.log_softmax(y, -1))).sum())
                den += y0.shape[0]
    return num / den


@pytest.mark.parametrize("metric", ["mse", "kl"])
def test_output_error_matches_a_plain_computation(metric):
    model, data = mlp(), batches()
    ref = copy.deepcopy(model)
    err = OutputError(model, data, metric)
    assert err() == 0
    with torch.no_grad():
        model[2].weight.add_(0.05)
    assert err() == pytest.approx(output_error(model, ref, data, metric), rel=1e-9)


def fp_and_compressed(data, **kw):
    model = mlp()
    report = compress_model(model, data, **kw)
    return mlp(), model, report


@pytest.mark.parametrize("b", [2, 3, 8])
def test_target_bits_b_is_uniform_b_or_better_on_held_out_batches(b):
    # 4 batches: the last is held out (allocation_holdout=0.25), the Hessians come from the other three; the
    # guarantee is the search's, on the solutions it measured (allocation_refit=False returns those)
    data = batches()
    fit, held = data[:3], data[3:]
    ref, mixed, report = fp_and_compressed(data, bits=[2, 3, 4, 8], target_bits=b, allocation_steps=8, solver="gptq",
                                           allocation_refit=False)
    uniform = mlp()
    compress_model(uniform, fit, b, solver="gptq")  # uniform b on the same Hessians: exactly b code bits per weight
    assert report.avg_code_bits <= b and report.allocation.achieved == report.avg_code_bits
    assert output_error(mixed, ref, held) <= output_error(uniform, ref, held) * (1 + 1e-9)
    a = report.allocation
    if a.error is not None:  # a search ran: its numbers are the plain computation's
        assert a.heldout == "1 of 4 calibration batches held out" and f"{b}-bit" in a.uniform
        assert a.error == pytest.approx(output_error(mixed, ref, held), rel=1e-6)
        assert a.uniform[f"{b}-bit"] == pytest.approx(output_error(uniform, ref, held), rel=1e-6)
        assert a.calibration_error == pytest.approx(output_error(mixed, ref, fit), rel=1e-6)
        assert a.uniform_calibration[f"{b}-bit"] == pytest.approx(output_error(uniform, ref, fit), rel=1e-6)
        assert a.error <= min(a.uniform.values())  # no uniform width within the budget does better held out
        assert "on 1 of 4 calibration batches held out" in report.table()
    else:  # every module at its widest candidate fits: uniform b itself
        assert b == 8 and set(report.bits.values()) == {8}
    again = mlp()  # the chosen widths repeat as a per-module mapping (on the batches the Hessians came from)
    compress_model(again, fit, bits=report.bits, solver="gptq")
    for n in ("0", "2", "4"):
        assert torch.equal(again.get_submodule(n).weight, mixed.get_submodule(n).weight), n


def test_eval_batches_judge_and_every_calibration_batch_gives_hessians():
    data, held = batches(), batches(2, seed=7)
    ref, mixed, report = fp_and_compressed(data, target_bits=3.0, allocation_steps=8, eval_batches=held, solver="gptq")
    uniform = mlp()
    compress_model(uniform, data, 3, solver="gptq")
    assert report.allocation.heldout == "eval_batches (2 batches)"
    assert output_error(mixed, ref, held) <= output_error(uniform, ref, held) * (1 + 1e-9)
    again = mlp()
    compress_model(again, data, bits=report.bits, solver="gptq")
    for n in ("0", "2", "4"):
        assert torch.equal(again.get_submodule(n).weight, mixed.get_submodule(n).weight), n
    with pytest.raises(ValueError, match="compress_model: eval_batches measures the assignments of a size target"):
        compress_model(mlp(), data, 3, eval_batches=held)


def test_a_held_out_metric_to_maximise():
    from obc_lightning.allocation import HeldOutMetric

    data, held = batches(), batches(2, seed=7)
    ref, model = mlp(), mlp()

    def agreement():  # the share of held-out rows whose argmax is the full-precision one
        with torch.no_grad():
            return float(sum((model(x).argmax(1) == ref(x).argmax(1)).sum() for x in held) / 64)

    metric = HeldOutMetric("agreement", agreement, "max")
    report = compress_model(model, data, target_bits=2.5, allocation_steps=6, eval_batches=metric, solver="gptq")
    a = report.allocation
    assert a.measure == "agreement" and a.heldout == "agreement" and metric.passes == a.evaluations
    assert a.error == agreement() >= max(a.uniform.values())
    assert "2-bit" in a.uniform and "3-bit" not in a.uniform


def test_a_width_target_solves_the_chosen_widths_again_on_every_batch_by_default():
    data = batches()
    for b in (2, 3):  # at 2 the only assignment within the budget is uniform 2-bit: the refit is uniform 2-bit
        searched = mlp()
        kept = compress_model(searched, data, target_bits=b, allocation_steps=4, solver="gptq", allocation_refit=False)
        assert kept.allocation.refit is None
        model = mlp()
        report = compress_model(model, data, target_bits=b, allocation_steps=4, solver="gptq")
        assert report.bits == kept.bits and (b == 2) == (set(report.bits.values()) == {2})
        again = mlp()
        compress_model(again, data, bits=report.bits, solver="gptq")  # those widths, on all four batches
        for n in ("0", "2", "4"):
            assert torch.equal(again.get_submodule(n).weight, model.get_submodule(n).weight), (b, n)
            assert not torch.equal(searched.get_submodule(n).weight, model.get_submodule(n).weight), (b, n)
        a = report.allocation
        assert a.heldout == "1 of 4 calibration batches held out" and a.error == kept.allocation.error
        assert a.refit == "the chosen widths solved again on all 4 calibration batches (allocation_refit)"
        assert a.refit in report.table() and report.avg_code_bits <= b and a.achieved == report.avg_code_bits
    with pytest.raises(ValueError, match="allocation_refit solves the chosen widths again"):
        compress_model(mlp(), data, None, target_sparsity=0.5, allocation_refit=True)
    pruned = compress_model(mlp(), data, None, target_sparsity=0.5, allocation_steps=4)  # levels are never refitted
    assert pruned.allocation.refit is None


def test_one_calibration_batch_is_judged_on_itself_and_says_so():
    from obc_lightning.calibration import CalibrationWarning

    data = batches(1)
    with pytest.warns(CalibrationWarning, match="only one calibration batch to split"):
        report = compress_model(mlp(), data, target_bits=2.5, allocation_steps=4, solver="gptq")
    a = report.allocation
    assert a.heldout is None and a.calibration_error == a.error and "on the calibration batches" in report.table()


def test_a_larger_budget_is_never_worse_on_the_held_out_batches():
    data = batches()
    errors = []
    for target in (2.0, 2.5, 3.0, 4.0):
        ref, model, report = fp_and_compressed(data, target_bits=target, allocation_steps=8, solver="gptq")
        errors.append(output_error(model, ref, data[3:]))
        assert report.allocation.fill  # the fill says why it stopped
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors


def test_target_with_room_for_the_widest_needs_no_search():
    model = mlp()
    report = compress_model(model, batches(), bits=[2, 3], target_bits=7.5)
    assert report.bits == {"0": 3, "2": 3, "4": 3} and report.allocation.evaluations == 0


def test_target_size_mb_is_met():
    model, data = mlp(), batches()
    size = compress_model(copy.deepcopy(model), data, 3).bytes_after / 2**20 + 0.0005
    report = compress_model(model, data, target_size_mb=size, allocation_steps=8)
    assert report.bytes_after <= size * 2**20
    assert report.allocation.achieved == report.bytes_after / 2**20
    assert len(set(report.bits.values())) > 1  # the extra half kilobyte went somewhere


def test_unreachable_targets_name_the_achievable_range_and_leave_the_model():
    model = mlp()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target_bits=1.5 is not reachable .* smallest achievable is 2\.0000 code "
                                         r"bits per weight .* the largest 8\.0000 code bits per weight"):
        compress_model(model, batches(), target_bits=1.5)
    with pytest.raises(ValueError, match=r"target_size_mb=1e-05 is not reachable .* smallest achievable is 0\.\d+ MB"):
        compress_model(model, batches(), target_size_mb=1e-5)
    with pytest.raises(ValueError, match=r"target_sparsity=0.9 is not reachable: .* reach at most 75\.\d+%"):
        compress_model(model, batches(), bits=None, sparsity=[0.0, 0.5, 0.75], target_sparsity=0.9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_target_sparsity_allocates_levels_from_the_obs_traces():
    model, data = mlp(), batches()
    uniform = copy.deepcopy(model)
    compress_model(uniform, data, None, sparsity=0.6)
    report = compress_model(model, data, None, target_sparsity=0.6, allocation_steps=10)
    assert report.bits is None and report.pruned_weights >= sum(round(0.6 * m.weight.numel()) for m in uniform[::2])
    levels = [m.sparsity for m in report.modules]
    assert len(set(round(x, 2) for x in levels)) > 1
    assert report.allocation.error <= report.allocation.uniform["60% sparse"]
    assert output_error(model, mlp(), data) <= output_error(uniform, mlp(), data) * (1 + 1e-9)
    for name in ("0", "2", "4"):  # OBS compensated kept weights, exact zeros elsewhere
        w = model.get_submodule(name).weight
        assert (w == 0).float().mean().item() == pytest.approx(report[name].sparsity)


def test_same_decision_under_a_sum_over_ranks():
    # two identical ranks: every sum doubles, the averaged losses and the error ratios do not change
    def reduce_fn(t):
        t.mul_(2)

    data = batches()
    a = compress_model(mlp(), data, target_bits=3.3, allocation_steps=6)
    b = compress_model(mlp(), data, target_bits=3.3, allocation_steps=6, reduce_fn=reduce_fn)
    assert a.bits == b.bits and a.allocation.error == pytest.approx(b.allocation.error)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=[2, 4]), r"bits=\[2, 4\] lists candidate widths of a size target"),
    (dict(bits=3, target_bits=3.0), r"give them as bits=\[2, 3, 4, 8\] \(or leave bits at its default 4"),
    (dict(target_bits=3.0, target_size_mb=1.0), "at most one size target"),
    (dict(target_bits=0), "target_bits must be a positive number"),
    (dict(bits=None, target_sparsity=1.0), r"target_sparsity must be a number in \(0, 1\)"),
    (dict(target_sparsity=0.5), "target_sparsity allocates sparsity to a pruned float model: it needs bits=None"),
    (dict(bits=None, target_sparsity=0.5, sequential=True),
     "target_sparsity builds its database .* with pruning only it needs sequential=False"),
    (dict(target_bits=3.0, n_m=(2, 4)), "does not combine with n_m"),
    (dict(target_bits=3.0, allocation_metric="l1"), r"allocation_metric must be one of \('mse', 'kl'\)"),
    (dict(target_bits=3.0, allocation_steps=0), "allocation_steps must be a positive integer"),
    (dict(target_bits=3.0, allocation_holdout=1.0), r"allocation_holdout must be a number in \[0, 1\)"),
    (dict(sparsity=[0.1, 0.2], bits=None), "lists candidate levels of target_sparsity"),
    (dict(target_bits=3.0, finetune="noise"), r"finetune='noise' learns its quantization in training"),
])
def test_configuration_errors_name_the_keywords(kwargs, match):
    from obc_lightning.callback import OBCQuantize

    with pytest.raises(ValueError, match=match):
        OBCQuantize(**kwargs)


def test_target_configuration_round_trips_through_flat_keywords():
    cfg = CompressionConfig.from_flat("x", target_bits=3.0)
    assert cfg.quantization.bits == (2, 3, 4, 8)
    assert CompressionConfig.from_flat("x", **cfg.to_flat()) == cfg
    q = QuantizationConfig(bits=None, target_sparsity=0.5, sparsity=[0.5, 0.0, 0.25])
    assert q.sparsity == (0.0, 0.25, 0.5)
    assert QuantizationConfig(bits={"*conv1*": 8, "*": 4}).describe().startswith("bits per module")


def test_lightning_cli_yaml_with_a_size_target(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from obc_lightning.callback import OBCQuantize

    yaml = tmp_path / "config.yaml"
    yaml.write_text(
        "trainer:\n  callbacks:\n    - class_path: obc_lightning.OBCQuantize\n      init_args:\n        config:\n"
        "          quantization: {target_bits: 3.0}\n"
    )
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(yaml)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OBCQuantize)]
    assert cb.config.quantization.bits == (2, 3, 4, 8) and cb.config.quantization.target_bits == 3.0


# ----------------------------------------------------------------------------------- the callback
def test_callback_target_bits_metrics_chart_ste_and_export(tmp_path):
    pytest.importorskip("matplotlib")
    from test_callback import Net, data, trainer

    from obc_lightning.callback import OBCQuantize
    from obc_lightning.export import load_quantized

    path = tmp_path / "m.safetensors"
    cb = OBCQuantize(target_bits=4.5, calibration_batches=2, allocation_steps=6, finetune="ste", finetune_epochs=1,
                     export_path=path, monitor="val_acc")
    t = trainer(tmp_path, cb, max_epochs=2)
    model = Net()
    t.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    bits = cb.report.bits
    assert set(bits) == {"conv", "head"} and cb.report.avg_code_bits <= 4.5
    a = cb.report.allocation  # judged by the user's monitor on the validation replay, higher is better
    assert a.measure == "val_acc" and a.heldout == "the validation data (val_acc)"
    assert a.error >= max(a.uniform.values())
    assert cb.metrics["obc/conv/bits"] == bits["conv"] and cb.metrics["obc/head/bits"] == bits["head"]
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        logged = {k for r in csv.DictReader(f) for k, v in r.items() if v not in ("", None)}
    assert {"obc/conv/bits", "obc/head/bits", "obc/allocation_evaluations"} <= logged
    with open(os.path.join(t.logger.log_dir, "obc_bits.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "obc/val_acc_finetuned" in cb.metrics  # fine-tuned on each module's own grid
    loaded = load_quantized(path, Net())
    for name in ("conv", "head"):
        w = getattr(model, name).weight
        assert torch.equal(getattr(loaded, name).weight, w), name
        assert w.reshape(w.shape[0], -1)[0].unique().numel() <= 2 ** bits[name]


def test_prune_callback_target_sparsity(tmp_path):
    from test_callback import Net, data, trainer

    from obc_lightning.callback import OBCPrune

    cb = OBCPrune(target_sparsity=0.5, calibration_batches=2, allocation_steps=4, plot=False)
    model = Net()
    trainer(tmp_path, cb).fit(model, DataLoader(data(), batch_size=8), DataLoader(data(16), batch_size=8))
    assert cb.report.allocation.heldout == "the validation batches (2)"  # output error on the validation batches
    zeros = sum(int((m.weight == 0).sum()) for m in (model.conv, model.head))
    assert zeros >= sum(round(0.5 * m.weight.numel()) for m in (model.conv, model.head))


def test_a_tied_weight_is_one_unit_of_the_allocation():
    from test_tied import Tied

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 8, generator=g) for _ in range(3)]
    model = Tied()
    report = compress_model(model, data, target_size_mb=900 / 2**20, allocation_steps=6)
    assert model.a.weight is model.b.weight  # still tied, one width for both users
    assert report["a"].bits == report["b"].bits and set(report.bits) == {"a", "b", "c"}
    assert report.quantized_weights == 64 + 32  # the shared weight counted once
    assert report.bytes_after <= 900 and report.allocation.achieved == report.bytes_after / 2**20
    again = Tied()
    compress_model(again, data, bits=report.bits)  # the third batch, held out from the search, refitted on
    assert torch.equal(again.a.weight, model.a.weight) and torch.equal(again.c.weight, model.c.weight)


def test_a_model_without_outputs_is_refused_and_left_intact():
    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp()

        def forward(self, x):
            self.inner(x)  # returns nothing

    model = Silent()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no floating-point output came from the model's forward"):
        compress_model(model, batches(), target_bits=3.2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_allocated_widths_round_trip_through_the_carried_formats(tmp_path):
    # no report at export: each module carries its own ScalarScheme (formats.record), at its chosen width
    import json

    from safetensors import safe_open

    from obc_lightning.export import load_quantized, save_quantized
    from obc_lightning.formats.record import format_of

    model, data = mlp(), batches()
    report = compress_model(model, data, target_bits=3.5, allocation_steps=6)
    assert len(set(report.bits.values())) > 1
    for n, b in report.bits.items():
        assert format_of(model.get_submodule(n)).bits == b, n
    path = tmp_path / "allocated.safetensors"
    save_quantized(model, path)
    with safe_open(str(path), "pt") as f:
        modules = json.loads(f.metadata()["modules"])
    assert {n: modules[n]["bits"] for n in report.bits} == report.bits
    loaded = load_quantized(path, mlp(seed=3))
    for n in report.bits:
        assert torch.equal(loaded.get_submodule(n).weight, model.get_submodule(n).weight), n


def test_a_width_target_with_sequential_compresses_sequentially_at_the_one_pass_widths():
    xs = batches()
    one_pass = compress_model(mlp(), xs, target_bits=3.5, allocation_steps=4)
    model = mlp()
    report = compress_model(model, xs, target_bits=3.5, allocation_steps=4, sequential=True)
    assert report.bits == one_pass.bits and len(set(report.bits.values())) > 1  # mixed widths
    assert report.sequential and report.match_outputs
    assert report.avg_code_bits == one_pass.avg_code_bits <= 3.5 and report.allocation.achieved == report.avg_code_bits
    # the same as asking for those widths sequentially from the start, on every batch (refit)
    again = mlp()
    compress_model(again, xs, bits=report.bits, sequential=True)
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    from obc_lightning.formats.record import format_of

    assert {n: format_of(model.get_submodule(n)).bits for n in report.bits} == report.bits


def test_pruning_targets_refuse_sequential_calibration_in_compress_model():
    model = mlp()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    for match in (dict(), dict(match_outputs=True), dict(match_outputs=False)):
        with pytest.raises(ValueError, match=r"compress_model: target_sparsity builds its database .* sequential"):
            compress_model(model, batches(), sequential=True, bits=None, target_sparsity=0.5, **match)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k
