"""What every solver shares: input checks, the result type, Hessian preparation, the layer objective."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obc_lightning.checks import check_nonnegative
from obc_lightning.grids import ROW_EXPONENT, Grid, check_bits, check_group_size, fit_grid, row_factors  # noqa: F401


class HessianDampingWarning(UserWarning):
    """The Hessian was not positive definite at the requested damping; more damping was used."""


@dataclass
class QuantResult:
    """A quantized matrix with its grid.

    ``quantized_matrix == scales * (codes - rounded_zeros)`` entry by entry, with ``scales`` and
    ``rounded_zeros`` of shape (rows, n_groups) expanded over each group of columns (n_groups == 1 for a
    per-channel grid). ``loss`` is per row: 1/2 (q - w) H (q - w)^T with the caller's matrix and undamped
    Hessian, evaluated in float64 (:func:`objective`), the same in every solver.
    """

    quantized_matrix: Tensor
    scales: Tensor
    rounded_zeros: Tensor
    codes: Tensor
    loss: Tensor
    grid: Grid
    damp: float = 0.0
    solver_rows: dict[str, int] = field(default_factory=dict)


def check_problem(fn: str, matrix: Tensor, hessian: Tensor, n_bits: int, group_size: int | None) -> None:
    """Clear ``ValueError`` for any input the solvers cannot take."""
    if not isinstance(matrix, Tensor) or not isinstance(hessian, Tensor):
        raise ValueError(f"{fn}: matrix and hessian must be torch tensors")
    if matrix.dim() != 2:
        raise ValueError(f"{fn}: matrix must be 2-D (rows x cols), got shape {tuple(matrix.shape)}")
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"{fn}: matrix is empty, shape {tuple(matrix.shape)}")
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"{fn}: hessian must be (cols x cols) = ({cols}, {cols}) for a matrix of shape "
            f"{tuple(matrix.shape)}, got {tuple(hessian.shape)}"
        )
    if not matrix.is_floating_point() or not hessian.is_floating_point():
        raise ValueError(f"{fn}: matrix and hessian must be floating point, got {matrix.dtype} and {hessian.dtype}")
    if matrix.device != hessian.device:
        raise ValueError(f"{fn}: matrix is on {matrix.device} but hessian on {hessian.device}")
    check_bits(n_bits)
    check_group_size(group_size, cols)
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{fn}: matrix of shape {tuple(matrix.shape)} contains NaN or Inf")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{fn}: hessian of shape {tuple(hessian.shape)} contains NaN or Inf")


# A Hessian 2/N X^T X is symmetric; two summation orders of the same n products differ by at most
# ~ n * eps * max|H|, typically ~ sqrt(n) * eps * max|H| (tests/test_numbers.py: float32 sums over 64
# batches in opposite orders differ by < 1e-5 max|H|). Asymmetry beyond this fraction of max|H| (at least
# 4 eps of the given dtype, for float16 / bfloat16 Hessians) is not rounding: the matrix is something else
# (X^T Y, a transposed factor).
HESSIAN_SYMMETRY_TOL = 1e-3


def symmetric_hessian(fn: str, hessian: Tensor, dtype: torch.dtype) -> Tensor:
    """``hessian`` in ``dtype``, exactly symmetric: (H + H^T) / 2.

    The objective 1/2 (q - w) H (q - w)^T depends on the symmetric part of H only, so replacing H by
    (H + H^T) / 2 changes no objective value; the solvers (Cholesky, OBS steps) read one triangle and
    need it. A symmetric H is returned unchanged, bit for bit. ``ValueError`` naming ``fn`` when
    max|H - H^T| > tol * max|H|, tol = max(HESSIAN_SYMMETRY_TOL, 4 eps(hessian.dtype)): that is not float
    rounding of a symmetric X^T X.
    """
    H = hessian.detach().to(dtype)
    asym = (H - H.mT).abs().amax() if H.numel() else torch.zeros((), dtype=dtype)
    if not bool(asym > 0):
        return H
    scale = H.abs().amax()
    tol = max(HESSIAN_SYMMETRY_TOL, 4 * torch.finfo(hessian.dtype).eps)
    rel = float(asym / scale)
    if rel > tol:
        raise ValueError(
            f"{fn}: hessian of shape {tuple(hessian.shape)} is not symmetric: max|H - H^T| = {float(asym):.3g} is "
            f"{rel:.3g} of max|H| = {float(scale):.3g}, beyond the {tol:g} that float rounding of a symmetric "
            "X^T X can explain; pass the Hessian 2/N X^T X of the layer's inputs"
        )
    return H * 0.5 + H.mT * 0.5  # elementwise a + b == b + a: exactly symmetric


def rows_on_their_grid(matrix: Tensor, dtype: torch.dtype, dead: Tensor, n_bits: int, *, symmetric: bool,
                       mse: bool, group_size: int | None) -> tuple[Tensor, Grid, Tensor | None]:
    """(W, grid, factors) that a grid solver starts from: ``matrix`` in ``dtype`` with its dead inputs set
    to 0, rows far from |w| ~ 1 divided by a power of two (:func:`row_factors`, None if none is), and the
    grid fitted to those rows (:func:`scaled_grid` gives it back for the caller's rows)."""
    W = matrix.detach().to(dtype).clone()
    W[:, dead] = 0
    factors = row_factors(W)
    if factors is not None:
        W /= factors
    return W, fit_grid(W, n_bits, symmetric=symmetric, mse=mse, group_size=group_size), factors


def scaled_grid(grid: Grid, factors: Tensor | None) -> Grid:
    """The grid of the rows scaled back by :func:`row_factors` (scales times s_r; codes and zero points
    are unchanged by the scaling)."""
    if factors is None:
        return grid
    f = factors.to(grid.scales.dtype)
    return Grid(grid.scales * f, grid.zeros, grid.n_bits, grid.group_size, grid.cols, grid.symmetric)


def objective(fn: str, matrix: Tensor, quantized: Tensor, hessian: Tensor, dtype: torch.dtype,
              unit: float = 1.0) -> Tensor:
    """The reported ``loss`` of every solver: per row 1/2 (q - w) H (q - w)^T with the caller's ``matrix``
    w, the returned ``quantized`` q and the caller's (symmetrised, undamped) ``hessian``, evaluated in
    float64 (a float32 product loses digits to cancellation when q - w is nearly in the null space of a
    rank-deficient H, which is where the solvers push it) and rounded once to ``dtype``. ``unit``: the
    caller's H is ``unit * hessian`` (:func:`solver_hessian`). Warns when a row's value lies beyond
    ``dtype``'s range (inf, or a positive value that rounds to 0)."""
    f = layer_objective(matrix.to(torch.float64), quantized.to(torch.float64), hessian.to(torch.float64))
    return loss_in(fn, f * unit if unit != 1.0 else f, dtype)


def loss_in(fn: str, f: Tensor, dtype: torch.dtype) -> Tensor:
    """The float64 objective ``f`` rounded to ``dtype``, with the warning of :func:`objective`."""
    out = f.to(dtype)
    lost = (torch.isinf(out) & torch.isfinite(f)) | ((out == 0) & (f != 0))
    if bool(lost.any()):
        warnings.warn(
            f"{fn}: the objective of {int(lost.sum())} of {f.shape[0]} rows (up to {float(f.abs().max()):.3g}) "
            f"is beyond the range of {str(dtype).removeprefix('torch.')}, so their loss reads inf or 0 (the "
            "result itself is not affected); pass a float64 matrix for finite losses",
            stacklevel=4,
        )
    return out


def compute_dtype(matrix: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is solved in float32."""
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


# Relative damping tried, in order, after the requested one fails (factor of mean(diag H)).
DAMP_ESCALATION = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class PreparedHessian:
    """H with dead inputs isolated and damping added, its inverse, and what was done to get there."""

    hessian: Tensor  # (d, d) damped, dead rows/cols replaced by the identity
    inverse: Tensor  # (d, d)
    dead: Tensor  # (d,) bool: dead inputs (see isolate_dead_inputs)
    damp: float  # relative damping actually used


# An input whose Hessian diagonal H_pp = 2/N sum x_p^2 is at most this fraction of the largest diagonal
# is dead: its RMS is below float32's resolution (eps = 2^-23) of the largest input's RMS, so a weight of
# ordinary size on it moves the layer's float32 output by less than its rounding. Relative, so the rule
# does not depend on the scale of the activations (an input that is always 0 is dead at every scale).
DEAD_INPUT_TOL = torch.finfo(torch.float32).eps ** 2
# Every X^T X has |H_ij| <= sqrt(H_ii H_jj) (Cauchy-Schwarz). Computed with bfloat16 products it misses by
# up to ~3 * 2^-8 of sqrt(H_ii H_jj) (the product_dtype note of collect_hessians), with float32 products by
# far less: a pair beyond (1 + 2^-5) sqrt(H_ii H_jj), an input counted dead (H_ii below DEAD_INPUT_TOL *
# max diag) included, is not a covariance, and every solver refuses it (:func:`check_covariance`).
# (Its smallest eigenvalue is no such test: bfloat16 products of correlated inputs reach -0.1 max diag.)
CAUCHY_SCHWARZ_TOL = 2.0**-5
# Hessians are solved divided by a power of 4 when max diag(H) lies outside [4^-16, 4^16] (float32 holds
# 1e-38 ... 3e38 and the solvers square and invert H): every solver is invariant to H -> c H, and a power
# of 4 keeps the arithmetic exact, square roots included, so the solve is that of the scaled problem.
HESSIAN_EXPONENT_RANGE = 16


def hessian_unit(hessian: Tensor) -> float:
    """4^k with max diag(H) / 4^k in [1, 4), or 1 when max diag(H) is within [4^-16, 4^16] (or <= 0).

    ``hessian`` (..., d, d): one unit for all the matrices of a batch (a conv's groups)."""
    if hessian.numel() == 0:
        return 1.0
    top = float(torch.diagonal(hessian, dim1=-2, dim2=-1).amax())
    if not (top > 0 and math.isfinite(top)) or 4.0**-HESSIAN_EXPONENT_RANGE <= top <= 4.0**HESSIAN_EXPONENT_RANGE:
        return 1.0
    k = math.floor(math.log2(top) / 2)
    return math.ldexp(1.0, 2 * k)


def solver_hessian(fn: str, hessian: Tensor, dtype: torch.dtype) -> tuple[Tensor, float]:
    """(H / unit in ``dtype``, unit): the caller's Hessian as every solver takes it.

    Divided by :func:`hessian_unit` in its own precision (exact: a power of 4) before it is rounded to
    ``dtype``, so that activations of any scale give the same problem; symmetrised
    (:func:`symmetric_hessian`) and checked to be a covariance (:func:`check_covariance`). Losses computed
    with the returned matrix are in units of ``unit``: :func:`objective` takes it to report the caller's."""
    unit = hessian_unit(hessian.detach())
    H = symmetric_hessian(fn, hessian.detach() if unit == 1.0 else hessian.detach() / unit, dtype)
    check_covariance(fn, H)
    return H, unit


def check_covariance(fn: str, hessian: Tensor) -> None:
    """``ValueError`` naming ``fn`` for a Hessian that no 2/N X^T X can be, even with rounding: a diagonal
    entry below -t, or a pair with |H_ij| > (1 + CAUCHY_SCHWARZ_TOL) sqrt((H_ii + t)(H_jj + t)),
    t = DEAD_INPUT_TOL * max diag(H) (so an input whose diagonal is 0 may not couple to any other). O(d^2).
    A Hessian that passes but is not positive definite is damped (:func:`prepare_hessian`)."""
    diag = torch.diagonal(hessian)
    if diag.numel() == 0:
        return
    t = DEAD_INPUT_TOL * max(float(diag.amax()), 0.0)
    low = diag < -t
    if bool(low.any()):
        p = int(low.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: hessian of shape {tuple(hessian.shape)} is not positive semi-definite: H[{p}, {p}] = "
            f"{float(diag[p]):.3g} < 0, while a Hessian 2/N X^T X has H_pp = 2/N sum x_p^2 >= 0; pass the Hessian "
            "of the layer's inputs"
        )
    s = (diag + t).clamp_min(0).sqrt()
    bad = hessian.abs() > torch.outer(s, s).mul_(1 + CAUCHY_SCHWARZ_TOL)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: hessian of shape {tuple(hessian.shape)} is not positive semi-definite: |H[{i}, {j}]| = "
            f"{float(hessian[i, j].abs()):.3g} exceeds sqrt(H[{i}, {i}] H[{j}, {j}]) = "
            f"{float((diag[i] * diag[j]).clamp_min(0).sqrt()):.3g} (every X^T X has H_ij^2 <= H_ii H_jj: an input "
            "that is always 0 has H_ii = 0 and no coupling); pass the Hessian 2/N X^T X of the layer's inputs"
        )


def isolate_dead_inputs(hessian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(H', dead, mean diag): a copy of H in which every dead input (H_pp <= DEAD_INPUT_TOL * max diag H)
    has H'[p, p] = 1 and no coupling, the mask of those inputs, and the mean diagonal of the live ones (a
    0-d tensor, 1 when none is live). The damping scale of every solve on H."""
    H = hessian.clone()
    diag = torch.diagonal(H)
    top = diag.amax().clamp_min(0) if diag.numel() else torch.zeros((), dtype=H.dtype, device=H.device)
    dead = diag <= DEAD_INPUT_TOL * top
    live = diag[~dead]
    mean_diag = live.mean() if live.numel() else torch.ones((), dtype=H.dtype, device=H.device)
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    return H, dead, mean_diag


class HessianBreakdown(ArithmeticError):
    """A factorization of a prepared (damped) Hessian failed in float64 too, or rows broke down in
    float64: :func:`solve_with_damping` solves again with the next damping. Never reaches the user."""

    def __init__(self, problem: int = 0, what: str = "a factorization"):
        super().__init__(f"problem {problem}: {what}")
        self.problem, self.what = problem, what


def checked_cholesky(A: Tensor, *, upper: bool = False, problem: int = 0, what: str = "a Cholesky factorization"
                     ) -> Tensor:
    """The Cholesky factor of ``A`` (a matrix or a batch), retried in float64 (returned in A's dtype) if
    it fails in A's; :class:`HessianBreakdown` of ``problem`` if it fails in float64 too."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if not bool((info != 0).any()) and bool(torch.isfinite(L).all()):
        return L
    if A.dtype != torch.float64:
        L, info = torch.linalg.cholesky_ex(A.double(), upper=upper)
        L = L.to(A.dtype)
        if not bool((info != 0).any()) and bool(torch.isfinite(L).all()):
            return L
    raise HessianBreakdown(problem, what)


def solve_with_damping(fn: str, hessians: list[Tensor], damp: float, shapes: list[tuple[int, ...]], solve,
                       preps: list[PreparedHessian] | None = None):
    """``solve(preps)``, ``preps[l]`` = :func:`prepare_hessian` of ``hessians[l]`` at ``damp``: the one
    damping mechanism of every solver. A Hessian that is not positive definite at a damping (its
    Cholesky fails), or on which a later factorization or the float64 re-solve of broken rows fails
    (:class:`HessianBreakdown`), gets the next damping of :data:`DAMP_ESCALATION` and the solve runs
    again; one :class:`HessianDampingWarning` per escalated problem names the damping used.
    ``preps``: start from these (prepared at ``damp``)."""
    if preps is None:
        preps = [prepare_hessian(H, damp, fn=fn, matrix_shape=s, warn=False) for H, s in zip(hessians, shapes)]
    preps = list(preps)
    reasons: dict[int, str] = {}
    while True:
        try:
            out = solve(preps)
            break
        except HessianBreakdown as e:
            p = e.problem
            reasons[p] = f"{e.what} broke down at damp={preps[p].damp:g}"
            preps[p] = prepare_hessian(hessians[p], damp, fn=fn, matrix_shape=shapes[p], warn=False,
                                       above=preps[p].damp)
    for p, prep in enumerate(preps):
        if prep.damp != damp:
            H = hessians[p]
            warnings.warn(
                f"{fn}: the Hessian ({H.shape[0]}x{H.shape[1]}) of the matrix of shape {tuple(shapes[p])} is not "
                f"positive definite enough at damp={damp:g} ({reasons.get(p, 'its Cholesky factorization failed')}); "
                f"used damp={prep.damp:g} x mean(diag H) instead",
                HessianDampingWarning,
                stacklevel=3,
            )
    return out


def prepare_hessian(hessian: Tensor, damp: float, *, fn: str, matrix_shape: tuple[int, ...], warn: bool = True,
                    above: float | None = None) -> PreparedHessian:
    """Damp H by ``damp * mean(diag H)``, isolate dead inputs, invert; escalate damping if H is not PD.

    A dead input (H_pp <= DEAD_INPUT_TOL * max diag H: always 0, or below float32's resolution of the
    largest input) gets H[p, p] = 1 and no coupling, so its weight is set to 0 at no cost and never moves
    another weight. ``above``: a damping at which a later factorization broke down, only larger ones are
    tried (:func:`solve_with_damping`). ``warn``: warn here when the damping was escalated
    (:func:`solve_with_damping` warns itself).
    """
    check_nonnegative(fn, "damp", damp)
    H, dead, mean_diag = isolate_dead_inputs(hessian)
    if not (mean_diag > 0):
        raise ValueError(
            f"{fn}: hessian of shape {tuple(hessian.shape)} has a non-positive mean diagonal "
            f"({float(mean_diag):.3g}); it is not a covariance (X^T X) matrix"
        )
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    levels = [float(damp)] + [x for x in DAMP_ESCALATION if x > damp]
    if above is not None:
        levels = [x for x in levels if x > above]
    for d in levels:
        Hd = H + (d * mean_diag) * eye if d > 0 else H
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            if torch.isfinite(Hinv).all():
                if d != damp and warn:
                    warnings.warn(
                        f"{fn}: the Hessian ({H.shape[0]}x{H.shape[1]}) of the matrix of shape "
                        f"{tuple(matrix_shape)} is not positive definite at damp={damp:g}; "
                        f"used damp={d:g} x mean(diag H) instead",
                        HessianDampingWarning,
                        stacklevel=3,
                    )
                return PreparedHessian(Hd, Hinv, dead, d)
    raise ValueError(
        f"{fn}: the Hessian ({H.shape[0]}x{H.shape[1]}) of the matrix of shape {tuple(matrix_shape)} "
        f"could not be made positive definite even with damp={DAMP_ESCALATION[-1]:g}"
    )


def masked_inverses(hessian: Tensor, zero_mask: Tensor, problem: int = 0) -> Tensor:
    """Per-row inverses of H with the rows' pruned inputs removed, shape (rows, d, d).

    For a row whose weights in ``zero_mask`` must stay 0, the free weights see the principal submatrix
    of H on the other inputs; embedding its inverse with 1 on the pruned diagonal keeps the pruned
    weights fixed (their column of H^-1 is the unit vector, so no compensation reaches them). Factored
    by :func:`checked_cholesky` (a breakdown is ``problem``'s).
    """
    H = hessian.unsqueeze(0).repeat(zero_mask.shape[0], 1, 1)
    z = zero_mask
    H.masked_fill_(z.unsqueeze(2) | z.unsqueeze(1), 0)
    H.diagonal(dim1=1, dim2=2).masked_fill_(z, 1)
    return torch.cholesky_inverse(checked_cholesky(H, problem=problem, what="a masked inverse"))


def layer_objective(matrix: Tensor, quantized: Tensor, hessian: Tensor) -> Tensor:
    """Per row: 1/2 (q - w) H (q - w)^T, the increase of the layer's squared output error."""
    delta = (quantized - matrix).to(hessian.dtype)
    return 0.5 * ((delta @ hessian) * delta).sum(dim=1)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the solvers may use for their working set: half the free GPU memory, 1 GiB on CPU.

    Free GPU memory counts what PyTorch's caching allocator holds but does not use (reserved minus
    allocated): the solvers' tensors are served from that cache first."""
    if device.type == "cuda":
        return int(cuda_free_bytes(device) * 0.5)
    return 1 << 30


def cuda_free_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can get: free on the device plus cached but unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


# ------------------------------------------------------------------ rows of several layers, working sets
def layer_index(counts: list[int], device) -> Tensor:
    """(sum counts,) the layer of every row, for rows stacked layer after layer (counts[l] rows each)."""
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))


def row_bounds(counts: list[int]) -> list[tuple[int, int]]:
    """Row ranges [a, b) of the layers stacked with ``counts`` rows each."""
    out, a = [], 0
    for n in counts:
        out.append((a, a + n))
        a += n
    return out


def default_block_size(d: int) -> int:
    """Steps between flushes. Per step the pending correction U U[p]^T reads ~n B / 2 values per row,
    a flush reads and writes the n x n inverse (2 n^2 / B per step): balanced at B ~ 2 sqrt(n)."""
    return int(min(256, max(16, round(2 * d**0.5 / 16) * 16)))
