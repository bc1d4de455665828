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
from obc_lightning.grids import dequantize, fit_grid, quantize_codes
from obc_lightning.solvers.common import (
    QuantResult,
    check_problem,
    compute_dtype,
    objective,
    prepare_hessian,
    row_factors,
    scaled_grid,
    symmetric_hessian,
)


def upper_cholesky_of_inverse(hinv: Tensor) -> Tensor:
    """U upper triangular with U^T U = H^-1; retried in float64 if the factorization fails in float32."""
    U, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not torch.isfinite(U).all():
        U = torch.linalg.cholesky(hinv.double(), upper=True).to(hinv.dtype)
    return U


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
    d = w.shape[1]
    perm = gptq_order(hessian, act_order)
    W = w[:, perm].clone()  # (R, d) in visiting order, updated in place
    s, z = scale[:, perm], zero[:, perm]
    fz = frozen[:, perm] if frozen is not None else None
    hp = hessian[perm][:, perm]
    U = upper_cholesky_of_inverse(torch.cholesky_inverse(torch.linalg.cholesky(hp)))  # (d, d)
    K = torch.empty_like(W)
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
            e = (W1[:, i] - dequantize(k, s[:, c], z[:, c])) / U[c, c]  # e = (w_i - q_i) / U_ii
            W1[:, i:].addr_(e, U[c, c:i2], alpha=-1)  # W[:, i:] -= e U[i, i:] within the block
            E1[:, i] = e
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)  # deferred: W[:, i2:] -= E U[block, i2:]
    return K[:, torch.argsort(perm)]


@torch.no_grad()
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

    The grid is :func:`obc_lightning.grids.fit_grid` on ``matrix`` with its dead columns (H_pp == 0) set to
    0, exactly as :func:`exact_obc` fits it. The solver uses ``hessian`` with dead inputs isolated (their
    rows/columns 0, diagonal 1) plus ``damp_used * mean(diag H) * I`` (``damp_used`` is ``result.damp``,
    escalated from ``damp`` with a warning if H is not positive definite). ``loss`` (per row) is the
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
    W = matrix.detach().to(dt).clone()
    H = symmetric_hessian("gptq", hessian, dt)
    prep = prepare_hessian(H, damp, fn="gptq", matrix_shape=tuple(matrix.shape))
    W[:, prep.dead] = 0
    factors = row_factors(W)  # rows far from |w| ~ 1 are solved scaled by a power of two
    if factors is not None:
        W /= factors
    grid = fit_grid(W, n_bits, symmetric=symmetric, mse=mse, group_size=group_size)
    s, z = grid.per_column()
    codes = gptq_codes(W, prep.hessian, s, z, grid.maxq, act_order=act_order, block_size=block_size)
    grid = scaled_grid(grid, factors)
    out = matrix.dtype
    Q = grid.dequantize(codes).to(out)
    return QuantResult(
        quantized_matrix=Q,
        scales=grid.scales.to(out),
        rounded_zeros=grid.zeros.to(out),
        codes=codes.to(torch.int32),
        loss=objective("gptq", matrix, Q, H, dt),
        grid=grid,
        damp=prep.damp,
        solver_rows={"gptq": matrix.shape[0]},
    )
