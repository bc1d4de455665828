"""Quantization-aware fine-tuning: weight parametrizations that train through a quantizer.

Three modes, one small ``nn.Module`` each, registered with
:func:`torch.nn.utils.parametrize.register_parametrization` on a layer's ``weight``. The latent float
weight stays the *same* ``nn.Parameter`` object (``module.parametrizations.weight.original``), so an
optimizer that already holds it keeps its state; the parametrization's own parameters (TTQ scales,
DiffQ bit logits) are new and must be added to the optimizer (:func:`add_param_group`).

* :class:`STEQuantizer`: fake quantization on a fixed OBC grid, straight-through gradient in the clip
  range (Bengio et al. 2013; the grid comes from :func:`~obc_lightning.compress.compress_model`).
* :class:`TernaryQuantizer`: trained ternary quantization (TTQ; Zhu, Han, Mao, Dally 2017).
* :class:`NoiseQuantizer`: differentiable bit widths through pseudo-quantization noise
  (DiffQ; Défossez, Adi, Synnaeve 2021).
* :class:`CentroidQuantizer`: product-quantized weights with the assignments fixed and the codebook
  trained (iPQ; Stock et al. 2020), optionally with quantization noise (Fan et al. 2020).

In training mode each quantizer returns the differentiable surrogate; in eval mode (and therefore in
:func:`finalize`, which removes the parametrization in eval mode with ``leave_parametrized=True``) the
true quantized weight. Each quantizer gives the storage format its final weight is in
(``weight_format``, an instance of a :mod:`obc_lightning.formats.schemes` class, which
:meth:`FinetuneSession.finish` records on the module) and its size through that scheme's size formula
(``storage_bits``). This module knows only torch (no Lightning); the callback is the glue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from obc_lightning.checks import check_fraction, check_positive_int, is_number
from obc_lightning.formats.record import drop_format, format_of, set_format
from obc_lightning.formats.schemes import (
    MixedScheme,
    PQScheme,
    ScalarScheme,
    SparseMaskScheme,
    StorageScheme,
    pq_code_bits,
)
from obc_lightning.grids import Grid, MixedGrid, MixedResult, round_to_dtype, round_to_grid
from obc_lightning.solvers.common import QuantResult
from obc_lightning.solvers.pq import PQResult

MODES = ("ste", "ternary", "noise", "masked", "pq")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _rows(w: Tensor) -> Tensor:
    """A Linear / Conv weight as the (out_channels, fan_in) matrix the grids are defined on."""
    return w.reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------- STE
class STEQuantizer(nn.Module):
    r"""Fake quantization on a fixed grid (scales s, zeros z per row or per row and group).

    forward (eval):  q(w) = s · (clamp(round(w / s) + z, 0, maxq) − z)      (hard rounding on the grid)
    forward (train): the same value, with the straight-through gradient
                     ∂q/∂w = 1  if  s·(0 − z) ≤ w ≤ s·(maxq − z)  (inside the clip range, bounds included)
                           = 0  otherwise                              (clipped weights get no gradient)
    """

    def __init__(
        self, scales: Tensor, zeros: Tensor, n_bits: int, group_size: int | None, cols: int, symmetric: bool = False
    ) -> None:
        super().__init__()
        if scales.shape != zeros.shape or scales.dim() != 2:
            raise ValueError(
                f"STEQuantizer: scales and zeros must both be (rows, n_groups), got {tuple(scales.shape)} "
                f"and {tuple(zeros.shape)}"
            )
        self.register_buffer("scales", scales.detach().clone())  # (rows, n_groups)
        self.register_buffer("zeros", zeros.detach().clone())
        self.n_bits, self.group_size, self.cols, self.symmetric = int(n_bits), group_size, int(cols), bool(symmetric)

    @classmethod
    def from_format(cls, fmt: ScalarScheme, cols: int) -> STEQuantizer:
        """The grid a module's weight is on (its recorded format, :mod:`obc_lightning.formats.record`)."""
        return cls(fmt.scales, fmt.zeros, fmt.bits, fmt.group_size, cols, fmt.symmetric)

    @classmethod
    def from_results(cls, results: Sequence[QuantResult]) -> STEQuantizer:
        """The grid of a module from its ``compress_model(..., keep_results=True)`` results (one per conv
        group; their rows are stacked in the weight's order)."""
        grids = [r.grid for r in results]
        g0 = grids[0]
        return cls(
            torch.cat([g.scales for g in grids]),
            torch.cat([g.zeros for g in grids]),
            g0.n_bits,
            g0.group_size,
            g0.cols,
            g0.symmetric,
        )

    @property
    def maxq(self) -> int:
        return 2**self.n_bits - 1

    def per_entry(self) -> tuple[Tensor, Tensor]:
        """(scale, zero) of every weight, each (rows, cols)."""
        if self.group_size is None or self.scales.shape[1] == 1:
            return self.scales.expand(-1, self.cols), self.zeros.expand(-1, self.cols)
        g = torch.arange(self.cols, device=self.scales.device) // self.group_size
        return self.scales[:, g], self.zeros[:, g]

    def forward(self, w: Tensor) -> Tensor:
        w2 = _rows(w)
        s, z = self.per_entry()
        s, z = s.to(w2.dtype), z.to(w2.dtype)
        q = round_to_grid(w2, s, z, self.maxq)
        if not self.training:
            return _masked(self, q.view_as(w))
        inside = (w2 >= s * (0 - z)) & (w2 <= s * (self.maxq - z))
        # value q, gradient 1 inside the clip range and 0 outside: q + (w − sg(w)) · 1[inside]
        return _masked(self, (q.detach() + (w2 - w2.detach()) * inside).view_as(w))

    def storage_bits(self, numel: int) -> int:
        """Bits of the packed weight: ``n_bits`` per weight + fp16 scale and uint8 zero per row / group
        (:class:`~obc_lightning.formats.schemes.ScalarScheme`'s size, before byte padding)."""
        rows = self.scales.shape[0]
        return ScalarScheme.payload_bits({"shape": [rows, numel // rows], "bits": self.n_bits,
                                          "group_size": self.group_size, "scale_dtype": "float16"})

    def weight_format(self, w: Tensor) -> ScalarScheme:
        """The format of the finalized weight: this grid."""
        return ScalarScheme(self.scales.detach().cpu(), self.zeros.detach().cpu(), self.n_bits, self.group_size,
                            self.symmetric)

    def config(self) -> dict:
        return {"n_bits": self.n_bits, "group_size": self.group_size, "cols": self.cols, "symmetric": self.symmetric}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, Tensor], weight: Tensor) -> STEQuantizer:
        q = cls(tensors["scales"], tensors["zeros"], **config)
        if "mask" in tensors:
            q.register_buffer("mask", tensors["mask"].clone().bool())
        return q

    @torch.no_grad()
    def result(self, w: Tensor, n_blocks: int = 1) -> list[QuantResult]:
        """The codes of the (finalized, on-grid) weight ``w`` on this grid, as ``n_blocks`` QuantResults
        (one per conv group, rows in the weight's order): what export writes. Pruned entries are exactly
        0, which the grid codes as its zero point."""
        out = []
        rows = _rows(w.detach())
        for wb, sc, zc in zip(rows.chunk(n_blocks), self.scales.chunk(n_blocks), self.zeros.chunk(n_blocks)):
            grid = Grid(sc.clone(), zc.clone(), self.n_bits, self.group_size, self.cols, self.symmetric)
            codes = grid.codes(wb.to(sc.dtype))
            q = grid.dequantize(codes)
            out.append(QuantResult(q, grid.scales, grid.zeros, codes, 0.5 * (q - wb).pow(2).sum(dim=1), grid))
        return out


def _masked(q: nn.Module, w: Tensor) -> Tensor:
    """``w`` with the pruned entries (``q.mask`` False) held at exactly 0 and given no gradient."""
    mask = getattr(q, "mask", None)
    return w if mask is None else w * mask.to(w.dtype)


class MaskedWeight(nn.Module):
    """Fine-tuning a pruned float model with its mask fixed: forward ``w · mask`` (pruned weights stay 0
    and get no gradient; the kept ones train as they are). Used after :func:`~obc_lightning.compress.
    compress_model` pruned without quantizing (``OBCPrune(finetune="masked")``)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().bool())

    def forward(self, w: Tensor) -> Tensor:
        return _masked(self, w)

    def storage_bits(self, numel: int) -> int:
        """The kept weights in float16 and a 1-bit mask (:class:`~obc_lightning.formats.schemes.
        SparseMaskScheme`'s size, before byte padding)."""
        return SparseMaskScheme.payload_bits({"shape": [1, numel], "nnz": int(self.mask.sum()),
                                              "value_dtype": "float16"})

    def weight_format(self, w: Tensor) -> SparseMaskScheme:
        """The format of the finalized weight: float values, its zeros the pattern."""
        return SparseMaskScheme()

    def config(self) -> dict:
        return {}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, Tensor], weight: Tensor) -> MaskedWeight:
        return cls(tensors["mask"])

    def result(self, w: Tensor, n_blocks: int = 1) -> list:
        """Nothing beyond the weight: export stores a pruned float module from its weights."""
        return []


def keep_masks(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """``weight != 0`` of each named module: after pruning, the weights fine-tuning must keep at 0 (a kept
    weight that quantized to exactly 0 is held there too, which only adds sparsity)."""
    return {name: model.get_submodule(name).weight.detach() != 0 for name in names}


def attach_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, MaskedWeight]:
    """One :class:`MaskedWeight` per module of ``masks``."""
    return {name: attach(model.get_submodule(name), MaskedWeight(mask)) for name, mask in masks.items()}


# ------------------------------------------------------------------------------------------ ternary
def _grad_scaled(scale: Tensor, mask: Tensor) -> Tensor:
    """``scale`` with its gradient multiplied by 1/√(number of weights in ``mask``) (value unchanged)."""
    k = 1.0 / math.sqrt(max(int(mask.sum()), 1))
    scaled = scale * k
    return scale.detach() + (scaled - scaled.detach())  # exactly ``scale`` (x − x = 0), gradient k


class TernaryQuantizer(nn.Module):
    r"""Trained ternary quantization (TTQ): w_t ∈ {−w_n, 0, +w_p} with learned positive scalars.

    Threshold Δ = t · max|w̃| (t = 0.05), from the latent weights w̃ (no gradient through Δ):
        w_t = +w_p  on I_p = {w̃ > Δ},   0  on I_z = {|w̃| ≤ Δ},   −w_n  on I_n = {w̃ < −Δ}
    Gradients, with g = ∂L/∂w_t:
        ∂L/∂w_p = Σ_{I_p} g
        ∂L/∂w_n = −Σ_{I_n} g      (chain rule through w_t = −w_n; the paper's Eq. 7 prints
                                   Σ_{I_n} ∂L/∂w_t without the minus sign, i.e. for the magnitude
                                   taken as −w_n — the descent direction is the one here)
        ∂L/∂w̃  = w_p·g on I_p,  1·g on I_z,  w_n·g on I_n     (scaled straight-through estimator)
    Initialisation: w_p (w_n) = mean |w̃| over I_p (I_n) of the initial weights.

    Storage: 2-bit codes (0 → 0, 1 → +w_p, 2 → −w_n) and the two scales in ``scale_dtype`` (float16 by
    default). In eval mode the scales are rounded to it, so the finalized weights are exactly those a
    file stores (:meth:`result`: a 3-entry scalar codebook, exported as product quantization with
    ``block_size=1``).

    Gradient scale of the two scalars (LSQ, Esser et al. 2020): the optimizer sees
        ∂L/∂w_p · 1/√|I_p|   and   ∂L/∂w_n · 1/√|I_n|
    (the value is unchanged). Without it a sum over thousands of weights, stepped at the latent weights'
    SGD learning rate, moves w_p by far more than its own size (ResNet-20: w_p ≈ 0.1, Σ_{I_p} g ≈ 3 per
    batch) and drives it negative -- the network collapsed to chance level at lr 0.01 and 0.05. Adam
    (the paper's optimizer) is invariant to this scale; SGD is not.
    """

    def __init__(self, weight: Tensor, threshold: float = 0.05, scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if not 0 <= threshold < 1:
            raise ValueError(f"TernaryQuantizer: threshold must be in [0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.scale_dtype = scale_dtype
        w = weight.detach()
        pos, neg = self.masks(w)
        fallback = w.abs().mean().clamp_min(torch.finfo(w.dtype).tiny)  # a side with no weight beyond Δ
        w_p = w[pos].abs().mean() if pos.any() else fallback
        w_n = w[neg].abs().mean() if neg.any() else fallback
        self.w_p = nn.Parameter(w_p.clone().reshape(()))
        self.w_n = nn.Parameter(w_n.clone().reshape(()))

    def masks(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(I_p, I_n) as boolean tensors of w's shape."""
        w = w.detach()
        delta = self.threshold * w.abs().max()
        return w > delta, w < -delta

    def stored_scales(self) -> tuple[Tensor, Tensor]:
        """(w_p, w_n) as a file stores them: rounded to ``scale_dtype`` (kept if beyond its range; export
        then asks for a wider dtype), no gradient."""
        return tuple(round_to_dtype(s.detach(), self.scale_dtype) for s in (self.w_p, self.w_n))

    def forward(self, w: Tensor) -> Tensor:
        pos, neg = self.masks(w)
        if not self.training:
            w_p, w_n = self.stored_scales()
            return (w_p * pos - w_n * neg).to(w.dtype)
        # value w_p·1[I_p] − w_n·1[I_n]; ∂/∂w_p = Σ_{I_p} g / √|I_p| and ∂/∂w_n = −Σ_{I_n} g / √|I_n|
        wt = _grad_scaled(self.w_p, pos) * pos - _grad_scaled(self.w_n, neg) * neg
        coef = torch.where(pos, self.w_p.detach(), torch.where(neg, self.w_n.detach(), torch.ones_like(w)))
        return wt + coef * (w - w.detach())  # latent gradient w_p·g | g | w_n·g, value unchanged

    @torch.no_grad()
    def result(self, w: Tensor) -> PQResult:
        """The eval-mode weight of the latent ``w`` as a 3-entry scalar codebook: codes (rows, d) in
        {0, 1, 2} for {0, +w_p, −w_n}, codebook (3, 1); ``loss`` is ½‖q − w‖² per row (no Hessian)."""
        pos, neg = self.masks(w)
        codebook = self.codebook().to(w.dtype)
        codes = (pos.to(torch.int64) + 2 * neg.to(torch.int64)).reshape(w.shape[0], -1)
        q = codebook[codes].reshape(w.shape)
        loss = 0.5 * (_rows(q) - _rows(w)).pow(2).sum(dim=1)
        return PQResult(_rows(q), codes, codebook, loss, block_size=1, n_centroids=3, hessian_aware=False)

    def codebook(self) -> Tensor:
        """(3, 1): {0, +w_p, −w_n} as stored (rounded to ``scale_dtype``), no gradient."""
        w_p, w_n = self.stored_scales()
        return torch.stack([torch.zeros_like(w_p), w_p, -w_n]).reshape(3, 1)

    def storage_bits(self, numel: int) -> int:
        """2-bit codes + the 3-entry codebook {0, w_p, −w_n} in ``scale_dtype`` (a "pq" weight with
        block_size 1: :class:`~obc_lightning.formats.schemes.PQScheme`'s size, before byte padding)."""
        return PQScheme.payload_bits({"shape": [1, numel], "bits": pq_code_bits(3), "block_size": 1,
                                      "n_centroids": 3, "scale_dtype": _dtype_name(self.scale_dtype)})

    def weight_format(self, w: Tensor) -> PQScheme:
        """The format of the finalized weight: the 3-entry codebook, block_size 1."""
        return PQScheme(self.codebook().cpu(), 1)

    def config(self) -> dict:
        return {"threshold": self.threshold, "scale_dtype": _dtype_name(self.scale_dtype)}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, Tensor], weight: Tensor) -> TernaryQuantizer:
        q = cls(weight, config["threshold"], _dtype(config["scale_dtype"]))
        q.load_state_dict(tensors)
        return q


# -------------------------------------------------------------------------------------------- noise
class NoiseQuantizer(nn.Module):
    r"""DiffQ: pseudo-quantization noise with a learned bit width per group, range per output channel.

    Layout (DiffQ's, made per output channel): each row of the weight (one output channel, the matrix
    the OBC grids are defined on) has one range [min_r, max_r] of its latent weights; the row is cut into
    groups of ``group_size`` consecutive entries (the last one may be shorter), each with one learned bit
    width (parameters: rows · n_groups logits, not one per weight):
        b = min_bits + (max_bits − min_bits) · σ(logit)
        Δ = (max_r − min_r) / (2^b − 1)                       (the row's range, the group's bit width)
    train:  w + Δ · u,  u ~ U(−½, ½)  (fresh each forward)   →  |noise| ≤ Δ/2
    eval:   b̂ = round(b); min_r, max_r rounded to ``range_dtype`` (float16: as a file stores them);
            Δ̂ = (max_r − min_r) / (2^b̂ − 1); q = min_r + clamp(round((w − min_r) / Δ̂), 0, 2^b̂ − 1) · Δ̂
            (:class:`~obc_lightning.grids.MixedGrid`; the clamp only acts on the range's rounding)
    Size (MB, differentiable): Σ_groups n_g · b / 8 / 2^20 (:meth:`size_mb`, the codes only); the
    training objective adds ``penalty · size_mb`` to the task loss. The stored size
    (:meth:`storage_bits`) adds the per-row range and the per-group bit widths; :meth:`result` gives
    the codes and grid that export writes (scheme "mixed").

    min / max are *not* detached: as in the DiffQ reference code (``scale = p.max() - p.min()``, taken
    there over the whole tensor, here per row), the noise amplitude's gradient also reaches the row's
    extreme weights.
    """

    def __init__(
        self,
        weight: Tensor,
        group_size: int = 16,
        min_bits: float = 2.0,
        max_bits: float = 8.0,
        init_bits: float = 4.0,
        range_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.range_dtype = range_dtype
        check_positive_int("NoiseQuantizer", "group_size", group_size)
        if not (is_number(min_bits) and is_number(max_bits) and 1 <= min_bits < max_bits <= 16):
            raise ValueError(
                f"NoiseQuantizer: need 1 <= min_bits < max_bits <= 16, got {min_bits!r}, {max_bits!r}"
            )
        self.min_bits, self.max_bits = float(min_bits), float(max_bits)
        rows, cols = _rows(weight).shape
        self.rows, self.cols = rows, cols
        self.group_size = min(group_size, cols)
        self.n_groups = -(-cols // self.group_size)
        numel = torch.full((self.n_groups,), float(self.group_size))
        numel[-1] = cols - self.group_size * (self.n_groups - 1)
        self.register_buffer("group_numel", numel.to(weight.device))  # (n_groups,)
        # initial bits = init_bits (kept strictly inside (min_bits, max_bits) so the logit is finite)
        frac = min(max((init_bits - self.min_bits) / (self.max_bits - self.min_bits), 1e-3), 1 - 1e-3)
        logit = math.log(frac / (1 - frac))
        self.logits = nn.Parameter(torch.full((rows, self.n_groups), logit, device=weight.device))

    def bits(self) -> Tensor:
        """(rows, n_groups) differentiable bit widths."""
        return self.min_bits + (self.max_bits - self.min_bits) * torch.sigmoid(self.logits)

    def rounded_bits(self) -> Tensor:
        return self.bits().detach().round()

    @property
    def bit_width_bits(self) -> int:
        """Bits that store one group's bit width: ceil(log2(number of possible rounded widths))."""
        n = round(self.max_bits) - round(self.min_bits) + 1
        return max(1, math.ceil(math.log2(n)))

    def _per_entry(self, g: Tensor) -> Tensor:
        """(rows, n_groups) -> (rows, cols): each weight gets its group's value."""
        idx = torch.arange(self.cols, device=g.device) // self.group_size
        return g[:, idx]

    def step(self, w: Tensor, bits: Tensor) -> tuple[Tensor, Tensor]:
        """(min_r, Δ) of every weight, each (rows, cols): the row's minimum and its group's step."""
        w2 = _rows(w)
        lo, hi = w2.amin(dim=1, keepdim=True), w2.amax(dim=1, keepdim=True)  # (rows, 1)
        delta = (hi - lo) / (2 ** self._per_entry(bits.to(w2.dtype)) - 1)
        return lo.expand_as(w2), delta

    def grid(self, w: Tensor) -> MixedGrid:
        """The evaluation grid of the latent ``w``: rounded bit widths, row ranges in ``range_dtype``."""
        return MixedGrid.from_weight(_rows(w).detach(), self.rounded_bits(), self.group_size, self.range_dtype)

    def forward(self, w: Tensor) -> Tensor:
        w2 = _rows(w)
        if self.training:
            _, delta = self.step(w, self.bits())
            return (w2 + delta * (torch.rand_like(w2) - 0.5)).view_as(w)
        grid = self.grid(w)
        return grid.dequantize(grid.codes(w2)).view_as(w)

    @torch.no_grad()
    def result(self, w: Tensor) -> MixedResult:
        """The eval-mode weight of the latent ``w`` with its grid and codes (what export writes)."""
        grid = self.grid(w)
        codes = grid.codes(_rows(w))
        lo, hi = round(self.min_bits), round(self.max_bits)
        return MixedResult(grid.dequantize(codes), codes, grid, self.range_dtype, lo, hi)

    def size_mb(self, exact: bool = False) -> Tensor:
        """Σ_groups n_g · b / 8 / 2^20: the codes' size in MB (``exact``: rounded bits, no gradient)."""
        b = self.rounded_bits() if exact else self.bits()
        return (b * self.group_numel.to(b.dtype)).sum() / 8 / 2**20

    def storage_bits(self, numel: int) -> int:
        """round(b) bits per weight + per row its min and max in ``range_dtype`` + per group its bit
        width in ``ceil(log2(round(max_bits) − round(min_bits) + 1))`` bits
        (:class:`~obc_lightning.formats.schemes.MixedScheme`'s size, before byte padding)."""
        lo, hi = round(self.min_bits), round(self.max_bits)
        per_width = (self.rounded_bits() == torch.arange(lo, hi + 1, device=self.logits.device).view(-1, 1, 1))
        counts = (per_width * self.group_numel).sum(dim=(1, 2)).round().long().tolist()
        return MixedScheme.payload_bits({"shape": [self.rows, self.cols], "group_size": self.group_size,
                                         "min_bits": lo, "max_bits": hi, "bit_counts": counts,
                                         "scale_dtype": _dtype_name(self.range_dtype)})

    def weight_format(self, w: Tensor) -> MixedScheme:
        """The format of the finalized weight, from the latent ``w``: its evaluation grid."""
        return MixedScheme(self.grid(w).to("cpu"), round(self.min_bits), round(self.max_bits), self.range_dtype)

    def config(self) -> dict:
        return {
            "group_size": self.group_size, "min_bits": self.min_bits, "max_bits": self.max_bits,
            "range_dtype": _dtype_name(self.range_dtype),
        }

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, Tensor], weight: Tensor) -> NoiseQuantizer:
        q = cls(weight, config["group_size"], config["min_bits"], config["max_bits"],
                range_dtype=_dtype(config["range_dtype"]))
        q.load_state_dict(tensors)
        return q


# ------------------------------------------------------------------------------- product quantization
class CentroidQuantizer(nn.Module):
    r"""Product-quantized weight with fixed assignments and a trained codebook (iPQ centroid fine-tuning).

    The weight, as its (rows, d) matrix, is cut into sub-vectors of ``block_size`` consecutive inputs;
    sub-vector (r, j) is the centroid ``codebook[codes[r, j]]``. The codebook is an ``nn.Parameter``:
    each centroid's gradient is the sum of the gradients of the sub-vectors assigned to it (what
    indexing's backward computes), so it trains with the rest of the model.

    Quantization noise (Fan et al. 2020, ``noise_rate`` p < 1): in training mode each sub-vector is
    replaced by its centroid with probability p and otherwise taken from the latent float weight (which
    then trains too); in eval mode every sub-vector is its centroid. ``codebook_dtype`` (float16: the
    export format) rounds the codebook in eval mode, so the finalized weight is exactly what
    :func:`~obc_lightning.export.save_quantized` stores.
    """

    def __init__(
        self,
        codebook: Tensor,
        codes: Tensor,
        noise_rate: float = 1.0,
        codebook_dtype: torch.dtype | None = torch.float16,
    ) -> None:
        super().__init__()
        if codebook.dim() != 2 or codes.dim() != 2:
            raise ValueError(
                f"CentroidQuantizer: codebook must be (K, block_size) and codes (rows, n_blocks), got "
                f"{tuple(codebook.shape)} and {tuple(codes.shape)}"
            )
        check_fraction("CentroidQuantizer", "noise_rate", noise_rate)
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.register_buffer("codes", codes.detach().clone().long())
        self.noise_rate = float(noise_rate)
        self.codebook_dtype = codebook_dtype

    @classmethod
    def from_format(cls, fmt: PQScheme, weight: Tensor, noise_rate: float = 1.0, codebook_dtype=torch.float16,
                    where: str = "CentroidQuantizer") -> CentroidQuantizer:
        """From the recorded format of a product-quantized weight: its codebook, and the codes of
        ``weight`` (the codebook rows its sub-vectors equal; ValueError naming ``where`` otherwise)."""
        return cls(fmt.codebook, fmt.codes(where, _rows(weight)), noise_rate, codebook_dtype)

    @classmethod
    def from_result(cls, result, noise_rate: float = 1.0, codebook_dtype=torch.float16) -> CentroidQuantizer:
        """From a :class:`~obc_lightning.solvers.pq.PQResult`."""
        return cls(result.codebook, result.codes, noise_rate, codebook_dtype)

    @property
    def block_size(self) -> int:
        return self.codebook.shape[1]

    def stored_codebook(self) -> Tensor:
        """The codebook as export stores it (rounded to ``codebook_dtype``), no gradient."""
        c = self.codebook.detach()
        return c if self.codebook_dtype is None else c.to(self.codebook_dtype).float()

    def forward(self, w: Tensor) -> Tensor:
        rows = self.codes.shape[0]
        if not self.training:
            return self.stored_codebook()[self.codes].to(w.dtype).reshape(w.shape)
        q = self.codebook[self.codes].to(w.dtype)  # (rows, n_blocks, b)
        if self.noise_rate < 1:
            keep = torch.rand(self.codes.shape, device=w.device) < self.noise_rate
            q = torch.where(keep.unsqueeze(-1), q, w.reshape(rows, -1, self.block_size))
        return q.reshape(w.shape)

    def storage_bits(self, numel: int) -> int:
        """ceil(log2 K) bits per sub-vector + the codebook in ``codebook_dtype``
        (:class:`~obc_lightning.formats.schemes.PQScheme`'s size, before byte padding)."""
        K, b = self.codebook.shape
        return PQScheme.payload_bits({"shape": [self.codes.shape[0], self.codes.shape[1] * b],
                                      "bits": pq_code_bits(K), "block_size": b, "n_centroids": K,
                                      "scale_dtype": _dtype_name(self.codebook_dtype or torch.float32)})

    def weight_format(self, w: Tensor) -> PQScheme:
        """The format of the finalized weight: the trained codebook as stored."""
        return PQScheme(self.stored_codebook().cpu(), self.block_size)

    def config(self) -> dict:
        return {"noise_rate": self.noise_rate, "codebook_dtype": _dtype_name(self.codebook_dtype)}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, Tensor], weight: Tensor) -> CentroidQuantizer:
        return cls(tensors["codebook"], tensors["codes"], config["noise_rate"], _dtype(config["codebook_dtype"]))

    @torch.no_grad()
    def result(self, w: Tensor, n_blocks: int = 1) -> list[PQResult]:
        """The finalized weight ``w`` as a PQResult with the trained codebook, as export stores it."""
        codebook = self.stored_codebook().cpu()
        q = codebook[self.codes.cpu()].reshape(self.codes.shape[0], -1).to(w.dtype)
        loss = 0.5 * (q - _rows(w.detach()).cpu()).pow(2).sum(dim=1)
        return [PQResult(q, self.codes.cpu(), codebook, loss, block_size=self.block_size,
                         n_centroids=self.codebook.shape[0], hessian_aware=True)]


# --------------------------------------------------------------------------------- model-level glue
def attach(module: nn.Module, quantizer: nn.Module) -> nn.Module:
    """Parametrize ``module.weight`` by ``quantizer``; the latent weight stays the same Parameter object."""
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"finetune: {type(module).__name__}.weight is already parametrized")
    parametrize.register_parametrization(module, "weight", quantizer)
    return quantizer


def quantizer_of(module: nn.Module) -> nn.Module | None:
    """The fine-tuning quantizer attached to ``module.weight`` (``None`` if there is none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, (STEQuantizer, TernaryQuantizer, NoiseQuantizer, MaskedWeight, CentroidQuantizer)):
            return p
    return None


@torch.no_grad()
def finalize(module: nn.Module) -> None:
    """Remove the parametrization in eval semantics: ``module.weight`` keeps its Parameter object and
    now holds the truly quantized values (``leave_parametrized=True``)."""
    for p in module.parametrizations.weight:
        p.eval()
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def attach_ste(
    model: nn.Module, results: Mapping[str, Sequence[QuantResult]], masks: Mapping[str, Tensor] | None = None
) -> dict[str, STEQuantizer]:
    """One :class:`STEQuantizer` per module of ``results`` (name -> QuantResult list), on the module's device.

    The latent weights are the module's current weights: after ``compress_model`` those are the OBC
    values, so fine-tuning starts exactly where post-training quantization ended. ``masks`` (name ->
    bool tensor of the weight's shape, False = pruned): those weights stay exactly 0 (a pruned model's
    mask held fixed, e.g. its N:M pattern).
    """
    return _attach_grids(model, {name: STEQuantizer.from_results(list(res)) for name, res in results.items()}, masks)


def _attach_grids(model: nn.Module, quantizers: Mapping[str, STEQuantizer], masks: Mapping[str, Tensor] | None):
    out = {}
    for name, q in quantizers.items():
        m = model.get_submodule(name)
        q = q.to(m.weight.device)
        if masks is not None and name in masks:
            q.register_buffer("mask", masks[name].detach().clone().bool().to(m.weight.device))
        if q.scales.shape[0] != m.weight.shape[0] or q.cols != _rows(m.weight).shape[1]:
            raise ValueError(
                f"finetune: the grid of '{name}' ({q.scales.shape[0]} x {q.cols}) does not fit its weight "
                f"{tuple(m.weight.shape)}"
            )
        out[name] = attach(m, q)
    return out


def _recorded(model: nn.Module, name: str, scheme: type[StorageScheme], what: str) -> StorageScheme:
    """The format module ``name`` carries, which must be of ``scheme`` (ValueError otherwise)."""
    fmt = format_of(model.get_submodule(name))
    if not isinstance(fmt, scheme):
        got = "no format" if fmt is None else f"a {type(fmt).__name__} format"
        raise ValueError(
            f"finetune: module '{name}' carries {got}, not {what}: compress the model with compress_model first "
            "(or pass its results)"
        )
    return fmt


def attach_ste_formats(
    model: nn.Module, names: Iterable[str], masks: Mapping[str, Tensor] | None = None
) -> dict[str, STEQuantizer]:
    """One :class:`STEQuantizer` per named module, on the grid the module carries since ``compress_model``
    (:mod:`obc_lightning.formats.record`); ``masks`` as in :func:`attach_ste`."""
    results = {}
    for name in names:
        fmt = _recorded(model, name, ScalarScheme, "a scalar grid")
        cols = _rows(model.get_submodule(name).weight).shape[1]
        results[name] = STEQuantizer.from_format(fmt, cols)
    return _attach_grids(model, results, masks)


def attach_ternary(model: nn.Module, names: Iterable[str], threshold: float = 0.05) -> dict[str, TernaryQuantizer]:
    """One :class:`TernaryQuantizer` per named module, initialised from its current (fp32) weights."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = attach(m, TernaryQuantizer(m.weight, threshold))
    return out


def attach_noise(
    model: nn.Module,
    names: Iterable[str],
    group_size: int = 16,
    min_bits: float = 2.0,
    max_bits: float = 8.0,
    init_bits: float = 4.0,
) -> dict[str, NoiseQuantizer]:
    """One :class:`NoiseQuantizer` per named module."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = attach(m, NoiseQuantizer(m.weight, group_size, min_bits, max_bits, init_bits))
    return out


def attach_centroids(
    model: nn.Module,
    results: Mapping[str, Sequence],
    noise_rate: float = 1.0,
    codebook_dtype: torch.dtype | None = torch.float16,
) -> dict[str, CentroidQuantizer]:
    """One :class:`CentroidQuantizer` per module of ``results`` (name -> [PQResult]), on its device."""
    return {
        name: attach(model.get_submodule(name), _centroids_from_result(model, name, res, noise_rate, codebook_dtype))
        for name, res in results.items()
    }


def _centroids_from_result(model, name, res, noise_rate, codebook_dtype=torch.float16) -> CentroidQuantizer:
    m = model.get_submodule(name)
    (r,) = res
    q = CentroidQuantizer.from_result(r, noise_rate, codebook_dtype).to(m.weight.device)
    if q.codes.numel() * q.block_size != m.weight.numel() or q.codes.shape[0] != m.weight.shape[0]:
        raise ValueError(
            f"finetune: the codes of '{name}' ({tuple(q.codes.shape)}, block {q.block_size}) do not fit its "
            f"weight {tuple(m.weight.shape)}"
        )
    return q


def _centroids_of(model, name, noise_rate, codebook_dtype=torch.float16) -> CentroidQuantizer:
    """The quantizer of a product-quantized module from the codebook it carries and its weight's codes."""
    fmt = _recorded(model, name, PQScheme, "a product-quantization codebook")
    w = model.get_submodule(name).weight.detach()
    return CentroidQuantizer.from_format(fmt, w.cpu(), noise_rate, codebook_dtype, f"finetune: module '{name}'").to(
        w.device)


def finalize_all(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        finalize(model.get_submodule(name))


def noise_penalty(quantizers: Iterable[nn.Module], penalty: float) -> Tensor | None:
    """``penalty · Σ size_mb`` over the :class:`NoiseQuantizer` s (``None`` if there is none)."""
    sizes = [q.size_mb() for q in quantizers if isinstance(q, NoiseQuantizer)]
    return penalty * torch.stack(sizes).sum() if sizes else None


# ----------------------------------------------------------------------------- optimizer / schedulers
# Per-parameter-group lists that torch's LR schedulers keep (LRScheduler, LambdaLR / MultiplicativeLR,
# CyclicLR, OneCycleLR, ReduceLROnPlateau); SequentialLR / ChainedScheduler hold theirs in _schedulers.
SCHEDULER_GROUP_LISTS = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "max_lrs",
    "min_lrs",
    "base_momentums",
    "max_momentums",
)


def _each_scheduler(schedulers):
    for s in schedulers:
        yield s
        yield from _each_scheduler(getattr(s, "_schedulers", []) or [])


def add_param_group(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], schedulers: Sequence = ()) -> bool:
    """Add ``params`` as a new group with the first group's hyper-parameters (lr, momentum, scheduler keys
    such as ``initial_lr`` / ``max_lr``), ``weight_decay=0``, and extend every scheduler's per-group
    lists with a copy of group 0's entry so ``scheduler.step()`` keeps working. Returns False if empty."""
    params = list(params)
    if not params:
        return False
    n = len(optimizer.param_groups)
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    if "weight_decay" in group:
        group["weight_decay"] = 0.0
    group["params"] = params
    optimizer.add_param_group(group)
    for s in _each_scheduler(schedulers):
        for attr in SCHEDULER_GROUP_LISTS:
            lst = getattr(s, attr, None)
            if isinstance(lst, list) and len(lst) == n:
                lst.append(lst[0])
    return True


def remove_last_param_group(optimizer: torch.optim.Optimizer, schedulers: Sequence = ()) -> None:
    """Undo :func:`add_param_group`: drop the last group, its optimizer state and its scheduler entries."""
    n = len(optimizer.param_groups)
    group = optimizer.param_groups.pop()
    for p in group["params"]:
        optimizer.state.pop(p, None)
    for s in _each_scheduler(schedulers):
        for attr in SCHEDULER_GROUP_LISTS:
            lst = getattr(s, attr, None)
            if isinstance(lst, list) and len(lst) == n:
                lst.pop()


# ------------------------------------------------------------------------------------ the session
QUANTIZER_KINDS: dict[str, type] = {
    "ste": STEQuantizer,
    "masked": MaskedWeight,
    "ternary": TernaryQuantizer,
    "noise": NoiseQuantizer,
    "pq": CentroidQuantizer,
}


def quantizer_state(q: nn.Module) -> dict:
    """A quantizer as plain data (its kind, constructor values and tensors on the CPU): checkpointable."""
    kind = next(k for k, cls in QUANTIZER_KINDS.items() if type(q) is cls)
    return {"kind": kind, "config": q.config(), "tensors": {k: v.detach().cpu() for k, v in q.state_dict().items()}}


def quantizer_from_state(state: Mapping, weight: Tensor) -> nn.Module:
    """The quantizer of :func:`quantizer_state` for the latent ``weight``, on its device."""
    cls = QUANTIZER_KINDS[state["kind"]]
    return cls.from_state(state["config"], state["tensors"], weight.detach()).to(weight.device)


class FinetuneSession:
    """Quantization-aware fine-tuning, driven by any training loop.

    ``FinetuneSession.begin(model, mode, ...)`` parametrizes the weights (the latent weights stay the same
    ``nn.Parameter`` objects, so an optimizer that holds them keeps its state) and adds the quantizers' own
    parameters to the optimizer (or to DiffQ's own Adam for the bit widths). Then, in a plain PyTorch loop::

        loss.backward()
        session.after_backward()          # DiffQ: the gradient of the model-size penalty
        session.before_optimizer_step()   # DiffQ: step the bit widths' own Adam
        optimizer.step()
        ...
        results = session.finish()        # weights truly quantized, parametrizations gone; export results

    ``state_dict()`` / ``resume(...)`` carry a session across a checkpoint, ``plain_state_dict(sd)`` turns a
    parametrized model's state dict into one the unparametrized module loads (the quantized weights), and
    ``abort()`` removes the parametrizations leaving the latent weights, for recovery from a failure.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        quantizers: dict[str, nn.Module],
        *,
        bits_lr: float | None = None,
        noise_penalty: float = 0.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"FinetuneSession: mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode, self.quantizers = model, mode, quantizers
        self.noise_penalty, self.bits_lr = float(noise_penalty), bits_lr
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list = []
        self.bits_optimizer: torch.optim.Optimizer | None = None
        self.added_group = False
        self.trains_parameters = not any(True for q in quantizers.values() for _ in q.parameters())

    def train_with(self, optimizer: torch.optim.Optimizer | None, schedulers: Sequence = ()) -> bool:
        """Let the quantizers' own parameters (TTQ scales, DiffQ bit logits, PQ codebooks) train: DiffQ's
        bit widths in their own Adam (``bits_lr``), the others as a new group of ``optimizer`` with group
        0's settings and no weight decay (``schedulers``' per-group lists extended). False when they
        have parameters but nothing trains them (no optimizer)."""
        params = [p for q in self.quantizers.values() for p in q.parameters()]
        self.optimizer, self.schedulers = optimizer, list(schedulers)
        if params and self.mode == "noise" and self.bits_lr is not None:
            self.bits_optimizer = torch.optim.Adam(params, lr=self.bits_lr, weight_decay=0.0)
        elif params and optimizer is not None:
            self.added_group = add_param_group(optimizer, params, self.schedulers)
        self.trains_parameters = not params or self.bits_optimizer is not None or optimizer is not None
        return self.trains_parameters

    @classmethod
    def begin(
        cls,
        model: nn.Module,
        mode: str,
        *,
        results: Mapping[str, Sequence] | None = None,
        names: Iterable[str] = (),
        masks: Mapping[str, Tensor] | None = None,
        latent: Mapping[str, Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        schedulers: Sequence = (),
        ternary_threshold: float = 0.05,
        noise_group_size: int = 16,
        noise_min_bits: float = 2.0,
        noise_max_bits: float = 8.0,
        noise_init_bits: float = 4.0,
        noise_penalty: float = 0.0,
        bits_lr: float | None = None,
        pq_noise_rate: float = 1.0,
    ) -> FinetuneSession:
        """Attach the quantizers of ``mode`` and return the session.

        ``"ste"`` / ``"pq"``: one per module of ``names``, on the grid / codebook it carries since
        ``compress_model`` (:mod:`obc_lightning.formats.record`), or one per module of ``results``
        (``compress_model(..., keep_results=True)``'s ``report.results``); ``masks`` keeping a pruning
        pattern (``"ste"``); ``"masked"``: one per module of ``masks``; ``"ternary"`` / ``"noise"``: one per
        module of ``names``, from its current weights. ``latent`` (``"pq"`` with ``pq_noise_rate < 1``):
        the weights the latent weights start from.
        """
        names = list(names)
        wanted = list(results or {}) + list(masks or {}) + names
        users: dict[int, list[str]] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            if isinstance(getattr(m, "weight", None), Tensor):
                users.setdefault(id(m.weight), []).append(n)
        for name in wanted:
            shared = users.get(id(model.get_submodule(name).weight), [])
            if len(shared) > 1:
                raise ValueError(
                    f"FinetuneSession: the weight of '{name}' is shared with {[u for u in shared if u != name]}; "
                    "fine-tuning parametrizes one module's weight, which would untie them: exclude all but one "
                    "of them, or compress without fine-tuning"
                )
        if mode == "ste":
            if results is None:
                quantizers = attach_ste_formats(model, names, masks)
            else:
                quantizers = attach_ste(model, results, masks)
        elif mode == "pq":
            if results is None:  # the codes are read from the quantized weights, before latent replaces them
                centroids = {name: _centroids_of(model, name, pq_noise_rate) for name in names}
            else:
                centroids = {name: _centroids_from_result(model, name, res, pq_noise_rate)
                             for name, res in results.items()}
            if latent:
                with torch.no_grad():
                    for name, w in latent.items():
                        if name in centroids:
                            model.get_submodule(name).weight.copy_(w)
            quantizers = {name: attach(model.get_submodule(name), q) for name, q in centroids.items()}
        elif mode == "masked":
            quantizers = attach_masks(model, masks or {})
        elif mode == "ternary":
            quantizers = attach_ternary(model, names, ternary_threshold)
        elif mode == "noise":
            quantizers = attach_noise(model, names, noise_group_size, noise_min_bits, noise_max_bits, noise_init_bits)
        else:
            raise ValueError(f"FinetuneSession: mode must be one of {MODES}, got {mode!r}")
        session = cls(model, mode, quantizers, bits_lr=bits_lr, noise_penalty=noise_penalty)
        session.train_with(optimizer, schedulers)
        return session

    # ------------------------------------------------------------------ training steps
    def penalty(self) -> Tensor | None:
        """DiffQ's ``noise_penalty · size_mb`` (``None`` in other modes or without a penalty)."""
        if self.mode != "noise" or self.noise_penalty == 0:
            return None
        return noise_penalty(self.quantizers.values(), self.noise_penalty)

    def after_backward(self, loss_scale: float = 1.0, accumulation: int = 1) -> None:
        """Add the penalty's gradient (the training step returned the task loss only), scaled like the task
        loss was (``loss_scale``: an AMP scaler's scale; ``accumulation``: gradient accumulation)."""
        loss = self.penalty()
        if loss is not None:
            (loss * loss_scale / accumulation).backward()

    def before_optimizer_step(self, grad_scale: float = 1.0) -> None:
        """Step the bit widths' own Adam, if there is one: gradients divided by ``grad_scale`` (an AMP
        scale), and a step with non-finite gradients skipped, as the scaler skips the model's."""
        if self.bits_optimizer is None:
            return
        params = [p for g in self.bits_optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grad_scale != 1.0:
            for p in params:
                p.grad.mul_(1.0 / grad_scale)
        if all(bool(torch.isfinite(p.grad).all()) for p in params):
            self.bits_optimizer.step()
        self.bits_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def quantized_weights(self) -> dict[str, Tensor]:
        """Each module's weight as evaluation (and :meth:`finish`) gives it: the quantizer in eval mode."""
        out = {}
        with torch.no_grad():
            for name, q in self.quantizers.items():
                latent = self.model.get_submodule(name).parametrizations.weight.original
                training = q.training
                q.eval()
                out[name] = q(latent).detach()
                q.train(training)
        return out

    def plain_state_dict(self, state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """``state_dict`` (of the parametrized model, keys under ``prefix``) with each parametrized weight
        replaced by its plain ``<module>.weight``: the quantized weight, so that the module as the user
        defined it loads it (and is the quantized model)."""
        out = dict(state_dict)
        for name, w in self.quantized_weights().items():
            base = f"{prefix}{name}." if name else prefix
            for key in [k for k in out if k.startswith(f"{base}parametrizations.weight.")]:
                del out[key]
            out[f"{base}weight"] = w.to(state_dict.get(f"{base}parametrizations.weight.original", w).dtype)
        return out

    def state_dict(self) -> dict:
        """Plain data to resume from: the mode, each quantizer, the latent weights, the bits optimizer."""
        latent = {
            name: self.model.get_submodule(name).parametrizations.weight.original.detach().cpu().clone()
            for name in self.quantizers
        }
        return {
            "mode": self.mode,
            "quantizers": {name: quantizer_state(q) for name, q in self.quantizers.items()},
            "latent": latent,
            "noise_penalty": self.noise_penalty,
            "bits_optimizer": None if self.bits_optimizer is None else self.bits_optimizer.state_dict(),
            "bits_lr": self.bits_lr,
        }

    @classmethod
    def resume(
        cls, model: nn.Module, state: Mapping, *, optimizer: torch.optim.Optimizer | None = None,
        schedulers: Sequence = (),
    ) -> FinetuneSession:
        """The session of :meth:`state_dict` on ``model`` (its weights: the plain quantized ones a checkpoint
        holds): latent weights back into the same Parameters, quantizers re-attached, the quantizers'
        parameters added to ``optimizer`` as before (so that its saved state loads next). A failure partway
        (a module the state names but the model lacks, a state that does not fit) takes off every quantizer
        it attached and the optimizer group before it propagates; the latent weights copied in stay (the
        caller's snapshot puts the checkpoint's weights back)."""
        quantizers = {}
        session = cls(model, state["mode"], quantizers, bits_lr=state.get("bits_lr"),
                      noise_penalty=state.get("noise_penalty", 0.0))
        try:
            with torch.no_grad():
                for name, qstate in state["quantizers"].items():
                    m = model.get_submodule(name)
                    m.weight.copy_(state["latent"][name].to(m.weight.device, m.weight.dtype))
                    quantizers[name] = attach(m, quantizer_from_state(qstate, m.weight))
            session.train_with(optimizer, schedulers)
            if session.bits_optimizer is not None and state.get("bits_optimizer") is not None:
                session.bits_optimizer.load_state_dict(state["bits_optimizer"])
        except BaseException:
            session.abort()
            raise
        return session

    # ------------------------------------------------------------------ the end
    def _release_optimizer(self) -> None:
        if self.added_group and self.optimizer is not None:
            remove_last_param_group(self.optimizer, self.schedulers)
        self.added_group = False
        self.bits_optimizer = None

    def finish(self, export: bool = True) -> dict[str, list]:
        """Remove the parametrizations in eval semantics (the weights are truly quantized, the same
        Parameters) and the optimizer group, and record on every module the format its weight is now in
        (the STE grid, the trained PQ or TTQ codebook, DiffQ's mixed grid, the pruning pattern: a
        pattern N:M that the module carried stays N:M), so that
        :func:`~obc_lightning.export.save_quantized` needs nothing more; returns {module: results for
        ``save_quantized``} of the final weights (``export=False``: {}, the formats are enough)."""
        formats = {}
        for name, q in self.quantizers.items():  # DiffQ's grid comes from the latent weights
            m = self.model.get_submodule(name)
            fmt = q.weight_format(m.parametrizations.weight.original.detach())
            old = format_of(m)
            n_m = getattr(old, "n_m", None)
            formats[name] = fmt.with_n_m(n_m) if n_m is not None and isinstance(fmt, (ScalarScheme, SparseMaskScheme)) \
                else fmt
        results = {}
        if export:  # ternary / DiffQ codes and ranges come from the latent weights
            for name, q in self.quantizers.items():
                if isinstance(q, (TernaryQuantizer, NoiseQuantizer)):
                    results[name] = [q.result(self.model.get_submodule(name).parametrizations.weight.original)]
        for name in self.quantizers:
            finalize(self.model.get_submodule(name))
        if export:
            for name, q in self.quantizers.items():
                if name not in results:
                    m = self.model.get_submodule(name)
                    results[name] = q.result(m.weight, getattr(m, "groups", 1))
        for name, fmt in formats.items():
            set_format(self.model.get_submodule(name), fmt)
        self._release_optimizer()
        return {name: results[name] for name in self.quantizers if name in results}

    def abort(self) -> None:
        """Remove the parametrizations leaving the latent weights (no rounding) and the optimizer group;
        the modules' recorded formats are dropped (the latent weights are in none)."""
        for name in self.quantizers:
            m = self.model.get_submodule(name)
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            drop_format(m)
        self._release_optimizer()

    # ------------------------------------------------------------------ what it weighs
    def size_metrics(self, targets: Mapping[str, nn.Module], fp32_extra: int = 0) -> dict[str, float]:
        """Sizes and bits of the ternary / noise-quantized model over ``targets`` (those without a quantizer,
        and ``fp32_extra`` bytes of weights no module holds, count at fp32)."""
        before = after = qbits = qnumel = 0
        wbits = 0.0
        for name, m in targets.items():
            w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            bias = 0 if m.bias is None else m.bias.numel() * 4
            before += w.numel() * 4 + bias
            q = self.quantizers.get(name)
            if q is None:
                after += w.numel() * 4 + bias
                continue
            sb = q.storage_bits(w.numel())
            after += sb / 8 + bias
            qbits, qnumel = qbits + sb, qnumel + w.numel()
            if isinstance(q, NoiseQuantizer):
                wbits += float((q.rounded_bits() * q.group_numel).sum())
        before, after = before + fp32_extra, after + fp32_extra
        out = {
            "obc/size_mb_before": before / 2**20,
            "obc/size_mb_after": after / 2**20,
            "obc/compression_ratio": before / after if after else float("nan"),
            "obc/avg_bits": qbits / qnumel if qnumel else float("nan"),
            "obc/modules_quantized": float(len(self.quantizers)),
        }
        if self.mode == "noise" and qnumel:
            out["obc/noise_bits"] = wbits / qnumel  # mean rounded bit width, without scales
        return out
