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
true quantized weight. This module knows only torch (no Lightning); the callback is the glue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from obc_lightning.checks import check_fraction, check_positive_int, is_number
from obc_lightning.grids import MixedGrid, round_to_dtype, round_to_grid
from obc_lightning.solvers.pq import PQResult

if TYPE_CHECKING:
    from obc_lightning.solvers.common import QuantResult

MODES = ("ste", "ternary", "noise", "masked", "pq")


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

    def __init__(self, scales: Tensor, zeros: Tensor, n_bits: int, group_size: int | None, cols: int) -> None:
        super().__init__()
        if scales.shape != zeros.shape or scales.dim() != 2:
            raise ValueError(
                f"STEQuantizer: scales and zeros must both be (rows, n_groups), got {tuple(scales.shape)} "
                f"and {tuple(zeros.shape)}"
            )
        self.register_buffer("scales", scales.detach().clone())  # (rows, n_groups)
        self.register_buffer("zeros", zeros.detach().clone())
        self.n_bits, self.group_size, self.cols = int(n_bits), group_size, int(cols)

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
        """Bits of the packed weight: ``n_bits`` per weight + fp16 scale and uint8 zero per row / group."""
        return self.n_bits * numel + 24 * self.scales.numel()


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
        """Dense float32 storage (no sparse format is modelled)."""
        return 32 * numel


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
        w_p, w_n = self.stored_scales()
        codebook = torch.stack([torch.zeros_like(w_p), w_p, -w_n]).reshape(3, 1).to(w.dtype)
        codes = (pos.to(torch.int64) + 2 * neg.to(torch.int64)).reshape(w.shape[0], -1)
        q = codebook[codes].reshape(w.shape)
        loss = 0.5 * (_rows(q) - _rows(w)).pow(2).sum(dim=1)
        return PQResult(_rows(q), codes, codebook, loss, block_size=1, n_centroids=3, hessian_aware=False)

    def storage_bits(self, numel: int) -> int:
        """2-bit codes + the 3-entry codebook {0, w_p, −w_n} in ``scale_dtype``."""
        return 2 * numel + 3 * 8 * torch.empty(0, dtype=self.scale_dtype).element_size()


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
        width in ``ceil(log2(round(max_bits) − round(min_bits) + 1))`` bits."""
        codes = int(float((self.rounded_bits() * self.group_numel).sum()))
        range_bits = 2 * 8 * torch.empty(0, dtype=self.range_dtype).element_size()
        return codes + range_bits * self.rows + self.bit_width_bits * self.rows * self.n_groups


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
        """ceil(log2 K) bits per sub-vector + the codebook at 16 bits per entry."""
        from obc_lightning.solvers.pq import code_bits

        return self.codes.numel() * code_bits(self.codebook.shape[0]) + 16 * self.codebook.numel()


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
    out = {}
    for name, res in results.items():
        m = model.get_submodule(name)
        q = STEQuantizer.from_results(list(res)).to(m.weight.device)
        if masks is not None and name in masks:
            q.register_buffer("mask", masks[name].detach().clone().bool().to(m.weight.device))
        if q.scales.shape[0] != m.weight.shape[0] or q.cols != _rows(m.weight).shape[1]:
            raise ValueError(
                f"finetune: the grid of '{name}' ({q.scales.shape[0]} x {q.cols}) does not fit its weight "
                f"{tuple(m.weight.shape)}"
            )
        out[name] = attach(m, q)
    return out


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
    out = {}
    for name, res in results.items():
        m = model.get_submodule(name)
        (r,) = res
        q = CentroidQuantizer.from_result(r, noise_rate, codebook_dtype).to(m.weight.device)
        if q.codes.numel() * q.block_size != m.weight.numel() or q.codes.shape[0] != m.weight.shape[0]:
            raise ValueError(
                f"finetune: the codes of '{name}' ({tuple(q.codes.shape)}, block {q.block_size}) do not fit its "
                f"weight {tuple(m.weight.shape)}"
            )
        out[name] = attach(m, q)
    return out


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
