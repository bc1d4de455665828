"""quantize_weight: per-row best of polished ExactOBC and GPTQ on one grid, true objective reported."""

import warnings

import pytest
import torch

from obc_lightning import HessianDampingWarning, exact_obc, layer_objective
from obc_lightning.solvers.gptq import gptq
from obc_lightning.solvers.quantize import quantize_weight


def cnn_like(d, n=300, seed=0, dtype=torch.float64):
    """X with strongly correlated columns (neighbouring pixels of a patch)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d + 4, generator=g, dtype=dtype)
    X = sum(Z[:, k:k + d] for k in range(5)) + 0.3 * torch.randn(n, d, generator=g, dtype=dtype)
    return 2 / n * X.T @ X


def heavy_tailed(d, n=300, seed=0, dtype=torch.float64):
    """Column scales log-normal: diag max / median ~ 100+ (inputs after LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    X = X @ (torch.eye(d, dtype=dtype) + 0.2 * torch.randn(d, d, generator=g, dtype=dtype))
    X = X * torch.exp(2.0 * torch.randn(d, generator=g, dtype=dtype))
    return 2 / n * X.T @ X


def weights(rows, d, seed=1, dtype=torch.float64):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_heavy_tailed_fixture_is_heavy_tailed():
    diag = heavy_tailed(48).diagonal()
    assert diag.max() / diag.median() > 100


@pytest.mark.parametrize("kind", [cnn_like, heavy_tailed])
@pytest.mark.parametrize("polish", [False, True])
def test_auto_is_the_per_row_minimum(kind, polish):
    W, H = weights(16, 48), kind(48)
    obc = quantize_weight(W, H, 3, solver="obc", polish=polish)
    gp = quantize_weight(W, H, 3, solver="gptq", polish=polish)
    auto = quantize_weight(W, H, 3, solver="auto", polish=polish)
    assert (auto.loss <= obc.loss).all() and (auto.loss <= gp.loss).all()
    torch.testing.assert_close(auto.loss, torch.minimum(obc.loss, gp.loss), rtol=0, atol=0)
    from_gptq = gp.loss < obc.loss
    assert auto.solver_rows == {"obc": 16 - int(from_gptq.sum()), "gptq": int(from_gptq.sum())}
    expect = torch.where(from_gptq.unsqueeze(1), gp.codes, obc.codes)
    assert torch.equal(auto.codes, expect)


def test_auto_mixes_solvers_and_beats_both():
    W, H = weights(32, 48, seed=2), cnn_like(48, seed=2)
    obc = quantize_weight(W, H, 3, solver="obc")
    gp = quantize_weight(W, H, 3, solver="gptq")
    auto = quantize_weight(W, H, 3)
    assert auto.solver_rows["obc"] > 0 and auto.solver_rows["gptq"] > 0
    assert auto.loss.sum() < min(obc.loss.sum(), gp.loss.sum())


def test_gptq_wins_on_heavy_tailed_and_polish_helps():
    W, H = weights(16, 48, seed=3), heavy_tailed(48, seed=3)
    obc = quantize_weight(W, H, 4, solver="obc", polish=False)
    gp = quantize_weight(W, H, 4, solver="gptq", polish=False)
    assert gp.loss.sum() < obc.loss.sum()
    polished = quantize_weight(W, H, 4, solver="obc")
    assert (polished.loss <= obc.loss).all() and polished.loss.sum() < obc.loss.sum()


def test_unpolished_solvers_are_exact_obc_and_gptq_on_the_shared_grid():
    W, H = weights(8, 32, seed=4), cnn_like(32, seed=4)
    H[7, :] = 0
    H[:, 7] = 0
    a = quantize_weight(W, H, 4, solver="obc", polish=False, damp=0.02, group_size=8)
    b = exact_obc(W, H, 4, damp=0.02, group_size=8)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    c = quantize_weight(W, H, 4, solver="gptq", polish=False, damp=0.02, group_size=8)
    d = gptq(W, H, 4, damp=0.02, group_size=8)
    assert torch.equal(c.codes, d.codes) and torch.equal(c.rounded_zeros, d.rounded_zeros)
    assert a.solver_rows == {"obc": 8} and c.solver_rows == {"gptq": 8}


@pytest.mark.parametrize("solver", ["obc", "gptq", "auto"])
def test_loss_is_the_true_undamped_objective(solver):
    W, H = weights(8, 32, seed=5), heavy_tailed(32, seed=5)
    H[2, :] = 0  # dead input: W[:, 2] != 0 but costs nothing
    H[:, 2] = 0
    res = quantize_weight(W, H, 4, solver=solver, damp=0.1)
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H))
    assert (res.quantized_matrix[:, 2] == 0).all()
    assert res.damp == 0.1


def test_polish_reaches_a_minimum_of_the_true_objective_not_the_damped_one():
    W, H = weights(6, 16, seed=9), heavy_tailed(16, seed=9)
    res = quantize_weight(W, H, 3, solver="gptq", damp=0.5, max_passes=100)
    s, z = res.grid.per_column()
    f = layer_objective(W, res.quantized_matrix, H)
    for j in range(16):
        for c in range(8):
            Q2 = res.quantized_matrix.clone()
            Q2[:, j] = s[:, j] * (c - z[:, j])
            assert (layer_objective(W, Q2, H) >= f - 1e-9 * f.abs().max()).all()


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grids_and_result_fields(group_size, symmetric, dtype):
    W, H = weights(10, 40, seed=6, dtype=dtype), cnn_like(40, seed=6, dtype=dtype)
    copies = W.clone(), H.clone()
    res = quantize_weight(W, H, 3, group_size=group_size, symmetric=symmetric)
    assert torch.equal(W, copies[0]) and torch.equal(H, copies[1])
    n_groups = 1 if group_size is None else 5
    assert res.scales.shape == (10, n_groups) and res.rounded_zeros.shape == (10, n_groups)
    if symmetric:
        assert (res.rounded_zeros == 4).all()
    assert res.codes.dtype == torch.int32 and res.codes.shape == W.shape
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 7
    assert res.quantized_matrix.dtype == dtype
    assert torch.equal(res.quantized_matrix, res.grid.dequantize(res.codes).to(dtype))
    assert sum(res.solver_rows.values()) == 10
    rtn = layer_objective(W, res.grid.round(W), H)
    assert res.loss.sum() < rtn.sum()


def test_half_precision_input_is_solved_in_float32():
    W, H = weights(6, 16, seed=7, dtype=torch.float32), cnn_like(16, seed=7, dtype=torch.float32)
    res = quantize_weight(W.to(torch.bfloat16), H, 4)
    assert res.quantized_matrix.dtype == torch.bfloat16 and res.loss.dtype == torch.float32
    assert torch.isfinite(res.loss).all()


def test_rank_deficient_hessian_warns_and_escalates_damping():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(8, 24, generator=g, dtype=torch.float64)  # 8 samples, 24 inputs: rank 8
    H = X.T @ X
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize_weight(weights(4, 24), H, 4, damp=0.0)
    assert any(issubclass(w.category, HessianDampingWarning) for w in caught)
    assert res.damp > 0 and torch.isfinite(res.loss).all()


def test_bad_inputs():
    W, H = weights(4, 16), cnn_like(16)
    with pytest.raises(ValueError, match="solver"):
        quantize_weight(W, H, solver="rtn")
    with pytest.raises(ValueError, match="max_passes"):
        quantize_weight(W, H, max_passes=0)
    with pytest.raises(ValueError, match="polish"):
        quantize_weight(W, H, polish="yes")
    with pytest.raises(ValueError, match="batch_size"):
        quantize_weight(W, H, batch_size=0)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_weight(W, H[:8, :8])
    with pytest.raises(ValueError, match="n_bits"):
        quantize_weight(W, H, 9)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(W, H, group_size=17)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(W[0], H)
    with pytest.raises(ValueError, match="damp"):
        quantize_weight(W, H, damp=float("nan"))


@pytest.mark.parametrize("solver", ["obc", "gptq", "auto"])
def test_pruned_weights_stay_zero(solver):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(12, 40, generator=g, dtype=torch.float64)
    X = torch.randn(400, 40, generator=g, dtype=torch.float64) @ (
        torch.eye(40, dtype=torch.float64) + 0.3 * torch.randn(40, 40, generator=g, dtype=torch.float64)
    )
    H = 2 * X.T @ X / 400
    pruned = torch.rand(12, 40, generator=g) < 0.5
    W[pruned] = 0
    res = quantize_weight(W, H, 3, solver=solver)
    assert torch.all(res.quantized_matrix[pruned] == 0)
    assert (res.quantized_matrix[~pruned] != 0).any()
    # the mask costs something but the result is still far better than rounding the kept weights
    from obc_lightning.grids import fit_grid

    rtn = fit_grid(W, 3).round(W)
    assert res.loss.sum() < 0.8 * layer_objective(W, rtn, H).sum()
