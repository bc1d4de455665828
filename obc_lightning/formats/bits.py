"""Bit packing and the byte sizes of stored values: the arithmetic every storage scheme is made of.

This module knows only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

FP32_BYTES = 4  # a full-precision weight, as the reports count an uncompressed one
# the dtypes a scheme stores its floating-point tensors in (scales, codebooks, ranges, sparse values)
STORAGE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
PACK_CHUNK = 1 << 18  # groups of 8 values widened to int64 at a time (bounds the temporary memory)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_bits(dtype: torch.dtype) -> int:
    return 8 * torch.empty(0, dtype=dtype).element_size()


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` values packed at ``bits`` bits: ceil(n * bits / 8)."""
    return -(-n * bits // 8)


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack integers in [0, 2**bits) densely into a 1-D uint8 tensor of ``ceil(n * bits / 8)`` bytes.

    Layout: value i occupies bits [i*bits, (i+1)*bits) of a bit stream, its least significant bit
    first; stream bit j is bit (j % 8) of byte (j // 8). Read as one little-endian integer, the bytes
    are sum_i value_i << (i * bits). Unused high bits of the last byte are 0. Every 8 values fill
    exactly ``bits`` bytes, which is the unit the implementation works in.
    """
    _check_pack_bits(bits)
    v = values.reshape(-1)
    n = v.numel()
    if n and (int(v.min()) < 0 or int(v.max()) > 2**bits - 1):
        raise ValueError(
            f"pack_bits: values must be in [0, {2**bits - 1}] for {bits} bits, got [{int(v.min())}, {int(v.max())}]"
        )
    if bits == 8:
        return v.to(torch.uint8)
    v = F.pad(v.to(torch.int32), (0, (-n) % 8)).view(-1, 8)
    shifts = torch.arange(8, device=v.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=v.device, dtype=torch.int64) * 8
    out = torch.empty(v.shape[0], bits, dtype=torch.uint8, device=v.device)
    for i in range(0, v.shape[0], PACK_CHUNK):
        # 8 * bits <= 56 bits: one int64 word per 8 values; the fields do not overlap, so sum == OR
        word = (v[i : i + PACK_CHUNK].to(torch.int64) << shifts).sum(dim=1)
        out[i : i + PACK_CHUNK] = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.view(-1)[: packed_nbytes(n, bits)]


def unpack_bits(data: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values, uint8, shape (n,)."""
    _check_pack_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
    if data.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"unpack_bits: {n} values of {bits} bits take {packed_nbytes(n, bits)} bytes, got {data.numel()}"
        )
    if bits == 8:
        return data
    if 8 % bits == 0:  # whole values per byte: value t of byte j at bits [t * bits, (t + 1) * bits)
        shifts = torch.arange(0, 8, bits, device=data.device, dtype=torch.uint8)
        return ((data.unsqueeze(1) >> shifts) & (2**bits - 1)).view(-1)[:n]
    n_words = -(-n // 8)
    d = F.pad(data, (0, n_words * bits - data.numel())).view(n_words, bits)
    shifts = torch.arange(8, device=d.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=d.device, dtype=torch.int64) * 8
    out = torch.empty(n_words, 8, dtype=torch.uint8, device=d.device)
    for i in range(0, n_words, PACK_CHUNK):
        word = (d[i : i + PACK_CHUNK].to(torch.int64) << byte_shifts).sum(dim=1)
        out[i : i + PACK_CHUNK] = ((word.unsqueeze(1) >> shifts) & (2**bits - 1)).to(torch.uint8)
    return out.view(-1)[:n]
