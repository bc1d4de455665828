"""Calibration: layer Hessians H = 2/N * X^T X from forward hooks on the user's own forward pass.

For a layer y = W x, the squared output error of a perturbed weight W + dW over N samples is
    1/N * sum_n ||dW x_n||^2 = 1/2 * sum_rows dw H dw^T   with   H = 2/N * sum_n x_n x_n^T,
so H is all a solver needs to know about the data. The samples x_n are:

- ``nn.Linear``: every token: an input of shape (..., in) gives prod(...) samples of size ``in``;
- ``nn.Conv1d`` / ``nn.Conv2d``: every output position: the receptive-field patch (as ``F.unfold`` with
  the layer's kernel, stride, padding, padding mode and dilation), of size in/groups * kh * kw in the
  order of ``weight.reshape(out, -1)``. A conv with g groups is g independent layers: group i maps
  input channels [i*in/g, (i+1)*in/g) to output rows [i*out/g, (i+1)*out/g), so it gets its own
  Hessian (g Hessians per conv; a depthwise conv has one tiny Hessian per channel).

Each batch's X^T X is computed in the activations' precision (float32 for half inputs), or in bfloat16
with ``product_dtype="bfloat16"``, and added to a float64 running sum (a float32 sum of thousands of
batches loses the small eigenvalues the solver depends on), on the module's device, or on the CPU with
``offload=True``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obc_lightning.checks import check_fraction
from obc_lightning.precision import fp32_matmul

SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# X^T X is multiplied in up to 8 block rows of at least 128 (from 2 blocks on only the block-lower
# triangle is computed: (k + 1) / 2k of the arithmetic, 15-30 % less time on CPU; 8 bounds the launches)
SYMMETRIC_MIN_BLOCK, SYMMETRIC_MAX_BLOCKS = 128, 8
# samples a module may buffer beyond d (see _Accumulator), in bytes of float32 samples
PENDING_BYTES = 2 * 2**20
# Activations are multiplied as they are while max|x| lies in [2^-32, 2^32]: every product of X^T X then
# stays far inside float32's range. Outside it, x is divided by 2^e (max|x| / 2^e in [1, 2): exact) and
# its products are multiplied by 4^e in the float64 sum, so activations of any magnitude give the Hessian
# of the rescaled ones times 4^e: no products underflowing to 0 (every input "dead"), none overflowing.
ACTIVATION_EXPONENT_RANGE = 32

# Reasons a target module gets no Hessian (reported, never silent).
REASON_OWNER_NOT_RUN = (
    "its MultiheadAttention '{owner}' (which uses out_proj.weight functionally, so out_proj is "
    "calibrated through it) was not called during calibration"
)
REASON_NOT_RUN = (
    "not called as a module during calibration (not on the forward path of the calibration batches, "
    "or its weight used functionally, e.g. F.linear(x, module.weight))"
)
REASON_COMPILED = (
    "inside the torch.compile'd module '{owner}', whose compiled graph ran without the calibration's forward "
    "hooks (compiled modules are calibrated eagerly with torch.compiler.set_stance, torch >= 2.6); upgrade "
    "torch, or compress the module before compiling it"
)


class CalibrationWarning(UserWarning):
    """Some target modules got no Hessian (they never ran as modules during calibration)."""


@dataclass
class LayerHessian:
    """The Hessians of one module.

    ``hessians`` is (groups, d, d): ``groups`` is the conv's ``groups`` (1 for Linear), d the number of
    weight columns of one group (in/groups * prod(kernel)). Rows ``[i*out/groups, (i+1)*out/groups)`` of
    ``weight.reshape(out, -1)`` belong to ``hessians[i]``. float64, on the module's device (or CPU).
    """

    name: str
    hessians: Tensor
    n_samples: int
    n_calls: int

    @property
    def groups(self) -> int:
        return self.hessians.shape[0]

    def weight_blocks(self, weight: Tensor) -> list[Tensor]:
        """``weight`` as the (out/groups, d) matrices that go with ``hessians[i]``."""
        return list(weight.reshape(weight.shape[0], -1).chunk(self.groups, dim=0))


@dataclass
class MatchedHessian(LayerHessian):
    """One module's Hessians for output matching (:func:`collect_matched`).

    ``hessians`` is H̃ = 2/N X̃^T X̃ of its inputs X̃ in the partly compressed model, what the solvers
    quantize on. With X the module's inputs in the full-precision model on the same samples and W its
    (uncompressed) weight, per conv group:

    - ``cross`` (groups, out/groups, d): 2/N sum_n (W x_n) x̃_n^T = W C^T, with C = 2/N X̃^T X;
    - ``energy`` (groups, out/groups): 2/N sum_n (w_r . x_n)^2 = diag(W H W^T), with H = 2/N X^T X;
    - ``drift``: whether any x̃_n differed from its x_n (on any rank); without drift C = H̃ = H.

    The least-squares target is W* = W C^T H̃^-1 and the objective against the full-precision outputs
    1/2 * 2/N ||X w_r - X̃ q||^2 = 1/2 (energy_r - 2 q . cross_r + q H̃ q^T)
    (:mod:`obc_lightning.solvers.match`).
    """

    cross: Tensor | None = None
    energy: Tensor | None = None
    drift: bool = True


@dataclass
class CalibrationResult:
    """Output of :func:`collect_hessians`: Hessians of the modules that ran, reasons for the others."""

    hessians: dict[str, LayerHessian] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    n_batches: int = 0

    def __getitem__(self, name: str) -> LayerHessian:
        return self.hessians[name]

    def __contains__(self, name: object) -> bool:
        return name in self.hessians


def hessian_shape(module: nn.Module) -> tuple[int, int, int]:
    """(groups, d, d) of the Hessians of a Linear / Conv1d / Conv2d."""
    if isinstance(module, nn.Linear):
        return (1, module.in_features, module.in_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        d = module.in_channels // module.groups * math.prod(module.kernel_size)
        return (module.groups, d, d)
    raise TypeError(
        f"collect_hessians supports {', '.join(m.__name__ for m in SUPPORTED_MODULES)}, "
        f"got {type(module).__name__}"
    )


def hessian_bytes(module: nn.Module) -> int:
    """float64 bytes of the Hessian sums of ``module``."""
    g, d, _ = hessian_shape(module)
    return g * d * d * 8


def default_max_memory(device: torch.device) -> int:
    """Budget for the Hessian sums on ``device``: 70 % of free GPU memory, 50 % of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        avail = 8 << 30
    return int(avail * 0.5)


def _module_device(module: nn.Module) -> torch.device:
    return module.weight.device


def _conv_geometry(module: nn.Conv1d | nn.Conv2d, x: Tensor):
    """``x`` as the 4-D batch the conv sees, the zero padding still to apply (top, bottom, left, right),
    and the 2-D kernel, stride, dilation and output size.

    Reproduces the conv's own padding: a non-zero padding mode pads ``x`` explicitly with
    ``module._reversed_padding_repeated_twice``, as ``nn.Conv*._conv_forward`` does (the zero padding
    left is then 0); zero padding (numeric or "same") is returned, not applied, so that sampled patches
    can be read from the unpadded input. A Conv1d is a Conv2d of height 1.
    """
    one_d = isinstance(module, nn.Conv1d)
    if x.dim() == (2 if one_d else 3):  # unbatched input
        x = x.unsqueeze(0)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pads = (0, 0, 0, 0)
    elif isinstance(module.padding, str):  # "same" / "valid": the padding nn.Conv* computed, maybe uneven
        rev = module._reversed_padding_repeated_twice  # (left, right[, top, bottom])
        pads = (0, 0, rev[0], rev[1]) if one_d else (rev[2], rev[3], rev[0], rev[1])
    else:
        ph, pw = (0, *module.padding) if one_d else module.padding
        pads = (ph, ph, pw, pw)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if one_d:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    Hp, Wp = x.shape[2] + pads[0] + pads[1], x.shape[3] + pads[2] + pads[3]
    (kh, kw), (dh, dw) = kernel, dilation
    out_size = ((Hp - dh * (kh - 1) - 1) // stride[0] + 1, (Wp - dw * (kw - 1) - 1) // stride[1] + 1)
    return x, pads, kernel, stride, dilation, out_size


def conv_patches(
    module: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    rows: Tensor | None = None,
    dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """The receptive-field patches of ``x`` for ``module``, transposed: (groups, in/groups * prod(kernel), N).

    Entry (c, i, j) of the patch at output position (b, r, s) is x_padded[b, c, r*sh + i*dh, s*sw + j*dw],
    the order of ``weight.reshape(out, -1)`` (what ``F.unfold`` gives, built from kh*kw strided slices:
    ``F.unfold`` is ~10x slower on CPU). ``rows``: flat indices into the B*Ho output rows (b, r); only
    the patches of those rows are built, all Wo positions of each, row after row (N = len(rows)*Wo).
    A row is read from the unpadded input as contiguous runs of W values (zero padding becomes a mask),
    ~4x cheaper per sample than gathering scattered positions. ``dtype``: the patches' dtype (the
    input is converted before the 9x larger patches are built from it); default ``x.dtype``.
    ``workspace``: build all patches in its reused buffers instead of fresh tensors (the result is then
    valid only until the workspace's next use).
    """
    x, (pt, pb, pl, pr), (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = _conv_geometry(module, x)
    B, C, H, W = x.shape
    g = module.groups
    if rows is None:
        dtype = dtype or x.dtype
        if pt or pb or pl or pr or x.dtype != dtype:
            x = _padded(x, (pt, pb, pl, pr), dtype, workspace)
        shape = (g, C // g, kh * kw, B, Ho, Wo)
        out = x.new_empty(shape) if workspace is None else workspace.take("patches", shape, dtype, x.device)
        # samples along the last axis: every kernel offset is a copy of contiguous image rows
        for i in range(kh):
            for j in range(kw):
                shift = x[:, :, i * dh : i * dh + sh * (Ho - 1) + 1 : sh, j * dw : j * dw + sw * (Wo - 1) + 1 : sw]
                out[:, :, i * kw + j] = shift.view(B, g, C // g, Ho, Wo).permute(1, 2, 0, 3, 4)
        return out.view(g, C // g * kh * kw, B * Ho * Wo)
    n = len(rows)
    b = rows.div(Ho, rounding_mode="floor")
    # input row of kernel row i for drawn output row r: r * sh - pt + i * dh, (kh, n)
    in_rows = torch.add(torch.arange(-pt, kh * dh - pt, dh, device=rows.device)[:, None], rows.remainder(Ho), alpha=sh)
    inside = in_rows.clamp(0, H - 1)
    # rows (kh, n, C, W) written straight into their zero-padded, converted place (kh, n, C, Wp): one
    # pass; input rows outside the image are the conv's zero padding (masked after a clamped read)
    lines = x.new_zeros((kh, n, C, W + pl + pr), dtype=dtype or x.dtype)
    gathered = x[b[None], :, inside]
    if pt or pb:
        torch.mul(gathered, (inside == in_rows)[:, :, None, None], out=lines[..., pl : pl + W])
    else:
        lines[..., pl : pl + W] = gathered
    # patch entry (c, i, j) of output position (row m, column s) is lines[i, m, c, j * dw + s * sw]: one
    # strided view in (c, i, j, m, s) order, copied once by the reshape
    st = lines.stride()
    view = lines.as_strided((C, kh, kw, n, Wo), (st[2], st[0], dw * st[3], st[1], sw * st[3]))
    return view.reshape(g, C // g * kh * kw, n * Wo)


def _padded(x: Tensor, pads: tuple[int, int, int, int], dtype: torch.dtype, workspace: Workspace | None) -> Tensor:
    """``x`` (B, C, H, W) in ``dtype`` with (top, bottom, left, right) rows / columns of zeros around it."""
    pt, pb, pl, pr = pads
    if workspace is None:
        return F.pad(x.to(dtype), (pl, pr, pt, pb))
    B, C, H, W = x.shape
    out = workspace.take("padded", (B, C, H + pt + pb, W + pl + pr), dtype, x.device)
    out[:, :, :pt].zero_()  # only the border: the buffer holds whatever it held last
    out[:, :, pt + H :].zero_()
    out[:, :, pt : pt + H, :pl].zero_()
    out[:, :, pt : pt + H, pl + W :].zero_()
    out[:, :, pt : pt + H, pl : pl + W] = x
    return out


def layer_inputs(
    module: nn.Module,
    x: Tensor,
    units: Tensor | None = None,
    dtype: torch.dtype | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """The samples the module's weight sees, transposed: (groups, d, N), in ``dtype`` (default: x's).

    ``units`` (see :func:`sample_units`): only those tokens of a Linear, only those output rows of a conv.
    ``workspace``: see :func:`conv_patches` (a Linear's tokens need no new buffer unless converted).
    """
    if isinstance(module, nn.Linear):
        tokens = x.reshape(-1, x.shape[-1])
        if units is not None:
            tokens = tokens[units]
        return tokens.to(dtype or tokens.dtype).T.unsqueeze(0)
    if units is not None:  # the patches of a fraction of the rows: small, in fresh tensors
        workspace = None
    return conv_patches(module, x, units, dtype, workspace)


class Workspace:
    """Named buffers reused from call to call: every hook call of a conv builds patches ~k*k times the
    size of its input (tens of MB), and on the CPU a fresh tensor that large is a fresh mmap from the
    C allocator, whose page faults and zero-filling by the kernel cost about a fifth of exact calibration
    time on ResNet-20 (``benchmarks/calibration.py``). One buffer per role and dtype, grown to the
    largest request; hooks run one at a time, and a result must be consumed before the next ``take``.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` in the buffer of ``role``."""
        key, numel = (role, dtype, torch.device(device)), math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def sample_units(module: nn.Module, x: Tensor) -> tuple[int, int]:
    """(units, samples per unit) of one input ``x``: sampling draws units. A Linear's unit is one token
    (one sample); a conv's unit is one output row (b, r) of Wo output positions (a Conv1d's: one whole
    sequence), since a row's patches are read as contiguous runs of the input."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1], 1
    one_d = isinstance(module, nn.Conv1d)
    batch = 1 if x.dim() == (2 if one_d else 3) else x.shape[0]
    spatial = x.shape[-1:] if one_d else x.shape[-2:]
    if isinstance(module.padding, str):  # "valid" or "same" (stride 1): same as the conv's own output
        if module.padding == "same":
            return (batch, spatial[0]) if one_d else (batch * spatial[0], spatial[1])
        pads = (0,) * len(spatial)
    else:
        pads = module.padding
    out = [
        (n + 2 * p - dl * (k - 1) - 1) // s + 1
        for n, p, k, s, dl in zip(spatial, pads, module.kernel_size, module.stride, module.dilation)
    ]
    return (batch, out[0]) if one_d else (batch * out[0], out[1])


def sample_count(module: nn.Module, x: Tensor) -> int:
    """How many samples (tokens or output positions) one input ``x`` gives the module."""
    units, per_unit = sample_units(module, x)
    return units * per_unit


class _Accumulator:
    """Running float64 sums S = sum X^T X (groups, d, d) and N for one module.

    Batches that give few samples (thinned calibration, few tokens) are buffered until max(d, 2 MiB
    of float32 samples) are pending, then multiplied in one product: the float64 update of S touches
    all d^2 entries whatever the number of samples, so folding it per batch would cost as much as the
    product itself at 1/128 of the samples, and every fold is some twenty small ops besides.
    ``buffer=False`` (offloaded sums) folds every batch.
    Only the block-lower triangle of S is summed; :meth:`symmetric_sum` mirrors it at the end.
    """

    def __init__(self, name: str, module: nn.Module, device: torch.device, sample_fraction: float = 1.0, seed=0,
                 buffer: bool = True, product_dtype: torch.dtype | None = None, workspace: Workspace | None = None):
        self.name = name
        self.workspace = workspace
        self.product_dtype = product_dtype
        self.module = module
        # written by the first fold (a zero fill first would be one more pass over g * d^2 float64s)
        self.sum = torch.empty(hessian_shape(module), dtype=torch.float64, device=device)
        self.folded = False
        self.n = 0
        self.calls = 0
        self.batch_index = -1
        self.sample_fraction = sample_fraction
        self.generator = None
        if sample_fraction < 1:
            self.generator = torch.Generator(device=_module_device(module)).manual_seed(seed)
        d = self.sum.shape[1]
        self.buffer_samples = max(d, PENDING_BYTES // (4 * self.sum.shape[0] * d)) if buffer else 0
        self.block = -(-d // max(1, min(SYMMETRIC_MAX_BLOCKS, d // SYMMETRIC_MIN_BLOCK)))
        self.pending: list[Tensor] = []
        self.n_pending = 0
        self.exponent = 0  # the pending samples are x / 2^exponent (see activation_exponent)

    def draw_units(self, x: Tensor) -> Tensor | None:
        """The units of ``x`` (tokens, conv output rows) this call samples; None: all of them."""
        if self.generator is None:
            return None
        # m units drawn uniformly with replacement (randint: ~100x cheaper than a permutation of all
        # units): the mean of x x^T over a drawn unit's samples has the expectation of the mean over all
        # samples (every unit has as many), so 2/n sum over the drawn samples is an unbiased estimate of
        # H at sample_fraction of the X^T X cost
        n_units, _ = sample_units(self.module, x)
        m = max(1, math.ceil(self.sample_fraction * n_units))
        return torch.randint(n_units, (m,), generator=self.generator, device=x.device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        self.calls += 1
        x = x.detach()
        units = self.draw_units(x)
        n_units, per_unit = sample_units(self.module, x)
        if units is not None:
            n_units = len(units)
        dtype = self.product_dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
        # one min / max reduction over x: NaN / Inf, and the scale (X is a part of x plus zero padding)
        e = activation_exponent(x, self._raise_not_finite, f"collect_hessians: module '{self.name}'")
        if e != self.exponent and self.pending:  # pending samples share one scale
            self._fold(None)
        self.exponent = e
        if e:
            x = times_power_of_two(x, -e)
        buffered = self.n_pending + n_units * per_unit < self.buffer_samples
        # patches folded right away (nothing pending) can live in the reused workspace
        workspace = None if buffered or self.pending else self.workspace
        Xt = layer_inputs(self.module, x, units, dtype, workspace)  # (g, d, N)
        self.n += Xt.shape[2]
        if buffered:
            if Xt.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                Xt = Xt.clone()  # a view of x (a Linear's tokens), which the model may change in place
            self.pending.append(Xt)
            self.n_pending += Xt.shape[2]
            return
        self._fold(Xt)

    def flush(self) -> None:
        """Fold the buffered samples into the sum (zeros if nothing ran: DDP reduces every rank's sum)."""
        if self.pending:
            self._fold(None)
        if not self.folded:
            self.sum.zero_()
            self.folded = True

    def symmetric_sum(self, total: Tensor) -> Tensor:
        """``total`` (this sum, or its reduction over ranks: block-lower) mirrored in place to the full
        symmetric X^T X. Diagonal blocks were multiplied in full; their lower triangles are kept."""
        d = total.shape[1]
        for r0 in range(0, d, self.block):
            r1 = min(d, r0 + self.block)
            diag = total[:, r0:r1, r0:r1]
            diag.copy_(torch.tril(diag) + torch.tril(diag, -1).transpose(1, 2))
            total[:, :r0, r0:r1].copy_(total[:, r0:r1, :r0].transpose(1, 2))
        return total

    @fp32_matmul  # the float32 products in IEEE float32 even under set_float32_matmul_precision("high")
    def _fold(self, Xt: Tensor | None) -> None:
        if self.pending:
            Xt = torch.cat(self.pending + ([Xt] if Xt is not None else []), dim=2)
            self.pending, self.n_pending = [], 0
        # the product in the activations' precision (fast matmul), the running sum in float64: the sum
        # over thousands of batches is what loses precision, not one product. X^T X is symmetric: block
        # row i is multiplied only up to the end of its diagonal block (the block-lower triangle, about
        # half the arithmetic for d >> block) and the sum is mirrored once, in collect_hessians. Samples
        # divided by 2^e add their products times 4^e (exact, in float64)
        d = Xt.shape[1]
        factor = math.ldexp(1.0, 2 * self.exponent)
        for r0 in range(0, d, self.block):
            r1 = min(d, r0 + self.block)
            if Xt.shape[0] == 1:  # a 2-D mm: CPU bfloat16 bmm misses oneDNN's kernel (3-8x slower)
                part = (Xt[0, r0:r1] @ Xt[0, :r1].T).unsqueeze(0)
            else:
                part = Xt[:, r0:r1] @ Xt[:, :r1].transpose(1, 2)  # (g, r1 - r0, r1)
            block = self.sum[:, r0:r1, :r1]
            if self.folded:
                block.add_(part.to(self.sum.device), alpha=factor)  # converted to float64 by add_
            else:
                block.copy_(part)
                if factor != 1.0:
                    block.mul_(factor)
        self.folded = True

    def _raise_not_finite(self):
        raise ValueError(
            f"collect_hessians: the input of module '{self.name}' ({type(self.module).__name__}) "
            f"contains NaN or Inf at calibration batch {self.batch_index}; check the model and the "
            f"calibration data (no Hessian can be built from non-finite activations)"
        )


def activation_exponent(x: Tensor, not_finite: Callable[[], None], who: str) -> int:
    """e with max|x| / 2^e in [1, 2) when max|x| lies outside [2^-32, 2^32], else 0 (the activations are
    multiplied as they are). ``not_finite()`` raises for NaN or Inf, which the one min / max reduction
    reaches; ``ValueError`` naming ``who`` where 4^e is beyond float64 (float64 activations beyond
    ~1e±150), which then cannot hold their Hessian."""
    if x.numel() == 0:
        return 0
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        not_finite()
    top = max(-lo, hi)
    if top == 0 or 2.0**-ACTIVATION_EXPONENT_RANGE <= top <= 2.0**ACTIVATION_EXPONENT_RANGE:
        return 0
    e = math.frexp(top)[1] - 1
    if abs(2 * e) > 1000:
        raise ValueError(
            f"{who}: its activations reach {top:.3g}: their squares, and so its Hessian 2/N X^T X, are beyond "
            "float64's range; rescale the model's activations (e.g. its input) towards 1"
        )
    return e


def times_power_of_two(x: Tensor, k: int) -> Tensor:
    """x * 2^k, exactly, as a new tensor: two factors 2^(k/2), inside x's range for every k that
    :func:`activation_exponent` gives x (|k| <= 149 for float32, where 2^149 itself would overflow)."""
    half = k // 2
    return (x * 2.0**half) * 2.0 ** (k - half)


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or Inf. One float32 reduction: a NaN or Inf anywhere makes the sum
    non-finite; only then, since large finite values can also overflow it (a float16 sum of a few
    thousand activations of ~100 does), are the entries checked one by one."""
    return math.isfinite(x.sum(dtype=torch.float32).item()) or bool(torch.isfinite(x).all())


PRODUCT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def product_dtype_of(value: str | torch.dtype | None, who: str) -> torch.dtype | None:
    """``product_dtype`` given as a dtype or its name, checked. float16 is refused: a product of
    float16 inputs overflows beyond 65504, while bfloat16 has float32's range."""
    if value is None:
        return None
    dtype = PRODUCT_DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in PRODUCT_DTYPES.values():
        raise ValueError(
            f"{who}: product_dtype must be None (the activations' precision) or one of "
            f"{', '.join(PRODUCT_DTYPES)}, got {value!r}"
        )
    return dtype


def call_model(model: nn.Module, batch, forward_fn: Callable | None = None):
    """The calling convention for calibration batches.

    ``forward_fn(model, batch)`` if given; else ``model(**batch)`` for a mapping, ``model(*batch)`` for a
    tuple or list, ``model(batch)`` for anything else (a tensor, a custom object).
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _functional_owner(model: nn.Module, name: str) -> str | None:
    """Name of the MultiheadAttention whose out_proj is ``name`` (its weight is used functionally)."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "out_proj":
        return None
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None
    return parent if isinstance(owner, nn.MultiheadAttention) else None


def compiled_owner(name: str) -> str | None:
    """Name of the ``torch.compile``'d module (an ``OptimizedModule``, whose original is ``_orig_mod``)
    that holds the module ``name``, if any ("<model>": the model itself is compiled)."""
    parts = name.split(".")
    if "_orig_mod" not in parts:
        return None
    return ".".join(parts[: parts.index("_orig_mod")]) or "<model>"


def never_ran_reason(model: nn.Module, name: str) -> str:
    owner = _functional_owner(model, name)
    if owner is not None:
        return REASON_OWNER_NOT_RUN.format(owner=owner or "<model>")
    compiled = compiled_owner(name)
    if compiled is not None and not hasattr(torch.compiler, "set_stance"):
        return REASON_COMPILED.format(owner=compiled)
    return REASON_NOT_RUN


@contextmanager
def compiled_code_eager():
    """Within the block, ``torch.compile``'d modules and functions run their Python code eagerly
    (``torch.compiler.set_stance("force_eager")``, torch >= 2.6): a graph compiled before calibration (in
    training or validation) holds no forward hooks, so the hooks on the modules inside it would never
    fire. Nothing is compiled unless ``torch._dynamo`` was imported, which is checked first (importing it
    costs seconds)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if sys.modules.get("torch._dynamo") is None or set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


class _IdentityProjection(nn.Module):
    """Stands in for a MultiheadAttention's out_proj: weight I, no bias, so the attention returns the
    concatenated heads, the input out_proj.weight is applied to."""

    def __init__(self, like: Tensor):
        super().__init__()
        self.weight = torch.eye(like.shape[1], dtype=like.dtype, device=like.device)
        self.bias = None


def out_proj_input(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor:
    """The input of ``mha.out_proj`` in the call ``mha(*args, **kwargs)`` that just ran.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` instead of
    calling ``out_proj``, so no hook on out_proj ever fires. The attention's own ``forward`` is run again
    on the same arguments with out_proj swapped for the identity (one more attention per call, during
    calibration only): what comes out, (…, embed_dim), is exactly what out_proj.weight multiplied.
    """
    proj = mha.out_proj
    mha.out_proj = _IdentityProjection(proj.weight)
    try:
        return mha.forward(*args, **kwargs)[0]  # forward, not __call__: no hook fires twice
    finally:
        mha.out_proj = proj


def register_input_hook(model: nn.Module, name: str, module: nn.Module, fn: Callable[[Tensor], None]):
    """Call ``fn(x)`` with the input of ``module``'s weight whenever the model uses it; returns the handle.

    A forward pre-hook on the module itself; for a MultiheadAttention's out_proj (used functionally by
    its parent) a forward hook on that attention that recomputes the input (:func:`out_proj_input`).
    """
    owner = _functional_owner(model, name)
    if owner is None:

        def pre_hook(m, args, kwargs):
            fn(args[0] if args else next(iter(kwargs.values())))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    mha = model.get_submodule(owner) if owner else model

    def hook(m, args, kwargs, output):
        fn(out_proj_input(m, args, kwargs))

    return mha.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def input_hooks(model: nn.Module, hooks: Mapping[str, tuple[nn.Module, Callable[[Tensor], None]]]):
    """Within the block, ``fn(x)`` sees the input of every ``{name: (module, fn)}`` (see
    :func:`register_input_hook`), with the model in eval mode and the fused attention fast path off: the
    fused MHA / TransformerEncoderLayer path bypasses the Linear submodules, the slow path calls them as
    modules (MultiheadAttention.out_proj excepted: see :func:`out_proj_input`), and ``torch.compile``'d
    code run eagerly (:func:`compiled_code_eager`). On exit, even by an error, the hooks are removed, the
    fast path setting and every submodule's train / eval mode restored.
    """
    modes = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    handles = []
    try:
        for name, (module, fn) in hooks.items():
            handles.append(register_input_hook(model, name, module, fn))
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with compiled_code_eager():
            yield
    finally:
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes.items():
            m.train(training)


def memory_budget(device: torch.device, max_memory: int | Mapping[str, int] | None) -> int:
    """The calibration budget on ``device``: ``max_memory`` (an int, or its entry for the device), else
    :func:`default_max_memory`."""
    budget = max_memory.get(str(device)) if isinstance(max_memory, Mapping) else max_memory
    return default_max_memory(device) if budget is None else budget


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


class _RecordedInputs:
    """Output matching's first pass keeps every call's input until the second pass pairs it: counted per
    device against the calibration budget (fixed when the pass starts), refused with an error before the
    device runs out rather than after."""

    def __init__(self, max_memory: int | Mapping[str, int] | None, offload: bool, who: str,
                 sums: Mapping[torch.device, int]) -> None:
        self.max_memory, self.offload, self.who = max_memory, offload, who
        self.used: dict[torch.device, int] = dict(sums)  # the Hessian and cross sums share the budget
        self.budgets: dict[torch.device, int] = {}

    def add(self, t: Tensor, name: str) -> None:
        dev = t.device
        if dev not in self.budgets:
            self.budgets[dev] = memory_budget(dev, self.max_memory)
        self.used[dev] = self.used.get(dev, 0) + t.numel() * t.element_size()
        if self.used[dev] > self.budgets[dev]:
            hint = "fewer calibration batches, a smaller sample_fraction (Linear inputs), or a larger max_memory"
            if dev.type != "cpu" and not self.offload:
                hint = "offload=True (the inputs kept on the CPU), " + hint
            raise MemoryError(
                f"{self.who}: output matching keeps each module's inputs of the full-precision pass until the "
                f"compressed model's pass pairs them; at module '{name}' they reached "
                f"{_size(self.used[dev])} on {dev} with the sums, above the budget of {_size(self.budgets[dev])}; "
                f"use {hint}"
            )


def check_memory(
    modules: Mapping[str, nn.Module], *, offload: bool, max_memory: int | Mapping[str, int] | None
) -> dict[torch.device, int]:
    """Refuse before allocating when the Hessian sums would not fit the budget of their device; returns
    the bytes the sums need per device.

    Without ``offload`` a module also holds buffered float32 samples: up to d per group, or 2 MiB
    in all if more (see ``_Accumulator``): half its float64 sum again, or 2 MiB.

    ``max_memory``: bytes for every device, or a mapping ``{"cpu": ..., "cuda:0": ...}``; ``None``: see
    :func:`default_max_memory`.
    """
    need: dict[torch.device, int] = {}
    sizes: dict[torch.device, list[tuple[int, str]]] = {}
    for name, m in modules.items():
        dev = torch.device("cpu") if offload else _module_device(m)
        nbytes = hessian_bytes(m) if offload else hessian_bytes(m) + max(hessian_bytes(m) // 2, PENDING_BYTES)
        need[dev] = need.get(dev, 0) + nbytes
        sizes.setdefault(dev, []).append((nbytes, name))
    for dev, nbytes in need.items():
        budget = memory_budget(dev, max_memory)
        if nbytes > budget:
            largest = ", ".join(f"'{n}' {b / 2**20:.1f} MiB" for b, n in sorted(sizes[dev], reverse=True)[:3])
            hint = "exclude the largest modules, calibrate them sequentially, or raise max_memory"
            if dev.type != "cpu":
                hint = "use offload=True (sums on the CPU), " + hint
            raise MemoryError(
                f"collect_hessians: the Hessian sums of {len(sizes[dev])} modules need "
                f"{nbytes / 2**20:.1f} MiB on {dev}, above the budget of {budget / 2**20:.1f} MiB "
                f"(largest: {largest}); {hint}"
            )
    return need


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable,
    modules: Mapping[str, nn.Module],
    *,
    forward_fn: Callable | None = None,
    offload: bool = False,
    max_memory: int | Mapping[str, int] | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    warn: bool = True,
    sample_fraction: float = 1.0,
    seed: int = 0,
    product_dtype: str | torch.dtype | None = None,
) -> CalibrationResult:
    """Run ``batches`` through ``model`` (eval mode, no grad) and return H = 2/N X^T X of each module.

    Args:
        model: the model; it is called as described in :func:`call_model` and left in the train/eval
            mode every submodule had. Batches are not moved: they must be on the model's device.
        batches: any iterable of batches (iterated once).
        modules: ``{name: module}`` of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` submodules.
        forward_fn: ``forward_fn(model, batch)`` replaces the default calling convention.
        offload: keep the float64 sums on the CPU instead of the module's device.
        max_memory: byte budget for the float64 sums, and without ``offload`` for the buffered samples
            too (the sums + max(half of them, 2 MiB): see :func:`check_memory`), per device; above it a
            ``MemoryError`` is raised before anything is allocated.
        reduce_fn: called on every sum before H is formed, e.g. ``torch.distributed.all_reduce`` under
            DDP, so that every rank ends with the same H (in place, or returning the reduced tensor).
        sample_fraction: in (0, 1]; below 1, each batch contributes this fraction of its samples to
            each Hessian: tokens of a Linear, whole output rows of a conv (see :func:`sample_units`),
            drawn uniformly with replacement by a generator seeded by ``seed``: an unbiased estimate at
            that fraction of the X^T X cost, which for a 3x3 conv is ~9x the conv's own arithmetic (see
            ``benchmarks/calibration.py``).
        product_dtype: the precision of each batch's X^T X product (the running sum is float64 in
            any case): ``None`` for the activations' own (float32 for half activations);
            ``"bfloat16"`` rounds the samples to 8 significant bits and each product's entries once
            more (|error| <= ~3 * 2^-8 of |X|^T|X| entrywise; 6e-4 relative in Frobenius norm on
            ResNet-20, against 2e-2 for ``sample_fraction=1/8``): products 3-4x faster where the
            hardware has bfloat16 arithmetic (CPUs with AVX512-BF16 or AMX, Ampere and later GPUs;
            elsewhere it can be slower than float32). ``"float32"`` / ``"float64"`` force that
            precision.

    Returns:
        :class:`CalibrationResult`. A module whose weight was never used in a way hooks see (not on
        the forward path, or used functionally as in ``F.linear(x, module.weight)``) is in ``skipped``
        with the reason and a :class:`CalibrationWarning` is issued. ``MultiheadAttention.out_proj``,
        used functionally by its parent, is calibrated through it (:func:`out_proj_input`).

    Raises:
        ValueError: no batches, an unsupported module, or NaN / Inf in a module's input (naming it).
        MemoryError: the Hessian sums would exceed ``max_memory``.
    """
    for name, m in modules.items():
        if not isinstance(m, SUPPORTED_MODULES):
            raise ValueError(
                f"collect_hessians: module '{name}' is a {type(m).__name__}; supported: "
                f"{', '.join(t.__name__ for t in SUPPORTED_MODULES)}"
            )
    check_fraction("collect_hessians", "sample_fraction", sample_fraction)
    product_dtype = product_dtype_of(product_dtype, "collect_hessians")
    check_memory(modules, offload=offload, max_memory=max_memory)

    workspace = Workspace()
    accs = {
        name: _Accumulator(
            name, m, torch.device("cpu") if offload else _module_device(m), sample_fraction, seed + i, not offload,
            product_dtype, workspace,
        )
        for i, (name, m) in enumerate(modules.items())
    }
    n_batches = 0
    with input_hooks(model, {acc.name: (acc.module, acc.add) for acc in accs.values()}):
        for batch in batches:
            for acc in accs.values():
                acc.batch_index = n_batches
            call_model(model, batch, forward_fn)
            n_batches += 1
        for acc in accs.values():
            acc.flush()
    if n_batches == 0:
        raise ValueError("collect_hessians: no calibration batches (the iterable was empty)")

    if reduce_fn is not None:
        # counts first, so every rank agrees on which modules ran (and then reduces the same sums)
        dev = next(iter(accs.values())).sum.device if accs else torch.device("cpu")
        counts = torch.tensor([[a.n, a.calls] for a in accs.values()], dtype=torch.float64, device=dev)
        counts = reduced(reduce_fn, counts)
        for a, (n, calls) in zip(accs.values(), counts.tolist()):
            a.n, a.calls = int(n), int(calls)

    result = CalibrationResult(n_batches=n_batches)
    for name, a in accs.items():
        if a.n == 0:
            result.skipped[name] = never_ran_reason(model, name)
            a.sum = None  # free it
            continue
        s = a.sum if reduce_fn is None else reduced(reduce_fn, a.sum)
        s = a.symmetric_sum(s)
        result.hessians[name] = LayerHessian(name, s.mul_(2.0 / a.n), a.n, a.calls)  # H = 2/N * X^T X
    if result.skipped and warn:
        lines = "\n".join(f"  {n}: {r}" for n, r in result.skipped.items())
        warnings.warn(
            f"collect_hessians: no Hessian for {len(result.skipped)} module(s):\n{lines}",
            CalibrationWarning,
            stacklevel=2,
        )
    return result


def reduced(reduce_fn: Callable[[Tensor], Tensor | None], t: Tensor) -> Tensor:
    """``reduce_fn(t)`` (a sum over processes), for reductions in place (returning None) or not."""
    out = reduce_fn(t)
    return t if out is None else out


_reduced = reduced  # the former name


class _PairedAccumulator:
    """Output matching for one module: its inputs x in the full-precision pass (:meth:`record`), paired
    call by call with its inputs x̃ in the compressed model's pass (:meth:`pair`) on the same samples
    (the units drawn in the first pass are reused in the second).

    float64 sums: S̃ = sum x̃ x̃^T exactly as :class:`_Accumulator` sums it for plain calibration (same
    draws, same buffering, same products), and, by whichever route costs less per sample:

    - covariance route: sum x̃ x^T and S = sum x x^T (d^2 + d^2/2 multiply-adds), from which W C^T and
      diag(W H W^T) follow once at the end;
    - output route: Y = W x, then sum Y x̃^T and sum Y^2 (2 * rows * d): cheaper when rows < 3/4 d
      (convolutions, where d = c_in * k^2; Linear layers that narrow their input).

    The first pass keeps each call's input (a Linear: its drawn tokens; a conv: the input tensor, whose
    patches are 9x larger) on ``store_device`` until the second pass pairs it.
    """

    def __init__(self, name: str, module: nn.Module, device: torch.device, sample_fraction: float, seed: int,
                 buffer: bool, product_dtype: torch.dtype | None, store_device: torch.device,
                 workspaces: tuple[Workspace, Workspace], who: str, recorded: _RecordedInputs | None = None):
        self.name, self.module, self.who = name, module, who
        self.recorded_inputs = recorded
        self.quant = _Accumulator(name, module, device, sample_fraction, seed, buffer, product_dtype)
        g, d, _ = hessian_shape(module)
        self.rows = module.weight.shape[0] // g
        self.by_outputs = 4 * self.rows < 3 * d
        self.full = None if self.by_outputs else _Accumulator(name, module, device, 1.0, 0, False, product_dtype)
        self.cross = torch.zeros((g, self.rows if self.by_outputs else d, d), dtype=torch.float64, device=device)
        self.energy = torch.zeros((g, self.rows), dtype=torch.float64, device=device) if self.by_outputs else None
        self.product_dtype, self.store_device, self.workspaces = product_dtype, store_device, workspaces
        self.stored: deque = deque()
        self.recorded = 0
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.n_pending = 0
        self.drift = False
        self._weight: Tensor | None = None
        self.exponents = (0, 0)  # the pending pairs are (x̃ / 2^eq, x / 2^ef) (see activation_exponent)

    def _dtype(self, x: Tensor) -> torch.dtype:
        return self.product_dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)

    @torch.no_grad()
    def record(self, x: Tensor) -> None:
        """Full-precision pass: draw this call's units as plain calibration would, keep the input."""
        x = x.detach()
        units = self.quant.draw_units(x)
        if isinstance(self.module, nn.Linear):
            Xt = layer_inputs(self.module, x, units, self._dtype(x))
            if Xt.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                Xt = Xt.clone()  # a view of x, which the model may change in place
            saved = Xt.to(self.store_device)
        else:
            saved = x.to(self.store_device, copy=True)
        if self.recorded_inputs is not None:
            self.recorded_inputs.add(saved, self.name)
        self.stored.append((tuple(x.shape), units, saved))
        self.recorded += 1

    def _raise_full_not_finite(self):
        raise ValueError(
            f"{self.who}: the input of module '{self.name}' ({type(self.module).__name__}) in the full-precision "
            f"model contains NaN or Inf; check the model and the calibration data"
        )

    def _mismatch(self, what: str) -> ValueError:
        return ValueError(
            f"{self.who}: match_outputs pairs the inputs of module '{self.name}' in the full-precision pass and "
            f"in the compressed model's pass call by call, but {what}; both passes must call it alike (the same "
            f"batches in the same order, no calls that depend on the data or on randomness)"
        )

    @torch.no_grad()
    def pair(self, x: Tensor) -> None:
        """Compressed model's pass: pair x̃ with the recorded x of the same call, same samples."""
        self.quant.calls += 1
        x = x.detach()
        if not self.stored:
            raise self._mismatch(f"it was called more often in the second pass ({self.quant.calls} calls) than "
                                 f"in the first ({self.recorded})")
        shape, units, saved = self.stored.popleft()
        if tuple(x.shape) != shape:
            raise self._mismatch(f"call {self.quant.calls} had an input of shape {tuple(x.shape)} in the second "
                                 f"pass and {shape} in the first")
        n_units, per_unit = sample_units(self.module, x)
        if units is not None:
            n_units = len(units)
        n = n_units * per_unit
        # NaN / Inf and the scale of x̃ and of x (see activation_exponent); pending pairs share the scales
        eq = activation_exponent(x, self.quant._raise_not_finite, f"{self.who}: module '{self.name}'")
        ef = activation_exponent(saved, self._raise_full_not_finite, f"{self.who}: module '{self.name}'")
        if (eq, ef) != self.exponents and self.pending:
            self._fold(None, None)
        self.quant.exponent, self.exponents = eq, (eq, ef)
        if self.full is not None:
            self.full.exponent = ef
        drift = eq != ef  # different largest entries: the inputs differ
        if eq:
            x = times_power_of_two(x, -eq)
        if ef:
            saved = times_power_of_two(saved, -ef)
        buffered = self.n_pending + n < self.quant.buffer_samples
        dtype = self._dtype(x)
        ws_q, ws_f = (None, None) if buffered or self.pending else self.workspaces
        Xq = layer_inputs(self.module, x, units, dtype, ws_q)  # (g, d, N)
        if isinstance(self.module, nn.Linear):
            Xf = saved.to(x.device)
        else:
            Xf = layer_inputs(self.module, saved.to(x.device), units, dtype, ws_f)
        if not self.drift and (drift or not torch.equal(Xq, Xf)):
            self.drift = True
        self.quant.n += n
        if buffered:
            if Xq.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                Xq = Xq.clone()
            self.pending.append((Xq, Xf))
            self.n_pending += n
            return
        self._fold(Xq, Xf)

    def _fold(self, Xq: Tensor | None, Xf: Tensor | None) -> None:
        if self.pending:
            pairs = self.pending + ([(Xq, Xf)] if Xq is not None else [])
            Xq = torch.cat([q for q, _ in pairs], dim=2)
            Xf = torch.cat([f for _, f in pairs], dim=2)
            self.pending, self.n_pending = [], 0
        self.quant._fold(Xq)  # S̃ += X̃^T X̃
        eq, ef = self.exponents  # X̃ and X were divided by 2^eq and 2^ef: products times 2^(eq + ef)
        if self.full is not None:
            self.full._fold(Xf)  # S += X^T X
            self.cross.add_(_products(Xq, Xf), alpha=math.ldexp(1.0, eq + ef))  # sum x̃ x^T
            return
        if self._weight is None:
            g, d = self.cross.shape[0], self.cross.shape[2]
            self._weight = self.module.weight.detach().reshape(g, self.rows, d).to(Xf.dtype)
        Y = _products(self._weight, Xf.transpose(1, 2))  # (g, rows, N): the full-precision outputs W x / 2^ef
        self.cross.add_(_products(Y, Xq), alpha=math.ldexp(1.0, eq + ef))  # sum (W x) x̃^T
        self.energy.add_(Y.square().sum(dim=2, dtype=torch.float64), alpha=math.ldexp(1.0, 2 * ef))

    def flush(self) -> None:
        if self.pending:
            self._fold(None, None)
        self.quant.flush()  # zeros if nothing ran (DDP reduces every rank's sums)
        if self.full is not None:
            self.full.flush()
        if self.stored:
            raise self._mismatch(f"it was called {self.recorded} times in the first pass and only "
                                 f"{self.quant.calls} in the second")

    def result(self, reduce_fn) -> MatchedHessian:
        """The reduced (DDP) sums as H̃, W C^T and diag(W H W^T); needs ``quant.n`` > 0."""
        a, scale = self.quant, 2.0 / self.quant.n
        Ht = a.symmetric_sum(a.sum if reduce_fn is None else reduced(reduce_fn, a.sum)).mul_(scale)
        cross = self.cross if reduce_fn is None else reduced(reduce_fn, self.cross)
        g, d = Ht.shape[0], Ht.shape[2]
        if self.full is not None:
            S = self.full.sum if reduce_fn is None else reduced(reduce_fn, self.full.sum)
            H = self.full.symmetric_sum(S).mul_(scale)
            W = self.module.weight.detach().reshape(g, self.rows, d).to(device=H.device, dtype=torch.float64)
            G = (W @ cross.transpose(1, 2)).mul_(scale)  # W (sum x x̃^T) 2/N = W C^T
            energy = ((W @ H) * W).sum(dim=2)
        else:
            G = cross.mul(scale)
            energy = (self.energy if reduce_fn is None else reduced(reduce_fn, self.energy)).mul(scale)
        if not (all_finite(G) and all_finite(energy)):
            raise ValueError(
                f"{self.who}: the input of module '{self.name}' ({type(self.module).__name__}) in the full-precision "
                f"model contains NaN or Inf; check the model and the calibration data"
            )
        return MatchedHessian(self.name, Ht, a.n, a.calls, cross=G, energy=energy, drift=self.drift)


def _products(A: Tensor, B: Tensor) -> Tensor:
    """A @ B^T per group: (g, m, N) x (g, k, N) -> (g, m, k); a 2-D mm for one group (CPU bfloat16 bmm
    misses oneDNN's kernel)."""
    if A.shape[0] == 1:
        return (A[0] @ B[0].T).unsqueeze(0)
    return A @ B.transpose(1, 2)


@torch.no_grad()
def collect_matched(
    model: nn.Module,
    batches: Iterable,
    modules: Mapping[str, nn.Module],
    *,
    full_precision: Callable[[], AbstractContextManager],
    forward_fn: Callable | None = None,
    offload: bool = False,
    max_memory: int | Mapping[str, int] | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    warn: bool = True,
    sample_fraction: float = 1.0,
    seed: int = 0,
    product_dtype: str | torch.dtype | None = None,
    who: str = "collect_matched",
) -> CalibrationResult:
    """:func:`collect_hessians` for output matching: each module's H̃ with its cross moments against the
    full-precision model's inputs on the same samples (:class:`MatchedHessian`).

    Two passes over ``batches``: the first inside ``full_precision()`` (a context manager under which
    the model computes its full-precision outputs, e.g. with the original weights of the already
    compressed layers swapped back in), recording each module's input x call by call; the second as the
    model is, pairing each input x̃ with the x of the same call, on the same drawn samples. ``batches``
    must give the same batches in the same order both times (a list, not a shuffling loader), and the
    model must call the modules alike: a different number of calls or input shapes is an error. The
    random number generators (CPU, and the CUDA devices of the modules) are reset between the passes, so
    a model that draws random numbers in eval mode draws the same ones in both.

    Cost: two forward passes; per sample, H̃ as in plain calibration and, per module, by the cheaper
    route, 1.5 d^2 or 2 * rows * d more multiply-adds (see :class:`_PairedAccumulator`). Memory: the
    sums (at most 2.5x those of plain calibration) and every recorded input of the modules until the
    second pass uses it: a Linear's (drawn) tokens, a conv's input tensor, of all batches, on the
    module's device or, with ``offload=True``, on the CPU. Sums and recorded inputs together stay within
    ``max_memory`` (its default as in :func:`check_memory`): past it, a ``MemoryError`` naming the module
    that crossed it, raised as the input is recorded, before the device runs out.

    Other arguments as in :func:`collect_hessians`; ``who`` names the caller in errors.
    """
    for name, m in modules.items():
        if not isinstance(m, SUPPORTED_MODULES):
            raise ValueError(
                f"{who}: module '{name}' is a {type(m).__name__}; supported: "
                f"{', '.join(t.__name__ for t in SUPPORTED_MODULES)}"
            )
    check_fraction(who, "sample_fraction", sample_fraction)
    product_dtype = product_dtype_of(product_dtype, who)
    # the extra sums (cross moments, full-precision S) are at most twice the H̃ sums
    sums = check_memory({**modules, **{f"{n} (cross sums)": m for n, m in modules.items()},
                         **{f"{n} (full-precision sums)": m for n, m in modules.items()}}, offload=offload,
                        max_memory=max_memory)

    workspaces = (Workspace(), Workspace())
    recorded = _RecordedInputs(max_memory, offload, who, sums)
    accs = {
        name: _PairedAccumulator(
            name, m, torch.device("cpu") if offload else _module_device(m), sample_fraction, seed + i, not offload,
            product_dtype, torch.device("cpu") if offload else _module_device(m), workspaces, who, recorded,
        )
        for i, (name, m) in enumerate(modules.items())
    }
    cuda = sorted({m.weight.device.index or 0 for m in modules.values() if m.weight.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # restored on exit: the second pass draws the same numbers
        with full_precision(), input_hooks(model, {a.name: (a.module, a.record) for a in accs.values()}):
            for batch in batches:
                call_model(model, batch, forward_fn)
    n_batches = 0
    with input_hooks(model, {a.name: (a.module, a.pair) for a in accs.values()}):
        for batch in batches:
            for a in accs.values():
                a.quant.batch_index = n_batches
            call_model(model, batch, forward_fn)
            n_batches += 1
        for a in accs.values():
            a.flush()
    if n_batches == 0:
        raise ValueError(f"{who}: no calibration batches (the iterable was empty)")

    if reduce_fn is not None:
        dev = next(iter(accs.values())).quant.sum.device if accs else torch.device("cpu")
        counts = torch.tensor([[a.quant.n, a.quant.calls, float(a.drift)] for a in accs.values()],
                              dtype=torch.float64, device=dev)
        counts = reduced(reduce_fn, counts)
        for a, (n, calls, drift) in zip(accs.values(), counts.tolist()):
            a.quant.n, a.quant.calls, a.drift = int(n), int(calls), drift > 0

    result = CalibrationResult(n_batches=n_batches)
    for name, a in accs.items():
        if a.quant.n == 0:
            result.skipped[name] = never_ran_reason(model, name)
            continue
        result.hessians[name] = a.result(reduce_fn)
    if result.skipped and warn:
        lines = "\n".join(f"  {n}: {r}" for n, r in result.skipped.items())
        warnings.warn(
            f"{who}: no Hessian for {len(result.skipped)} module(s):\n{lines}", CalibrationWarning, stacklevel=2
        )
    return result
