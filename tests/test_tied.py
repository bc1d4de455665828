"""Issue 23, tied weights in compress_model: a weight shared by several modules is quantized once, on the sum
of its users' Hessians, reported under every name, and restored exactly when compress_model fails."""

import pytest
import torch
from torch import nn

import obc_lightning.scheduling as quantize_mod  # compress_model solves through this module's name
from obc_lightning import compress_model, load_quantized, save_quantized
from obc_lightning.calibration import CalibrationWarning, collect_hessians
from obc_lightning.solvers import layer_objective, quantize_weight

F64 = torch.float64


class Tied(nn.Module):
    """a and b: two Linear modules sharing one weight Parameter (own biases); c: an ordinary Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


class Twice(nn.Module):
    """The same Linear module registered under two names, called twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


class TiedEmbedding(nn.Module):
    """A decoder Linear tied to the input embedding (an Embedding is not a target)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 16, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, tokens):
        return self.dec(self.mix(self.emb(tokens)).relu())


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 8, generator=g) for _ in range(2)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


class TiedDeep(Tied):
    """Tied with a last layer d of another input width: solved in a later batch than a, b and c."""

    def __init__(self):
        super().__init__()
        self.d = nn.Linear(4, 2)

    def forward(self, x):
        return self.d(super().forward(x).relu())


@pytest.mark.parametrize("sequential", [False, True])
def test_failure_after_a_tied_weight_was_written_restores_the_original_weight(monkeypatch, sequential):
    model = TiedDeep()
    before = snapshot(model)
    real = quantize_mod.quantize_weights

    def fails_on_d(problems, *args, **kwargs):  # the solve of d, after a and b's weight was written
        if any(matrix.shape == (2, 4) for matrix, _ in problems):
            raise RuntimeError("solver exploded")
        return real(problems, *args, **kwargs)

    monkeypatch.setattr(quantize_mod, "quantize_weights", fails_on_d)
    with pytest.raises(RuntimeError, match="solver exploded"):
        compress_model(model, batches(), bits=3, sequential=sequential)
    assert_same(model, before)
    assert model.b.weight is model.a.weight


@pytest.mark.parametrize("sequential", [False, True])
def test_tied_weight_quantized_once_on_the_summed_hessians_and_reported_under_both_names(sequential):
    model = Tied()
    W0 = model.a.weight.detach().clone()
    ref = Tied()
    # b is calibrated on a's fp output in both modes: the shared weight is written once both are in
    calib = collect_hessians(ref, batches(), {"a": ref.a, "b": ref.b})
    Ha, Hb = calib["a"].hessians[0].float(), calib["b"].hessians[0].float()
    report = compress_model(model, batches(), bits=3, sequential=sequential, keep_results=True)
    expected = quantize_weight(W0, Ha + Hb, 3, damp=0.01, scale_dtype=torch.float16)
    assert torch.equal(model.a.weight.detach(), expected.quantized_matrix)  # one solve, the sum of objectives
    assert model.b.weight is model.a.weight
    assert [m.name for m in report.modules] == ["a", "b", "c"]
    Q = model.a.weight.detach()
    for name, Hn in (("a", Ha), ("b", Hb)):
        own = float(layer_objective(W0.double(), Q.double(), Hn.double()).sum())
        assert report[name].loss == pytest.approx(own, rel=1e-6) and own > 0
    assert report["a"].tied == ("b",) and report["b"].tied == ("a",) and report["c"].tied == ()
    # the weight counts once in the sizes and in the quantized weights
    assert report.quantized_weights == 8 * 8 + 4 * 8
    assert report.bytes_before == 4 * (8 * 8 + 8 + 8 + 4 * 8 + 4)
    assert report.results["a"][0].quantized_matrix.equal(report.results["b"][0].quantized_matrix)


def test_tied_weight_round_trips_through_export(tmp_path):
    model = Tied()
    report = compress_model(model, batches(), bits=3, keep_results=True)
    save_quantized(model, tmp_path / "m.safetensors", report, scale_dtype=torch.float32)
    fresh = Tied()
    load_quantized(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh.a.weight, model.a.weight) and fresh.b.weight is fresh.a.weight


def test_one_module_registered_twice_is_one_entry_found_under_both_names():
    model = Twice()
    report = compress_model(model, batches(), bits=3, keep_results=True)
    assert [m.name for m in report.modules] == ["a", "c"]
    assert report["b"] is report["a"] and report["a"].tied == ("b",)
    assert report["a"].n_samples == 2 * 2 * 64  # both calls in the one Hessian
    assert set(report.results) == {"a", "b", "c"}


def test_a_tied_user_that_is_not_a_target_is_named_in_a_warning():
    model = TiedEmbedding()
    tokens = [torch.randint(0, 16, (32,)) for _ in range(2)]
    with pytest.warns(CalibrationWarning, match=r"'emb' \(Embedding, sharing the weight of 'dec'\)"):
        report = compress_model(model, tokens, bits=4)
    assert model.emb.weight is model.dec.weight and report["dec"].tied == ()


def test_modules_splitting_a_shared_weight_differently_are_refused_before_any_work():
    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 3, groups=2)  # weight (8, 2, 3, 3): two row blocks, two Hessians
            self.b = nn.Conv2d(2, 8, 3)  # the same shape, one Hessian for all rows
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x).sum() + self.b(x[:, :2]).sum()

    model = Convs()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules 'a' and 'b' share one weight but use it differently"):
        compress_model(model, [torch.randn(2, 4, 6, 6)], bits=4)
    assert_same(model, before)
