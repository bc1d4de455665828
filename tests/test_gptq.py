"""GPTQ: the blocked, lazy, act-order solver against a plain column-by-column loop."""

import pytest
import torch

from obc_lightning import exact_obc, fit_grid, layer_objective
from obc_lightning.solvers.common import prepare_hessian
from obc_lightning.solvers.gptq import gptq


def correlated_hessian(d, n=256, seed=0, dtype=torch.float64, heavy=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    X = X @ (torch.eye(d, dtype=dtype) + 0.4 * torch.randn(d, d, generator=g, dtype=dtype))
    if heavy:
        X = X * torch.exp(1.5 * torch.randn(d, generator=g, dtype=dtype))
    return 2 / n * X.T @ X


def gptq_reference(W, H, grid, act_order):
    """Quantize column i, e = (w_i - q_i) / U_ii, W[:, i+1:] -= e U[i, i+1:]; U = upper Cholesky of H^-1."""
    d = W.shape[1]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(d)
    W = W[:, perm].clone()
    U = torch.linalg.cholesky(torch.linalg.inv(H[perm][:, perm]), upper=True)
    s, z = (t[:, perm] for t in grid.per_column())
    codes = torch.empty_like(W)
    for i in range(d):
        codes[:, i] = torch.clamp(torch.round(W[:, i] / s[:, i]) + z[:, i], 0, grid.maxq)
        e = (W[:, i] - s[:, i] * (codes[:, i] - z[:, i])) / U[i, i]
        W[:, i + 1:] -= e[:, None] * U[i, i + 1:][None, :]
    return codes[:, torch.argsort(perm)].to(torch.int32)


def problem(rows=12, d=40, seed=0, dtype=torch.float64, dead=(5,)):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(rows, d, generator=g, dtype=dtype)
    H = correlated_hessian(d, seed=seed, dtype=dtype, heavy=True)
    for p in dead:
        H[p, :] = 0
        H[:, p] = 0
    return W, H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_column_by_column_reference(act_order, group_size, symmetric):
    W, H = problem()
    res = gptq(W, H, 3, act_order=act_order, block_size=16, group_size=group_size, symmetric=symmetric)
    prep = prepare_hessian(H, 0.01, fn="test", matrix_shape=W.shape)
    W0 = W.clone()
    W0[:, prep.dead] = 0
    grid = fit_grid(W0, 3, symmetric=symmetric, group_size=group_size)
    assert torch.equal(res.grid.scales, grid.scales) and torch.equal(res.grid.zeros, grid.zeros)
    ref = gptq_reference(W0, prep.hessian, grid, act_order)
    assert torch.equal(res.codes, ref)
    assert torch.equal(res.codes[:, 5], grid.codes(W0)[:, 5])  # the dead column is the grid's 0


def test_act_order_changes_the_order():
    W, H = problem()
    a = gptq(W, H, 3, act_order=True)
    b = gptq(W, H, 3, act_order=False)
    assert not torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_block_size_is_only_a_speed_knob(block_size):
    W, H = problem(seed=3)
    ref = gptq(W, H, 4, block_size=40)
    assert torch.equal(gptq(W, H, 4, block_size=block_size).codes, ref.codes)


def test_same_grid_as_exact_obc():
    W, H = problem(seed=1)
    a = gptq(W, H, 4, group_size=10)
    b = exact_obc(W, H, 4, group_size=10, damp=0.01)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.rounded_zeros, b.rounded_zeros)


def test_loss_is_objective_with_the_callers_undamped_hessian():
    # one definition of loss for every solver (issue 23): the caller's H, not the damped one the solver used
    W, H = problem(dead=())
    res = gptq(W, H, 4, damp=0.05)
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H), rtol=1e-12, atol=0)
    Hd = H + 0.05 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    assert (layer_objective(W, res.quantized_matrix, Hd) > res.loss).all()
    assert res.damp == 0.05


@pytest.mark.parametrize("act_order", [False, True])
def test_no_coupling_is_round_to_nearest(act_order):
    # one column, or a diagonal H: nothing to compensate, GPTQ is round-to-nearest on the grid
    g = torch.Generator().manual_seed(4)
    W = torch.randn(9, 1, generator=g, dtype=torch.float64)
    res = gptq(W, torch.full((1, 1), 2.0, dtype=torch.float64), 3, act_order=act_order)
    assert torch.equal(res.codes, res.grid.codes(W))
    W = torch.randn(9, 16, generator=g, dtype=torch.float64)
    res = gptq(W, torch.diag(torch.rand(16, generator=g, dtype=torch.float64) + 0.1), 3, act_order=act_order)
    assert torch.equal(res.codes, res.grid.codes(W))


def test_compensation_beats_round_to_nearest_on_correlated_inputs():
    W = torch.randn(32, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    H = correlated_hessian(40, seed=5)
    res = gptq(W, H, 3, damp=0.0)
    rtn = layer_objective(W, res.grid.round(W), H)
    assert res.loss.sum() < 0.8 * rtn.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_fields_and_inputs_untouched(dtype):
    W, H = problem(dtype=dtype, seed=2)
    W_copy, H_copy = W.clone(), H.clone()
    res = gptq(W, H, 4, group_size=16)
    assert torch.equal(W, W_copy) and torch.equal(H, H_copy)
    assert res.quantized_matrix.dtype == dtype and res.quantized_matrix.shape == W.shape
    assert res.codes.dtype == torch.int32
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= res.grid.maxq
    assert res.scales.shape == (12, 3)
    assert torch.equal(res.quantized_matrix, res.grid.dequantize(res.codes).to(dtype))
    assert torch.isfinite(res.loss).all() and (res.loss >= 0).all()


def test_bad_inputs():
    W, H = problem()
    with pytest.raises(ValueError, match="block_size"):
        gptq(W, H, block_size=0)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq(W, H[:-1, :-1])
    with pytest.raises(ValueError, match="n_bits"):
        gptq(W, H, 1)
    with pytest.raises(ValueError, match="damp"):
        gptq(W, H, damp=-1.0)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq(bad, H)
