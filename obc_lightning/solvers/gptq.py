"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023) on the project's grids.

All rows are quantized column by column in one fixed order. With U the upper Cholesky factor of H^-1
(H^-1 = U^T U) in that order, column i of every row goes to its grid point q_i and the error is spread
over the columns not yet quantized:
    e = (w_i - q_i) / U_ii,        W[:, i+1:] -= e U[i, i+1:]
(the OBS update of ExactOBC with the downdated inverse read off U's row i). Updates to columns outside
the current block of ``block_size`` columns are deferred and applied once per block as one product
(lazy batch updates). ``act_order`` visits the columns by decreasing H_ii (costly inputs first, while
many weights are left to compensate them). The grid is fitted once on the original W (static groups:
a column keeps the scale of its group in the original order), the same grid ExactOBC uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obc_lightning.checks import check_positive_int
from obc_lightning.grids import dequantize, quantize_codes
from obc_lightning.kernels import use_triton
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    PreparedHessian,
    QuantResult,
    check_problem,
    checked_cholesky,
    compute_dtype,
    layer_index,
    objective,
    row_bounds,
    rows_on_their_grid,
    scaled_grid,
    solve_with_damping,
    solver_hessian,
)


def upper_cholesky_of_inverse(hinv: Tensor, problem: int = 0) -> Tensor:
    """U upper triangular with U^T U = H^-1; retried in float64 if the factorization fails in float32
    (:func:`~obc_lightning.solvers.common.checked_cholesky`: a failure there too is ``problem``'s
    :class:`~obc_lightning.solvers.common.HessianBreakdown`, answered with more damping)."""
    return checked_cholesky(hinv, upper=True, problem=problem, what="GPTQ's factor of the inverse Hessian")


def gptq_order(hessian: Tensor, act_order: bool) -> Tensor:
    """Column order: decreasing H_ii (stable, so ties keep their index order) or the identity."""
    d = hessian.shape[0]
    if not act_order:
        return torch.arange(d, device=hessian.device)
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def gptq_codes(
    w: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    *,
    act_order: bool = True,
    block_size: int = 128,
    frozen: Tensor | None = None,
) -> Tensor:
    """Integer codes (as floats, (R, d)) of GPTQ on w (R, d) with a PD hessian (d, d).

    scale, zero: (R, d), the grid of every entry in the original column order (static groups).
    frozen: (R, d) bool, weights held at 0 (pruned): their target is 0 instead of the nearest grid point
    (0 is always on the grid) and their error is compensated like any other (SparseGPT's masked step).
    """
    return gptq_codes_layers(
        w, hessian.unsqueeze(0), [w.shape[0]], scale, zero, maxq, act_order=act_order, block_size=block_size,
        frozen=frozen,
    )


def gptq_codes_layers(
    w: Tensor,
    hessians: Tensor,
    counts: list[int],
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    *,
    act_order: bool = True,
    block_size: int = 128,
    frozen: Tensor | None = None,
) -> Tensor:
    """:func:`gptq_codes` for several layers of the same width in one column loop.

    w (R, d) holds the rows of layer 0, then of layer 1, ... (``counts[l]`` rows each); hessians
    (L, d, d). Each layer has its own column order (act-order on its own H) and its own factor U_l; step
    c visits column c of every row's own order, so one loop over d serves all layers. Per row the
    arithmetic is the single-layer loop's (the rows are independent), so each layer's codes are those of
    :func:`gptq_codes` on that layer alone.
    """
    R, d = w.shape
    L = hessians.shape[0]
    lid = layer_index(counts, w.device) if L > 1 else None
    perms = [gptq_order(hessians[i], act_order) for i in range(L)]
    perm = torch.cat([p.expand(n, d) for p, n in zip(perms, counts)]) if L > 1 else perms[0]
    # U_l upper with U_l^T U_l = H_l^-1 in layer l's order: (L, d, d)
    U = torch.stack([
        upper_cholesky_of_inverse(torch.cholesky_inverse(
            checked_cholesky(hessians[i][p][:, p], problem=i, what="the Hessian in GPTQ's column order")), i)
        for i, p in enumerate(perms)
    ])

    def visit(x: Tensor) -> Tensor:  # (R, d) in every row's visiting order
        return x.gather(1, perm) if L > 1 else x[:, perm]

    W = visit(w).clone()  # updated in place
    s, z = visit(scale), visit(zero)
    fz = visit(frozen) if frozen is not None else None
    K = torch.empty_like(W)
    if use_triton(W):  # the same loop, a block of columns per launch (obc_lightning.kernels)
        from obc_lightning.kernels.fused import gptq_blocks

        gptq_blocks(W, K, s, z, fz, U, lid, counts, maxq, block_size)
    else:
        bounds = row_bounds(counts)
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            W1 = W[:, i1:i2]  # view: the block, kept exactly up to date
            E1 = torch.empty_like(W1)  # (R, B) scaled errors e of the block
            for i in range(i2 - i1):
                c = i1 + i
                k = quantize_codes(W1[:, i], s[:, c], z[:, c], maxq)
                if fz is not None:
                    k = torch.where(fz[:, c], z[:, c], k)  # code z is the value 0
                K[:, c] = k
                # each row's U_cc and U[c, c:i2] (one layer: broadcast; several: gathered per row)
                ucc, urow = (U[0, c, c], U[0, c, c:i2]) if lid is None else (U[lid, c, c], U[lid, c, c:i2])
                e = (W1[:, i] - dequantize(k, s[:, c], z[:, c])) / ucc  # e = (w_i - q_i) / U_ii
                W1[:, i:].addcmul_(e.unsqueeze(1), urow, value=-1)  # W[:, i:] -= e U[i, i:] within the block
                E1[:, i] = e
            if i2 < d:
                for li, (a, b) in enumerate(bounds):  # deferred: W[:, i2:] -= E U_l[block, i2:], per layer
                    W[a:b, i2:].addmm_(E1[a:b], U[li, i1:i2, i2:], alpha=-1)
    out = torch.empty_like(K)
    return out.scatter_(1, perm if L > 1 else perm.expand(R, d), K)  # back to the original column order


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
def gptq(
    matrix: Tensor,
    hessian: Tensor,
    n_bits: int = 4,
    *,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    symmetric: bool = False,
    mse: bool = True,
    group_size: int | None = None,
) -> QuantResult:
    """Quantize ``matrix`` (rows x cols) to ``n_bits`` with GPTQ, given the layer Hessian (cols x cols).

    The grid is :func:`obc_lightning.grids.fit_grid` on ``matrix`` with its dead columns (H_pp <= 1.4e-14
    max diag H) set to 0, exactly as :func:`exact_obc` fits it. The solver uses ``hessian`` with dead
    inputs isolated (their rows/columns 0, diagonal 1) plus ``damp_used * mean(diag H) * I``
    (``damp_used`` is ``result.damp``, escalated from ``damp`` with a warning if H is not positive
    definite or a later factorization fails; a Hessian that no X^T X can be, even rounded, is refused:
    see :func:`~obc_lightning.solvers.common.check_covariance`). ``loss`` (per row) is the
    objective 1/2 (q - w) H (q - w)^T with the caller's ``matrix`` and undamped ``hessian`` (as
    :func:`exact_obc`, whose notes on symmetry and row magnitudes apply here too).

    Args:
        act_order: visit columns by decreasing H_ii (else in index order).
        block_size: columns per lazy block; a speed knob (results equal up to float rounding).
        damp, symmetric, mse, group_size: as in :func:`exact_obc` (note the default damp here is 0.01).
    """
    check_problem("gptq", matrix, hessian, n_bits, group_size)
    check_positive_int("gptq", "block_size", block_size)
    dt = compute_dtype(matrix)
    H, unit = solver_hessian("gptq", hessian, dt)

    def solve(preps: list[PreparedHessian]):
        W, grid, factors = rows_on_their_grid(matrix, dt, preps[0].dead, n_bits, symmetric=symmetric, mse=mse,
                                              group_size=group_size)
        s, z = grid.per_column()
        codes = gptq_codes(W, preps[0].hessian, s, z, grid.maxq, act_order=act_order, block_size=block_size)
        return preps[0], scaled_grid(grid, factors), codes

    prep, grid, codes = solve_with_damping("gptq", [H], damp, [tuple(matrix.shape)], solve)
    out = matrix.dtype
    Q = grid.dequantize(codes).to(out)
    return QuantResult(
        quantized_matrix=Q,
        scales=grid.scales.to(out),
        rounded_zeros=grid.zeros.to(out),
        codes=codes.to(torch.int32),
        loss=objective("gptq", matrix, Q, H, dt, unit),
        grid=grid,
        damp=prep.damp,
        solver_rows={"gptq": matrix.shape[0]},
    )
