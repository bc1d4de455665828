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
  steps as one batched matrix product on the live columns only, the finished ones dropped at each flush
  (the working set shrinks from d x d to 0: ~2 d^3 / 3 FLOPs per row, ~d^3 / 3 using the symmetry of
  H^-1, where one rank-1 downdate per step costs 2 d^3).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from obc_lightning.checks import check_positive_int
from obc_lightning.grids import Grid, dequantize, quantize_codes
from obc_lightning.kernels import use_triton
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    HessianBreakdown,
    PreparedHessian,
    QuantResult,
    check_problem,
    checked_cholesky,
    compute_dtype,
    default_block_size,
    default_memory_budget,
    layer_index,
    masked_inverses,
    objective,
    rows_on_their_grid,
    scaled_grid,
    solve_with_damping,
    solver_hessian,
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
    dj = torch.where(dj > 0, dj, torch.nan)  # a non-positive pivot: the row broke down (see greedy_fast)
    u = hinv[ar, j] / dj.sqrt().unsqueeze(1)  # H^-1[:, p] / sqrt([H^-1]_pp)
    w -= u * ((wj - q) / dj.sqrt()).unsqueeze(1)
    w[ar, j] = q
    hinv.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1)
    return 0.5 * (wj - q) ** 2 / dj


class GridRule:
    """The quantization rule of the greedy engine: each step moves one weight to its nearest grid point.

    Cheapest weight first (score (q - w_p)^2 / [H^-1]_pp), unless a row has an outlier (rounding error
    above scale^2 / 4, pushed off the grid by earlier compensations): that one first. A rule is what the
    engine needs to know about the target of a step and which weights may be chosen; the engine
    (:func:`greedy_loop_reference`, :func:`greedy_loop_fast`) owns H^-1, the compensation and the loss.
    Per-column state lives in the engine's local column order; ``shrink`` follows its working set.
    """

    def __init__(self, scale: Tensor, zero: Tensor, maxq: int):
        self.scale, self.zero, self.maxq = scale.contiguous(), zero.contiguous(), maxq
        self.outlier = 0.25 * self.scale**2
        self.codes = torch.zeros_like(self.scale)  # (R, d) in global columns
        self.ar = torch.arange(scale.shape[0], device=scale.device)

    def choose(self, w: Tensor, diag: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
        """(j, q): the local column each row takes next and its target; diag = current diag(H^-1)."""
        k = quantize_codes(w, self.scale, self.zero, self.maxq)
        q = dequantize(k, self.scale, self.zero)
        err = (w - q).square_().masked_fill_(done, 0)
        score = (err / diag).masked_fill_(done, float("inf"))
        j = torch.where((err > self.outlier).any(dim=1), err.argmax(dim=1), score.argmin(dim=1))
        self.k = k
        return j, q[self.ar, j]

    def record(self, j: Tensor, gj: Tensor, q: Tensor, dl: Tensor) -> None:
        """After the step: j local and gj global column, q the target, dl the step loss."""
        self.codes[self.ar, gj] = self.k[self.ar, j]

    def shrink(self, keep: Tensor) -> None:
        self.scale, self.zero, self.outlier = (x.gather(1, keep) for x in (self.scale, self.zero, self.outlier))


def greedy_loop_reference(w: Tensor, hinv: Tensor, rule, n_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """The paper's loop for a batch of rows: ask the rule for (j, q), :func:`obs_step` it, repeat.

    w: (R, d); hinv: (R, d, d), the inverse Hessian of each row (neither modified). Runs ``n_steps``
    (default d) steps; returns the per-row sum of step losses (R,) (NaN marks a row whose inverse lost
    positive definiteness in finite precision, a pivot [H^-1]_pp <= 0) and the final weights (R, d).
    """
    R, d = w.shape
    w, hinv = w.clone(), hinv.clone()
    done = torch.zeros(R, d, dtype=torch.bool, device=w.device)
    loss = torch.zeros(R, dtype=w.dtype, device=w.device)
    ar = torch.arange(R, device=w.device)
    for _ in range(d if n_steps is None else n_steps):
        j, q = rule.choose(w, hinv.diagonal(dim1=1, dim2=2), done)
        dl = obs_step(w, hinv, j, q)
        rule.record(j, j, q, dl)
        loss += dl
        done[ar, j] = True
    return loss, w


def greedy_reference(w: Tensor, hinv: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """ExactOBC on the reference engine. w, scale, zero: (R, d); hinv: (R, d, d) (not modified).

    Returns the integer codes (R, d) as floats and the per-row sum of step losses (R,).
    """
    rule = GridRule(scale, zero, maxq)
    loss, _ = greedy_loop_reference(w, hinv, rule)
    return rule.codes, loss


class FlushBuffers:
    """Two reused (R, n, n) buffers for the flushed inverse and the gathered rows of the next one.

    Fresh multi-megabyte tensors cost page faults on every flush (on CPU a new 60 MB tensor takes longer
    than the rank-B product written into it); the working set only shrinks, so two buffers sized at
    the first flush serve every later one."""

    def __init__(self):
        self.hf: Tensor | None = None
        self.rows: Tensor | None = None

    def take(self, name: str, numel: int, like: Tensor) -> Tensor:
        buf = getattr(self, name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            setattr(self, name, buf)
        return buf[:numel]


def symmetric_blocks(device: torch.device) -> int:
    """Row blocks of the flush's product: the lower block triangle is computed and mirrored (about
    (1 + 1/k) / 2 of the full product's FLOPs). On CPU the strided mirror copy costs more than the
    FLOPs it saves (measured, docs/gpu.md), so the full product there; on CUDA gpu_check.py times both."""
    return 4 if device.type == "cuda" else 1


def flush_live(src: Tensor, src_row: Tensor, keep: Tensor, uk: Tensor, bufs: FlushBuffers,
               blocks: int = 1) -> Tensor:
    """The flushed inverse on the live columns only: H_f[keep, keep] - U[keep] U[keep]^T per row.

    src (L, n, n) symmetric, row r's at src[src_row[r]]; keep (R, n2) the live local columns (sorted);
    uk (R, t, n2) the pending scaled columns restricted to them. Rows are gathered whole (a memcpy each),
    then their live columns; the product is the batched rank-t update of the n2 x n2 block, its lower
    block triangle only when ``blocks`` > 1 (H^-1 is symmetric: the upper blocks are copies)."""
    R, n2 = keep.shape
    n = src.shape[-1]
    flat = (src_row.unsqueeze(1) * n + keep).reshape(-1)
    rows = torch.index_select(src.reshape(-1, n), 0, flat, out=bufs.take("rows", R * n2 * n, src).view(R * n2, n))
    hf = bufs.take("hf", R * n2 * n2, src).view(R, n2, n2)  # may alias src: its rows are taken already
    torch.gather(rows.view(R, n2, n), 2, keep.unsqueeze(1).expand(R, n2, n2), out=hf)
    ukt = uk.transpose(1, 2)
    if blocks <= 1:
        return hf.baddbmm_(ukt, uk, alpha=-1)
    b = [round(n2 * i / blocks) for i in range(blocks + 1)]
    for a0, a1 in zip(b[:-1], b[1:]):  # block row [a0, a1): columns [0, a1)
        hf[:, a0:a1, :a1].baddbmm_(ukt[:, a0:a1], uk[:, :, :a1], alpha=-1)
    for a0, a1 in zip(b[1:-1], b[2:]):
        hf[:, :a0, a0:a1].copy_(hf[:, a0:a1, :a0].transpose(1, 2))
    return hf


def flush_flops(d: int, block_size: int, schedule: str = "live", blocks: int = 1) -> int:
    """Multiply-adds x 2 of the flushes of one row of width d (the per-step corrections not counted).

    ``live`` (this engine): every ``block_size`` steps the finished columns are dropped and the live
    n2 x n2 block takes the rank-B update, 2 n2^2 B (with ``blocks`` > 1: the lower block triangle,
    2 B sum_i (a1_i - a0_i) a1_i). ``half`` (the engine before issue 35): a rank-B update of the whole
    n x n working set, in place, and the finished columns dropped only at the flush where they are half
    of it (that flush updates the n2 x n2 block)."""
    if schedule not in ("live", "half"):
        raise ValueError(f"flush_flops: schedule must be 'live' or 'half', got {schedule!r}")
    n, step, n_done, flops = d, 0, 0, 0
    while step + block_size < d:  # a flush follows every full block but the last
        step += block_size
        n_done += block_size
        if schedule == "live" or 2 * n_done >= n:
            n, n_done = n - n_done, 0
            if blocks > 1:
                b = [round(n * i / blocks) for i in range(blocks + 1)]
                flops += 2 * block_size * sum((a1 - a0) * a1 for a0, a1 in zip(b[:-1], b[1:]))
                continue
        flops += 2 * n * n * block_size
    return flops


def greedy_loop_fast(
    w: Tensor,
    hinv_src: Tensor,
    row_src: Tensor,
    rule,
    n_steps: int | None = None,
    block_size: int | None = None,
    blocks: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same greedy steps as :func:`greedy_loop_reference`, with deferred downdates on the live columns.

    Row r starts from ``hinv_src[row_src[r]]`` (hinv_src: (L, d, d); one shared inverse, per-row masked
    inverses, or the inverses of several layers with the same d). Between flushes the current inverse is
    H^-1 = Hf - U U^T, with Hf the last flushed matrix and U (n x t) the pending scaled columns
    u = H^-1[:, p] / sqrt([H^-1]_pp); the column needed at a step is Hf[:, p] - U U[p, :]^T.
    Every ``block_size`` steps the finished columns are dropped and U is flushed into the live block:
    Hf <- Hf[keep, keep] - U[keep] U[keep]^T (:func:`flush_live`; ``rule.shrink(keep)``). The flushes
    cost sum_k 2 (d - kB)^2 B ~ 2 d^3 / 3 FLOPs per row (~d^3 / 3 with ``blocks`` > 1: the lower block
    triangle), against ~1.05 d^3 for in-place updates of the whole working set with the finished
    columns dropped only when they are half of it (:func:`flush_flops` counts both).

    Returns the per-row loss (NaN: broken row), and the weights still in the working set (R, n) with
    their global columns (R, n); finished weights sit at the targets the rule recorded.
    """
    R, d = w.shape
    dev, dt = w.device, w.dtype
    n_steps = d if n_steps is None else n_steps
    block_size = block_size or default_block_size(d)
    blocks = symmetric_blocks(dev) if blocks is None else blocks
    ar = torch.arange(R, device=dev)
    w = w.clone()
    cols = torch.arange(d, device=dev).expand(R, d).contiguous()  # global column of each local one
    shared = hinv_src.shape[0] == 1
    hf = None  # (R, n, n) per-row flushed inverse, once materialised
    bufs = FlushBuffers()
    diag = hinv_src.diagonal(dim1=1, dim2=2)[row_src].clone()
    floor = (torch.finfo(dt).eps * diag.amax(dim=1)).clamp_min(torch.finfo(dt).tiny)  # (R,)
    broken = torch.zeros(R, dtype=torch.bool, device=dev)
    ut = torch.empty(R, block_size, d, dtype=dt, device=dev)  # U^T: pending columns as rows
    done = torch.zeros(R, d, dtype=torch.bool, device=dev)
    loss = torch.zeros(R, dtype=dt, device=dev)
    n, t = d, 0
    for step in range(n_steps):
        j, qj = rule.choose(w, diag, done)
        if hf is not None:
            c = hf[ar, j]
        else:
            c = hinv_src[0].index_select(0, j) if shared else hinv_src[row_src, j]
        if t:
            c = c - torch.bmm(ut[ar, :t, j].unsqueeze(1), ut[:, :t, :]).squeeze(1)
        c.masked_fill_(done, 0)
        # [H^-1]_pp from the column itself (as the reference reads it), floored: in float32 the Schur
        # complement of a nearly dependent input can round to <= 0 late in a row
        broken |= c[ar, j] <= floor
        wj, dj = w[ar, j], c[ar, j].clamp_min(floor)
        e = (wj - qj) / dj
        dl = 0.5 * (wj - qj) * e
        loss += dl
        rule.record(j, cols[ar, j], qj, dl)
        w.addcmul_(c, e.unsqueeze(1), value=-1)
        w[ar, j] = qj
        done[ar, j] = True
        u = c * dj.rsqrt().unsqueeze(1)
        ut[:, t] = u
        diag.addcmul_(u, u, value=-1)
        t += 1
        if t < block_size or step == n_steps - 1:
            continue
        # drop the t finished columns (stable sort: same order, same tie-breaks) and flush the rest
        n2 = n - t
        keep = torch.argsort(done.to(torch.uint8), dim=1, stable=True)[:, :n2]
        uk = ut.gather(2, keep.unsqueeze(1).expand(R, t, n2))
        src, src_row = (hf, ar) if hf is not None else (hinv_src, row_src)
        hf = flush_live(src, src_row, keep, uk, bufs, blocks)
        w, cols = w.gather(1, keep), cols.gather(1, keep)
        rule.shrink(keep)
        done = torch.zeros(R, n2, dtype=torch.bool, device=dev)
        ut = torch.empty(R, block_size, n2, dtype=dt, device=dev)
        n = n2
        diag = hf.diagonal(dim1=1, dim2=2).clone()  # resync the running diagonal with the matrix
        t = 0
    return loss.masked_fill_(broken, float("nan")), w, cols


def greedy_fast(
    w: Tensor,
    hinv_src: Tensor,
    row_src: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
    block_size: int | None = None,
    blocks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """ExactOBC on the fast engine (:func:`greedy_loop_fast`): the codes (R, d) and per-row loss (R,)."""
    rule = GridRule(scale, zero, maxq)
    loss, _, _ = greedy_loop_fast(w, hinv_src, row_src, rule, block_size=block_size, blocks=blocks)
    return rule.codes, loss


def _row_bytes(d: int, dtype: torch.dtype, method: str, masked: bool = False) -> int:
    """Peak working-set bytes per row of a batch, counting every d x d copy the path makes.

    fast: two reused buffers, the flushed inverse H_f (n2 x n2) and the gathered rows of the next one
    (n2 x n), under 2 d^2 together, plus a per-row source when the rows have their own inverse
    (zero-aware path: ``masked_inverses`` holds 3 copies while it factors: H repeated, L, the inverse);
    reference: the gathered inverse and its working clone; vectors: U (<= 256 x d) and ~64 d more."""
    el = torch.finfo(dtype).bits // 8
    copies = 2.0 + (1.0 if masked else 0.0)
    return int(el * (copies * d * d + (256 + 64) * d))


def obc_row_batch(rows: int, cols: int, dtype: torch.dtype, device: torch.device, method: str,
                  batch_size: int | None, max_memory: int | None, masked: bool = False) -> int:
    """Rows solved together: ``batch_size`` if given, else as many as fit ``max_memory``."""
    if batch_size is not None:
        return max(1, min(batch_size, rows))
    budget = max_memory if max_memory is not None else default_memory_budget(device)
    return max(1, min(rows, budget // _row_bytes(cols, dtype, method, masked)))


def solve_obc_rows(
    W: Tensor,
    prep: PreparedHessian,
    grid: Grid,
    *,
    method: str = "fast",
    batch_size: int | None = None,
    block_size: int | None = None,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the greedy loop on every row of W (dead columns already zeroed) on a fitted grid.

    Rows with weights that are exactly 0 keep them at 0 through a per-row masked inverse.
    Returns codes (rows, cols) as floats and the per-row loss.
    """
    scale_c, zero_c = grid.per_column()
    return solve_obc_layers(
        W, [W.shape[0]], [prep], scale_c, zero_c, grid.maxq,
        method=method, batch_size=batch_size, block_size=block_size, max_memory=max_memory,
    )


def solve_obc_layers(
    W: Tensor,
    counts: list[int],
    preps: list[PreparedHessian],
    scale_c: Tensor,
    zero_c: Tensor,
    maxq: int,
    *,
    method: str = "fast",
    batch_size: int | None = None,
    block_size: int | None = None,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`solve_obc_rows` for the rows of several layers of the same width, stacked layer after layer
    (``counts[l]`` rows with prepared Hessian ``preps[l]``); scale_c, zero_c (R, d) every entry's grid.

    The engine's rows read their layer's H^-1 (``row_src``), so rows of different layers share row
    batches, flushes and launches; a row with pruned weights (exactly 0 on a live input) reads its own
    masked inverse instead. Each row takes the steps it takes in a call for its layer alone: the codes
    do not depend on which rows are batched together. Returns codes (R, d) as floats and the loss (R,).
    """

    rows, d = W.shape
    L = len(preps)
    lid = layer_index(counts, W.device)
    codes = torch.empty_like(W)
    loss = torch.empty(rows, dtype=W.dtype, device=W.device)
    dead = torch.stack([p.dead for p in preps])  # (L, d)
    pruned = (W == 0) & ~dead[lid]  # dead inputs are already uncoupled in H
    has_pruned = pruned.any(dim=1)
    masked = bool(has_pruned.any())
    inverses = torch.stack([p.inverse for p in preps]) if L > 1 else preps[0].inverse.unsqueeze(0)  # (L, d, d)
    budget = max_memory if max_memory is not None else default_memory_budget(W.device)
    el = torch.finfo(W.dtype).bits // 8
    # the stacked inverses come out of the budget (a batch with pruned rows copies the ones it uses)
    R = obc_row_batch(rows, d, W.dtype, W.device, method, batch_size,
                      max(0, budget - (L * d * d * el if L > 1 else 0)), masked)

    def sources(idx: Tensor, inv: Tensor, slot: list[int], hessians: list) -> tuple[Tensor, Tensor]:
        """(hinv_src, row_src) for rows ``idx``: their layer's inverse ``inv[slot[l]]``, or where a row has
        pruned weights its own masked inverse (built a quarter of the batch at a time into one buffer)."""
        slots = torch.tensor(slot, device=W.device)
        if not bool(has_pruned[idx].any()):
            return inv, slots[lid[idx]]
        own = has_pruned[idx]
        layers = lid[idx].tolist()
        plain = sorted({layers[r] for r in (~own).nonzero().squeeze(1).tolist()})
        where = {li: k for k, li in enumerate(plain)}
        src = torch.empty(len(plain) + int(own.sum()), d, d, dtype=inv.dtype, device=W.device)
        row_src = torch.empty(len(idx), dtype=torch.long, device=W.device)
        for li in plain:
            src[where[li]] = inv[slot[li]]
        free_rows = (~own).nonzero().squeeze(1)
        row_src[free_rows] = torch.tensor([where[layers[r]] for r in free_rows.tolist()], device=W.device,
                                          dtype=torch.long)
        k, chunk = len(plain), max(1, len(idx) // 4)
        for li in sorted(set(layers)):
            sel = (own & (lid[idx] == li)).nonzero().squeeze(1)
            for c in range(0, len(sel), chunk):
                part = sel[c : c + chunk]
                src[k : k + len(part)] = masked_inverses(hessians[li], pruned[idx[part]], problem=li)
                row_src[part] = torch.arange(k, k + len(part), device=W.device)
                k += len(part)
        return src, row_src

    hess = [p.hessian for p in preps]
    for i in range(0, rows, R):
        idx = torch.arange(i, min(i + R, rows), device=W.device)
        src, row_src = sources(idx, inverses, list(range(L)), hess)
        sl = slice(i, i + len(idx))
        codes[sl], loss[sl] = _greedy(method, W[sl], src, row_src, scale_c[sl], zero_c[sl], maxq, block_size)
    del inverses
    broken = ~torch.isfinite(loss)
    if W.dtype != torch.float64 and bool(broken.any()):
        # float32 could not carry this Hessian's conditioning through the row: re-solve those rows in
        # float64 (H is well-defined: it was damped to positive definite before)
        idx = broken.nonzero().squeeze(1)
        n_broken = torch.bincount(lid[idx], minlength=L).tolist()
        hit = [li for li in range(L) if n_broken[li]]
        H64 = [p.hessian.double() if n_broken[li] else None for li, p in enumerate(preps)]
        # the float64 inverse of each layer with a broken row that has no pruned weight
        need = [li for li in hit if not bool(has_pruned[idx[lid[idx] == li]].all())]
        slot = [need.index(li) if li in need else 0 for li in range(L)]
        inv64 = torch.stack([torch.cholesky_inverse(checked_cholesky(H64[li], problem=li, what=REDO))
                             for li in need]) if need else None
        # row-batched like the float32 pass, sized for float64
        R64 = obc_row_batch(len(idx), d, torch.float64, W.device, method, batch_size,
                            max(0, budget - len(need) * d * d * 8), masked)
        for i in range(0, len(idx), R64):
            ib = idx[i : i + R64]
            src, row_src = sources(ib, inv64, slot, H64)
            c64, l64 = _greedy(method, W[ib].double(), src, row_src, scale_c[ib].double(), zero_c[ib].double(),
                               maxq, block_size)
            if not bool(torch.isfinite(l64).all()):  # float64 could not carry it either: more damping
                raise HessianBreakdown(int(lid[ib[~torch.isfinite(l64)][0]]), REDO)
            codes[ib], loss[ib] = c64.to(W.dtype), l64.to(W.dtype)
        for li in hit:
            warnings.warn(
                f"exact_obc: {n_broken[li]} of {counts[li]} rows of the ({counts[li]}, {d}) matrix broke down in "
                f"{W.dtype} (ill-conditioned Hessian; consider damp > 0) and were solved again in float64",
                stacklevel=4,
            )
    return codes, loss


# what broke down when the float64 re-solve of a layer's broken rows fails (HessianBreakdown)
REDO = "the float64 re-solve of rows that broke down in float32"


def _greedy(method, w, src, row_src, scale, zero, maxq, block_size):
    if method == "fast":
        if use_triton(w):  # the same steps, a block of them per launch (obc_lightning.kernels)
            from obc_lightning.kernels.fused import greedy_fast_fused

            return greedy_fast_fused(w, src, row_src, scale, zero, maxq, block_size)
        return greedy_fast(w, src, row_src, scale, zero, maxq, block_size)
    return greedy_reference(w, src[row_src], scale, zero, maxq)


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
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
    block_size: int | None = None,
    max_memory: int | None = None,
) -> QuantResult:
    """Quantize ``matrix`` (rows x cols) to ``n_bits`` with ExactOBC, given the layer Hessian (cols x cols).

    A drop-in for the TinyVolt ``exact_obc``: same positional call; the result has ``quantized_matrix``
    (same shape, dtype and device as ``matrix``), ``scales``, ``rounded_zeros``, and also ``codes``
    (int32, the matrix's shape) and ``loss`` (per row: the objective 1/2 (q - w) H (q - w)^T with the
    caller's ``matrix``, the returned ``quantized_matrix`` and the caller's undamped ``hessian``,
    evaluated in float64 and returned in float32, float64 for float64 input; the greedy step losses
    1/2 (q - w_p)^2 / [H^-1]_pp sum to it only in exact arithmetic and with the damped H).

    ``hessian`` must be symmetric up to float rounding (see
    :func:`~obc_lightning.solvers.common.symmetric_hessian`); it is used as (H + H^T) / 2. Rows with
    max|w| outside [2^-24, 2^24] are solved divided by a power of two and scaled back (the objective is
    covariant: the result is the scaled result of the scaled row).

    Args:
        batch_size: rows solved together; a speed knob only (the result does not depend on it).
            ``None`` sizes the batch to ``max_memory`` (default: half the free GPU memory, 1 GiB on CPU).
        symmetric / mse / group_size: the grid (see :func:`obc_lightning.grids.fit_grid`).
        damp: adds ``damp * mean(diag H)`` to the diagonal; escalated with a warning if H is not
            positive definite, or a later factorization (the float64 re-solve of rows that broke down
            in float32) fails (:func:`~obc_lightning.solvers.common.solve_with_damping`). A Hessian that
            no X^T X can be, even rounded, is refused (``ValueError``; see
            :func:`~obc_lightning.solvers.common.check_covariance`).
        method: ``"fast"`` (deferred, blocked downdates with a shrinking working set) or
            ``"reference"`` (one rank-1 downdate per step; the oracle).
        block_size: steps between two flushes of the deferred downdates (``method="fast"``);
            ``None``: about 2 sqrt(cols), which balances the per-step correction against the flushes.
    """
    check_problem("exact_obc", matrix, hessian, n_bits, group_size)
    check_positive_int("exact_obc", "batch_size", batch_size, optional=True)
    if method not in ("fast", "reference"):
        raise ValueError(f"exact_obc: method must be 'fast' or 'reference', got {method!r}")
    check_positive_int("exact_obc", "block_size", block_size, optional=True)
    dt = compute_dtype(matrix)
    H, unit = solver_hessian("exact_obc", hessian, dt)

    def solve(preps: list[PreparedHessian]):
        W, grid, factors = rows_on_their_grid(matrix, dt, preps[0].dead, n_bits, symmetric=symmetric, mse=mse,
                                              group_size=group_size)
        codes, _ = solve_obc_rows(
            W, preps[0], grid,
            method=method, batch_size=batch_size, block_size=block_size, max_memory=max_memory,
        )
        return preps[0], scaled_grid(grid, factors), codes

    prep, grid, codes = solve_with_damping("exact_obc", [H], damp, [tuple(matrix.shape)], solve)
    out = matrix.dtype
    Q = grid.dequantize(codes).to(out)
    return QuantResult(
        quantized_matrix=Q,
        scales=grid.scales.to(out),
        rounded_zeros=grid.zeros.to(out),
        codes=codes.to(torch.int32),
        loss=objective("exact_obc", matrix, Q, H, dt, unit),
        grid=grid,
        damp=prep.damp,
    )
