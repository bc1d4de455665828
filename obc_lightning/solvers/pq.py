"""Product quantization of a weight matrix: plain (fairseq / iPQ) and Hessian-aware.

Layout (fairseq's ``PQ``): every row of W (rows x d) is cut into J = d / b sub-vectors of b consecutive
inputs (for a conv, of the flattened in * kh * kw axis: b = 9 is one 3x3 kernel); one codebook C
(K x b) per layer; ``codes[r, j]`` names the centroid that replaces sub-vector j of row r, so
``Q[r, j*b:(j+1)*b] = C[codes[r, j]]``. Storage: log2(K) bits per sub-vector plus the codebook.

Plain PQ (``hessian=None``) runs k-means (EM) on the rows * J sub-vectors: it minimises ||W - Q||^2.

Hessian-aware PQ minimises the layer objective 1/2 trace((Q - W) H (Q - W)^T) instead:

1. the codebook starts from k-means weighted by the Hessian diagonal: sub-vector x of block j is
   compared with a centroid c by sum_t H_tt (x_t - c_t)^2 over the block's inputs t;
2. sub-vectors are assigned block by block with optimal compensation of the inputs not yet quantized
   (GPTQ for vectors; GPTVQ, van Baalen et al. 2024). With U the upper Cholesky factor of H^-1
   (H^-1 = U^T U) in the visiting order and B the block's inputs, fixing w_B to q_B costs
   1/2 (w_B - q_B) (U_BB^T U_BB)^-1 (w_B - q_B)^T = 1/2 ||(w_B - q_B) U_BB^-1||^2, so the best centroid
   is the Euclidean nearest neighbour of w_B A among the rows of C A, A = U_BB^-1; the remaining inputs
   R move by -(w_B - q_B) A U_BR;
3. with the assignments fixed the objective is a convex quadratic in the codebook; conjugate gradient
   minimises it (its gradient for centroid k gathers (Q - W) H over the sub-vectors assigned to k);
4. steps 2-3 alternate for ``n_rounds`` rounds; the best round (by the objective) is kept.

Blocks are visited in decreasing order of their Hessian trace (``act_order``: the costly inputs are
fixed first while many inputs remain to compensate them, as GPTQ's act-order does for columns).
Every codebook is rounded to ``codebook_dtype`` (float16: what export stores) before its codes are
chosen, so the exported file holds exactly the in-memory result.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from obc_lightning.checks import check_int, check_positive_int
from obc_lightning.grids import check_scale_dtype
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    PreparedHessian,
    compute_dtype,
    layer_objective,
    loss_in,
    objective,
    row_factors,
    solve_with_damping,
    solver_hessian,
)
from obc_lightning.solvers.gptq import upper_cholesky_of_inverse

CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries computed at a time (64 MiB in float32)
MAX_SPLIT_TRIES = 10  # attempts to refill one empty cluster before giving up
CG_ITERS = 25  # conjugate-gradient steps of the codebook update per round


class EmptyClusterError(ValueError):
    """k-means could not keep every centroid populated (fewer distinct sub-vectors than centroids)."""


@dataclass
class PQResult:
    """A product-quantized matrix: ``quantized_matrix[r, j*b:(j+1)*b] == codebook[codes[r, j]]``.

    ``loss`` is per row: 1/2 (q - w) H (q - w)^T with the given (undamped) Hessian (its sum is
    1/2 trace((Q - W) H (Q - W)^T)), or 1/2 ||q - w||^2 without one; evaluated in float64.
    """

    quantized_matrix: Tensor
    codes: Tensor
    codebook: Tensor
    loss: Tensor
    block_size: int
    n_centroids: int
    hessian_aware: bool
    damp: float = 0.0

    @property
    def code_bits(self) -> int:
        return code_bits(self.n_centroids)

    def storage_bits(self, codebook_bits: int = 16) -> int:
        """Bits to store the layer: the packed codes plus the codebook at ``codebook_bits`` per entry."""
        return self.codes.numel() * self.code_bits + self.codebook.numel() * codebook_bits

    def bits_per_weight(self, codebook_bits: int = 16) -> float:
        """log2(K) / b plus the codebook's share."""
        return self.storage_bits(codebook_bits) / self.quantized_matrix.numel()


def code_bits(n_centroids: int) -> int:
    """Bits of one code: ceil(log2 K), at least 1."""
    return max(1, math.ceil(math.log2(n_centroids)))


def check_pq_args(fn: str, cols: int, rows: int, block_size, n_centroids, what: str = "matrix") -> None:
    """Clear errors for a block size or codebook size that cannot apply to a (rows x cols) weight."""
    check_positive_int(fn, "block_size", block_size)
    if isinstance(n_centroids, bool) or not isinstance(n_centroids, int) or not 2 <= n_centroids <= 2**16:
        raise ValueError(f"{fn}: n_centroids must be an integer in [2, 65536], got {n_centroids!r}")
    if cols % block_size:
        raise ValueError(
            f"{fn}: block_size={block_size} must divide the {cols} inputs of the {what} of shape ({rows}, {cols})"
        )
    n_vectors = rows * cols // block_size
    if n_vectors < n_centroids:
        raise ValueError(
            f"{fn}: the {what} of shape ({rows}, {cols}) has only {n_vectors} sub-vectors of {block_size} for "
            f"n_centroids={n_centroids}; use fewer centroids, a smaller block, or leave it uncompressed"
        )


# ------------------------------------------------------------------ k-means
def _chunk_rows(n_centroids: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(n_centroids, 1))


def nearest(x: Tensor, centroids: Tensor, weights: Tensor | None = None) -> Tensor:
    """Index of the closest centroid for every row of x (n, b): argmin_k sum_t w_t (x_t - c_kt)^2.

    ``weights`` (n, b) weights each sub-vector's coordinates (None: Euclidean). Computed in chunks of
    rows as -2 (w * x) C^T + w (C * C)^T (the term in x alone does not change the argmin); ties go to
    the lowest index.
    """
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    c2 = (centroids * centroids).T  # (b, K)
    step = _chunk_rows(centroids.shape[0])
    for i in range(0, x.shape[0], step):
        xs = x[i : i + step]
        if weights is None:
            d = c2.sum(0) - 2 * xs @ centroids.T
        else:
            ws = weights[i : i + step]
            d = ws @ c2 - 2 * (ws * xs) @ centroids.T
        out[i : i + step] = d.argmin(dim=1)
    return out


def _centroid_sums(x: Tensor, codes: Tensor, n_centroids: int, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per centroid: sum of (w *) x and sum of w (or the count, broadcast over b)."""
    w = torch.ones_like(x) if weights is None else weights
    num = torch.zeros(n_centroids, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, codes, w * x)
    den = torch.zeros(n_centroids, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, codes, w)
    return num, den


def _fill_empty(
    x: Tensor, codes: Tensor, centroids: Tensor, weights: Tensor | None, gen: torch.Generator, fn: str
) -> None:
    """Give every empty cluster members by splitting the most populated one (in place).

    The split moves the two halves' centroids to mean +- e (the members' mean, e a small random direction)
    and reassigns the big cluster's members between them; a split that leaves the new cluster empty (identical members)
    is retried with the next most populated cluster, at most ``MAX_SPLIT_TRIES`` times.
    """
    K = centroids.shape[0]
    counts = torch.bincount(codes, minlength=K)
    for k in torch.nonzero(counts == 0).flatten().tolist():
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        for m in order[:MAX_SPLIT_TRIES]:
            if counts[m] < 2:
                break
            members = torch.nonzero(codes == m).flatten()
            xm = x[members]
            # split around the members' (weighted) mean, not the centroid: a centroid that is still an
            # initial data row can sit at the edge of its cluster, where a small split separates nothing
            if weights is None:
                center = xm.mean(0)
            else:
                wm = weights[members]
                den = wm.sum(0)
                center = torch.where(den > 0, (wm * xm).sum(0) / den.clamp_min(torch.finfo(x.dtype).tiny), centroids[m])
            scale = float((xm - center).abs().mean())
            if scale == 0.0:
                continue  # identical members: no split separates them
            e = torch.randn(x.shape[1], generator=gen, dtype=x.dtype).to(x.device) * (1e-2 * scale)
            pair = torch.stack([center - e, center + e])
            side = nearest(x[members], pair, None if weights is None else weights[members])
            if 0 < int(side.sum()) < members.numel():
                centroids[m], centroids[k] = pair[0], pair[1]
                codes[members[side == 1]] = k
                counts[m] -= int(side.sum())
                counts[k] = int(side.sum())
                break
        else:
            raise EmptyClusterError(
                f"{fn}: cannot fill an empty cluster after {MAX_SPLIT_TRIES} splits: fewer distinct sub-vectors "
                f"than the {K} centroids; use fewer centroids"
            )
        if counts[k] == 0:
            raise EmptyClusterError(
                f"{fn}: cannot fill an empty cluster: {int((counts > 0).sum())} of the {K} centroids hold distinct "
                "sub-vectors and the rest cannot be split off; use fewer centroids"
            )


def kmeans(
    x: Tensor,
    n_centroids: int,
    *,
    n_iter: int = 20,
    seed: int = 0,
    weights: Tensor | None = None,
    init: Tensor | None = None,
    fn: str = "kmeans",
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means (EM) on the rows of x (n, b); returns (centroids (K, b), codes (n,)).

    Starts from K distinct random rows (seeded: the same seed gives the same result on a device), or
    from ``init``; ``weights`` (n, b) >= 0 turn both steps into their weighted forms
    (c_kt = sum_i w_it x_it / sum_i w_it over the members i of k). Stops early when no assignment
    changes. Empty clusters are refilled by splitting populated ones (:class:`EmptyClusterError` when
    impossible).
    """
    n = x.shape[0]
    if n < n_centroids:
        raise ValueError(f"{fn}: {n} sub-vectors cannot fill {n_centroids} centroids")
    gen = torch.Generator().manual_seed(seed)
    if init is None:
        centroids = x[torch.randperm(n, generator=gen)[:n_centroids].to(x.device)].clone()
    else:
        centroids = init.to(x.dtype).clone()
    codes = nearest(x, centroids, weights)
    _fill_empty(x, codes, centroids, weights, gen, fn)
    for _ in range(n_iter):
        num, den = _centroid_sums(x, codes, n_centroids, weights)
        populated = den > 0
        centroids = torch.where(populated, num / den.clamp_min(torch.finfo(x.dtype).tiny), centroids)
        new = nearest(x, centroids, weights)
        _fill_empty(x, new, centroids, weights, gen, fn)
        if torch.equal(new, codes):
            break
        codes = new
    return centroids, codes


# ------------------------------------------------------------------ Hessian-aware assignment and update
def _round_to(codebook: Tensor, dtype: torch.dtype | None, factor: Tensor | None = None) -> Tensor:
    """The codebook rounded to values ``dtype`` holds, where it can hold the codebook: its largest entry
    (times ``factor``, the scaling the matrix is solved under) finite and a normal number in ``dtype``,
    so that every entry is stored to within dtype's relative precision of the largest one. Otherwise
    (float16: beyond 65504, or all below 6.1e-5) it stays in the compute precision, as a grid keeps a
    scale that its ``scale_dtype`` cannot hold (:func:`~obc_lightning.grids.round_scales`)."""
    if dtype is None:
        return codebook
    true = codebook if factor is None else codebook * factor
    if not storable(true, dtype):
        return codebook
    r = true.to(dtype).to(codebook.dtype)
    return r if factor is None else r / factor


def storable(codebook: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds the codebook (see :func:`_round_to`)."""
    top = float(codebook.abs().amax()) if codebook.numel() else 0.0
    return top == 0.0 or (math.isfinite(float(torch.tensor(top).to(dtype))) and top >= torch.finfo(dtype).tiny)


def block_order(hessian: Tensor, block_size: int, act_order: bool) -> Tensor:
    """Blocks by decreasing trace of their diagonal block of H (stable), or in their natural order."""
    J = hessian.shape[0] // block_size
    if not act_order:
        return torch.arange(J, device=hessian.device)
    trace = torch.diagonal(hessian).reshape(J, block_size).sum(1)
    return torch.argsort(trace, descending=True, stable=True)


def assign_with_compensation(
    w: Tensor, U: Tensor, codebook: Tensor, block_size: int, lazy_block: int = 128
) -> Tensor:
    """Codes (rows, J) of GPTQ-style vector assignment on w (rows, d), columns already in visiting order.

    U: upper Cholesky factor of H^-1 in that order. Updates beyond the current ``lazy_block`` columns
    are deferred and applied once per lazy block (GPTQ's lazy batch updates).
    """
    w = w.clone()
    rows, d = w.shape
    b = block_size
    J = d // b
    codes = torch.empty(rows, J, dtype=torch.long, device=w.device)
    lazy = max(b, (lazy_block // b) * b)
    for s in range(0, d, lazy):
        e = min(s + lazy, d)
        errs = torch.empty(rows, e - s, dtype=w.dtype, device=w.device)
        for c in range(s, e, b):
            A = torch.linalg.solve_triangular(
                U[c : c + b, c : c + b], torch.eye(b, dtype=w.dtype, device=w.device), upper=True
            )  # U_BB^-1
            k = nearest(w[:, c : c + b] @ A, codebook @ A)
            codes[:, c // b] = k
            err = (w[:, c : c + b] - codebook[k]) @ A  # (rows, b)
            errs[:, c - s : c - s + b] = err
            w[:, c + b : e] -= err @ U[c : c + b, c + b : e]
        w[:, e:] -= errs @ U[s:e, e:]
    return codes


def _gather(codebook: Tensor, codes: Tensor) -> Tensor:
    """Q (rows, J * b) from the codebook and the codes."""
    return codebook[codes].reshape(codes.shape[0], -1)


def _scatter(g: Tensor, codes: Tensor, n_centroids: int) -> Tensor:
    """Sum of g's sub-vectors (rows, J * b) per assigned centroid: the adjoint of ``_gather``."""
    b = g.shape[1] // codes.shape[1]
    out = torch.zeros(n_centroids, b, dtype=g.dtype, device=g.device)
    return out.index_add_(0, codes.reshape(-1), g.reshape(-1, b))


def update_codebook(w: Tensor, hessian: Tensor, codes: Tensor, codebook: Tensor, iters: int = CG_ITERS) -> Tensor:
    """The codebook minimising 1/2 trace((Q - W) H (Q - W)^T) for fixed codes, by conjugate gradient.

    The objective is quadratic in C: its gradient is S((C[codes] - W) H) and its curvature applied to a
    direction P is S(P[codes] H), with S the scatter-add of sub-vectors onto their centroids. Centroids
    that no sub-vector uses keep their value.
    """
    K = codebook.shape[0]
    C = codebook.clone()
    r = -_scatter((_gather(C, codes) - w) @ hessian, codes, K)  # the negative gradient
    p = r.clone()
    rr = (r * r).sum()
    tol = 1e-12 * float(rr) if float(rr) > 0 else 0.0
    for _ in range(iters):
        if float(rr) <= tol:
            break
        Ap = _scatter(_gather(p, codes) @ hessian, codes, K)
        pAp = (p * Ap).sum()
        if not float(pAp) > 0:
            break
        alpha = rr / pAp
        C += alpha * p
        r -= alpha * Ap
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return C


# ------------------------------------------------------------------ the solver
def _check(fn: str, matrix, hessian, block_size, n_centroids, n_iter, seed) -> None:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or not matrix.is_floating_point():
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{fn}: matrix must be a 2-D floating-point tensor, got {shape}")
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"{fn}: matrix is empty, shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{fn}: matrix of shape {tuple(matrix.shape)} contains NaN or Inf")
    if hessian is not None:
        if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (cols, cols) or not hessian.is_floating_point():
            got = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
            raise ValueError(f"{fn}: hessian must be a floating-point ({cols}, {cols}) tensor, got {got}")
        if hessian.device != matrix.device:
            raise ValueError(f"{fn}: matrix is on {matrix.device} but hessian on {hessian.device}")
        if not torch.isfinite(hessian).all():
            raise ValueError(f"{fn}: hessian of shape {tuple(hessian.shape)} contains NaN or Inf")
    check_int(fn, "n_iter", n_iter, 0)
    check_int(fn, "seed", seed, 0)
    check_pq_args(fn, cols, rows, block_size, n_centroids)


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
def product_quantize(
    matrix: Tensor,
    hessian: Tensor | None = None,
    *,
    block_size: int = 8,
    n_centroids: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    damp: float = 0.01,
    act_order: bool = True,
    n_rounds: int = 2,
    codebook_dtype: torch.dtype | None = torch.float16,
) -> PQResult:
    """Product-quantize ``matrix`` (rows x d) with one codebook of ``n_centroids`` sub-vectors of
    ``block_size`` consecutive inputs; Hessian-aware when ``hessian`` (d x d) is given.

    Args:
        block_size: inputs per sub-vector; must divide d (for a conv weight flattened to
            (out, in * kh * kw), 9 is one 3x3 kernel).
        n_centroids: codebook size K (codes take ceil(log2 K) bits); the matrix needs at least K
            sub-vectors.
        n_iter: k-means iterations (EM; stops early when no assignment changes).
        seed: k-means initialisation; the same seed gives the same result on a given device.
        damp: with a Hessian, ``damp * mean(diag H)`` is added to its diagonal (escalated with a
            :class:`~obc_lightning.solvers.common.HessianDampingWarning` if H is not positive definite).
        act_order: visit blocks by decreasing Hessian trace (Hessian-aware only).
        n_rounds: alternations of compensated assignment and codebook update (Hessian-aware only).
        codebook_dtype: the codebook is rounded to values this dtype holds (float16: what export
            stores); ``None`` keeps the compute precision. A codebook the dtype cannot hold (float16: an
            entry beyond 65504, or every entry below 6.1e-5, where float16 keeps too few bits) is kept in
            the compute precision, with a warning (export it with ``scale_dtype=torch.float32``).

    ``loss`` is the objective of every solver (see :class:`PQResult`), evaluated in float64. ``hessian``
    is used as (H + H^T) / 2 and refused if not symmetric up to float rounding; a matrix with max|w|
    outside [2^-24, 2^24] is solved divided by a power of two (one for all rows: the codebook is
    shared) and scaled back.

    Returns a :class:`PQResult`; ``quantized_matrix`` has the input's shape and dtype. The caller's
    tensors are not modified.
    """
    fn = "product_quantize"
    _check(fn, matrix, hessian, block_size, n_centroids, n_iter, seed)
    check_scale_dtype(fn, "codebook_dtype", codebook_dtype)
    check_int(fn, "n_rounds", n_rounds, 1)
    dt = compute_dtype(matrix)
    W = matrix.detach().to(dt)
    rows, d = W.shape
    b, K = block_size, n_centroids
    J = d // b
    # one codebook for all rows: a matrix far from |w| ~ 1 is solved divided by one power of two s
    # (the objective scales by s^2, the codes not at all) and its codebook scaled back
    factor = row_factors(W.reshape(1, -1))
    if factor is not None:
        W = W / factor

    if hessian is None:
        C, codes = kmeans(W.reshape(-1, b), K, n_iter=n_iter, seed=seed, fn=fn)
        C = _round_to(C, codebook_dtype, factor)
        codes = nearest(W.reshape(-1, b), C).reshape(rows, J)
        C = _unscaled(fn, C, factor, codebook_dtype)
        Q = _gather(C, codes).to(matrix.dtype)
        D = Q.to(torch.float64) - matrix.to(torch.float64)
        return PQResult(Q, codes, C, loss_in(fn, 0.5 * (D * D).sum(dim=1), dt), b, K, False)

    H, unit = solver_hessian(fn, hessian, dt)
    W0 = W

    def solve(preps: list[PreparedHessian]):
        prep = preps[0]
        Hd = prep.hessian
        W = W0.masked_fill(prep.dead.unsqueeze(0), 0.0)  # a dead input's weight never reaches the output
        # 1. codebook from k-means weighted by each input's curvature H_tt
        diag = torch.diagonal(Hd).reshape(1, J, b).expand(rows, J, b).reshape(-1, b)
        C, _ = kmeans(W.reshape(-1, b), K, n_iter=n_iter, seed=seed, weights=diag, fn=fn)
        # 2.-4. compensated assignment <-> codebook update, in block visiting order
        order = block_order(Hd, b, act_order)
        perm = (order.unsqueeze(1) * b + torch.arange(b, device=W.device)).reshape(-1)
        U = upper_cholesky_of_inverse(prep.inverse[perm][:, perm])
        Wp = W[:, perm]
        best = None
        for _ in range(n_rounds):
            C = _round_to(C, codebook_dtype, factor)
            codes_p = assign_with_compensation(Wp, U, C, b)
            codes = torch.empty_like(codes_p)
            codes[:, order] = codes_p
            obj = float(layer_objective(W, _gather(C, codes), H).sum())
            if best is None or obj < best[0]:
                best = (obj, C, codes)
            C = _round_to(update_codebook(W, Hd, codes, C), codebook_dtype, factor)
            obj = float(layer_objective(W, _gather(C, codes), H).sum())
            if obj < best[0]:
                best = (obj, C, codes)
        return prep, best

    # a breakdown of the factor of the inverse gets more damping, as in every solver
    prep, (_, C, codes) = solve_with_damping(fn, [H], damp, [tuple(matrix.shape)], solve)
    C = _unscaled(fn, C, factor, codebook_dtype)
    Q = _gather(C, codes).to(matrix.dtype)
    return PQResult(Q, codes, C, objective(fn, matrix, Q, H, dt, unit), b, K, True, prep.damp)


def _unscaled(fn: str, codebook: Tensor, factor: Tensor | None, dtype: torch.dtype | None) -> Tensor:
    """The codebook in the matrix's units; warns when ``dtype`` could not hold it (kept unrounded)."""
    C = codebook if factor is None else codebook * factor
    if dtype is not None and not storable(C, dtype):
        name = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"{fn}: codebook_dtype={name} cannot hold this codebook (largest |entry| "
            f"{float(C.abs().amax()):.3g}; {name} holds normal numbers in [{torch.finfo(dtype).tiny:.3g}, "
            f"{torch.finfo(dtype).max:.3g}]), so it is kept in {str(C.dtype).removeprefix('torch.')}; store it "
            "with save_quantized(..., scale_dtype=torch.float32)",
            stacklevel=3,
        )
    return C
