"""ExactOBC (Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022) for quantization.

For one row w with inverse Hessian H^-1, quantizing weight p to its grid point q costs
    dL = 1/2 (q - w_p)^2 / [H^-1]_pp
and the optimal compensation of the free weights is
    delta = -(w_p - q) / [H^-1]_pp * H^-1[:, p],
after which p leaves the problem by the rank-1 downdate
    H^-1 <- H^-1 - H^-1[:, p] H^-1[p, :] / [H^-1]_pp.
ExactOBC repeats this greedily, cheapest weight first, except that a row whose rounding error somewhere
exceeds scale^2 / 4 (an outlier, pushed off the grid by earlier compensations) quantizes that weight
first. Rows are independent and solved in batches.

Two implementations of the same greedy loop:
- :func:`greedy_reference`: one step at a time, the downdate applied at once (in place, batched over
  rows). Short, obviously the paper's loop: the test oracle and the benchmark baseline.
- :func:`greedy_fast`: the same steps with the downdates deferred and applied every ``block_size``
  steps as one batched matrix product, the finished columns dropped from the working set at each flush
  (the working set shrinks from d x d to 0, so the flushes cost ~d^3/3 per row instead of d^3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from obc_lightning.grids import Grid, dequantize, fit_grid, quantize_codes
from obc_lightning.solvers.common import (
    PreparedHessian,
    QuantResult,
    check_problem,
    compute_dtype,
    default_memory_budget,
    masked_inverses,
    prepare_hessian,
)


def obs_step(w: Tensor, hinv: Tensor, j: Tensor, q: Tensor) -> Tensor:
    """One OBS step for a batch of rows, in place: weight j of each row goes to q.

    w: (R, d), hinv: (R, d, d), j: (R,) column indices, q: (R,) targets (a grid point, or 0 to prune).
    Applies delta = -(w_p - q) / [H^-1]_pp * H^-1[:, p] to w (so w_p becomes q) and the rank-1 downdate
    H^-1 <- H^-1 - H^-1[:, p] H^-1[p, :] / [H^-1]_pp, after which p is decoupled from the free weights.
    Returns the step losses 1/2 (q - w_p)^2 / [H^-1]_pp, shape (R,).
    """
    ar = torch.arange(w.shape[0], device=w.device)
    wj, dj = w[ar, j], hinv[ar, j, j]
    u = hinv[ar, j] / dj.sqrt().unsqueeze(1)  # H^-1[:, p] / sqrt([H^-1]_pp)
    w -= u * ((wj - q) / dj.sqrt()).unsqueeze(1)
    w[ar, j] = q
    hinv.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1)
    return 0.5 * (wj - q) ** 2 / dj


def greedy_reference(w: Tensor, hinv: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """The paper's loop for a batch of rows: pick a weight, :func:`obs_step` it, repeat.

    w, scale, zero: (R, d); hinv: (R, d, d), the inverse Hessian of each row (not modified).
    Returns the integer codes (R, d) as floats and the per-row sum of step losses (R,).
    """
    R, d = w.shape
    ar = torch.arange(R, device=w.device)
    w, hinv = w.clone(), hinv.clone()
    outlier = 0.25 * scale**2
    done = torch.zeros(R, d, dtype=torch.bool, device=w.device)
    codes = torch.zeros_like(w)
    loss = torch.zeros(R, dtype=w.dtype, device=w.device)
    for _ in range(d):
        k = quantize_codes(w, scale, zero, maxq)
        q = dequantize(k, scale, zero)
        err = (w - q).square().masked_fill(done, 0)
        score = (err / hinv.diagonal(dim1=1, dim2=2)).masked_fill(done, float("inf"))
        # cheapest weight first, unless a row has an outlier (error above scale^2 / 4): that one first
        j = torch.where((err > outlier).any(dim=1), err.argmax(dim=1), score.argmin(dim=1))
        codes[ar, j] = k[ar, j]
        loss += obs_step(w, hinv, j, q[ar, j])
        done[ar, j] = True
    return codes, loss


def greedy_fast(
    w: Tensor,
    hinv_src: Tensor,
    row_src: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    block_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """The same greedy steps as :func:`greedy_reference`, with deferred downdates and a shrinking set.

    Row r starts from ``hinv_src[row_src[r]]`` (hinv_src: (L, d, d); one shared inverse, per-row masked
    inverses, or the inverses of several layers with the same d). Between flushes the current inverse is
    H^-1 = Hf - U U^T, with Hf the last flushed matrix and U (n x t) the pending scaled columns
    u = H^-1[:, p] / sqrt([H^-1]_pp); the column needed at a step is Hf[:, p] - U U[p, :]^T.
    At a flush the finished columns are dropped (every row has finished the same number) and
    Hf <- Hf[keep, keep] - U[keep] U[keep]^T as one batched product.
    """
    R, d = w.shape
    dev, dt = w.device, w.dtype
    ar = torch.arange(R, device=dev)
    w = w.clone()
    scale, zero = scale.contiguous(), zero.contiguous()
    outlier = 0.25 * scale**2
    cols = torch.arange(d, device=dev).expand(R, d).contiguous()  # global column of each local one
    hf = None  # (R, n, n) per-row flushed inverse, after the first flush
    diag = hinv_src.diagonal(dim1=1, dim2=2)[row_src].clone()
    ut = torch.empty(R, block_size, d, dtype=dt, device=dev)  # U^T: pending columns as rows
    done = torch.zeros(R, d, dtype=torch.bool, device=dev)
    codes = torch.zeros(R, d, dtype=dt, device=dev)
    loss = torch.zeros(R, dtype=dt, device=dev)
    inf = torch.tensor(float("inf"), dtype=dt, device=dev)
    n, t = d, 0
    for step in range(d):
        k = quantize_codes(w, scale, zero, maxq)
        q = dequantize(k, scale, zero)
        err = (w - q).square_()  # finished weights sit exactly on their grid point: err == 0
        score = torch.where(done, inf, err / diag)
        j = torch.where((err > outlier).any(dim=1), err.argmax(dim=1), score.argmin(dim=1))
        c = hinv_src[row_src, j] if hf is None else hf[ar, j]  # (R, n)
        if t:
            c = c - torch.bmm(ut[ar, :t, j].unsqueeze(1), ut[:, :t, :]).squeeze(1)
        c.masked_fill_(done, 0)
        wj, qj, dj = w[ar, j], q[ar, j], diag[ar, j]
        e = (wj - qj) / dj
        loss += 0.5 * (wj - qj) * e
        codes[ar, cols[ar, j]] = k[ar, j]
        w.addcmul_(c, e.unsqueeze(1), value=-1)
        w[ar, j] = qj
        done[ar, j] = True
        u = c * dj.rsqrt().unsqueeze(1)
        ut[:, t] = u
        diag.addcmul_(u, u, value=-1)
        t += 1
        if t == block_size and step < d - 1:
            n2 = n - t
            # stable sort puts the unfinished columns first, in their original order (same tie-breaks)
            keep = torch.argsort(done.to(torch.uint8), dim=1, stable=True)[:, :n2]
            if hf is None:
                hn = hinv_src[row_src.view(R, 1, 1), keep.unsqueeze(2), keep.unsqueeze(1)]
            else:
                hn = hf[ar.view(R, 1, 1), keep.unsqueeze(2), keep.unsqueeze(1)]
            uk = ut.gather(2, keep.unsqueeze(1).expand(R, t, n2))
            hf = hn.baddbmm_(uk.transpose(1, 2), uk, alpha=-1)
            w, scale, zero = w.gather(1, keep), scale.gather(1, keep), zero.gather(1, keep)
            outlier, cols, diag = outlier.gather(1, keep), cols.gather(1, keep), diag.gather(1, keep)
            done = torch.zeros(R, n2, dtype=torch.bool, device=dev)
            ut = torch.empty(R, block_size, n2, dtype=dt, device=dev)
            n, t = n2, 0
    return codes, loss


def _row_bytes(d: int, dtype: torch.dtype, method: str) -> int:
    """Working-set bytes per row: the d x d inverse (two copies while a flush gathers) plus vectors."""
    el = torch.finfo(dtype).bits // 8
    copies = 2 if method == "fast" else 1
    return el * (copies * d * d + 64 * d)


def obc_row_batch(rows: int, cols: int, dtype: torch.dtype, device: torch.device, method: str,
                  batch_size: int | None, max_memory: int | None) -> int:
    """Rows solved together: ``batch_size`` if given, else as many as fit ``max_memory``."""
    if batch_size is not None:
        return max(1, min(batch_size, rows))
    budget = max_memory if max_memory is not None else default_memory_budget(device)
    return max(1, min(rows, budget // _row_bytes(cols, dtype, method)))


def solve_obc_rows(
    W: Tensor,
    prep: PreparedHessian,
    grid: Grid,
    *,
    method: str = "fast",
    batch_size: int | None = None,
    block_size: int = 32,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the greedy loop on every row of W (dead columns already zeroed) on a fitted grid.

    Rows with weights that are exactly 0 keep them at 0 through a per-row masked inverse.
    Returns codes (rows, cols) as floats and the per-row loss.
    """
    rows, d = W.shape
    scale_c, zero_c = grid.per_column()
    codes = torch.empty_like(W)
    loss = torch.empty(rows, dtype=W.dtype, device=W.device)
    pruned = (W == 0) & ~prep.dead.unsqueeze(0)  # dead inputs are already uncoupled in H
    has_pruned = pruned.any(dim=1)
    R = obc_row_batch(rows, d, W.dtype, W.device, method, batch_size, max_memory)
    for i in range(0, rows, R):
        sl = slice(i, min(i + R, rows))
        n = sl.stop - sl.start
        if bool(has_pruned[sl].any()):
            src = masked_inverses(prep.hessian, pruned[sl])
            row_src = torch.arange(n, device=W.device)
        else:
            src = prep.inverse.unsqueeze(0)
            row_src = torch.zeros(n, dtype=torch.long, device=W.device)
        if method == "fast":
            codes[sl], loss[sl] = greedy_fast(W[sl], src, row_src, scale_c[sl], zero_c[sl], grid.maxq, block_size)
        else:
            codes[sl], loss[sl] = greedy_reference(W[sl], src[row_src], scale_c[sl], zero_c[sl], grid.maxq)
    return codes, loss


@torch.no_grad()
def exact_obc(
    matrix: Tensor,
    hessian: Tensor,
    n_bits: int = 4,
    batch_size: int | None = 32,
    *,
    symmetric: bool = False,
    mse: bool = True,
    group_size: int | None = None,
    damp: float = 0.0,
    method: str = "fast",
    block_size: int = 32,
    max_memory: int | None = None,
) -> QuantResult:
    """Quantize ``matrix`` (rows x cols) to ``n_bits`` with ExactOBC, given the layer Hessian (cols x cols).

    A drop-in for the TinyVolt ``exact_obc``: same positional call; the result has ``quantized_matrix``
    (same shape, dtype and device as ``matrix``), ``scales``, ``rounded_zeros``, and also ``codes``
    (int32, the matrix's shape) and ``loss`` (per row: the sum of the greedy step losses
    1/2 (q - w_p)^2 / [H^-1]_pp, equal to 1/2 (q - w) H (q - w)^T with the damped H the solver used).

    Args:
        batch_size: rows solved together; a speed knob only (the result does not depend on it).
            ``None`` sizes the batch to ``max_memory`` (default: half the free GPU memory, 1 GiB on CPU).
        symmetric / mse / group_size: the grid (see :func:`obc_lightning.grids.fit_grid`).
        damp: adds ``damp * mean(diag H)`` to the diagonal; escalated with a warning if H is not
            positive definite.
        method: ``"fast"`` (deferred, blocked downdates with a shrinking working set) or
            ``"reference"`` (one rank-1 downdate per step; the oracle).
        block_size: steps between two flushes of the deferred downdates (``method="fast"``).
    """
    check_problem("exact_obc", matrix, hessian, n_bits, group_size)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"exact_obc: batch_size must be a positive integer or None, got {batch_size!r}")
    if method not in ("fast", "reference"):
        raise ValueError(f"exact_obc: method must be 'fast' or 'reference', got {method!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"exact_obc: block_size must be a positive integer, got {block_size!r}")
    dt = compute_dtype(matrix)
    W = matrix.detach().to(dt).clone()
    prep = prepare_hessian(hessian.detach().to(dt), damp, fn="exact_obc", matrix_shape=tuple(matrix.shape))
    W[:, prep.dead] = 0
    grid = fit_grid(W, n_bits, symmetric=symmetric, mse=mse, group_size=group_size)
    codes, loss = solve_obc_rows(
        W, prep, grid,
        method=method, batch_size=batch_size, block_size=block_size, max_memory=max_memory,
    )
    out = matrix.dtype
    return QuantResult(
        quantized_matrix=grid.dequantize(codes).to(out),
        scales=grid.scales.to(out),
        rounded_zeros=grid.zeros.to(out),
        codes=codes.to(torch.int32),
        loss=loss,
        grid=grid,
        damp=prep.damp,
    )
