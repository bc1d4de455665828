import warnings

import pytest
import torch

from obc_lightning import HessianDampingWarning, PruneResult, layer_objective, obs_prune
from obc_lightning.solvers.common import prepare_hessian
from obc_lightning.solvers.obc import obs_step
from obc_lightning.solvers.prune import (
    compensate,
    conv_nm_group_index,
    greedy_prune_rows,
    magnitude_prune,
    obs_block_step,
    select_levels,
)

F64 = torch.float64


def correlated_problem(rows, cols, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(4 * cols, cols, generator=g, dtype=dtype)
    X = X @ (torch.eye(cols, dtype=dtype) + 0.3 * torch.randn(cols, cols, generator=g, dtype=dtype))
    return W, 2 * X.T @ X / X.shape[0]


def group_loss(w, Hinv, S):
    """1/2 w_S^T ([H^-1]_SS)^-1 w_S: the loss of removing the set S from w at once."""
    S = list(S)
    if not S:
        return torch.zeros((), dtype=w.dtype)
    wS = w[S]
    return 0.5 * wS @ torch.linalg.solve(Hinv[S][:, S], wS)


def least_squares(w, H, S):
    """The best kept weights for the mask by brute force: minimise (p - w) H (p - w)^T over p_K, p_S = 0."""
    K = [i for i in range(len(w)) if i not in set(S)]
    p = torch.zeros_like(w)
    if K:
        L = torch.linalg.cholesky(H)  # (p - w) H (p - w)^T = ||L^T (p - w)||^2: lstsq in p_K
        A, b = L.T[:, K], L.T @ w
        p[K] = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return p


# --- the step, by hand ------------------------------------------------------------------------------

H3 = torch.tensor([[2.0, 1, 0], [1, 2, 1], [0, 1, 2]], dtype=F64)  # H^-1 = [[3,-2,1],[-2,4,-2],[1,-2,3]] / 4


def test_prune_step_by_hand():
    Hinv = torch.linalg.inv(H3).unsqueeze(0)
    w = torch.tensor([[1.0, 0.5, -0.3]], dtype=F64)
    loss = obs_step(w, Hinv, torch.tensor([0]), torch.zeros(1, dtype=F64))
    # dL = 1/2 w_p^2 / [H^-1]_pp = 1/2 * 1 / 0.75
    assert loss.item() == pytest.approx(0.5 / 0.75)
    # delta = -w_p / [H^-1]_pp * H^-1[:, p] = -(1 / 0.75) * [0.75, -0.5, 0.25]
    assert torch.allclose(w, torch.tensor([[0.0, 0.5 + 2 / 3, -0.3 - 1 / 3]], dtype=F64))
    assert torch.allclose(Hinv[0, 1:, 1:], torch.linalg.inv(H3[1:, 1:]))


def test_block_step_by_hand_and_b1_is_obs_step():
    Hinv = torch.linalg.inv(H3)
    w0 = torch.tensor([[1.0, 0.5, -0.3]], dtype=F64)
    # b = 1 is the single OBS step
    w1, h1 = w0.clone(), Hinv.unsqueeze(0).clone()
    w2, h2 = w0.clone(), Hinv.unsqueeze(0).clone()
    l1 = obs_step(w1, h1, torch.tensor([1]), torch.zeros(1, dtype=F64))
    l2 = obs_block_step(w2, h2, torch.tensor([[1]]))
    assert torch.allclose(l1, l2) and torch.allclose(w1, w2) and torch.allclose(h1, h2)
    # B = {0, 1}: dL = 1/2 w_B^T ([H^-1]_BB)^-1 w_B, delta = -H^-1[:, B] ([H^-1]_BB)^-1 w_B
    w, h = w0.clone(), Hinv.unsqueeze(0).clone()
    loss = obs_block_step(w, h, torch.tensor([[0, 1]]))
    wB = w0[0, :2]
    x = torch.linalg.solve(Hinv[:2, :2], wB)
    assert loss.item() == pytest.approx(float(0.5 * wB @ x))
    assert torch.allclose(w[0], w0[0] - Hinv[:, :2] @ x)
    assert w[0, 0] == 0 and w[0, 1] == 0
    # the optimal weight for the remaining input: w_2 + H_22^-1 H_2B w_B, and H^-1 -> inverse of H_22
    assert w[0, 2].item() == pytest.approx(-0.3 + (1 * 0.5) / 2)
    assert h[0, 2, 2].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(float(layer_objective(w0, w, H3)))


# --- brute force on tiny problems -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_unstructured_trace_matches_group_formula_and_least_squares(seed):
    W, H = correlated_problem(1, 6, seed)
    Hinv = torch.linalg.inv(H)
    res = obs_prune(W, H, sparsity=0.5, method="reference")
    w, order = W[0], res.order[0].tolist()
    # first removal: the cheapest single weight
    assert order[0] == int((w**2 / Hinv.diagonal()).argmin())
    for level in range(1, 7):
        S = order[:level]
        assert res.loss_trace[0, level - 1].item() == pytest.approx(group_loss(w, Hinv, S).item(), rel=1e-9)
        P = compensate(W, H, torch.isin(torch.arange(6), torch.tensor(S)).unsqueeze(0), 8)[0]
        assert torch.allclose(P, least_squares(w, H, S), atol=1e-10)
        assert 0.5 * float((P - w) @ H @ (P - w)) == pytest.approx(res.loss_trace[0, level - 1].item(), rel=1e-9)
    assert sorted(order) == list(range(6))
    # at the chosen level (3 of 6): the closed form, optimal for its mask
    S = (~res.mask[0]).nonzero().squeeze(1).tolist()
    assert len(S) == 3 and set(S) == set(order[:3])
    assert torch.allclose(res.pruned_matrix[0], least_squares(w, H, S), atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_blocks_match_brute_force_group_formula(seed):
    W, H = correlated_problem(2, 6, seed)
    Hinv = torch.linalg.inv(H)
    res = obs_prune(W, H, sparsity=0.5, block_size=2)
    assert res.loss_trace.shape == (2, 3)
    for r in range(2):
        w, order = W[r], res.order[r].tolist()
        blocks = [[2 * i, 2 * i + 1] for i in range(3)]
        # first block removed: the brute-force cheapest group
        costs = [group_loss(w, Hinv, b).item() for b in blocks]
        assert order[0] == min(range(3), key=costs.__getitem__)
        for level in range(1, 4):
            S = [c for i in order[:level] for c in blocks[i]]
            assert res.loss_trace[r, level - 1].item() == pytest.approx(group_loss(w, Hinv, S).item(), rel=1e-9)
    # whole blocks removed, 3 of the 6 blocks in the layer
    dropped = ~res.mask.view(2, 3, 2)
    assert torch.equal(dropped[..., 0], dropped[..., 1]) and int(dropped[..., 0].sum()) == 3
    assert torch.allclose(res.loss, layer_objective(W, res.pruned_matrix, H), rtol=1e-9)


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (3, 8), (0, 2)])
def test_nm_pattern_is_exact_and_compensation_optimal(n_m):
    N, M = n_m
    W, H = correlated_problem(5, 16, seed=N + M)
    res = obs_prune(W, H, n_m=n_m)
    kept = res.mask.view(5, 16 // M, M).sum(dim=2)
    assert torch.equal(kept, torch.full_like(kept, N))
    assert torch.equal(res.pruned_matrix != 0, res.mask)
    assert res.loss_trace.shape == (5, 16 * (M - N) // M)
    for r in range(5):  # the kept weights are the optimal ones for the mask
        S = (~res.mask[r]).nonzero().squeeze(1).tolist()
        assert torch.allclose(res.pruned_matrix[r], least_squares(W[r], H, S), atol=1e-9)
    assert torch.allclose(res.loss, layer_objective(W, res.pruned_matrix, H), rtol=1e-9)


def test_conv_nm_groups_run_along_input_channels():
    g = torch.Generator().manual_seed(0)
    out_c, in_c, kh, kw = 6, 8, 3, 3
    Wc = torch.randn(out_c, in_c, kh, kw, generator=g, dtype=F64)
    X = torch.randn(300, in_c * kh * kw, generator=g, dtype=F64)
    H = 2 * X.T @ X / 300
    gi = conv_nm_group_index(in_c, kh * kw, 4)
    assert torch.equal(torch.bincount(gi), torch.full((in_c * kh * kw // 4,), 4))
    res = obs_prune(Wc.reshape(out_c, -1), H, n_m=(2, 4), group_index=gi)
    nz = (res.pruned_matrix.view(out_c, in_c // 4, 4, kh, kw) != 0).sum(dim=2)  # channels grouped by 4
    assert torch.equal(nz, torch.full_like(nz, 2))
    assert (magnitude_prune(Wc.reshape(out_c, -1), n_m=(2, 4), group_index=gi).view(out_c, 2, 4, kh, kw)
            .sum(dim=2) == 2).all()
    with pytest.raises(ValueError, match="divide"):
        conv_nm_group_index(6, 9, 4)


# --- the objective, the trace, the global selection ------------------------------------------------


def test_loss_is_callers_objective_trace_the_damped_one_with_dead_input():
    W, H = correlated_problem(8, 12, seed=5)
    H[3, :] = 0
    H[:, 3] = 0  # a dead input
    res = obs_prune(W, H, sparsity=0.4, damp=0.1)
    live = torch.ones(12, dtype=F64)
    live[3] = 0
    Hd = H + 0.1 * H.diagonal()[live.bool()].mean() * torch.diag(live)
    # loss: the objective with the caller's H, as every solver reports it (issue 23); the trace: the
    # solver's step losses, with the damped H, at each row's level
    assert torch.allclose(res.loss, layer_objective(W, res.pruned_matrix, H), rtol=1e-12, atol=0)
    levels = (~res.mask).sum(dim=1)
    traced = res.loss_trace.gather(1, (levels - 1).unsqueeze(1)).squeeze(1)
    assert torch.allclose(traced, layer_objective(W, res.pruned_matrix, Hd), rtol=1e-9)
    # the dead input goes first, at no cost; its weight is pruned in every row
    assert (res.order[:, 0] == 3).all() and (res.loss_trace[:, 0] == 0).all() and not res.mask[:, 3].any()


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_trace_monotone_and_ends_with_everything_removed(method):
    W, H = correlated_problem(10, 20, seed=1)
    res = obs_prune(W, H, sparsity=0.5, method=method)
    assert (res.loss_trace.diff(dim=1) >= 0).all()
    assert torch.allclose(res.loss_trace[:, -1], layer_objective(W, torch.zeros_like(W), H), rtol=1e-9)
    assert torch.equal(res.order.sort(dim=1).values, torch.arange(20).expand(10, 20))


@pytest.mark.parametrize("s", [0.0, 0.13, 0.5, 0.77])
def test_global_selection_hits_target_and_beats_uniform(s):
    W, H = correlated_problem(12, 24, seed=2)
    res = obs_prune(W, H, sparsity=s)
    assert int((~res.mask).sum()) == round(s * 12 * 24)
    k = round(s * 12 * 24)
    base, extra = divmod(k, 12)
    uniform = torch.full((12,), base)
    uniform[:extra] += 1
    at = res.loss_trace.gather(1, (uniform - 1).clamp_min(0).unsqueeze(1)).squeeze(1) * (uniform > 0)
    assert res.loss.sum() <= at.sum() * (1 + 1e-12)
    if 0 < s:
        assert res.loss.sum() < layer_objective(W, W * magnitude_prune(W, sparsity=s), H).sum()


def test_select_levels_merge_and_uniform_fallback():
    # convex rows: the k smallest steps of the layer
    steps = torch.tensor([[1.0, 2, 3], [0.5, 5, 6], [4.0, 4, 4]], dtype=F64)
    assert select_levels(steps, 3).tolist() == [2, 1, 0]  # 0.5, 1, 2
    assert select_levels(steps, 4).tolist() == [3, 1, 0]  # then 3
    # non-convex: a cheap step behind a costly one is reachable only through it (merge keys = running max)
    steps = torch.tensor([[0.0, 10, 0], [1.0, 1, 1]], dtype=F64)
    assert select_levels(steps, 4).tolist() == [1, 3]  # keys 0, 10, 10 | 1, 1, 1: costs 0 + 3 (uniform: 12)
    steps = torch.tensor([[1.0, 9, 0.1], [2.0, 3, 8]], dtype=F64)
    assert select_levels(steps, 3).tolist() == [1, 2]  # keys 1, 9, 9 | 2, 3, 8 -> 1, 2, 3
    # k = 5: the merge takes 8 before the 9 that unlocks 0.1 ([2, 3]: 10 + 13); the uniform split with the
    # extra removal on the cheapest next step ([3, 2]: 10.1 + 5) is cheaper and is kept
    assert select_levels(steps, 5).tolist() == [3, 2]
    assert select_levels(steps, 1, min_levels=torch.tensor([0, 2])).tolist() == [1, 2]


def test_closed_form_equals_rerun_to_level():
    # the two ways to rebuild a row at its level: rerun the greedy to it, or the closed form on its set
    W, H = correlated_problem(9, 14, seed=4)
    W[2, 5] = 0
    res = obs_prune(W, H, sparsity=0.6)
    prep = prepare_hessian(H, 0.0, fn="t", matrix_shape=tuple(W.shape))
    levels = (~res.mask).sum(dim=1)
    for method in ("reference", "fast"):
        P, removed, loss, _, _ = greedy_prune_rows(
            W, prep, torch.zeros(14, dtype=torch.long), levels.unsqueeze(1), int(levels.max()), method, 4)
        assert torch.equal(~removed & (W != 0), res.mask)
        assert torch.allclose(P, res.pruned_matrix, atol=1e-10)
        assert torch.allclose(loss, res.loss, rtol=1e-9)


# --- fast == reference, zeros, dtypes, devices ------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.3), dict(n_m=(2, 4)), dict(n_m=(1, 8))])
@pytest.mark.parametrize("shape", [(7, 32), (20, 72)])
def test_fast_equals_reference(kw, shape):
    W, H = correlated_problem(*shape, seed=shape[1])
    W[1, :9] = 0  # pruned already
    H[4, :], H[:, 4] = 0, 0  # dead
    ref = obs_prune(W, H, method="reference", **kw)
    for bs in (3, 32):
        fast = obs_prune(W, H, method="fast", batch_size=bs, **kw)
        assert torch.equal(fast.mask, ref.mask)
        assert torch.equal(fast.order, ref.order)
        assert torch.allclose(fast.pruned_matrix, ref.pruned_matrix, atol=1e-10)
        assert torch.allclose(fast.loss_trace, ref.loss_trace, rtol=1e-9, atol=1e-12)


def test_existing_zeros_count_as_pruned():
    W, H = correlated_problem(4, 8, seed=6)
    W[0, :3] = 0  # 3 zeros in the first 2:4 group: more than M - N
    W[1, 4] = 0
    res = obs_prune(W, H, n_m=(2, 4))
    assert not res.mask[0, :3].any() and res.mask[0, 3]
    assert (res.pruned_matrix[0, :3] == 0).all() and not res.mask[1, 4]
    assert (res.mask.view(4, 2, 4).sum(dim=2) <= 2).all()
    assert torch.allclose(res.loss, layer_objective(W, res.pruned_matrix, H), rtol=1e-9)
    res = obs_prune(W, H, sparsity=0.1)  # fewer to remove (3) than zeros already there (4): only the zeros
    assert torch.equal(~res.mask, W == 0) and torch.equal(res.pruned_matrix, W)
    assert (res.loss == 0).all()


def test_float32_and_half_keep_dtype_and_inputs_untouched():
    W, H = correlated_problem(6, 16, seed=7, dtype=torch.float32)
    W0, H0 = W.clone(), H.clone()
    for kw in (dict(sparsity=0.5), dict(n_m=(2, 4)), dict(sparsity=0.5, block_size=4)):
        res = obs_prune(W, H, **kw)
        assert isinstance(res, PruneResult)
        assert res.pruned_matrix.dtype == torch.float32 and res.mask.dtype == torch.bool
        assert torch.equal(W, W0) and torch.equal(H, H0)
        ref = obs_prune(W.double(), H.double(), **kw)
        assert torch.allclose(res.loss.double(), ref.loss, rtol=1e-3)
    res = obs_prune(W.half(), H, sparsity=0.5)
    assert res.pruned_matrix.dtype == torch.float16 and res.sparsity == 0.5


def test_singular_hessian_escalates_damping():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 20, generator=g, dtype=F64)  # 5 samples, 20 inputs: rank 5
    H = X.T @ X
    W = torch.randn(8, 20, generator=g, dtype=F64)
    for kw in (dict(sparsity=0.5), dict(n_m=(2, 4))):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = obs_prune(W, H, **kw)
        msgs = [str(r.message) for r in rec if issubclass(r.category, HessianDampingWarning)]
        assert len(msgs) == 1 and "obs_prune" in msgs[0]
        assert res.damp > 0 and torch.isfinite(res.pruned_matrix).all()
        assert layer_objective(W, res.pruned_matrix, H).sum() < layer_objective(W, W * res.mask, H).sum()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.1), r"\[0, 1\)"),
        (dict(sparsity=True), r"\[0, 1\)"),
        (dict(), "exactly one"),
        (dict(sparsity=0.5, n_m=(2, 4)), "exactly one"),
        (dict(n_m=(2, 3)), "divide"),
        (dict(n_m=(4, 4)), "N < M"),
        (dict(n_m=(-1, 4)), "N < M"),
        (dict(n_m=(2.0, 4)), "pair of integers"),
        (dict(n_m=(2, 4), block_size=2), "unstructured"),
        (dict(sparsity=0.5, block_size=3), "divide"),
        (dict(sparsity=0.5, batch_size=0), "batch_size"),
        (dict(sparsity=0.5, method="magic"), "method"),
        (dict(n_m=(2, 4), group_index=torch.zeros(8, dtype=torch.long)), "exactly M=4"),
        (dict(sparsity=0.5, damp=-1.0), "damp"),
    ],
)
def test_bad_arguments(kw, match):
    W, H = correlated_problem(2, 8)
    with pytest.raises(ValueError, match=match):
        obs_prune(W, H, **kw)


def test_nan_is_rejected():
    W, H = correlated_problem(2, 8)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        obs_prune(W, H, sparsity=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    W, H = correlated_problem(16, 64, seed=9)
    for kw in (dict(sparsity=0.5), dict(n_m=(2, 4))):
        cpu = obs_prune(W, H, **kw)
        gpu = obs_prune(W.cuda(), H.cuda(), **kw)
        assert gpu.pruned_matrix.is_cuda and torch.equal(gpu.mask.cpu(), cpu.mask)
        assert torch.allclose(gpu.pruned_matrix.cpu(), cpu.pruned_matrix, atol=1e-9)

