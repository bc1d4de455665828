"""Coordinate-descent polish: monotone, a coordinate-wise minimum when converged, blocking-invariant."""

import pytest
import torch

from obc_lightning import fit_grid, layer_objective
from obc_lightning.solvers.gptq import gptq
from obc_lightning.solvers.polish import polish, polish_codes


def setup(rows=8, d=24, bits=3, seed=0, dtype=torch.float64, group_size=None, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d, generator=g, dtype=dtype)
    X = X @ (torch.eye(d, dtype=dtype) + 0.5 * torch.randn(d, d, generator=g, dtype=dtype))
    X = X * torch.exp(torch.randn(d, generator=g, dtype=dtype))
    H = 2 / 200 * X.T @ X
    W = torch.randn(rows, d, generator=g, dtype=dtype)
    grid = fit_grid(W, bits, group_size=group_size, symmetric=symmetric)
    return W, H, grid


def naive_pass(W, H, codes, grid):
    """One pass, g_j recomputed from scratch for every column: q_j <- nearest grid point to q_j - g_j / H_jj."""
    s, z = grid.per_column()
    K = codes.to(W.dtype).clone()
    for j in range(W.shape[1]):
        Q = s * (K - z)
        gj = (Q - W) @ H[:, j]
        t = Q[:, j] - gj / H[j, j]
        k = torch.clamp(torch.round(t / s[:, j]) + z[:, j], 0, grid.maxq)
        delta = s[:, j] * (k - K[:, j])
        K[:, j] = torch.where(delta * (gj + 0.5 * delta * H[j, j]) < 0, k, K[:, j])
    return K.to(torch.int32)


@pytest.mark.parametrize("start", ["random", "rtn", "gptq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_never_increases_the_objective(start, dtype):
    W, H, grid = setup(dtype=dtype, seed=1)
    if start == "random":
        codes = torch.randint(0, grid.maxq + 1, W.shape, generator=torch.Generator().manual_seed(0))
    elif start == "rtn":
        codes = grid.codes(W)
    else:
        codes = gptq(W, H, 3).codes
    before = layer_objective(W, grid.dequantize(codes), H)
    res = polish(W, H, codes, grid, max_passes=2)
    assert (res.loss <= before).all()
    assert res.loss.sum() < before.sum()  # and it does something
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H))


@pytest.mark.parametrize("group_size,symmetric", [(None, False), (6, False), (None, True), (8, True)])
def test_converges_to_a_coordinatewise_minimum(group_size, symmetric):
    W, H, grid = setup(rows=6, d=12, seed=2, group_size=group_size, symmetric=symmetric)
    s, z = grid.per_column()
    K, passes, converged = polish_codes(W, H, grid.codes(W).double(), s, z, grid.maxq, max_passes=100)
    assert converged and passes >= 2
    Q = grid.dequantize(K)
    f = layer_objective(W, Q, H)
    # brute force: no single weight moved to any other grid point lowers its row's objective
    for j in range(W.shape[1]):
        for c in range(grid.maxq + 1):
            Q2 = Q.clone()
            Q2[:, j] = s[:, j] * (c - z[:, j])
            assert (layer_objective(W, Q2, H) >= f - 1e-9 * f.abs().max()).all()


def test_rtn_is_not_a_coordinatewise_minimum_here():
    # guards the test above: the brute-force check does fail on an unpolished start
    W, H, grid = setup(rows=6, d=12, seed=2)
    Q = grid.round(W)
    f = layer_objective(W, Q, H)
    s, z = grid.per_column()
    lower = False
    for j in range(12):
        for c in range(grid.maxq + 1):
            Q2 = Q.clone()
            Q2[:, j] = s[:, j] * (c - z[:, j])
            lower |= bool((layer_objective(W, Q2, H) < f - 1e-9).any())
    assert lower


@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_one_pass_matches_the_naive_pass(block_size):
    W, H, grid = setup(rows=10, d=30, seed=3, group_size=10)
    codes = grid.codes(W)
    res = polish(W, H, codes, grid, max_passes=1, block_size=block_size)
    assert torch.equal(res.codes, naive_pass(W, H, codes, grid))


def test_polish_of_a_minimum_is_unchanged_and_input_forms_agree():
    W, H, grid = setup(seed=4)
    first = polish(W, H, grid.codes(W), grid, max_passes=50)
    again = polish(W, H, first.codes, grid, max_passes=50)
    assert torch.equal(again.codes, first.codes)
    s, z = grid.per_column()
    _, passes, converged = polish_codes(W, H, first.codes.double(), s, z, grid.maxq, max_passes=5)
    assert passes == 1 and converged
    from_matrix = polish(W, H, grid.round(W), grid, max_passes=50)  # quantized matrix instead of codes
    assert torch.equal(from_matrix.codes, first.codes)


def test_dead_inputs_are_left_alone_and_inputs_untouched():
    W, H, grid = setup(seed=5)
    H[3, :] = 0
    H[:, 3] = 0
    codes = grid.codes(W)
    copies = (W.clone(), H.clone(), codes.clone())
    res = polish(W, H, codes, grid)
    assert torch.equal(res.codes[:, 3], codes[:, 3])
    assert torch.equal(W, copies[0]) and torch.equal(H, copies[1]) and torch.equal(codes, copies[2])
    assert not torch.equal(res.codes, codes)
    assert res.codes.dtype == torch.int32 and int(res.codes.min()) >= 0 and int(res.codes.max()) <= grid.maxq
    assert torch.equal(res.quantized_matrix, grid.dequantize(res.codes))


def test_float32_output_dtype():
    W, H, grid = setup(dtype=torch.float32, seed=6)
    res = polish(W, H, grid.round(W), grid)
    assert res.quantized_matrix.dtype == torch.float32
    assert torch.equal(res.quantized_matrix, res.grid.dequantize(res.codes))


def test_bad_inputs():
    W, H, grid = setup()
    codes = grid.codes(W)
    with pytest.raises(ValueError, match="max_passes"):
        polish(W, H, codes, grid, max_passes=0)
    with pytest.raises(ValueError, match="hessian"):
        polish(W, H[:-1, :-1], codes, grid)
    with pytest.raises(ValueError, match="quantized has shape"):
        polish(W, H, codes[:, :-1], grid)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        polish(W, H, codes + 8, grid)
    other = fit_grid(W[:4], 3)
    with pytest.raises(ValueError, match="grid is for"):
        polish(W, H, codes, other)


@pytest.mark.parametrize("block_size", [4, 128])
def test_rows_stop_independently_so_stacked_rows_polish_as_separate_calls(block_size):
    """Each row stops after a pass that moves none of its weights: rows converging at different passes
    give the same codes polished together or apart (what quantize_weight relies on for auto)."""
    W, H, grid = setup(rows=12, d=30, seed=5)
    s, z = grid.per_column()
    start = torch.randint(0, grid.maxq + 1, W.shape, generator=torch.Generator().manual_seed(1)).to(W.dtype)
    start[:6] = grid.codes(W)[:6].to(W.dtype)  # half the rows start close to a minimum, half far from it
    together, passes, _ = polish_codes(W, H, start, s, z, grid.maxq, max_passes=6, block_size=block_size)
    apart = torch.cat([
        polish_codes(W[r], H, start[r], s[r], z[r], grid.maxq, max_passes=6, block_size=block_size)[0]
        for r in (slice(0, 6), slice(6, 12))
    ])
    assert passes > 1 and torch.equal(together, apart)
    for r in range(12):  # and row by row
        one = polish_codes(W[r : r + 1], H, start[r : r + 1], s[r : r + 1], z[r : r + 1], grid.maxq, max_passes=6,
                           block_size=block_size)[0]
        assert torch.equal(one, together[r : r + 1]), r
