"""One entry point for weight quantization: ExactOBC, GPTQ, or the per-row best of both, polished.

The objective separates by rows, f_r(q) = 1/2 (q_r - w_r) H (q_r - w_r)^T, so with one shared grid the
per-row minimum over solvers is a valid (and better) solution: ``solver="auto"`` runs ExactOBC and GPTQ
(act-order) on the same grid, polishes both by coordinate descent on the caller's H, and keeps for every
row the lower objective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from obc_lightning.checks import check_int
from obc_lightning.grids import check_scale_dtype, fit_grid, round_scales
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    QuantResult,
    check_problem,
    compute_dtype,
    loss_in,
    objective,
    prepare_hessian,
    row_bounds,
    row_factors,
    scaled_grid,
    solve_with_damping,
    solver_hessian,
)
from obc_lightning.solvers.gptq import gptq_codes_layers
from obc_lightning.solvers.obc import solve_obc_layers
from obc_lightning.solvers.polish import polish_codes_layers

SOLVERS = ("auto", "obc", "gptq")


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
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
    H_pp <= 1.4e-14 max diag H, set to 0) and shared by every solver, so ``scales``/``rounded_zeros`` do
    not depend on which solver won a row.

    Args:
        solver: ``"obc"`` (ExactOBC, greedy), ``"gptq"`` (GPTQ, act-order by default) or ``"auto"``
            (both, each polished if ``polish``; per row the lower objective, ties to ExactOBC).
        polish: coordinate-descent polish (:mod:`obc_lightning.solvers.polish`) of every solver's result
            on the caller's undamped H, at most ``max_passes`` passes.
        group_size, symmetric, mse, scale_dtype: the grid (see :func:`obc_lightning.grids.fit_grid`).
        damp: the solvers see H + damp * mean(diag H) * I (escalated with a warning if not positive
            definite, or if a later factorization breaks down: one mechanism for every solver,
            :func:`~obc_lightning.solvers.common.solve_with_damping`; the value used is ``result.damp``).
            The polish and the reported loss do not. A ``hessian`` that no X^T X can be, even rounded
            (a negative diagonal, |H_ij| > sqrt(H_ii H_jj): :func:`~obc_lightning.solvers.common.
            check_covariance`), is refused with a ``ValueError``; one that is merely not positive
            definite is damped as above (with an indefinite H a row's reported loss can be < 0).
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
    return quantize_weights(
        [(matrix, hessian)], n_bits, solver=solver, polish=polish, group_size=group_size, symmetric=symmetric,
        mse=mse, damp=damp, act_order=act_order, max_passes=max_passes, batch_size=batch_size,
        block_size=block_size, max_memory=max_memory, scale_dtype=scale_dtype, _fn="quantize_weight",
    )[0]


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
def quantize_weights(
    problems: Sequence[tuple[Tensor, Tensor]],
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
    _fn: str = "quantize_weights",
) -> list[QuantResult]:
    """:func:`quantize_weight` of several (matrix, hessian) pairs with the same number of columns, solved
    together: one column loop of each solver for all their rows (rows of different matrices in the same
    row batches, kernel launches and flushes), each row with its own matrix's H. Every result equals
    :func:`quantize_weight` on its pair alone (the rows are independent and take the same steps), so this
    only saves per-step overhead: on a GPU, launches; many small layers of one width fill it together.

    Per pair, as :func:`quantize_weight`: its own damping (escalated alone, with its warning), grid and
    pruned weights. ``max_memory`` bounds the row batches of all pairs together.
    """
    fn = _fn  # the entry point named in errors and warnings
    if not isinstance(problems, Sequence) or not problems:
        raise ValueError(f"{fn}: problems must be a non-empty list of (matrix, hessian) pairs")
    for pair in problems:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{fn}: problems must be (matrix, hessian) pairs, got {type(pair).__name__}")
        check_problem(fn, pair[0], pair[1], n_bits, group_size)
    if solver not in SOLVERS:
        raise ValueError(f"{fn}: solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(polish, bool) or not isinstance(act_order, bool):
        raise ValueError(f"{fn}: polish and act_order must be bools, got {polish!r}, {act_order!r}")
    check_int(fn, "max_passes", max_passes, 1)
    check_int(fn, "block_size", block_size, 1)
    check_int(fn, "batch_size", batch_size, 1, optional=True)
    check_scale_dtype(fn, "scale_dtype", scale_dtype)
    m0 = problems[0][0]
    for m, _ in problems[1:]:
        if m.shape[1] != m0.shape[1] or compute_dtype(m) != compute_dtype(m0) or m.device != m0.device:
            raise ValueError(
                f"{fn}: every matrix must have the same number of columns, compute dtype and device; got "
                f"{tuple(m0.shape)} {m0.dtype} on {m0.device} and {tuple(m.shape)} {m.dtype} on {m.device}"
            )
    dt = compute_dtype(m0)
    W0s, H0s, units, preps, grids, Ws, frozens, factor_list = [], [], [], [], [], [], [], []
    for matrix, hessian in problems:
        W0 = matrix.detach().to(dt)  # the caller's W: the true objective is measured against it
        H0, unit = solver_hessian(fn, hessian, dt)  # the caller's undamped H, divided by unit
        units.append(unit)
        prep = prepare_hessian(H0, damp, fn=fn, matrix_shape=tuple(matrix.shape), warn=False)
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
        # weights that are exactly 0 on live inputs are pruned: every solver keeps them at 0
        frozens.append((W == 0) & ~prep.dead.unsqueeze(0))
        W0s.append(W0), H0s.append(H0), preps.append(prep), grids.append(grid), Ws.append(W)
        factor_list.append(factors)
    counts = [w.shape[0] for w in Ws]
    L = len(Ws)
    cat = (lambda xs: torch.cat(xs)) if L > 1 else (lambda xs: xs[0])
    W = cat(Ws)
    per_col = [g.per_column() for g in grids]
    s, z = cat([x[0] for x in per_col]), cat([x[1] for x in per_col])
    frozen = cat(frozens)
    frozen = frozen if bool(frozen.any()) else None
    maxq = grids[0].maxq

    names = ["obc", "gptq"] if solver == "auto" else [solver]

    def solve(preps: list) -> tuple[list[Tensor], list]:
        solutions = []
        for name in names:
            if name == "obc":
                codes, _ = solve_obc_layers(W, counts, preps, s, z, maxq, batch_size=batch_size,
                                            max_memory=max_memory)
            else:
                codes = gptq_codes_layers(
                    W, torch.stack([p.hessian for p in preps]), counts, s, z, maxq, act_order=act_order,
                    block_size=block_size, frozen=frozen,
                )
            solutions.append(codes)
        return solutions, preps

    # a layer whose damped H breaks down in a later factorization is solved again with more damping
    solutions, preps = solve_with_damping(fn, H0s, damp, [tuple(m.shape) for m, _ in problems], solve, preps)
    n = len(solutions)
    bounds = row_bounds(counts)
    if polish:
        # one coordinate-descent run over all solutions stacked by rows (per layer: its rows under each
        # solver in turn): the rows are independent, and the per-column loop (the cost on small layers)
        # runs once instead of once per solver and layer
        def stack(xs: list[Tensor]) -> Tensor:
            return torch.cat([x[a:b] for a, b in bounds for x in xs])

        stacked, _, _ = polish_codes_layers(
            stack([W0s[0] if L == 1 else torch.cat(W0s)] * n), torch.stack(H0s), [c * n for c in counts],
            stack(solutions), stack([s] * n), stack([z] * n), maxq, max_passes=max_passes, block_size=block_size,
            frozen=None if frozen is None else stack([frozen] * n),
        )
        # back to one (R, d) tensor per solver
        solutions = [torch.cat([stacked[n * a + i * (b - a) : n * a + (i + 1) * (b - a)] for a, b in bounds])
                     for i in range(n)]
    out = []
    for li, (a, b) in enumerate(bounds):
        matrix, H0 = problems[li][0], H0s[li]
        dtype = matrix.dtype
        grid = scaled_grid(grids[li], factor_list[li])  # the grid of the caller's (unscaled) rows
        best_codes, best_loss, winner = None, None, None
        for i, codes in enumerate(solutions):
            codes = codes[a:b]
            loss = objective(fn, matrix, grid.dequantize(codes).to(dtype), H0, torch.float64, units[li])  # true
            if best_codes is None:
                best_codes, best_loss = codes, loss
                winner = torch.zeros(matrix.shape[0], dtype=torch.long, device=matrix.device)
            else:
                better = loss < best_loss  # ties stay with the earlier solver
                best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
                best_loss = torch.where(better, loss, best_loss)
                winner = torch.where(better, torch.full_like(winner, i), winner)
        counts_won = torch.bincount(winner, minlength=len(names)).tolist()
        Q = grid.dequantize(best_codes)
        out.append(QuantResult(
            quantized_matrix=Q.to(dtype),
            scales=grid.scales.to(dtype),
            rounded_zeros=grid.zeros.to(dtype),
            codes=best_codes.to(torch.int32),
            loss=loss_in(fn, best_loss, dt),
            grid=grid,
            damp=preps[li].damp,
            solver_rows=dict(zip(names, counts_won)),
        ))
    return out
