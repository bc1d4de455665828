"""One entry point for weight quantization: ExactOBC, GPTQ, or the per-row best of both, polished.

The objective separates by rows, f_r(q) = 1/2 (q_r - w_r) H (q_r - w_r)^T, so with one shared grid the
per-row minimum over solvers is a valid (and better) solution: ``solver="auto"`` runs ExactOBC and GPTQ
(act-order) on the same grid, polishes both by coordinate descent on the caller's H, and keeps for every
row the lower objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obc_lightning.checks import check_int
from obc_lightning.grids import fit_grid, round_scales
from obc_lightning.solvers.common import (
    QuantResult,
    check_problem,
    compute_dtype,
    loss_in,
    objective,
    prepare_hessian,
    row_factors,
    scaled_grid,
    symmetric_hessian,
)
from obc_lightning.solvers.gptq import gptq_codes
from obc_lightning.solvers.obc import solve_obc_rows
from obc_lightning.solvers.polish import polish_codes

SOLVERS = ("auto", "obc", "gptq")


@torch.no_grad()
def quantize_weight(
    matrix: Tensor,
    hessian: Tensor,
    n_bits: int = 4,
    *,
    solver: str = "auto",
    polish: bool = True,
    group_size: int | None = None,
    symmetric: bool = False,
    mse: bool = True,
    damp: float = 0.01,
    act_order: bool = True,
    max_passes: int = 3,
    batch_size: int | None = None,
    block_size: int = 128,
    max_memory: int | None = None,
    scale_dtype: torch.dtype | None = None,
) -> QuantResult:
    """Quantize ``matrix`` (rows x cols) to ``n_bits`` given the layer Hessian ``hessian`` (cols x cols).

    Weights that are exactly 0 (pruned; not dead inputs) stay 0 in every solver and in the polish.

    The grid is fitted once (:func:`obc_lightning.grids.fit_grid` on ``matrix`` with the dead columns,
    H_pp == 0, set to 0) and shared by every solver, so ``scales``/``rounded_zeros`` do not depend on
    which solver won a row.

    Args:
        solver: ``"obc"`` (ExactOBC, greedy), ``"gptq"`` (GPTQ, act-order by default) or ``"auto"``
            (both, each polished if ``polish``; per row the lower objective, ties to ExactOBC).
        polish: coordinate-descent polish (:mod:`obc_lightning.solvers.polish`) of every solver's result
            on the caller's undamped H, at most ``max_passes`` passes.
        group_size, symmetric, mse, scale_dtype: the grid (see :func:`obc_lightning.grids.fit_grid`).
        damp: the solvers see H + damp * mean(diag H) * I (escalated with a warning if not positive
            definite; the value used is ``result.damp``). The polish and the reported loss do not.
        act_order: GPTQ visits columns by decreasing H_ii.
        batch_size, max_memory: ExactOBC row batching (see :func:`exact_obc`); block_size: GPTQ's lazy
            blocks and the polish's blocks.

    Returns:
        :class:`QuantResult`; ``loss`` is always the true objective per row,
        ``layer_objective(matrix, quantized_matrix, hessian)`` with the caller's undamped ``hessian``
        (evaluated in float64, returned in float64 for float64 input, else float32; rows are compared
        on the float64 values); ``solver_rows`` counts the rows kept from each solver, e.g.
        ``{"obc": 10, "gptq": 54}``. Symmetry of ``hessian`` and rows of extreme magnitude: as in
        :func:`~obc_lightning.solvers.obc.exact_obc`.
    """
    check_problem("quantize_weight", matrix, hessian, n_bits, group_size)
    if solver not in SOLVERS:
        raise ValueError(f"quantize_weight: solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(polish, bool) or not isinstance(act_order, bool):
        raise ValueError(f"quantize_weight: polish and act_order must be bools, got {polish!r}, {act_order!r}")
    check_int("quantize_weight", "max_passes", max_passes, 1)
    check_int("quantize_weight", "block_size", block_size, 1)
    check_int("quantize_weight", "batch_size", batch_size, 1, optional=True)
    dt = compute_dtype(matrix)
    W0 = matrix.detach().to(dt)  # the caller's W: the true objective is measured against it
    H0 = symmetric_hessian("quantize_weight", hessian, dt)  # the caller's undamped H
    prep = prepare_hessian(H0, damp, fn="quantize_weight", matrix_shape=tuple(matrix.shape))
    W = W0.clone()
    W[:, prep.dead] = 0
    factors = row_factors(W)  # rows far from |w| ~ 1 are solved scaled by a power of two
    if factors is None:
        grid = fit_grid(W, n_bits, symmetric=symmetric, mse=mse, group_size=group_size, scale_dtype=scale_dtype)
    else:
        W, W0 = W / factors, W0 / factors
        grid = fit_grid(W, n_bits, symmetric=symmetric, mse=mse, group_size=group_size)
        if scale_dtype is not None:  # the stored scales are those of the unscaled rows
            grid.scales = round_scales(grid.scales * factors, scale_dtype) / factors
    s, z = grid.per_column()
    # weights that are exactly 0 on live inputs are pruned: every solver keeps them at 0
    frozen = (W == 0) & ~prep.dead.unsqueeze(0)
    frozen = frozen if bool(frozen.any()) else None

    names = ["obc", "gptq"] if solver == "auto" else [solver]
    solutions = []
    for name in names:
        if name == "obc":
            codes, _ = solve_obc_rows(W, prep, grid, batch_size=batch_size, max_memory=max_memory)
        else:
            codes = gptq_codes(
                W, prep.hessian, s, z, grid.maxq, act_order=act_order, block_size=block_size, frozen=frozen
            )
        solutions.append(codes)
    if polish:
        # one coordinate-descent run over all solutions stacked by rows: the rows are independent, and
        # the per-column loop (the cost on small layers) runs once instead of once per solver
        n = len(solutions)
        stacked, _, _ = polish_codes(
            W0.repeat(n, 1), H0, torch.cat(solutions), s.repeat(n, 1), z.repeat(n, 1), grid.maxq,
            max_passes=max_passes, block_size=block_size, frozen=None if frozen is None else frozen.repeat(n, 1),
        )
        solutions = list(stacked.chunk(n))
    out = matrix.dtype
    grid = scaled_grid(grid, factors)
    best_codes, best_loss, winner = None, None, None
    for i, codes in enumerate(solutions):
        loss = objective("quantize_weight", matrix, grid.dequantize(codes).to(out), H0, torch.float64)
        if best_codes is None:
            best_codes, best_loss = codes, loss
            winner = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
        else:
            better = loss < best_loss  # ties stay with the earlier solver
            best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
            best_loss = torch.where(better, loss, best_loss)
            winner = torch.where(better, torch.full_like(winner, i), winner)

    counts = torch.bincount(winner, minlength=len(names)).tolist()
    Q = grid.dequantize(best_codes).to(out)
    return QuantResult(
        quantized_matrix=Q,
        scales=grid.scales.to(out),
        rounded_zeros=grid.zeros.to(out),
        codes=best_codes.to(torch.int32),
        loss=loss_in("quantize_weight", best_loss, dt),
        grid=grid,
        damp=prep.damp,
        solver_rows=dict(zip(names, counts)),
    )
