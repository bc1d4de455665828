"""Pruning with Optimal Brain Surgeon: the OBC greedy engine with target q = 0 (Frantar & Alistarh 2022).

For one row w with inverse Hessian H^-1, removing weight p costs
    dL = 1/2 w_p^2 / [H^-1]_pp,   compensation  delta = -w_p / [H^-1]_pp * H^-1[:, p],
and p leaves by the rank-1 downdate of :func:`~obc_lightning.solvers.obc.obs_step`. The same engine as
ExactOBC runs the loop (:func:`~obc_lightning.solvers.obc.greedy_loop_reference` / ``greedy_loop_fast``);
:class:`PruneRule` only says which weights may go next (those in a group with removals left) and that
their target is 0. Removing a set S at once (a block) is the group step
    dL = 1/2 w_S^T ([H^-1]_SS)^-1 w_S,   delta = -H^-1[:, S] ([H^-1]_SS)^-1 w_S,
    H^-1 <- H^-1 - H^-1[:, S] ([H^-1]_SS)^-1 H^-1[S, :],
and a greedy sequence of single removals ending at S lands on the same weights: the optimal kept
weights for the mask, p_K = w_K + H_KK^-1 H_KS w_S (:func:`compensate`).

Unstructured sparsity (the paper's global mask): every row is pruned greedily to the end, recording its
removal order and step losses; the layer then picks the k = round(s * rows * d) cheapest removals over
all rows (:func:`select_levels`), and each row's weights at its level come from the closed form.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from obc_lightning.checks import check_positive_int
from obc_lightning.formats.nm import conv_nm_group_index, nm_group_index  # noqa: F401  (the formats' layout)
from obc_lightning.precision import fp32_matmul
from obc_lightning.solvers.common import (
    HessianBreakdown,
    PreparedHessian,
    check_problem,
    checked_cholesky,
    compute_dtype,
    masked_inverses,
    objective,
    row_factors,
    solve_with_damping,
    solver_hessian,
)
from obc_lightning.solvers.obc import greedy_loop_fast, greedy_loop_reference


@dataclass
class PruneResult:
    """A pruned matrix. ``mask`` is True where a weight is kept (weights already 0, and dead inputs, count
    as pruned). ``loss`` (rows,) is the sum of the step losses, 1/2 (p - w) H (p - w)^T per row; see
    :func:`obs_prune` for which H. ``loss_trace`` (rows, steps): cumulative loss after each removal of the
    row's greedy sequence (steps = d unstructured, d / block_size for blocks, d (M - N) / M for N:M), in
    the order ``order`` (rows, steps; the column, or block index, removed at each step)."""

    pruned_matrix: Tensor
    mask: Tensor
    loss: Tensor
    loss_trace: Tensor
    order: Tensor
    damp: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned (mask False)."""
        return 1.0 - self.mask.float().mean().item()


class PruneRule:
    """The pruning rule of the greedy engine: target 0 for the cheapest eligible weight.

    Eligible: not finished and its group still has removals left (``quota``; one group per row and
    quota d for the full greedy sequence, groups of M inputs with quota M - N for N:M). Score
    w_p^2 / [H^-1]_pp. A row with nothing eligible left freezes its first free weight at its value
    (q = w_p: no cost, no compensation), so rows with different budgets share one batch.
    Records (in global columns): final value, removed or not, the removal order and step losses.
    """

    def __init__(self, group: Tensor, quota: Tensor, n_steps: int, dtype: torch.dtype):
        R, d = group.shape
        dev = group.device
        self.group, self.quota = group.contiguous(), quota.clone()
        self.ar = torch.arange(R, device=dev)
        self.out = torch.zeros(R, d, dtype=dtype, device=dev)
        self.finished = torch.zeros(R, d, dtype=torch.bool, device=dev)
        self.removed = torch.zeros(R, d, dtype=torch.bool, device=dev)
        self.order = torch.zeros(R, n_steps, dtype=torch.long, device=dev)
        self.steps = torch.zeros(R, n_steps, dtype=dtype, device=dev)
        self.t = 0

    def choose(self, w: Tensor, diag: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
        elig = ~done & (self.quota.gather(1, self.group) > 0)
        score = (w.square() / diag).masked_fill_(~elig, float("inf"))  # 1/2 w_p^2 / [H^-1]_pp, x2
        self.rm = elig.any(dim=1)
        j = torch.where(self.rm, score.argmin(dim=1), (~done).to(torch.uint8).argmax(dim=1))
        wj = w[self.ar, j]
        return j, torch.where(self.rm, torch.zeros_like(wj), wj)

    def record(self, j: Tensor, gj: Tensor, q: Tensor, dl: Tensor) -> None:
        ar = self.ar
        self.out[ar, gj] = q
        self.finished[ar, gj] = True
        self.removed[ar, gj] = self.rm
        self.quota[ar, self.group[ar, j]] -= self.rm.long()
        self.order[:, self.t], self.steps[:, self.t] = gj, dl
        self.t += 1

    def shrink(self, keep: Tensor) -> None:
        self.group = self.group.gather(1, keep)


def _batches(rows: int, batch_size: int):
    for i in range(0, rows, batch_size):
        yield slice(i, min(i + batch_size, rows))


def _start_inverse(prep: PreparedHessian, frozen: Tensor) -> tuple[Tensor, Tensor]:
    """(hinv_src, row_src) for a batch: the shared inverse, or per-row inverses with the zeros frozen."""
    n, dev = frozen.shape[0], frozen.device
    if bool(frozen.any()):
        return masked_inverses(prep.hessian, frozen), torch.arange(n, device=dev)
    return prep.inverse.unsqueeze(0), torch.zeros(n, dtype=torch.long, device=dev)


def greedy_prune_rows(W: Tensor, prep: PreparedHessian, group: Tensor, quota: Tensor, n_steps: int,
                      method: str, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the engine with :class:`PruneRule` on every row of W (dead columns zeroed).

    group: (d,) group of each column; quota: (rows, G) removals per group. Weights exactly 0 are frozen
    at 0 by per-row masked inverses (they cost 0 and are removed first). Returns the final weights
    (rows, d), removed mask, per-row loss, removal order and step losses (rows, n_steps).
    """
    rows, d = W.shape
    P, removed = torch.empty_like(W), torch.empty(rows, d, dtype=torch.bool, device=W.device)
    loss = torch.empty(rows, dtype=W.dtype, device=W.device)
    order = torch.empty(rows, n_steps, dtype=torch.long, device=W.device)
    steps = torch.empty(rows, n_steps, dtype=W.dtype, device=W.device)
    frozen = (W == 0) & ~prep.dead.unsqueeze(0)
    for sl in _batches(rows, batch_size):
        w = W[sl]
        rule = PruneRule(group.expand(w.shape[0], d), quota[sl], n_steps, W.dtype)
        src, row_src = _start_inverse(prep, frozen[sl])
        if method == "fast":
            loss[sl], wl, cols = greedy_loop_fast(w, src, row_src, rule, n_steps)
            wfull = torch.zeros_like(w).scatter_(1, cols, wl)
        else:
            loss[sl], wfull = greedy_loop_reference(w, src[row_src], rule, n_steps)
        rule.steps[~torch.isfinite(loss[sl])] = float("nan")  # a broken row (see greedy_loop_fast)
        P[sl] = torch.where(rule.finished, rule.out, wfull)
        removed[sl], order[sl], steps[sl] = rule.removed, rule.order, rule.steps
    return P, removed, loss, order, steps


def obs_block_step(w: Tensor, hinv: Tensor, J: Tensor) -> Tensor:
    """Remove the columns J (R, b) of each row at once, in place; returns the step losses (R,).

    With x = ([H^-1]_BB)^-1 w_B: dL = 1/2 w_B^T x, w <- w - H^-1[:, B] x (so w_B becomes 0), and
    H^-1 <- H^-1 - V^T V with V = L^-1 H^-1[B, :], L L^T = [H^-1]_BB. b = 1 is :func:`obs_step` with q = 0.
    """
    R, b = J.shape
    hB = hinv.gather(1, J.unsqueeze(2).expand(R, b, hinv.shape[2]))  # (R, b, d) = H^-1[B, :]
    L, info = torch.linalg.cholesky_ex(hB.gather(2, J.unsqueeze(1).expand(R, b, b)))
    wB = w.gather(1, J)
    x = torch.cholesky_solve(wB.unsqueeze(2), L)  # (R, b, 1)
    dl = 0.5 * (wB * x.squeeze(2)).sum(dim=1)
    w -= torch.bmm(hB.transpose(1, 2), x).squeeze(2)
    w.scatter_(1, J, 0)
    V = torch.linalg.solve_triangular(L, hB, upper=False)
    hinv.baddbmm_(V.transpose(1, 2), V, alpha=-1)
    return dl.masked_fill(info > 0, float("nan"))


def block_trace_rows(W: Tensor, prep: PreparedHessian, b: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Greedy block OBS to the end for every row (reference speed): block order and step losses
    (rows, d / b). At each step every free block is scored 1/2 w_B^T ([H^-1]_BB)^-1 w_B."""
    rows, d = W.shape
    nb, dev = d // b, W.device
    order = torch.empty(rows, nb, dtype=torch.long, device=dev)
    steps = torch.empty(rows, nb, dtype=W.dtype, device=dev)
    frozen = (W == 0) & ~prep.dead.unsqueeze(0)
    eye = torch.eye(b, dtype=W.dtype, device=dev)
    offs = torch.arange(b, device=dev)
    for sl in _batches(rows, batch_size):
        w = W[sl].clone()
        R = w.shape[0]
        src, row_src = _start_inverse(prep, frozen[sl])
        hinv = src[row_src].clone()
        done = torch.zeros(R, nb, dtype=torch.bool, device=dev)
        ar = torch.arange(R, device=dev)
        for t in range(nb):
            hbb = hinv.view(R, nb, b, nb, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (R, nb, b, b)
            hbb = torch.where(done[..., None, None], eye, hbb)
            L, info = torch.linalg.cholesky_ex(hbb)
            wb = w.view(R, nb, b)
            score = (wb * torch.cholesky_solve(wb.unsqueeze(3), L).squeeze(3)).sum(dim=2)
            score = score.masked_fill_(done | (info > 0), float("inf"))
            jb = score.argmin(dim=1)
            steps[sl, t] = obs_block_step(w, hinv, jb.unsqueeze(1) * b + offs)
            order[sl, t] = jb
            done[ar, jb] = True
    return order, steps


def select_levels(steps: Tensor, k: int, min_levels: Tensor | None = None) -> Tensor:
    """How many removals each row makes so that the layer makes k in all, at least total loss.

    ``steps`` (rows, n): each row's step losses in its greedy order; a row at level l pays
    trace[l] = steps[:l].sum(). The paper's global selection takes the k smallest step losses over the
    layer. A row's steps need not increase (a compensation can make the next weight cheaper), and a row
    can only take a prefix, so we take the sorted merge of the rows' sequences: the cheapest next step
    among all rows, repeatedly. That equals sorting all steps by their running maximum within the row
    (a cheap step behind a costly one becomes available, and is taken, right after it). Where every
    row's steps increase (convex traces) this is the exact optimum of the separable problem; where not,
    it is the paper's heuristic, so we also price the uniform allocation (k / rows per row, the extra
    removals to the rows with the cheapest next step) and keep whichever is cheaper.
    """
    rows, n = steps.shape
    key = steps.cummax(dim=1).values.reshape(-1)
    pick = torch.argsort(key, stable=True)[:k]
    merged = torch.bincount(pick // n, minlength=rows)
    base, extra = divmod(k, rows)
    uniform = torch.full((rows,), base, dtype=torch.long, device=steps.device)
    if extra:
        uniform[torch.topk(steps[:, base], extra, largest=False).indices] += 1
    best = merged if _total(steps, merged) <= _total(steps, uniform) else uniform
    return best if min_levels is None else torch.maximum(best, min_levels)


def _total(steps: Tensor, levels: Tensor) -> float:
    return float(level_loss(steps.cumsum(dim=1), levels).sum())


def level_loss(trace: Tensor, levels: Tensor) -> Tensor:
    """trace[r, levels[r] - 1] (0 at level 0): each row's cumulative loss at its level."""
    at = trace.gather(1, (levels - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(levels > 0, at, torch.zeros_like(at))


def compensate(W: Tensor, H: Tensor, removed: Tensor, batch_size: int) -> Tensor:
    """The optimal weights for a mask: minimise 1/2 (p - w) H (p - w)^T subject to p_S = 0.

    Zero gradient on the kept set K: H_KK (p_K - w_K) - H_KS w_S = 0, so p_K = w_K + H_KK^-1 H_KS w_S,
    the same as the OBS group step w - H^-1[:, S] ([H^-1]_SS)^-1 w_S. Per row: H with S masked to the
    identity (as :func:`masked_inverses`), one Cholesky solve. W, removed: (rows, d); H: (d, d).
    """
    out = torch.empty_like(W)
    for sl in _batches(W.shape[0], batch_size):
        w, rm = W[sl], removed[sl]
        s = w.masked_fill(~rm, 0)  # w_S, embedded
        Hm = H.expand(w.shape[0], *H.shape).masked_fill(rm.unsqueeze(2) | rm.unsqueeze(1), 0)
        Hm.diagonal(dim1=1, dim2=2).masked_fill_(rm, 1)
        rhs = (s @ H).masked_fill_(rm, 0)  # (H_KS w_S) on K, 0 on S
        L = checked_cholesky(Hm, what="the compensation of the kept weights")
        x = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        out[sl] = (w - s + x).masked_fill_(rm, 0)
    return out


def check_sparsity_pattern(fn: str, sparsity, n_m) -> None:
    """The values of ``sparsity`` (in [0, 1)) and ``n_m`` (integers 0 <= N < M), each when given; shared by
    :func:`obs_prune` and :func:`~obc_lightning.compress.compress_model`, which checks before any work."""
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1
    ):
        raise ValueError(f"{fn}: sparsity must be a number in [0, 1), got {sparsity!r}")
    if n_m is None:
        return
    ok = isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in n_m)
    if not ok:
        raise ValueError(f"{fn}: n_m must be a pair of integers (N, M), got {n_m!r}")
    if not 0 <= n_m[0] < n_m[1]:
        raise ValueError(f"{fn}: n_m=(N, M) needs 0 <= N < M, got {n_m!r}")


def _check(matrix, hessian, sparsity, n_m, block_size, batch_size, method, group_index) -> None:
    fn = "obs_prune"
    check_problem(fn, matrix, hessian, 8, None)  # bits unused: 8 is always valid
    d = matrix.shape[1]
    if (sparsity is None) == (n_m is None):
        raise ValueError(f"{fn}: give exactly one of sparsity=... or n_m=(N, M), got {sparsity=!r}, {n_m=!r}")
    check_positive_int(fn, "block_size", block_size)
    check_positive_int(fn, "batch_size", batch_size)
    if method not in ("fast", "reference"):
        raise ValueError(f"{fn}: method must be 'fast' or 'reference', got {method!r}")
    check_sparsity_pattern(fn, sparsity, n_m)
    if sparsity is not None:
        if d % block_size:
            raise ValueError(f"{fn}: block_size={block_size} must divide the {d} columns")
        if group_index is not None:
            raise ValueError(f"{fn}: group_index is for n_m pruning only")
        return
    M = n_m[1]
    if block_size != 1:
        raise ValueError(f"{fn}: block_size applies to unstructured sparsity only, not to n_m")
    if group_index is None:
        if d % M:
            raise ValueError(f"{fn}: M={M} must divide the {d} columns of the matrix (or pass group_index)")
        return
    if not isinstance(group_index, Tensor) or group_index.shape != (d,) or group_index.is_floating_point():
        raise ValueError(f"{fn}: group_index must be an integer tensor of shape ({d},)")
    sizes = torch.bincount(group_index.long().cpu()) if bool((group_index >= 0).all()) else None
    if sizes is None or not bool((sizes == M).all()):
        raise ValueError(f"{fn}: group_index must put exactly M={M} columns in each group 0, 1, ...")


@torch.no_grad()
@fp32_matmul  # IEEE float32 products whatever torch.set_float32_matmul_precision says
def obs_prune(
    matrix: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 1,
    damp: float = 0.0,
    batch_size: int = 32,
    method: str = "fast",
    group_index: Tensor | None = None,
) -> PruneResult:
    """Prune ``matrix`` (rows x d) with OBS, given the layer Hessian (d x d); minimises the layer objective.

    Args:
        sparsity: unstructured: remove k = round(sparsity * rows * d) weights from the layer, as many per
            row as the global selection (:func:`select_levels`) finds cheapest. Weights already 0 count
            as removed; if there are more than k of them, none more is removed.
        n_m: (N, M): at most N non-zeros in each group of M consecutive inputs (NVIDIA's 2:4 is (2, 4));
            every group loses M - N weights (its zeros first). ``group_index`` (d,) overrides the groups,
            e.g. :func:`conv_nm_group_index` for a flattened conv weight.
        block_size: unstructured only: remove b consecutive inputs together (group OBS step); k is
            counted in blocks, round(sparsity * rows * d / b). Reference speed (one step per block).
        damp: the solver uses H_d = H + damp * mean(diag H) * I on the live inputs (escalated with a
            warning if not positive definite; ``result.damp``). Dead inputs (H_pp <= 1.4e-14 max diag H)
            are pruned first at no cost.
        batch_size: rows solved together (a speed knob; the result does not depend on it).
        method: ``"fast"`` (the deferred-downdate engine of ExactOBC) or ``"reference"`` (one rank-1
            downdate per step; the oracle).

    Returns:
        :class:`PruneResult`, ``pruned_matrix`` in ``matrix``'s dtype and device. ``loss`` per row is the
        objective 1/2 (p - w) H (p - w)^T with the caller's row w and undamped ``hessian`` (evaluated in
        float64, as for every solver); ``loss_trace`` holds the solver's cumulative step losses, with
        the damped H_d above restricted to the live inputs (dead rows/columns of H are 0 and stay 0).
        Symmetry of ``hessian`` and rows of extreme magnitude: as in
        :func:`~obc_lightning.solvers.obc.exact_obc`.
    """
    _check(matrix, hessian, sparsity, n_m, block_size, batch_size, method, group_index)
    dt = compute_dtype(matrix)
    H, unit = solver_hessian("obs_prune", hessian, dt)
    shape = tuple(matrix.shape)

    def solve(preps: list[PreparedHessian]) -> PruneResult:
        prep = preps[0]
        W = matrix.detach().to(dt).clone()
        W[:, prep.dead] = 0
        zero0 = W == 0  # already pruned, dead inputs included
        rows, d = W.shape
        # rows far from |w| ~ 1 are solved scaled by s_r (a power of two): weights scale by s_r, step
        # losses by s_r^2, the removal order not at all
        factors = row_factors(W)
        if factors is not None:
            W /= factors
        if n_m is None:
            return _trace(matrix, H, unit, damp, W, prep, factors, zero0, block_size, method, batch_size).at(sparsity)
        N, M = n_m
        group = (nm_group_index(d, M) if group_index is None else group_index.long()).to(W.device)
        quota = torch.full((rows, d // M), M - N, dtype=torch.long, device=W.device)
        P, removed, _, order, steps = _with_float64_retry(
            W, prep, lambda W_, p_: greedy_prune_rows(W_, p_, group, quota, d * (M - N) // M, method, batch_size)
        )
        mask = ~(removed | zero0)
        P.masked_fill_(~mask, 0)
        return _result(matrix, H, unit, _unscale(P, factors), mask, _unscale(steps, factors, 2).cumsum(dim=1),
                       order, prep)

    return solve_with_damping("obs_prune", [H], damp, [shape], solve)


@dataclass
class PruneTrace:
    """One unstructured OBS run of a matrix, every sparsity level from it (the OBC paper's database).

    Each row is pruned greedily to the end once, recording its removal order and step losses; level s
    takes k = round(s * rows * d / b) removals with the layer-wise global selection (:func:`select_levels`)
    and the kept weights from the closed form (:func:`compensate`). ``obs_prune(W, H, sparsity=s)`` is
    ``obs_prune_trace(W, H).at(s)``, bit for bit."""

    matrix: Tensor
    hessian: Tensor  # the caller's H, symmetrised, divided by ``unit``, compute dtype
    unit: float  # the caller's H is unit * hessian (see solver_hessian)
    damp: float  # the damping asked for
    W: Tensor  # rows divided by ``factors``, dead inputs zeroed
    prep: PreparedHessian
    factors: Tensor | None
    zero0: Tensor
    order: Tensor
    steps: Tensor  # (rows, d / b) step losses in the caller's units (damped H on the live inputs, times unit)
    block_size: int
    batch_size: int

    def removals(self, sparsity: float) -> int:
        """k: the units (weights, or blocks of ``block_size``) that level ``sparsity`` removes."""
        rows, d = self.W.shape
        return round(sparsity * rows * d / self.block_size)

    def levels(self, sparsity: float) -> Tensor:
        rows, d = self.W.shape
        b = self.block_size
        # units (weights or blocks) already all zero: removed first at no cost; a row never keeps them
        min_levels = self.zero0.view(rows, d // b, b).all(dim=2).sum(dim=1)
        return select_levels(self.steps, self.removals(sparsity), min_levels)

    def loss(self, sparsity: float) -> float:
        """The solver's loss at ``sparsity``: the sum of the selected step losses (without the closed-form
        solve; the damped H, where :attr:`PruneResult.loss` uses the caller's)."""
        return _total(self.steps, self.levels(sparsity))

    def at(self, sparsity: float) -> PruneResult:
        """The pruned matrix at ``sparsity``, as :func:`obs_prune` returns it."""
        rows, d = self.W.shape
        b = self.block_size
        levels = self.levels(sparsity)
        dev = self.W.device
        unit_removed = torch.zeros(rows, d // b, dtype=torch.bool, device=dev)
        unit_removed.scatter_(1, self.order, torch.arange(d // b, device=dev).unsqueeze(0) < levels.unsqueeze(1))
        removed = unit_removed.repeat_interleave(b, dim=1) | self.zero0

        def solve(preps: list[PreparedHessian]) -> tuple[Tensor, PreparedHessian]:
            return compensate(self.W, preps[0].hessian, removed, self.batch_size), preps[0]

        # the compensation factors principal submatrices of the damped H: if one breaks down, more damping
        # for it (warned), the removals staying those of the trace
        P, prep = solve_with_damping("obs_prune", [self.hessian], self.prep.damp, [tuple(self.matrix.shape)], solve,
                                     preps=[self.prep])
        trace = self.steps.cumsum(dim=1).to(self.W.dtype)
        return _result(self.matrix, self.hessian, self.unit, _unscale(P, self.factors), ~removed, trace, self.order,
                       prep)


def _trace(matrix, H, unit, damp, W, prep, factors, zero0, b, method, batch_size) -> PruneTrace:
    rows, d = W.shape
    if b == 1:
        trace_fn = lambda W_, p_: greedy_prune_rows(  # noqa: E731
            W_, p_, torch.zeros(d, dtype=torch.long, device=W.device),
            torch.full((rows, 1), d, dtype=torch.long, device=W.device), d, method, batch_size)[3:]
    else:
        trace_fn = lambda W_, p_: block_trace_rows(W_, p_, b, batch_size)  # noqa: E731
    order, steps = _with_float64_retry(W, prep, trace_fn)
    if factors is not None:  # the global selection compares rows: their step losses in the caller's units
        steps = steps.double() * factors.double().square()
    if unit != 1.0:  # and the caller's H (float64: a tiny or huge unit would leave float32's range)
        steps = steps.double() * unit
    return PruneTrace(matrix, H, unit, damp, W, prep, factors, zero0, order, steps, b, batch_size)


@torch.no_grad()
@fp32_matmul
def obs_prune_trace(
    matrix: Tensor,
    hessian: Tensor,
    *,
    block_size: int = 1,
    damp: float = 0.0,
    batch_size: int = 32,
    method: str = "fast",
) -> PruneTrace:
    """The unstructured OBS run of :func:`obs_prune` without a level: :meth:`PruneTrace.loss` and
    :meth:`PruneTrace.at` give every sparsity level from one greedy pass (arguments as :func:`obs_prune`)."""
    _check(matrix, hessian, 0.0, None, block_size, batch_size, method, None)
    dt = compute_dtype(matrix)
    H, unit = solver_hessian("obs_prune", hessian, dt)

    def solve(preps: list[PreparedHessian]) -> PruneTrace:
        prep = preps[0]
        W = matrix.detach().to(dt).clone()
        W[:, prep.dead] = 0
        zero0 = W == 0
        factors = row_factors(W)
        if factors is not None:
            W /= factors
        return _trace(matrix, H, unit, damp, W, prep, factors, zero0, block_size, method, batch_size)

    return solve_with_damping("obs_prune", [H], damp, [tuple(matrix.shape)], solve)


def _unscale(x: Tensor, factors: Tensor | None, power: int = 1) -> Tensor:
    """Rows solved divided by ``factors`` back in the caller's units (times factors ** power)."""
    if factors is None:
        return x
    return (x.double() * factors.double() ** power).to(x.dtype)  # s_r^2 may overflow float32 on its own


def _with_float64_retry(W: Tensor, prep: PreparedHessian, fn):
    """``fn(W, prep)``; rows whose step losses are not finite in float32 (the inverse lost positive
    definiteness in finite precision) are solved again in float64, with a warning."""
    out = list(fn(W, prep))
    steps = out[-1]
    broken = ~torch.isfinite(steps).all(dim=1)
    if W.dtype == torch.float64 or not bool(broken.any()):
        return out
    idx = broken.nonzero().squeeze(1)
    H64 = prep.hessian.double()
    what = "the float64 re-solve of rows that broke down in float32"
    prep64 = PreparedHessian(H64, torch.cholesky_inverse(checked_cholesky(H64, what=what)), prep.dead, prep.damp)
    redo = fn(W[idx].double(), prep64)
    if not bool(torch.isfinite(redo[-1]).all()):  # float64 could not carry it either: more damping
        raise HessianBreakdown(0, what)
    for o, r in zip(out, redo):
        o[idx] = r.to(o.dtype)
    warnings.warn(
        f"obs_prune: {len(idx)} of {W.shape[0]} rows of the {tuple(W.shape)} matrix broke down in {W.dtype} "
        "(ill-conditioned Hessian; consider damp > 0) and were solved again in float64",
        stacklevel=4,
    )
    return out


def _result(matrix, hessian, unit, P, mask, trace, order, prep) -> PruneResult:
    P = P.to(matrix.dtype)
    loss = objective("obs_prune", matrix, P, hessian, compute_dtype(matrix), unit)
    return PruneResult(pruned_matrix=P, mask=mask, loss=loss, loss_trace=trace, order=order, damp=prep.damp)


def magnitude_prune(matrix: Tensor, *, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
                    group_index: Tensor | None = None) -> Tensor:
    """Baseline: the keep mask of magnitude pruning (smallest |w| per layer, or per N:M group)."""
    rows, d = matrix.shape
    a = matrix.abs()
    if n_m is None:
        k = round(sparsity * rows * d)
        mask = torch.ones(rows * d, dtype=torch.bool, device=matrix.device)
        mask[torch.argsort(a.reshape(-1), stable=True)[:k]] = False
        return mask.view(rows, d)
    N, M = n_m
    g = nm_group_index(d, M) if group_index is None else group_index.long().cpu()
    perm = torch.argsort(g, stable=True).to(matrix.device)  # columns grouped: group i at [i*M, (i+1)*M)
    ranks = a[:, perm].view(rows, d // M, M).argsort(dim=2).argsort(dim=2)
    mask = torch.empty_like(a, dtype=torch.bool)
    mask[:, perm] = (ranks >= M - N).view(rows, d)
    return mask

