"""One memory budget: rows are batched to fit it, the float64 fallback too, and results do not change."""

import pytest
import torch
from breakdown import force_float32_breakdown, rows_with_positive_last_weight, well_conditioned_layer

import obc_lightning.solvers.obc as obc
from obc_lightning import compress_model, exact_obc, quantize_weight
from obc_lightning.solvers.obc import _row_bytes, obc_row_batch


def problem(rows, cols, seed=0, dtype=torch.float64, samples=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(samples or 4 * cols, cols, generator=g, dtype=dtype)
    X = X @ (torch.eye(cols, dtype=dtype) + 0.3 * torch.randn(cols, cols, generator=g, dtype=dtype))
    return W, 2 * X.T @ X / X.shape[0]


def spy_batches(monkeypatch):
    sizes = []
    real = obc._greedy

    def spy(method, w, *args):
        sizes.append((w.shape[0], w.dtype))
        return real(method, w, *args)

    monkeypatch.setattr(obc, "_greedy", spy)
    return sizes


def test_row_bytes_counts_the_zero_aware_copies():
    plain, masked = _row_bytes(100, torch.float32, "fast"), _row_bytes(100, torch.float32, "fast", masked=True)
    assert masked - plain == 4 * 100 * 100  # one more d x d per row: its own inverse
    assert obc_row_batch(50, 100, torch.float32, torch.device("cpu"), "fast", None, 3 * plain) == 3
    assert obc_row_batch(50, 100, torch.float32, torch.device("cpu"), "fast", None, 3 * plain, masked=True) == 2


def test_small_budget_batches_rows_with_the_same_result(monkeypatch):
    W, H = problem(10, 24, seed=1)
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.3] = 0  # zero-aware path
    whole = exact_obc(W, H, 4, batch_size=None)
    sizes = spy_batches(monkeypatch)
    budget = 3 * _row_bytes(24, torch.float64, "fast", masked=True)
    small = exact_obc(W, H, 4, batch_size=None, max_memory=budget)
    assert [n for n, _ in sizes] == [3, 3, 3, 1]
    assert torch.equal(small.codes, whole.codes) and torch.equal(small.loss, whole.loss)
    sizes.clear()
    q = quantize_weight(W, H, 4, max_memory=budget)
    assert max(n for n, _ in sizes) == 3
    assert torch.equal(q.codes, quantize_weight(W, H, 4).codes)


def test_float64_fallback_is_row_batched(monkeypatch):
    W, H = well_conditioned_layer()
    force_float32_breakdown(monkeypatch)
    sizes = spy_batches(monkeypatch)
    budget = 4 * _row_bytes(576, torch.float64, "fast")
    with pytest.warns(UserWarning, match="solved again in float64"):
        res = exact_obc(W, H, 4, batch_size=None, max_memory=budget, block_size=64)
    redo = [n for n, dt in sizes if dt == torch.float64]
    assert sum(redo) == int(rows_with_positive_last_weight(W).sum()) and max(redo) <= 4
    assert torch.isfinite(res.loss).all()


def test_compress_model_passes_the_budget_to_the_solvers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(256, 10))
    batches = [torch.randn(64, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sizes = spy_batches(monkeypatch)
    budget = 3 << 20  # calibration: 0.5 MiB of float64 sums + 2 MiB of buffered samples; a row ~0.9 MiB
    compress_model(model, batches, 4, max_memory=budget, solver="obc")
    assert [n for n, _ in sizes] == [3, 3, 3, 1]
