"""Uniform quantization grids: per output channel or per group of input columns.

A grid maps a weight w of row r, column c to the integer code
``k = clamp(round(w / s) + z, 0, 2**bits - 1)`` and back to ``s * (k - z)``, where the scale s and the
(rounded, integer-valued) zero point z belong to row r and to the group of column c. Zero is always on
the grid (the range is widened to contain 0), so pruned and dead weights stay exactly zero.

This module knows only torch: solvers take a fitted :class:`Grid` and never refit it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 8

# Scale search of the OBC / BRECQ recipe: shrink the range in 100 steps down to 20 % of it and keep, per
# row (or group), the range whose rounding error sum |q - w|^2.4 is smallest.
MSE_NORM = 2.4
MSE_STEPS = 100
MSE_MIN_RANGE = 0.2


# Rows with max|w| in [2^-ROW_EXPONENT, 2^ROW_EXPONENT] are solved as given. Every solver step is
# covariant under scaling a row by a power of two (codes unchanged, compensations and grid scaled by s,
# objective by s^2) but squares the weights: a row far outside this range overflows or underflows float32
# (|w| ~ 1e20: (q - w)^2 ~ 1e40). Such rows are solved divided by s_r = 2^e (exact), e the binary
# exponent of max|w_r| (the row then has max|w| in [1/2, 1)), and scaled back.
ROW_EXPONENT = 24


def row_factors(W: Tensor) -> Tensor | None:
    """(rows, 1) powers of two s_r for the rows of ``W`` with max|w| outside [2^-24, 2^24] (1 for the
    others), or None when every row is inside: solve on W / s_r, scale the grid (and the result) by s_r."""
    a = W.abs().amax(dim=1, keepdim=True)
    far = (a > 2.0**ROW_EXPONENT) | ((a < 2.0**-ROW_EXPONENT) & (a > 0))
    if not bool(far.any()):
        return None
    _, e = torch.frexp(a)
    one = torch.ones_like(a)
    return torch.where(far, torch.ldexp(one, e), one)


# the dtypes scales (and codebooks) may be rounded to: those a file stores them in
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_scale_dtype(who: str, name: str, dtype) -> None:
    """``ValueError`` naming ``who`` and the argument ``name`` unless ``dtype`` is None or a floating dtype
    of :data:`SCALE_DTYPES` (a bool or integer dtype would turn every scale into 1 or an integer)."""
    if dtype is not None and dtype not in SCALE_DTYPES:
        raise ValueError(
            f"{who}: {name} must be None or a floating dtype, one of "
            f"{', '.join(str(t) for t in SCALE_DTYPES)} (the scales are rounded to values it holds), got {dtype!r}"
        )


def check_bits(n_bits: int) -> None:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise ValueError(f"n_bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {n_bits!r}")


def check_group_size(group_size: int | None, cols: int) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if group_size > cols:
        raise ValueError(f"group_size={group_size} is larger than the number of input columns ({cols})")


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (as floats) of ``w`` on the grid (scale, zero); shapes broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (codes - zero)


def round_to_grid(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Nearest grid point of every entry of ``w`` (round-to-nearest quantization)."""
    return dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)


@dataclass
class Grid:
    """A fitted uniform grid for a (rows x cols) matrix.

    ``scales`` and ``zeros`` are (rows, n_groups); ``n_groups == 1`` for a per-channel grid, otherwise
    column c belongs to group ``c // group_size``.
    """

    scales: Tensor
    zeros: Tensor
    n_bits: int
    group_size: int | None
    cols: int
    symmetric: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.n_bits - 1

    @property
    def rows(self) -> int:
        return self.scales.shape[0]

    def column_groups(self, device=None) -> Tensor:
        """Group index of every column, shape (cols,)."""
        cols = torch.arange(self.cols, device=device if device is not None else self.scales.device)
        return cols // self.group_size if self.group_size is not None else torch.zeros_like(cols)

    def per_column(self) -> tuple[Tensor, Tensor]:
        """(scale, zero) of every entry, each (rows, cols)."""
        if self.group_size is None:
            return (self.scales.expand(-1, self.cols), self.zeros.expand(-1, self.cols))
        g = self.column_groups()
        return self.scales[:, g], self.zeros[:, g]

    def codes(self, w: Tensor) -> Tensor:
        s, z = self.per_column()
        return quantize_codes(w, s, z, self.maxq).to(torch.int32)

    def dequantize(self, codes: Tensor) -> Tensor:
        s, z = self.per_column()
        return dequantize(codes.to(s.dtype), s, z)

    def round(self, w: Tensor) -> Tensor:
        """Round-to-nearest on this grid."""
        s, z = self.per_column()
        return round_to_grid(w, s, z, self.maxq)

    def select_rows(self, keep: Tensor, other: Grid) -> Grid:
        """Rows where ``keep`` is True from self, the others from ``other`` (same layout)."""
        k = keep.view(-1, 1)
        return Grid(
            torch.where(k, self.scales, other.scales),
            torch.where(k, self.zeros, other.zeros),
            self.n_bits,
            self.group_size,
            self.cols,
            self.symmetric,
        )

    def to(self, device=None, dtype=None) -> Grid:
        return Grid(
            self.scales.to(device=device, dtype=dtype),
            self.zeros.to(device=device, dtype=dtype),
            self.n_bits,
            self.group_size,
            self.cols,
            self.symmetric,
        )


def _range_params(xmin: Tensor, xmax: Tensor, maxq: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and rounded zero point of the range [xmin, xmax] (which contains 0)."""
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


# elements of one (candidates x rows x cols) block of the scale search: a few such temporaries at a time
MSE_BLOCK_ELEMENTS = 1 << 23


def _mse_search(w, xmin, xmax, scale, zero, maxq, symmetric):
    """Per row of ``w``, the first shrink factor p (1 ... 0.2) of minimal sum |round(w) - w|^2.4.

    Candidates are evaluated many at once, a (P, rows, cols) block per ~20 ops instead of ~20 ops per
    candidate (on a GPU each op is a launch); each candidate's error is computed exactly as for one
    candidate alone, and the first minimum wins, as in a loop with a strict ``<``.
    """
    ps = torch.linspace(1.0, MSE_MIN_RANGE, MSE_STEPS).tolist()
    per = max(1, min(len(ps), MSE_BLOCK_ELEMENTS // max(1, w.numel())))
    best = torch.full_like(scale, float("inf"))
    for i in range(0, len(ps), per):
        p = torch.tensor(ps[i : i + per], dtype=w.dtype, device=w.device).view(-1, 1, 1)  # (P, 1, 1)
        s1, z1 = _range_params(p * xmin, p * xmax, maxq, symmetric)  # (P, rows, 1)
        err = (round_to_grid(w, s1, z1, maxq) - w).abs_().pow_(MSE_NORM).sum(dim=2, keepdim=True)
        e, k = err.min(dim=0)  # first index of the minimum (rows, 1)
        better = e < best
        best = torch.where(better, e, best)
        scale = torch.where(better, s1.gather(0, k.unsqueeze(0)).squeeze(0), scale)
        zero = torch.where(better, z1.gather(0, k.unsqueeze(0)).squeeze(0), zero)
    return scale, zero


@torch.no_grad()
def fit_grid(
    matrix: Tensor,
    n_bits: int = 4,
    *,
    symmetric: bool = False,
    mse: bool = True,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = None,
) -> Grid:
    """Fit a uniform grid to ``matrix`` (rows x cols), per row or per group of ``group_size`` columns.

    min-max: the range [min(w, 0), max(w, 0)]; with ``mse=True`` that range is shrunk by factors
    p = 1 ... 0.2 (100 steps) and, per row / group, the p minimising sum |round(w) - w|^2.4 is kept.
    ``scale_dtype`` (e.g. ``torch.float16``): round the chosen scales to values that dtype represents
    (kept in the matrix's dtype), so a file storing them in that dtype holds exactly this grid; a scale
    the dtype cannot hold (underflow to 0, overflow) stays unrounded. Rows with max|w| outside
    [2^-24, 2^24] are fitted divided by a power of two (:func:`row_factors`) and their scales scaled
    back: the grid of ``s * w`` is exactly ``s`` times the grid of ``w`` for any power of two s.
    """
    check_bits(n_bits)
    check_scale_dtype("fit_grid", "scale_dtype", scale_dtype)
    if matrix.dim() != 2:
        raise ValueError(f"fit_grid expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    rows, cols = matrix.shape
    check_group_size(group_size, cols)
    maxq = 2**n_bits - 1
    factors = row_factors(matrix)  # |w| ~ 1e20 would overflow the error search: fit rows scaled, exactly
    w = matrix if factors is None else matrix / factors
    if group_size is not None:
        n_groups = -(-cols // group_size)
        pad = n_groups * group_size - cols
        # zero padding is exact: 0 is inside every range and always rounds to 0
        w = torch.nn.functional.pad(w, (0, pad)).reshape(rows * n_groups, group_size)
    else:
        n_groups = 1

    xmin = torch.clamp(w.amin(dim=1, keepdim=True), max=0)
    xmax = torch.clamp(w.amax(dim=1, keepdim=True), min=0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = _range_params(xmin, xmax, maxq, symmetric)

    if mse:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, maxq, symmetric)

    scale = scale.reshape(rows, n_groups)
    if factors is not None:
        scale = scale * factors
    if scale_dtype is not None:
        scale = round_scales(scale, scale_dtype)

    return Grid(
        scale,
        zero.reshape(rows, n_groups),
        n_bits,
        group_size,
        cols,
        symmetric,
    )


def round_scales(scale: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """Scales rounded to values ``scale_dtype`` holds (kept in their dtype), where the rounded value is
    finite and > 0; the others stay as they are (a file in that dtype cannot store them)."""
    rounded = scale.to(scale_dtype).to(scale.dtype)
    return torch.where(torch.isfinite(rounded) & (rounded > 0), rounded, scale)


def round_to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to values ``dtype`` holds (in t's dtype), where they are finite in it."""
    r = t.to(dtype).to(t.dtype)
    return torch.where(torch.isfinite(r), r, t)


@dataclass
class MixedGrid:
    """DiffQ's evaluation grid: per row one range [lo, hi], per group of ``group_size`` consecutive
    columns of the row its own bit width b (integer-valued; the last group may be shorter).

        Δ = (hi − lo) / (2^b − 1),   k = clamp(round((w − lo) / Δ), 0, 2^b − 1),   q = lo + k · Δ

    A row with hi == lo (Δ = 0) has every code 0 and every value lo. ``lo`` / ``hi`` are (rows, 1),
    ``bits`` (rows, n_groups); all three in the weight's dtype.
    """

    lo: Tensor
    hi: Tensor
    bits: Tensor
    group_size: int
    cols: int

    @classmethod
    def from_weight(cls, w: Tensor, bits: Tensor, group_size: int, range_dtype: torch.dtype | None = None):
        """The grid of the (rows, cols) matrix ``w``: its row minima and maxima, rounded to ``range_dtype``
        (the dtype a file stores them in; None, or beyond that dtype's range: kept as they are), and the
        given group bit widths."""
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        if range_dtype is not None:
            lo, hi = (round_to_dtype(t, range_dtype) for t in (lo, hi))
        return cls(lo, hi, bits.to(w.dtype), group_size, w.shape[1])

    def per_column_bits(self) -> Tensor:
        """(rows, cols): the bit width of every entry's group."""
        g = torch.arange(self.cols, device=self.bits.device) // self.group_size
        return self.bits[:, g]

    def _step(self) -> tuple[Tensor, Tensor]:
        """(Δ, 2^b − 1) of every entry, each (rows, cols)."""
        maxq = 2 ** self.per_column_bits() - 1
        return (self.hi - self.lo) / maxq, maxq

    def codes(self, w: Tensor) -> Tensor:
        """int32 codes (rows, cols); entries outside [lo, hi] (a range rounded to its storage dtype) clamp."""
        delta, maxq = self._step()
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))
        k = torch.clamp(torch.round((w - self.lo) / safe), torch.zeros_like(maxq), maxq)
        return torch.where(delta > 0, k, torch.zeros_like(k)).to(torch.int32)

    def dequantize(self, codes: Tensor) -> Tensor:
        delta, _ = self._step()
        return self.lo + codes.to(delta.dtype) * delta

    def to(self, device=None, dtype=None) -> MixedGrid:
        lo, hi, bits = (t.to(device=device, dtype=dtype) for t in (self.lo, self.hi, self.bits))
        return MixedGrid(lo, hi, bits, self.group_size, self.cols)


@dataclass
class MixedResult:
    """A DiffQ-quantized matrix: ``quantized_matrix == grid.dequantize(codes)``, codes (rows, d) int32,
    the grid's widths integers in [min_bits, max_bits]; ``range_dtype`` is the dtype its ranges were
    rounded to (the one to store them in)."""

    quantized_matrix: Tensor
    codes: Tensor
    grid: MixedGrid
    range_dtype: torch.dtype
    min_bits: int
    max_bits: int
