"""Coordinate-descent polish of a quantized matrix on a fixed grid.

Per row, f(q) = 1/2 (q - w) H (q - w)^T with gradient g = (q - w) H. Moving q_j by delta changes f by
    df = delta (g_j + 1/2 delta H_jj),
a convex parabola minimised at the target t = q_j - g_j / H_jj; the best grid point is the grid point
nearest to t. A pass visits the columns in order, moves every row's weight there when df < 0 and
updates g by the rank-1 step g += delta H[j, :]; within a block of columns the update is applied at
once to the block, to the later columns once per block as one product. f never increases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obc_lightning.checks import check_positive_int
from obc_lightning.grids import Grid, dequantize, quantize_codes
from obc_lightning.kernels import use_triton
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    QuantResult,
    compute_dtype,
    layer_index,
    layer_objective,
    objective,
    row_bounds,
    row_factors,
    solver_hessian,
)


def polish_codes(
    w: Tensor,
    hessian: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    *,
    max_passes: int = 3,
    block_size: int = 128,
    frozen: Tensor | None = None,
) -> tuple[Tensor, int, bool]:
    """Coordinate descent for all rows at once.

    w, codes (floats), scale, zero: (R, d); hessian: (d, d) symmetric PSD (columns with H_jj <= 0 are
    left alone: with a PSD H their weight costs nothing). A row stops after a pass that moves none of its
    weights (it is then coordinate-wise optimal), so rows are independent: polishing a stack of row sets
    in one call gives each set's own result. Returns (codes, passes run, converged), where converged means
    every row's last pass moved nothing. Rows whose objective would rise by float rounding keep their
    input codes. ``frozen`` (R, d) bool: weights never moved (pruned weights held at 0).
    """
    return polish_codes_layers(
        w, hessian.unsqueeze(0), [w.shape[0]], codes, scale, zero, maxq,
        max_passes=max_passes, block_size=block_size, frozen=frozen,
    )


def polish_codes_layers(
    w: Tensor,
    hessians: Tensor,
    counts: list[int],
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    *,
    max_passes: int = 3,
    block_size: int = 128,
    frozen: Tensor | None = None,
) -> tuple[Tensor, int, bool]:
    """:func:`polish_codes` for several layers of the same width in one column loop.

    Rows stacked layer after layer (``counts[l]`` rows of layer l), hessians (L, d, d). The gradient of a
    pass, G = (Q - W) H_l, and the deferred block updates are one product per layer; the per-column work
    runs once for all rows, each row reading its own layer's H_jj and H[j, :]. Per row the arithmetic is
    the single-layer loop's, so each layer gets the codes :func:`polish_codes` gives it alone.
    """

    R, d = w.shape
    L = hessians.shape[0]
    bounds = row_bounds(counts)
    if use_triton(w):  # the same passes, a block of columns per launch (obc_lightning.kernels)
        from obc_lightning.kernels.fused import polish_fused

        lid = layer_index(counts, w.device) if L > 1 else None
        K, Q, passes_t, active = polish_fused(
            w, hessians, lid, counts, codes, scale, zero, maxq, max_passes, block_size, frozen
        )
        worse = _objectives(w, Q, hessians, bounds) > _objectives(w, dequantize(codes, scale, zero), hessians, bounds)
        K = torch.where(worse.unsqueeze(1), codes, K)
        return K, int(passes_t), not bool(active.any())
    K = codes.clone()
    Q = dequantize(K, scale, zero)
    hd = torch.diagonal(hessians, dim1=1, dim2=2)  # (L, d)
    # 1 / H_jj (0 where H_jj <= 0: such a column is left alone) formed in double, then in the working dtype
    inv_h = torch.where(hd > 0, 1.0 / hd.double(), torch.zeros((), dtype=torch.float64, device=hd.device)).to(hd.dtype)
    half_h = 0.5 * hd
    if L == 1:  # one layer: per-column scalars, a dead column skipped outright
        live, half_l, inv_l = (hd[0] > 0).tolist(), half_h[0].tolist(), inv_h[0].tolist()
    else:  # per row: its layer's values, as (R, d) tables read one column per step
        lid = layer_index(counts, w.device)
        live_r, half_r, inv_r = (hd > 0)[lid], half_h[lid], inv_h[lid]
    active = torch.ones(R, dtype=torch.bool, device=w.device)
    passes = 0
    while passes < max_passes:
        rows = torch.nonzero(active).flatten()
        if rows.numel() == 0:
            break
        passes += 1
        everything = rows.numel() == R
        wa, Qa, Ka = (w, Q, K) if everything else (w[rows], Q[rows], K[rows])
        sa, za = (scale, zero) if everything else (scale[rows], zero[rows])
        free = None if frozen is None else ~(frozen if everything else frozen[rows])
        if L > 1:
            la = lid if everything else lid[rows]
            lv, hh, ih = (live_r, half_r, inv_r) if everything else (live_r[rows], half_r[rows], inv_r[rows])
            # the active rows stay grouped by layer (rows is sorted): each layer's slice of them
            n_act = torch.bincount(la, minlength=L).tolist() if not everything else counts
            sub = row_bounds(n_act)
        else:
            sub = [(0, rows.numel())]
        G = torch.empty_like(wa)  # (r, d) gradient g = (q - w) H, exact at the start of each pass
        for li, (a, b) in enumerate(sub):
            if b > a:
                torch.mm(Qa[a:b] - wa[a:b], hessians[li], out=G[a:b])
        moved = torch.zeros(rows.numel(), dtype=torch.bool, device=w.device)
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            Gb = G[:, i1:i2]  # view: the block's gradients, kept current
            D = torch.zeros(rows.numel(), i2 - i1, dtype=w.dtype, device=w.device)  # the block's moves
            Kb = Ka[:, i1:i2].clone()
            for i in range(i2 - i1):
                j = i1 + i
                g, q, sj, zj = Gb[:, i], Qa[:, j], sa[:, j], za[:, j]
                if L == 1:
                    if not live[j]:
                        continue
                    # the grid point nearest to the 1-D minimiser t = q - g / H_jj
                    k = quantize_codes(q - g * inv_l[j], sj, zj, maxq)
                    delta = sj * (k - zj) - q
                    take = delta * (g + half_l[j] * delta) < 0  # df = delta (g + delta H_jj / 2) < 0
                    hrow = hessians[0, j, j:i2]
                else:  # the same with every row's own layer (take is False on its dead columns)
                    k = quantize_codes(q - g * ih[:, j], sj, zj, maxq)
                    delta = sj * (k - zj) - q
                    take = (delta * (g + hh[:, j] * delta) < 0) & lv[:, j]
                    hrow = hessians[la, j, j:i2]
                if free is not None:
                    take &= free[:, j]
                delta = delta * take
                Kb[:, i] = torch.where(take, k, Kb[:, i])
                Gb[:, i:].addcmul_(delta.unsqueeze(1), hrow)  # g += delta H[j, :] within the block
                D[:, i] = delta
            Qa[:, i1:i2] += D  # column j's own value is only read before its move
            Ka[:, i1:i2] = Kb
            moved |= (D != 0).any(dim=1)
            if i2 < d:
                for li, (a, b) in enumerate(sub):  # deferred: g[:, i2:] += D H_l[block, i2:]
                    if b > a:
                        G[a:b, i2:].addmm_(D[a:b], hessians[li, i1:i2, i2:])
        if not everything:
            Q[rows], K[rows] = Qa, Ka
        active[rows] = moved
    worse = _objectives(w, Q, hessians, bounds) > _objectives(w, dequantize(codes, scale, zero), hessians, bounds)
    K[worse] = codes[worse]
    return K, passes, not bool(active.any())


def _objectives(w: Tensor, q: Tensor, hessians: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """:func:`layer_objective` of every row with its layer's H (rows stacked layer after layer)."""
    return torch.cat([layer_objective(w[a:b], q[a:b], hessians[li]) for li, (a, b) in enumerate(bounds)])


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
def polish(
    matrix: Tensor,
    hessian: Tensor,
    quantized: Tensor,
    grid: Grid,
    *,
    max_passes: int = 3,
    block_size: int = 128,
) -> QuantResult:
    """Polish a quantized ``matrix`` (rows x cols) on its fixed ``grid`` by coordinate descent.

    ``quantized`` is either the integer codes (an integer tensor) or the quantized matrix (a floating
    tensor, on the grid: its codes are read back with ``grid.codes``). ``hessian`` (cols x cols) is the
    Hessian of the objective minimised, used as given (pass the damped one to polish a solver's damped
    objective, the caller's to polish the true one). Stops after a pass that moves nothing or after
    ``max_passes`` passes (:func:`polish_codes` also tells how many passes ran and whether it converged).
    ``loss`` is 1/2 (q - w) H (q - w)^T per row with that ``hessian`` (evaluated in float64, as for
    every solver; ``hessian`` is used as (H + H^T) / 2 and refused if not symmetric up to float rounding).
    """
    rows, cols = matrix.shape if matrix.dim() == 2 else (None, None)
    if matrix.dim() != 2 or hessian.shape != (cols, cols):
        raise ValueError(f"polish: need matrix (rows, cols) and hessian (cols, cols), got {tuple(matrix.shape)} "
                         f"and {tuple(hessian.shape)}")
    if quantized.shape != matrix.shape:
        raise ValueError(f"polish: quantized has shape {tuple(quantized.shape)}, matrix {tuple(matrix.shape)}")
    if grid.rows != rows or grid.cols != cols:
        raise ValueError(f"polish: grid is for a ({grid.rows}, {grid.cols}) matrix, got {tuple(matrix.shape)}")
    check_positive_int("polish", "max_passes", max_passes)
    check_positive_int("polish", "block_size", block_size)
    for what, t in (("matrix", matrix), ("hessian", hessian)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"polish: {what} must be floating point and finite")
    dt = compute_dtype(matrix)
    g = grid.to(device=matrix.device, dtype=dt)
    codes = quantized.to(dt) if not quantized.is_floating_point() else g.codes(quantized.to(dt)).to(dt)
    if codes.min() < 0 or codes.max() > grid.maxq:
        raise ValueError(f"polish: codes must lie in [0, {grid.maxq}]")
    W = matrix.detach().to(dt)
    H, unit = solver_hessian("polish", hessian, dt)
    s, z = g.per_column()
    factors = row_factors(W)  # rows far from |w| ~ 1 are polished scaled by a power of two (codes unchanged)
    if factors is not None:
        W, s = W / factors, s / factors
    K, _, _ = polish_codes(W, H, codes, s, z, g.maxq, max_passes=max_passes, block_size=block_size)
    out = matrix.dtype
    Q = g.dequantize(K).to(out)
    return QuantResult(
        quantized_matrix=Q,
        scales=g.scales.to(out),
        rounded_zeros=g.zeros.to(out),
        codes=K.to(torch.int32),
        loss=objective("polish", matrix, Q, H, dt, unit),
        grid=g,
        solver_rows={"polish": rows},
    )
