"""Product quantization: k-means, the fairseq layout, and the Hessian-aware solver against plain references."""

import itertools
import math
import warnings

import pytest
import torch

from obc_lightning.solvers import pq
from obc_lightning.solvers.common import HessianDampingWarning, layer_objective
from obc_lightning.solvers.pq import (
    EmptyClusterError,
    PQResult,
    assign_with_compensation,
    kmeans,
    nearest,
    product_quantize,
    update_codebook,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The problems are tiny: intra-op threads only add synchronisation (100x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ar1_hessian(d, rho=0.9, n=512, seed=0, dtype=F64):
    """2/n X^T X of n samples of an AR(1) process: x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t."""
    g = gen(seed)
    e = torch.randn(n, d, generator=g, dtype=dtype)
    X = torch.empty_like(e)
    X[:, 0] = e[:, 0]
    for t in range(1, d):
        X[:, t] = rho * X[:, t - 1] + math.sqrt(1 - rho**2) * e[:, t]
    return 2 / n * X.T @ X


def random_hessian(d, seed=0, dtype=F64):
    g = gen(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=dtype)
    X = X @ (torch.eye(d, dtype=dtype) + 0.4 * torch.randn(d, d, generator=g, dtype=dtype))
    return 2 * X.T @ X / X.shape[0]


def gather(codebook, codes):
    """Q (rows, J * b): sub-vector j of row r is codebook[codes[r, j]], written out the slow way."""
    rows, J = codes.shape
    b = codebook.shape[1]
    Q = torch.empty(rows, J * b, dtype=codebook.dtype)
    for r in range(rows):
        for j in range(J):
            Q[r, j * b : (j + 1) * b] = codebook[codes[r, j]]
    return Q


def objective(W, Q, H):
    """1/2 trace((Q - W) H (Q - W)^T)."""
    D = (Q - W).to(H.dtype)
    return 0.5 * float(torch.trace(D @ H @ D.T))


# --- k-means ----------------------------------------------------------------------------------------


def kmeans_cost(x, centroids, codes, weights=None):
    w = torch.ones_like(x) if weights is None else weights
    return float((w * (x - centroids[codes]) ** 2).sum())


def brute_force_kmeans(x, K, weights=None):
    """min over every assignment of the n points to K clusters of sum_i sum_t w_it (x_it - c_kt)^2, with
    c_k the (weighted) mean of its members: the optimal centroid for a fixed assignment."""
    n = x.shape[0]
    w = torch.ones_like(x) if weights is None else weights
    A = torch.tensor(list(itertools.product(range(K), repeat=n)))  # (K^n, n)
    onehot = torch.nn.functional.one_hot(A, K).to(x.dtype)  # (M, n, K)
    num = torch.einsum("mnk,nb->mkb", onehot, w * x)
    den = torch.einsum("mnk,nb->mkb", onehot, w)
    c = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))  # (M, K, b)
    ci = torch.gather(c, 1, A.unsqueeze(2).expand(-1, -1, x.shape[1]))  # (M, n, b): each point's centroid
    return float((w * (x - ci) ** 2).sum(dim=(1, 2)).min())


@pytest.mark.parametrize("b, K", [(1, 2), (1, 3), (2, 2), (2, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_best_of_seeds_is_the_brute_force_optimum(b, K, weighted):
    g = gen(10 * b + K)
    x = torch.randn(7, b, generator=g, dtype=F64)
    w = torch.rand(7, b, generator=g, dtype=F64) + 0.1 if weighted else None
    best = brute_force_kmeans(x, K, w)
    costs = []
    for seed in range(60):  # Lloyd has local minima: on one of these problems only 2 of 21 starts reach the optimum
        C, codes = kmeans(x, K, seed=seed, weights=w, n_iter=50)
        assert C.shape == (K, b) and codes.shape == (7,)
        assert torch.bincount(codes, minlength=K).min() >= 1  # every centroid populated
        costs.append(kmeans_cost(x, C, codes, w))
    assert min(costs) >= best - 1e-12  # brute force is the optimum: nothing beats it
    assert min(costs) == pytest.approx(best, rel=1e-10, abs=1e-12)


def test_kmeans_result_is_a_lloyd_fixed_point():
    # each centroid is the (weighted) mean of its members and each point is with its nearest centroid
    g = gen(3)
    x = torch.randn(40, 2, generator=g, dtype=F64)
    w = torch.rand(40, 2, generator=g, dtype=F64) + 0.1
    for weights in (None, w):
        C, codes = kmeans(x, 4, n_iter=100, weights=weights)
        ww = torch.ones_like(x) if weights is None else weights
        for k in range(4):
            m = codes == k
            mean = (ww[m] * x[m]).sum(0) / ww[m].sum(0)
            torch.testing.assert_close(C[k], mean)
        dist = (ww[:, None, :] * (x[:, None, :] - C[None]) ** 2).sum(-1)
        assert torch.equal(codes, dist.argmin(1))


def separated_clusters(centers, per=5):
    centers = torch.tensor(centers, dtype=F64)
    truth = torch.arange(len(centers)).repeat_interleave(per)
    return centers[truth] + 0.1 * torch.randn(len(truth), centers.shape[1], generator=gen(0), dtype=F64), truth


def found(x, truth, C, codes):
    """The same partition up to a relabelling, each centroid the mean of its cluster."""
    label = {int(t): int(c) for t, c in zip(truth, codes)}
    if sorted(label.values()) != list(range(C.shape[0])):
        return False
    if not torch.equal(codes, torch.tensor([label[int(t)] for t in truth])):
        return False
    return all(torch.allclose(C[label[t]], x[truth == t].mean(0)) for t in range(C.shape[0]))


@pytest.mark.parametrize("seed", range(8))
def test_kmeans_finds_two_well_separated_clusters_from_any_seed(seed):
    # two starts in the same cluster still end right: the far cluster pulls one centroid all the way over
    x, truth = separated_clusters([[0.0, 0.0], [10.0, 3.0]])
    assert found(x, truth, *kmeans(x, 2, seed=seed))


def test_kmeans_finds_three_well_separated_clusters():
    # with K = 3, a start with two rows in one cluster is a local minimum of Lloyd's algorithm (random rows,
    # no k-means++): some seeds end there, but every start with one row per cluster finds the clusters
    x, truth = separated_clusters([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    hits = [found(x, truth, *kmeans(x, 3, seed=seed)) for seed in range(8)]
    assert sum(hits) >= 4
    for init in ([0, 5, 10], [14, 3, 7], [9, 11, 2]):
        assert found(x, truth, *kmeans(x, 3, init=x[init]))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 7, 20])
def test_nearest_is_the_naive_argmin(weighted, chunk, monkeypatch):
    g = gen(5)
    x = torch.randn(50, 3, generator=g, dtype=F64)
    C = torch.randn(7, 3, generator=g, dtype=F64)
    w = torch.rand(50, 3, generator=g, dtype=F64) if weighted else None
    if chunk is not None:
        monkeypatch.setattr(pq, "CHUNK_ELEMENTS", chunk)  # 1, 7: one row per chunk; 20: 2 rows, uneven tail
    ww = torch.ones_like(x) if w is None else w
    dist = torch.stack([(ww * (x - C[k]) ** 2).sum(1) for k in range(7)], dim=1)
    assert torch.equal(nearest(x, C, w), dist.argmin(1))


def test_nearest_ties_go_to_the_lowest_index():
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    C = torch.tensor([[5.0], [1.0], [1.0], [-1.0]], dtype=F64)  # 1 and 2 are the same centroid
    assert nearest(x, C).tolist() == [1, 1, 1]
    # x = 0 is as far from 1 as from -1
    assert nearest(torch.zeros(1, 1, dtype=F64), torch.tensor([[1.0], [-1.0]], dtype=F64)).tolist() == [0]


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(60, 3, generator=gen(1))
    C1, c1 = kmeans(x, 5, seed=3)
    C2, c2 = kmeans(x, 5, seed=3)
    assert torch.equal(C1, C2) and torch.equal(c1, c2)
    results = [kmeans(x, 5, seed=s, n_iter=0)[0] for s in range(4)]  # the seed picks the initial rows
    assert any(not torch.equal(results[0], r) for r in results[1:])


# --- empty clusters ---------------------------------------------------------------------------------


def test_empty_cluster_from_a_far_centroid_is_refilled():
    x = torch.linspace(0, 1, 10, dtype=F64).unsqueeze(1)
    # the centroid at 100 gets no point; the one at 0.5 holds all ten
    init = torch.tensor([[0.5], [100.0]], dtype=F64)
    C, codes = kmeans(x, 2, init=init)
    assert init.tolist() == [[0.5], [100.0]]  # the caller's start is not modified
    assert torch.bincount(codes, minlength=2).tolist() == [5, 5]
    assert sorted(C.flatten().tolist()) == pytest.approx([0.2222222222222222, 0.7777777777777778])


def test_empty_cluster_is_refilled_whatever_the_populated_centroid():
    # ten distinct points and 2 centroids: both can always be populated. Here the populated centroid (-10)
    # lies outside its members, so splitting around it (c +- e) cannot separate them.
    x = torch.linspace(0, 1, 10, dtype=F64).unsqueeze(1)
    C, codes = kmeans(x, 2, init=torch.tensor([[-10.0], [100.0]], dtype=F64))
    assert torch.bincount(codes, minlength=2).min() >= 1
    assert sorted(C.flatten().tolist()) == pytest.approx([0.2222222222222222, 0.7777777777777778])


def test_duplicated_points_with_enough_distinct_values_never_raise():
    # 6 distinct values for 3 centroids; a random start may pick the duplicated 0 twice
    x = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5], dtype=F64).unsqueeze(1)
    failed = []
    for seed in range(40):
        try:
            C, codes = kmeans(x, 3, seed=seed)
        except EmptyClusterError:
            failed.append(seed)
            continue
        assert torch.bincount(codes, minlength=3).min() >= 1
    assert failed == []


def test_product_quantize_on_a_pruned_matrix_never_raises():
    # block_size 1 (scalar k-means) on a matrix half zeros: 17 distinct values for 6 centroids
    failed = []
    for seed in range(40):
        W = torch.randn(4, 8, generator=gen(seed), dtype=F64)
        W[:, :4] = 0
        try:
            product_quantize(W, block_size=1, n_centroids=6, seed=seed, codebook_dtype=None)
        except EmptyClusterError:
            failed.append(seed)
    assert failed == []


def test_fewer_distinct_vectors_than_centroids_raises_after_bounded_tries(monkeypatch):
    calls = []
    real = pq.nearest

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pq, "nearest", counting)
    # 3 distinct points, each 5 times, for 5 centroids
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]], dtype=F64).repeat(5, 1)
    for seed in range(5):
        with pytest.raises(EmptyClusterError, match="empty cluster.*use fewer centroids"):
            kmeans(x, 5, seed=seed)
    assert len(calls) < 100
    assert issubclass(EmptyClusterError, ValueError)
    # more populated clusters of identical points than split tries: the other message
    monkeypatch.setattr(pq, "MAX_SPLIT_TRIES", 2)
    with pytest.raises(EmptyClusterError, match="after 2 splits: fewer distinct sub-vectors"):
        kmeans(x, 4, init=x[:4].clone())
    # through the solver: 16 sub-vectors but only 2 distinct ones
    W = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64).repeat(4, 4)  # (8, 8), b = 2
    with pytest.raises(ValueError, match="empty cluster"):
        product_quantize(W, block_size=2, n_centroids=4)
    with pytest.raises(ValueError, match="empty cluster"):
        product_quantize(W, torch.eye(8, dtype=F64), block_size=2, n_centroids=4)


# --- layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hessian", [False, True])
def test_layout_linear(hessian):
    W = torch.randn(6, 12, generator=gen(2))
    H = random_hessian(12, dtype=torch.float32) if hessian else None
    res = product_quantize(W, H, block_size=3, n_centroids=8)
    assert res.codes.shape == (6, 4) and res.codebook.shape == (8, 3)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) < 8
    for r in range(6):
        for j in range(4):
            assert torch.equal(res.quantized_matrix[r, 3 * j : 3 * j + 3], res.codebook[res.codes[r, j]])
    assert res.hessian_aware is hessian and res.block_size == 3 and res.n_centroids == 8


@pytest.mark.parametrize("hessian", [False, True])
def test_layout_conv_kernels(hessian):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    weight = conv.weight.detach()  # (4, 3, 3, 3)
    W = weight.reshape(4, 27)
    H = random_hessian(27, dtype=torch.float32) if hessian else None
    res = product_quantize(W, H, block_size=9, n_centroids=4)
    assert res.codes.shape == (4, 3) and res.codebook.shape == (4, 9)
    Q = res.quantized_matrix.reshape(4, 3, 3, 3)
    for o in range(4):
        for i in range(3):  # sub-vector i of output o is the 3x3 kernel (o, i)
            assert torch.equal(Q[o, i], res.codebook[res.codes[o, i]].reshape(3, 3))
    assert torch.equal(conv.weight.detach(), weight)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hessian", [False, True])
def test_dtype_shape_and_inputs_untouched(dtype, hessian):
    W = torch.randn(8, 16, generator=gen(3)).to(dtype)
    H = random_hessian(16, dtype=torch.float32 if dtype != F64 else F64) if hessian else None
    W_copy = W.clone()
    H_copy = None if H is None else H.clone()
    res = product_quantize(W, H, block_size=4, n_centroids=8)
    assert torch.equal(W, W_copy) and (H is None or torch.equal(H, H_copy))
    assert res.quantized_matrix.dtype == dtype and res.quantized_matrix.shape == W.shape
    assert res.codebook.dtype == (F64 if dtype == F64 else torch.float32)
    assert torch.equal(res.codebook, res.codebook.half().to(res.codebook.dtype))  # float16 values
    # in the input's dtype: bfloat16 cannot hold every float16 value, so the layout holds after its rounding
    assert torch.equal(res.quantized_matrix, gather(res.codebook, res.codes).to(dtype))
    assert torch.isfinite(res.loss).all() and (res.loss >= 0).all() and res.loss.shape == (8,)


# --- plain PQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_plain_pq_with_one_centroid_per_subvector_is_exact(dtype):
    W = torch.randn(5, 12, generator=gen(4), dtype=dtype)  # 20 distinct sub-vectors of 3
    exact = product_quantize(W, block_size=3, n_centroids=20, codebook_dtype=None)
    assert torch.equal(exact.quantized_matrix, W)
    assert float(exact.loss.sum()) == 0.0
    half = product_quantize(W, block_size=3, n_centroids=20)  # only the codebook's float16 rounding
    assert torch.equal(half.quantized_matrix, W.half().to(dtype))
    torch.testing.assert_close(half.loss, 0.5 * ((W.half().to(dtype) - W) ** 2).sum(1))
    assert float(half.loss.sum()) < 1e-5


def test_plain_pq_loss_is_half_the_squared_error_and_codes_are_nearest():
    W = torch.randn(16, 24, generator=gen(5), dtype=F64)
    res = product_quantize(W, block_size=4, n_centroids=16)
    torch.testing.assert_close(res.loss, 0.5 * ((res.quantized_matrix - W) ** 2).sum(1))
    # every sub-vector takes its nearest centroid of the (rounded) codebook
    x = W.reshape(-1, 4)
    dist = ((x[:, None, :] - res.codebook[None]) ** 2).sum(-1)
    assert torch.equal(res.codes.reshape(-1), dist.argmin(1))
    assert res.damp == 0.0 and not res.hessian_aware


# --- compensated assignment -------------------------------------------------------------------------


def assign_reference(W, H, C, b):
    """Block by block in the given order: the current inverse Hessian of the inputs not yet quantized,
    explicitly; the centroid minimising (w_B - c) (Hinv_BB)^-1 (w_B - c)^T by brute force over the
    codebook; the remaining inputs move by -(w_B - q_B) (Hinv_BB)^-1 Hinv_BR."""
    W = W.clone()
    d = W.shape[1]
    codes = []
    for s in range(0, d, b):
        Hinv = torch.linalg.inv(H[s:, s:])
        M = torch.linalg.inv(Hinv[:b, :b])
        cost = torch.stack([torch.einsum("rb,bc,rc->r", W[:, s : s + b] - c, M, W[:, s : s + b] - c) for c in C], dim=1)
        k = cost.argmin(1)
        codes.append(k)
        W[:, s + b :] -= (W[:, s : s + b] - C[k]) @ M @ Hinv[:b, b:]
    return torch.stack(codes, dim=1)


def test_assign_reference_by_hand():
    # no coupling (diagonal H): nothing to compensate, the plain nearest centroid
    W = torch.randn(5, 6, generator=gen(8), dtype=F64)
    C = torch.randn(4, 3, generator=gen(9), dtype=F64)
    plain = nearest(W.reshape(-1, 3), C).reshape(5, 2)
    assert torch.equal(assign_reference(W, 2 * torch.eye(6, dtype=F64), C, 3), plain)
    U = torch.linalg.cholesky(torch.eye(6, dtype=F64) / 2, upper=True)
    assert torch.equal(assign_with_compensation(W, U, C, 3), plain)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lazy_block", [128, 6, 7, 3])
def test_assign_with_compensation_matches_reference(seed, lazy_block):
    d, b, K, rows = 12, 3, 4, 5
    g = gen(seed)
    W = torch.randn(rows, d, generator=g, dtype=F64)
    C = torch.randn(K, b, generator=g, dtype=F64)
    H = random_hessian(d, seed=seed)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    ref = assign_reference(W, H, C, b)
    W_copy = W.clone()
    # 128 >= d: one lazy block; 6: two; 7 (not a multiple of b): rounded down to 6; 3: one block each
    assert torch.equal(assign_with_compensation(W, U, C, b, lazy_block=lazy_block), ref)
    assert torch.equal(W, W_copy)


def test_compensation_is_not_plain_nearest_on_correlated_inputs():
    W = torch.randn(16, 24, generator=gen(1), dtype=F64)
    C = torch.randn(8, 3, generator=gen(2), dtype=F64)
    H = ar1_hessian(24)
    ref = assign_reference(W, H, C, 3)
    assert not torch.equal(ref, nearest(W.reshape(-1, 3), C).reshape(16, 8))
    # and compensation pays off: lower objective than the plain nearest centroids
    plain = gather(C, nearest(W.reshape(-1, 3), C).reshape(16, 8))
    assert objective(W, gather(C, ref), H) < objective(W, plain, H)


# --- codebook update --------------------------------------------------------------------------------


def codebook_least_squares(W, H, codes, K):
    """argmin_C 1/2 trace((C[codes] - W) H (C[codes] - W)^T) from the explicit (K b) x (K b) normal
    equations: q_r = S_r vec(C), so (sum_r S_r^T H S_r) vec(C) = sum_r S_r^T H w_r."""
    rows, J = codes.shape
    d = W.shape[1]
    b = d // J
    S = torch.zeros(rows, d, K * b, dtype=W.dtype)
    for r in range(rows):
        for j in range(J):
            for t in range(b):
                S[r, j * b + t, int(codes[r, j]) * b + t] = 1
    A = torch.einsum("rdi,de,rej->ij", S, H, S)
    rhs = torch.einsum("rdi,de,re->i", S, H, W)
    return torch.linalg.solve(A, rhs).reshape(K, b)


@pytest.mark.parametrize("seed", range(3))
def test_update_codebook_is_the_least_squares_codebook(seed):
    rows, d, b, K = 5, 12, 3, 4
    g = gen(seed)
    W = torch.randn(rows, d, generator=g, dtype=F64)
    H = random_hessian(d, seed=seed)
    codes = (torch.randperm(rows * (d // b), generator=g) % K).reshape(rows, d // b)  # all K used
    C0 = torch.randn(K, b, generator=g, dtype=F64)
    C0_copy = C0.clone()
    C = update_codebook(W, H, codes, C0)
    ref = codebook_least_squares(W, H, codes, K)
    # CG stops at a relative residual of 1e-6: the codebook to ~1e-6 * cond, the objective to second order
    torch.testing.assert_close(C, ref, rtol=1e-4, atol=1e-4)
    assert objective(W, gather(C, codes), H) == pytest.approx(objective(W, gather(ref, codes), H), rel=1e-9)
    assert torch.equal(C0, C0_copy)


@pytest.mark.parametrize("iters", [0, 1, 2, 5, 25])
def test_update_codebook_never_increases_the_objective(iters):
    rows, d, b, K = 8, 24, 4, 6
    g = gen(iters)
    W = torch.randn(rows, d, generator=g, dtype=F64)
    H = ar1_hessian(d, seed=iters)
    codes = torch.randint(0, K - 1, (rows, d // b), generator=g)  # centroid K-1 unused
    C0 = torch.randn(K, b, generator=g, dtype=F64)
    before = objective(W, gather(C0, codes), H)
    C = update_codebook(W, H, codes, C0, iters=iters)
    assert objective(W, gather(C, codes), H) <= before + 1e-12
    assert torch.equal(C[K - 1], C0[K - 1])  # an unused centroid keeps its value
    if iters == 0:
        assert torch.equal(C, C0)


# --- the Hessian-aware solver -----------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_first_round_is_weighted_kmeans_then_reference_assignment(act_order):
    # n_rounds=1, no rounding: the codes are the reference assignment (blocks in act order, with the damped
    # H) with the codebook of k-means weighted by diag(H); the codebook is then the least-squares one
    rows, d, b, K, damp = 6, 12, 3, 5, 0.05
    W = torch.randn(rows, d, generator=gen(11), dtype=F64)
    H = random_hessian(d, seed=11) * torch.linspace(0.5, 3, d, dtype=F64).sqrt().outer(
        torch.linspace(0.5, 3, d, dtype=F64).sqrt()
    )  # block traces differ
    res = product_quantize(
        W, H, block_size=b, n_centroids=K, damp=damp, n_rounds=1, codebook_dtype=None, act_order=act_order
    )
    Hd = H + damp * H.diagonal().mean() * torch.eye(d, dtype=F64)
    C0, _ = kmeans(W.reshape(-1, b), K, seed=0, weights=Hd.diagonal().repeat(rows, 1).reshape(-1, b))
    trace = Hd.diagonal().reshape(-1, b).sum(1)
    order = sorted(range(d // b), key=lambda j: -float(trace[j])) if act_order else list(range(d // b))
    if act_order:
        assert order != list(range(d // b))
    perm = [j * b + t for j in order for t in range(b)]
    ref = torch.empty(rows, d // b, dtype=torch.long)
    ref[:, order] = assign_reference(W[:, perm], Hd[perm][:, perm], C0, b)
    assert torch.equal(res.codes, ref)
    best_C = codebook_least_squares(W, Hd, ref, K) if len(ref.unique()) == K else None
    if best_C is not None:
        torch.testing.assert_close(res.codebook, best_C, rtol=1e-5, atol=1e-6)
    assert res.damp == damp


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_loss_is_the_objective_with_the_undamped_hessian(dtype):
    W = torch.randn(10, 16, generator=gen(12), dtype=dtype)
    H = random_hessian(16, seed=12, dtype=dtype)
    res = product_quantize(W, H, block_size=4, n_centroids=8, damp=0.1)
    D = (res.quantized_matrix - W).to(dtype)
    torch.testing.assert_close(res.loss, 0.5 * torch.einsum("rd,de,re->r", D, H, D))
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H))


@pytest.mark.parametrize("seed", range(3))
def test_hessian_aware_halves_plain_pq_on_correlated_inputs(seed):
    # the target: at the same block size and K, at most half of plain k-means PQ's layer objective
    d, rows, b, K = 64, 32, 4, 16
    W = torch.randn(rows, d, generator=gen(seed))
    H = ar1_hessian(d, rho=0.9, seed=seed, dtype=torch.float32)
    aware = product_quantize(W, H, block_size=b, n_centroids=K, seed=seed)
    plain = product_quantize(W, None, block_size=b, n_centroids=K, seed=seed)
    plain_obj = float(layer_objective(W, plain.quantized_matrix, H).sum())
    assert float(aware.loss.sum()) <= 0.5 * plain_obj


def test_dead_inputs():
    rows, d, b, K = 8, 16, 4, 8
    W = torch.randn(rows, d, generator=gen(13), dtype=F64)
    H = random_hessian(d, seed=13)
    dead = [2, 9]
    H[dead, :] = 0
    H[:, dead] = 0
    res = product_quantize(W, H, block_size=b, n_centroids=K)
    assert torch.isfinite(res.quantized_matrix).all()
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H))
    # a dead input's weight never reaches the output: any value there gives the same result
    W2 = W.clone()
    W2[:, dead] = 100 * torch.randn(rows, 2, generator=gen(14), dtype=F64)
    res2 = product_quantize(W2, H, block_size=b, n_centroids=K)
    assert torch.equal(res.codes, res2.codes) and torch.equal(res.loss, res2.loss)
    # all inputs of a block dead
    H[4:8, :] = 0
    H[:, 4:8] = 0
    res3 = product_quantize(W, H, block_size=b, n_centroids=K)
    torch.testing.assert_close(res3.loss, layer_objective(W, res3.quantized_matrix, H))


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_singular_hessian_never_crashes(damp):
    d = 16
    X = torch.randn(8, d, generator=gen(15), dtype=F64)  # 8 samples: rank 8 < 16
    X[:, 5] = X[:, 4]
    H = 2 * X.T @ X / 8
    W = torch.randn(6, d, generator=gen(16), dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = product_quantize(W, H, block_size=4, n_centroids=8, damp=damp)
    escalated = [w for w in caught if issubclass(w.category, HessianDampingWarning)]
    assert [w for w in caught if w not in escalated] == []
    assert res.damp >= damp and (res.damp > damp) == bool(escalated)
    if damp == 0.0:
        assert escalated and "not positive definite" in str(escalated[0].message)
    assert torch.isfinite(res.quantized_matrix).all() and torch.isfinite(res.loss).all()
    torch.testing.assert_close(res.loss, layer_objective(W, res.quantized_matrix, H))


def test_act_order_both_run_and_differ():
    W = torch.randn(12, 24, generator=gen(17), dtype=F64)
    H = ar1_hessian(24, seed=17) * torch.linspace(0.2, 4, 24, dtype=F64)  # rising curvature: act order reverses
    H = (H + H.T) / 2
    a = product_quantize(W, H, block_size=4, n_centroids=8, act_order=True)
    b = product_quantize(W, H, block_size=4, n_centroids=8, act_order=False)
    assert torch.isfinite(a.loss).all() and torch.isfinite(b.loss).all()
    assert not torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("seed", range(3))
def test_more_rounds_are_never_worse(seed):
    W = torch.randn(16, 32, generator=gen(seed))
    H = ar1_hessian(32, seed=seed, dtype=torch.float32)
    losses = [
        float(product_quantize(W, H, block_size=4, n_centroids=16, seed=seed, n_rounds=n).loss.sum()) for n in (1, 2, 3)
    ]
    assert losses[1] <= losses[0] and losses[2] <= losses[1]


@pytest.mark.parametrize("hessian", [False, True])
def test_product_quantize_is_deterministic_for_a_seed(hessian):
    W = torch.randn(16, 32, generator=gen(18))
    H = ar1_hessian(32, seed=18, dtype=torch.float32) if hessian else None
    a = product_quantize(W, H, block_size=4, n_centroids=16, seed=5)
    b = product_quantize(W, H, block_size=4, n_centroids=16, seed=5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook) and torch.equal(a.loss, b.loss)


# --- bad inputs and storage -------------------------------------------------------------------------


def test_bad_inputs():
    W = torch.randn(4, 12, dtype=F64)
    H = random_hessian(12)
    cases = [
        (dict(block_size=5), "block_size=5 must divide the 12 inputs"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(block_size=True), "block_size must be a positive integer"),
        (dict(block_size=3.0), "block_size must be a positive integer"),
        (dict(n_centroids=1), r"n_centroids must be an integer in \[2, 65536\]"),
        (dict(n_centroids=65537), r"n_centroids must be an integer in \[2, 65536\]"),
        (dict(block_size=4, n_centroids=13), "only 12 sub-vectors of 4 for n_centroids=13"),
        (dict(n_iter=-1), "n_iter must be an integer >= 0"),
        (dict(n_rounds=0), "n_rounds must be an integer >= 1"),
        (dict(damp=-1.0), "damp must be"),
    ]
    for kwargs, msg in cases:
        kwargs = {"block_size": 3, "n_centroids": 4, **kwargs}
        with pytest.raises(ValueError, match=msg):
            product_quantize(W, H, **kwargs)
    bad = W.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="matrix .* contains NaN"):
        product_quantize(bad, H, block_size=3, n_centroids=4)
    with pytest.raises(ValueError, match="matrix .* contains NaN"):
        product_quantize(bad, None, block_size=3, n_centroids=4)
    badH = H.clone()
    badH[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hessian .* contains NaN"):
        product_quantize(W, badH, block_size=3, n_centroids=4)
    with pytest.raises(ValueError, match=r"hessian must be a floating-point \(12, 12\) tensor, got \(11, 11\)"):
        product_quantize(W, H[:-1, :-1], block_size=3, n_centroids=4)
    with pytest.raises(ValueError, match="matrix must be a 2-D floating-point tensor"):
        product_quantize(W[0], None, block_size=3, n_centroids=4)
    with pytest.raises(ValueError, match="matrix must be a 2-D floating-point tensor"):
        product_quantize(torch.ones(4, 12, dtype=torch.long), None, block_size=3, n_centroids=4)


@pytest.mark.parametrize("K", [2, 3, 5, 16, 256])
def test_bits_per_weight(K):
    rows, d, b = 16, 64, 4
    J = d // b
    res = product_quantize(torch.randn(rows, d, generator=gen(K)), block_size=b, n_centroids=K, n_iter=2)
    assert res.code_bits == math.ceil(math.log2(K))
    expected = (math.ceil(math.log2(K)) * rows * J + 16 * K * b) / (rows * d)
    assert res.bits_per_weight() == pytest.approx(expected)
    assert res.bits_per_weight(32) == pytest.approx((math.ceil(math.log2(K)) * rows * J + 32 * K * b) / (rows * d))
    assert isinstance(res, PQResult)
    assert pq.code_bits(65536) == 16 and pq.code_bits(2) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hessian", [False, True])
def test_cuda_matches_cpu_objective(hessian):
    W = torch.randn(32, 64, generator=gen(19))
    H = ar1_hessian(64, seed=19, dtype=torch.float32)
    cpu = product_quantize(W, H if hessian else None, block_size=4, n_centroids=16)
    gpu = product_quantize(W.cuda(), H.cuda() if hessian else None, block_size=4, n_centroids=16)
    assert gpu.quantized_matrix.device.type == "cuda" and gpu.codes.device.type == "cuda"
    Hc = H if hessian else torch.eye(64)
    a = float(layer_objective(W, cpu.quantized_matrix, Hc).sum())
    b = float(layer_objective(W, gpu.quantized_matrix.cpu(), Hc).sum())
    assert b == pytest.approx(a, rel=1e-3)
