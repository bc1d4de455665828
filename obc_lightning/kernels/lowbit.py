"""torch's own low-bit matmul kernels behind :class:`~obc_lightning.packed.QuantizedLinear`.

A packed Linear with a scalar grid (``W[r, c] = s[r, g(c)] * (q[r, c] - z[r, g(c)])``, dense codes) can
skip the dequantization where torch ships a kernel that reads the codes directly:

- ``int4``: ``aten._weight_int4pack_mm_for_cpu`` (CPU; float32, bfloat16 and float16 activations) or
  ``aten._weight_int4pack_mm`` (CUDA tinygemm: bfloat16 activations; the CPU op of older torch). The
  kernel computes ``W[r, c] = (q[r, c] - 8) * S[r, b] + Z[r, b]`` per block b of ``a`` in {32, 64, 128,
  256} inputs, so any code of at most 4 bits fits (2- and 3-bit codes too) and our grid maps to it
  exactly in real arithmetic: ``S = s``, ``Z = s * (8 - z)`` (``a`` must divide the group size and the
  input width; a per-row grid repeats its scale over the blocks).
- ``int8``: ``aten._weight_int8pack_mm`` (``y = (x @ Wq^T) * S``, one scale per row) for per-row grids
  of any width: ``Wq = q - 128`` (int8), ``S = s``, and the zero point as a rank-one term,
  ``y += (sum_c x[c]) * s * (128 - z)`` (zero for a symmetric grid, z = 128).

Which ops exist, which weight layout they take and which activation dtypes they accept differ between
torch versions and devices (the project allows torch >= 2.1): every candidate op is found by feature
detection -- the op exists and, on a small problem, agrees with the dequantize path within the rounding
bound of :func:`rounding_bound` -- never by version number. What does not apply falls back to the
dequantize path, which stays the reference. No kernel computes a gradient: the module uses them only
when no gradient is needed.

This module knows only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

INT4_BLOCKS = (256, 128, 64, 32)  # the block sizes the int4 kernels accept, largest first
INT4_MID, INT8_MID = 8, 128  # the code each kernel's signed weight is measured from


@dataclass
class LowbitWeight:
    """A Linear's weight in one kernel's layout, for one device and activation dtype."""

    kernel: str  # "int4" / "int8"
    op: str  # the aten op, for reports
    matmul: Callable[[Tensor], Tensor]  # (rows, in) -> (rows, out), without the bias
    nbytes: int  # memory held by the layout

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        y = self.matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias


def rounding_bound(
    x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, mid: int, dtype: torch.dtype, y: Tensor
) -> Tensor:
    """An upper bound on |kernel - dequantize path| over the outputs ``y`` (rows, out), from the arithmetic.

    Both paths compute sum_c x[c] * s * (q[c] - z) for ``dtype`` activations x. The kernel splits each weight
    as s * (q - mid) + s * (mid - z), the int8 one adds the second part as a rank-one term; every scale,
    zero part, weight, partial result and output is rounded to ``dtype`` at most once (at most 6 roundings
    per product, unit roundoff u) and the K products are summed in float32 or better, in any order (gamma_K
    of float32, u32 = 2^-24: torch's CPU and CUDA kernels accumulate half types in float32). The dequantize
    path rounds each weight twice (float32, then ``dtype``) and sums the same way. With
    A = |x| @ (s * (|q - mid| + |mid - z|))^T, which bounds sum |x| * |each part|, each path is within
    (gamma_{K+2} + 6 u) A + 2 u |y| of the exact value, so the two are within twice that.

    ``codes`` (out, in), ``scales`` / ``zeros`` (out, in): every column's grid.
    """
    u = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    k = x.shape[-1] + 2
    gamma = k * u32 / (1 - k * u32)
    weight_parts = scales.double() * ((codes.double() - mid).abs() + (mid - zeros.double()).abs())
    a = x.double().abs() @ weight_parts.T
    return 2 * ((gamma + 6 * u) * a + 2 * u * y.double().abs())


# ------------------------------------------------------------------ layouts
def _int4_block(cols: int, group_size: int | None) -> int | None:
    """The largest int4 kernel block that divides the input width and the group (None: none does)."""
    span = cols if group_size is None else group_size
    return next((a for a in INT4_BLOCKS if cols % a == 0 and span % a == 0), None)


def _block_grids(scales: Tensor, zeros: Tensor, cols: int, group_size: int | None, block: int):
    """(out, cols // block) float64 scales and zero points of every kernel block."""
    first_col = torch.arange(0, cols, block, device=scales.device)
    g = torch.zeros_like(first_col) if group_size is None or scales.shape[1] == 1 else first_col // group_size
    return scales.double()[:, g], zeros.double()[:, g]


def _int4_pack(codes: Tensor, op_names: tuple[str, str], layout: str):
    """(the kernel's weight, its mm op): codes (out, in) as int32 values, or two per byte (even column high)."""
    convert, mm = (getattr(torch.ops.aten, n) for n in op_names)
    q = codes.to(torch.int32) if layout == "int32" else (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    cols = codes.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if cols % (16 * t) == 0)  # CUDA tiles; the CPU op ignores it
    return convert(q.contiguous(), inner_k_tiles), mm


# (convert op, mm op, layout of the codes handed to convert): newest first; the probe keeps the first that works
_INT4_CANDIDATES = {
    "cpu": (
        (("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"), "int32"),
        (("_convert_weight_to_int4pack", "_weight_int4pack_mm"), "int32"),
        (("_convert_weight_to_int4pack", "_weight_int4pack_mm"), "uint8"),
    ),
    "cuda": (
        (("_convert_weight_to_int4pack", "_weight_int4pack_mm"), "uint8"),  # torch >= 2.5
        (("_convert_weight_to_int4pack", "_weight_int4pack_mm"), "int32"),  # older
    ),
}


def _make_int4(candidate, codes, scales, zeros, group_size, dtype) -> LowbitWeight:
    (names, layout) = candidate
    cols = codes.shape[1]
    block = _int4_block(cols, group_size)
    s, z = _block_grids(scales, zeros, cols, group_size, block)
    # (cols // block, out, 2): S = s, Z = s * (8 - z), each rounded once to the activation dtype
    scale_and_zero = torch.stack([s.T, (s * (INT4_MID - z)).T], dim=-1).to(dtype).contiguous()
    packed, mm = _int4_pack(codes, names, layout)

    def matmul(x: Tensor) -> Tensor:
        return mm(x.contiguous(), packed, block, scale_and_zero)

    nbytes = packed.numel() * packed.element_size() + scale_and_zero.numel() * scale_and_zero.element_size()
    return LowbitWeight("int4", f"aten.{names[1]} (block {block})", matmul, nbytes)


def _make_int8(codes, scales, zeros, dtype) -> LowbitWeight:
    mm = torch.ops.aten._weight_int8pack_mm
    wq = (codes.to(torch.int16) - INT8_MID).to(torch.int8).contiguous()
    s64, z64 = scales.double()[:, 0], zeros.double()[:, 0]
    s = s64.to(dtype).contiguous()
    offset = None if bool((z64 == INT8_MID).all()) else (s64 * (INT8_MID - z64)).to(dtype)

    def matmul(x: Tensor) -> Tensor:
        x = x.contiguous()
        y = mm(x, wq, s)
        return y if offset is None else y + x.sum(dim=-1, keepdim=True) * offset

    nbytes = wq.numel() + s.numel() * s.element_size() + (0 if offset is None else offset.numel() * s.element_size())
    return LowbitWeight("int8", "aten._weight_int8pack_mm", matmul, nbytes)


# ------------------------------------------------------------------ feature detection
_PROBED: dict[tuple, object] = {}


def _probe_problem(device, bits: int, group_size: int | None):
    g = torch.Generator().manual_seed(0)
    rows, cols = 32, 256
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g).to(torch.uint8)
    ng = 1 if group_size is None else cols // group_size
    scales = (torch.rand(rows, ng, generator=g) + 0.5).to(torch.float16).float()
    zeros = torch.randint(0, 2**bits, (rows, ng), generator=g).to(torch.uint8)
    x = torch.randn(3, cols, generator=g)
    return [t.to(device) for t in (codes, scales, zeros, x)]


def _agrees(make, kind: str, device, dtype) -> bool:
    """Whether the kernel ``make`` builds runs on ``device`` with ``dtype`` activations and agrees with the
    dequantize path within :func:`rounding_bound` on a small problem with asymmetric grids."""
    bits, group_size, mid = (4, 64, INT4_MID) if kind == "int4" else (8, None, INT8_MID)
    codes, scales, zeros, x = _probe_problem(device, bits, group_size)
    x = x.to(dtype)
    try:
        lw = make(codes, scales, zeros, group_size, dtype)
        y = lw.matmul(x)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError):
        return False
    cols = codes.shape[1]
    g = torch.arange(cols, device=device) // (cols if group_size is None else group_size)
    s, z = scales[:, g], zeros[:, g].float()
    w = (s * (codes.float() - z)).to(dtype)
    ref = x @ w.T
    if y.shape != ref.shape or y.dtype != dtype:
        return False
    bound = rounding_bound(x, codes, s, z, mid, dtype, ref)
    return bool(((y.double() - ref.double()).abs() <= bound).all())


def _detect(kind: str, device: torch.device, dtype: torch.dtype):
    """The first candidate of ``kind`` that works on ``device.type`` with ``dtype`` activations (None: none)."""
    key = (kind, device.type, dtype)
    if key not in _PROBED:
        found = None
        if kind == "int4":
            for cand in _INT4_CANDIDATES.get(device.type, ()):
                if all(hasattr(torch.ops.aten, n) for n in cand[0]):
                    def make(c, s, z, gs, dt, cand=cand):
                        return _make_int4(cand, c, s, z, gs, dt)

                    if _agrees(make, kind, device, dtype):
                        found = cand
                        break
        elif hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            if _agrees(lambda c, s, z, gs, dt: _make_int8(c, s, z, dt), kind, device, dtype):
                found = "int8"
        _PROBED[key] = found
    return _PROBED[key]


# (device type, activation dtype) where torch's kernels run but are slower than the float matmul, so that
# "auto" dequantizes instead: on CPU their float32 path (AVX2, torch 2.13: 3-10x slower than float at batch 1,
# 17-70x at batch 64, where bfloat16 activations are 1.5-3x faster than float32; benchmarks/packed_inference.py)
SLOW = {("cpu", torch.float32)}


def prepare(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype,
    *,
    include_slow: bool = False,
) -> LowbitWeight | str:
    """The weight ``W = s * (q - z)`` (codes (out, in) uint8 on the target device, scales / zeros (out,
    n_groups)) in the layout of the kernel that serves it for ``dtype`` activations, or why none does.
    Where the kernels are known to be slow (:data:`SLOW`) only with ``include_slow``."""
    rows, cols = codes.shape
    device = codes.device
    if not include_slow and (device.type, dtype) in SLOW:
        return (
            f"torch's low-bit kernels on {device.type} are slow with {dtype_str(dtype)} activations: run the model in "
            "bfloat16 to use them (or kernel='kernel' to force them)"
        )
    reasons = []
    if bits <= 4:
        block = _int4_block(cols, group_size)
        cand = _detect("int4", device, dtype)
        if cand is None:
            reasons.append(f"no int4 kernel for {dtype_str(dtype)} activations on {device.type} in this torch")
        elif block is None:
            span = "the input width" if group_size is None else f"group_size {group_size} and the input width"
            reasons.append(f"int4 needs a block of 32, 64, 128 or 256 dividing {span} ({cols})")
        else:
            try:
                return _make_int4(cand, codes, scales, zeros, group_size, dtype)
            except RuntimeError as e:  # a shape rule of the op (e.g. out % 16 on CPU)
                reasons.append(f"int4: {str(e).splitlines()[0]}")
    if group_size is not None and scales.shape[1] > 1:
        reasons.append("int8 needs one grid per row")
    elif _detect("int8", device, dtype) is None:
        reasons.append(f"no int8 kernel for {dtype_str(dtype)} activations on {device.type} in this torch")
    else:
        try:
            return _make_int8(codes, scales, zeros, dtype)
        except RuntimeError as e:
            reasons.append(f"int8: {str(e).splitlines()[0]}")
    return "; ".join(reasons)


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
