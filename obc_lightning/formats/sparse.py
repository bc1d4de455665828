"""Sparse float weights, pruned and not quantized: :class:`SparseMaskScheme` (a bitmask and the kept
values) and :class:`SparseNMScheme` (N of every M values and their positions). This module knows only
torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from obc_lightning.formats.base import (
    SPARSE_KEYS,
    SPARSE_SCHEME,
    StorageScheme,
    check_config,
    is_int,
    packed_buffer,
    plain_buffer,
    rows_cols,
    scheme_of,
    weight_header,
)
from obc_lightning.formats.bits import STORAGE_DTYPES, pack_bits, unpack_bits
from obc_lightning.formats.nm import check_nm_positions, nm_columns, nm_position_bits, nm_select, nm_sizes


@dataclass(repr=False, eq=False)
class SparseMaskScheme(StorageScheme):
    """Sparse float weights ("sparse": pruned, not quantized) as a bitmask and the kept values (description
    key ``"nnz"``, the number of stored weights; no ``n_m``), in ``value_dtype`` (float16 by default; part
    of the format, as the scales' dtype).

    Buffers: ``weight_mask`` uint8, bit i set iff weight i of ``weight.reshape(-1)`` is stored, packed at 1
    bit (``ceil(rows * d / 8)`` bytes; exactly ``nnz`` bits set); ``weight_values`` (nnz,) in
    ``value_dtype``, the stored weights in the same row-major order.

    Dequantization: ``W.reshape(-1)[mask] = values``, every other weight exactly 0 (written into a zero
    weight of the module's dtype: exact when it holds ``value_dtype``). The writer stores the non-zero
    weights of the weight rounded to ``value_dtype``, so a weight that rounds to 0 is not stored.
    Size: ``ceil(rows * d / 8) + nnz * (value bytes)``.

    As a format: nothing but the scheme (the non-zero weights are the pattern).
    """

    names: ClassVar = (SPARSE_SCHEME,)
    keys: ClassVar = SPARSE_KEYS
    layout_key: ClassVar = "nnz"
    storage_key: ClassVar = "value_dtype"
    takes_n_m: ClassVar = True

    @classmethod
    def check_layout(cls, config, where):
        rows, cols = rows_cols(config)
        nnz, numel = config.get("nnz"), rows * cols
        if not is_int(nnz) or not 0 <= nnz <= numel:
            raise ValueError(
                f"{where}: a sparse weight without n_m needs nnz, an integer in [0, {numel}] (the stored weights "
                f"of shape {list(config['shape'])}), got {nnz!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = rows_cols(config)
        return {
            "weight_mask": packed_buffer(rows * cols, 1),
            "weight_values": plain_buffer(STORAGE_DTYPES[config["value_dtype"]], (config["nnz"],)),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_values"]).all():
            raise ValueError(f"{where}: weight_values contains NaN or Inf")
        rows, cols = rows_cols(config)
        n_set = int(unpack_bits(tensors["weight_mask"], 1, rows * cols).sum())
        if n_set != config["nnz"]:
            raise ValueError(f"{where}: weight_mask has {n_set} bits set, nnz={config['nnz']} values are stored")

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = rows_cols(config)
        values = tensors["weight_values"].to(dtype)
        w = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        w.view(-1)[unpack_bits(tensors["weight_mask"], 1, rows * cols).bool()] = values
        return w.view(config["shape"])

    @classmethod
    def layout(cls, config):
        return (
            f"a sparse weight of shape {config['shape']} (bitmask, nnz={config['nnz']}, "
            f"value_dtype={config['value_dtype']})"
        )

    @classmethod
    def extra_repr(cls, config):
        return f"scheme=sparse, value_dtype={config['value_dtype']}, nnz={config['nnz']}"

    @classmethod
    def pack(cls, config: Mapping, weight: Tensor, where: str = "") -> dict[str, Tensor]:
        """Buffers from the weight already rounded to ``value_dtype``: its non-zero weights are the stored
        ones (``nnz`` must be their number)."""
        w = weight.reshape(-1)
        kept = w != 0
        return {"weight_mask": pack_bits(kept.to(torch.int32), 1), "weight_values": w[kept]}

    @classmethod
    def from_packed(cls, config, tensors, dtype):
        return SparseMaskScheme() if config.get("n_m") is None else SparseNMScheme(tuple(config["n_m"]))

    def with_n_m(self, n_m):
        return SparseNMScheme((int(n_m[0]), int(n_m[1])))

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        stored = weight.detach().to(STORAGE_DTYPES[value_dtype])
        return {**weight_header(kind, weight), "scheme": SPARSE_SCHEME, "value_dtype": value_dtype,
                "nnz": int(torch.count_nonzero(stored))}  # pack stores exactly these

    def encode(self, where, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        W = weight.detach().cpu()
        if not torch.isfinite(W).all():
            raise ValueError(f"{where}: its weight contains NaN or Inf")
        stored = W.to(STORAGE_DTYPES[value_dtype])
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"{where}: value_dtype={value_dtype} cannot represent its weights (largest |w| = "
                f"{float(W.abs().max()):.3g}); use value_dtype=torch.float32"
            )
        config = check_config(self.describe(kind, W, value_dtype=value_dtype), where)
        return config, scheme_of(config).pack(config, stored.reshape(W.shape[0], -1), where)


@dataclass(repr=False, eq=False)
class SparseNMScheme(SparseMaskScheme):
    """Sparse float weights stored N:M (description key ``"n_m": [N, M]``): the groups, positions, padding
    and entry order of :class:`ScalarNMScheme`, in ``value_dtype``.

    Buffers: ``weight_values`` (rows * G * N,) in ``value_dtype``, the value of stored entry e at index e;
    ``weight_positions`` uint8, their positions, packed at ``ceil(log2 M)`` bits as for N:M codes.

    Dequantization: ``W[r, column of entry e] = values[e]``, every other weight 0. Size:
    ``rows * d * N / M * (value bytes) + ceil(ceil(log2 M) * rows * d * N / M / 8)`` (2:4, float16: 9 bits
    per weight, 0.5625 of dense float16).

    As a format: ``n_m``, the pattern the weight satisfies.
    """

    n_m: tuple[int, int]

    names: ClassVar = (SPARSE_SCHEME,)
    layout_key: ClassVar = "n_m"

    @classmethod
    def check_layout(cls, config, where):
        if "nnz" in config:
            raise ValueError(
                f"{where}: a sparse weight stores either n_m (N:M layout) or nnz (bitmask layout), not both"
            )

    @classmethod
    def buffers(cls, config):
        n = nm_sizes(config)[3]
        return {
            "weight_values": plain_buffer(STORAGE_DTYPES[config["value_dtype"]], (n,)),
            "weight_positions": packed_buffer(n, nm_position_bits(config["n_m"][1])),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_values"]).all():
            raise ValueError(f"{where}: weight_values contains NaN or Inf")
        check_nm_positions(config, tensors["weight_positions"], where)

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = rows_cols(config)
        values = tensors["weight_values"].to(dtype)
        w = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        w.scatter_(1, nm_columns(config, tensors["weight_positions"]), values.view(rows, -1))
        return w.view(config["shape"])

    @classmethod
    def layout(cls, config):
        return (
            f"a sparse weight of shape {config['shape']} ({config['n_m'][0]}:{config['n_m'][1]}, "
            f"value_dtype={config['value_dtype']})"
        )

    @classmethod
    def extra_repr(cls, config):
        return f"scheme=sparse, value_dtype={config['value_dtype']}, n_m={tuple(config['n_m'])}"

    @classmethod
    def pack(cls, config, weight, where=""):
        """Buffers from the (rows, d) weight already rounded to ``value_dtype``; ValueError naming the
        worst group if a group has more than N non-zeros."""
        w = weight.reshape(config["shape"][0], -1)
        pos, col = nm_select(config, w != 0, where)
        return {
            "weight_values": w.gather(1, col).reshape(-1).contiguous(),
            "weight_positions": pack_bits(pos.reshape(-1).to(torch.int32), nm_position_bits(config["n_m"][1])),
        }

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return {**weight_header(kind, weight), "scheme": SPARSE_SCHEME, "value_dtype": value_dtype,
                "n_m": list(self.n_m)}
