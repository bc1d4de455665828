"""Scalar codes on a uniform grid: :class:`ScalarScheme` (dense codes) and :class:`ScalarNMScheme` (N of
every M codes and their positions). This module knows only torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from obc_lightning.formats.base import (
    SCALAR_KEYS,
    SCALAR_SCHEMES,
    Buffer,
    StorageScheme,
    check_config,
    is_int,
    n_groups_of,
    packed_buffer,
    plain_buffer,
    rows_cols,
    weight_header,
)
from obc_lightning.formats.bits import STORAGE_DTYPES, pack_bits, unpack_bits
from obc_lightning.formats.nm import check_nm_positions, nm_columns, nm_position_bits, nm_select, nm_sizes
from obc_lightning.grids import Grid


@dataclass(repr=False, eq=False)
class ScalarScheme(StorageScheme):
    """Scalar codes on a uniform grid ("affine", or "symmetric": zero point 2**(bits-1)), dense.

    Buffers: ``weight_codes`` uint8, the codes of W in row-major order packed by
    :func:`~obc_lightning.formats.bits.pack_bits` (``ceil(numel * bits / 8)`` bytes); ``weight_scales``
    (rows, n_groups) in ``scale_dtype`` (float16 by default); ``weight_zeros`` (rows, n_groups) uint8,
    the integer zero points (0 <= z <= 2**bits - 1). Column c is in group ``c // group_size`` of its row
    (one group per row with ``group_size`` null).

    Dequantization (float32, float64 if the scales or the module are float64, then cast to the module's
    dtype): ``W[r, c] = s[r, c // group_size] * (code[r, c] - z[r, c // group_size])``.
    Size: ``ceil(bits * numel / 8) + rows * n_groups * (scale bytes + 1)``.

    As a format: ``scales`` and ``zeros`` (rows, n_groups), the conv groups' grids stacked by rows (the
    zero points integer-valued, in the scales' dtype), ``bits``, ``group_size``, ``symmetric``.
    """

    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int | None
    symmetric: bool

    names: ClassVar = SCALAR_SCHEMES
    keys: ClassVar = SCALAR_KEYS
    takes_n_m: ClassVar = True

    @classmethod
    def check_fields(cls, config, where, cols):
        if not is_int(config["bits"]) or not 2 <= config["bits"] <= 8:
            raise ValueError(f"{where}: bits must be an integer in [2, 8], got {config['bits']!r}")
        gs = config["group_size"]
        if gs is not None and (not is_int(gs) or not 1 <= gs <= cols):
            raise ValueError(f"{where}: group_size must be null or an integer in [1, {cols}], got {gs!r}")

    @classmethod
    def _scale_buffers(cls, config) -> dict[str, Buffer]:
        rows, cols = rows_cols(config)
        ng = n_groups_of(cols, config["group_size"])
        return {
            "weight_scales": plain_buffer(STORAGE_DTYPES[config["scale_dtype"]], (rows, ng)),
            "weight_zeros": plain_buffer(torch.uint8, (rows, ng)),
        }

    @classmethod
    def buffers(cls, config):
        rows, cols = rows_cols(config)
        return {"weight_codes": packed_buffer(rows * cols, config["bits"]), **cls._scale_buffers(config)}

    @classmethod
    def check_values(cls, config, tensors, where):
        zeros, scales = tensors["weight_zeros"], tensors["weight_scales"]
        if zeros.numel() and int(zeros.max()) > 2 ** config["bits"] - 1:
            raise ValueError(
                f"{where}: zero points exceed {2 ** config['bits'] - 1}, the largest {config['bits']}-bit code"
            )
        bad = ~torch.isfinite(scales) | (scales <= 0)
        if bool(bad.any()):
            r, g = divmod(int(bad.reshape(-1).to(torch.uint8).argmax()), scales.shape[1])
            raise ValueError(
                f"{where}: weight_scales must be finite and > 0 (the grid's step), got {float(scales[r, g])!r} in "
                f"row {r}" + (f", group {g}" if scales.shape[1] > 1 else "")
            )

    @classmethod
    def column_zeros(cls, config: Mapping, zeros: Tensor) -> Tensor:
        """(rows, d): the zero point of every column's grid."""
        cols = rows_cols(config)[1]
        gs = config["group_size"]
        if gs is None or zeros.shape[1] == 1:
            return zeros[:, :1].expand(-1, cols)
        return zeros[:, torch.arange(cols, device=zeros.device) // gs]

    @classmethod
    def dense_codes(cls, config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
        """(rows, d) uint8: the code of every weight."""
        rows, cols = rows_cols(config)
        return unpack_bits(tensors["weight_codes"], config["bits"], rows * cols).view(rows, cols)

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        scales, zeros = tensors["weight_scales"], tensors["weight_zeros"]
        compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
        k = cls.dense_codes(config, tensors).to(compute)
        s, z = scales.to(compute), zeros.to(compute)
        gs, (rows, cols) = config["group_size"], rows_cols(config)
        if gs is not None and s.shape[1] > 1:
            if cols % gs == 0:  # groups as a dimension: broadcast, no (rows, cols) copies of s and z
                k, s, z = k.view(rows, cols // gs, gs), s.unsqueeze(-1), z.unsqueeze(-1)
            else:
                g = torch.arange(cols, device=k.device) // gs
                s, z = s[:, g], z[:, g]
        # the same expression, in the same order, as Grid.dequantize: s * (k - z), in place in k (one
        # (rows, cols) temporary in the compute dtype: the dequantized weight)
        return k.sub_(z).mul_(s).to(dtype).view(config["shape"])

    @classmethod
    def layout(cls, config):
        return f"a {config['bits']}-bit weight of shape {config['shape']} (group_size={config['group_size']})"

    @classmethod
    def extra_repr(cls, config):
        return (
            f"bits={config['bits']}, group_size={config['group_size']}, scheme={config['scheme']}, "
            f"scale_dtype={config['scale_dtype']}"
        )

    @classmethod
    def pack(cls, config: Mapping, codes: Tensor, scales: Tensor, zeros: Tensor, where: str = "") -> dict[str, Tensor]:
        """Buffers from the (rows, d) codes and the stored scales and zero points (rows, n_groups)."""
        return {
            "weight_codes": pack_bits(codes.to(torch.int32), config["bits"]),
            "weight_scales": scales.contiguous(),
            "weight_zeros": zeros.to(torch.uint8),
        }

    # ------------------------------------------------------------------ the format
    @classmethod
    def from_grids(cls, grids: Sequence[Grid], n_m: tuple[int, int] | None = None) -> ScalarScheme:
        """The format of a weight quantized on ``grids`` (one per conv group, rows stacked), stored N:M
        with ``n_m``; the tensors on the CPU."""
        g0 = grids[0]
        fmt = cls(
            torch.cat([g.scales for g in grids]).detach().cpu(),
            torch.cat([g.zeros for g in grids]).detach().cpu(),
            g0.n_bits,
            g0.group_size,
            g0.symmetric,
        )
        return fmt if n_m is None else fmt.with_n_m(n_m)

    @classmethod
    def from_results(cls, where: str, kind: str, weight: Tensor, results: Sequence, groups: int = 1,
                     scale_dtype: str = "float16") -> tuple[dict, dict[str, Tensor]]:
        """(description, buffers) of a weight from its solver results (QuantResults, one per conv group:
        ``codes``, ``scales``, ``rounded_zeros``, ``grid``), checked against it."""
        if len(results) != groups:
            raise ValueError(f"{where} has {groups} conv group(s) but {len(results)} result(s)")
        grids = [r.grid for r in results]
        bits, gs, sym = grids[0].n_bits, grids[0].group_size, grids[0].symmetric
        if any((g.n_bits, g.group_size, g.symmetric) != (bits, gs, sym) for g in grids):
            raise ValueError(f"{where}: its conv groups were quantized on different grids")
        rows, cols = weight.shape[0], weight[0].numel()
        codes = torch.cat([r.codes.cpu() for r in results])
        scales = torch.cat([r.scales.cpu() for r in results])
        zeros = torch.cat([r.rounded_zeros.cpu() for r in results])
        ng = n_groups_of(cols, gs)
        if tuple(codes.shape) != (rows, cols) or tuple(scales.shape) != (rows, ng) or zeros.shape != scales.shape:
            raise ValueError(
                f"{where}: results of shapes codes {tuple(codes.shape)}, scales {tuple(scales.shape)} do not "
                f"fit its weight of shape {tuple(weight.shape)} ({rows} x {cols}, {ng} group(s) per row)"
            )
        fmt = cls(scales, zeros, bits, gs, sym)
        return fmt._encode(where, kind, weight, scale_dtype, codes,
                           "the given results (was the model changed after compress_model?)")

    @classmethod
    def from_packed(cls, config, tensors, dtype):
        scales = tensors["weight_scales"]
        compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
        fmt = ScalarScheme(scales.detach().to("cpu", compute), tensors["weight_zeros"].detach().to("cpu", compute),
                           config["bits"], config["group_size"], config["scheme"] == "symmetric")
        return fmt if config.get("n_m") is None else fmt.with_n_m(tuple(config["n_m"]))

    def grid(self, cols: int) -> Grid:
        """The grid of a weight with ``cols`` inputs per row."""
        return Grid(self.scales, self.zeros, self.bits, self.group_size, cols, self.symmetric)

    def with_n_m(self, n_m):
        return ScalarNMScheme(self.scales, self.zeros, self.bits, self.group_size, self.symmetric,
                              (int(n_m[0]), int(n_m[1])))

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return {**weight_header(kind, weight), "bits": self.bits, "group_size": self.group_size,
                "scheme": "symmetric" if self.symmetric else "affine", "scale_dtype": scale_dtype}

    def encode(self, where, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return self._encode(where, kind, weight, scale_dtype, None,
                            f"its recorded {self.bits}-bit format (was the weight trained or changed after it was "
                            "quantized?); quantize it again")

    def _encode(self, where, kind, weight, scale_dtype, codes, source):
        W = weight.detach().cpu()
        rows, cols = W.shape[0], W[0].numel()
        ng = n_groups_of(cols, self.group_size)
        if tuple(self.scales.shape) != (rows, ng):
            raise ValueError(
                f"{where}: its format has scales of shape {tuple(self.scales.shape)}, its weight of shape "
                f"{tuple(W.shape)} needs ({rows}, {ng})"
            )
        maxq = 2**self.bits - 1
        zeros = self.zeros
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > maxq:
            raise ValueError(f"{where}: zero points must be integers in [0, {maxq}]")
        w = W.reshape(rows, cols)
        s, z = self.grid(cols).per_column()
        z = z.to(s.dtype)
        if codes is None or not torch.equal((s * (codes.to(s.dtype) - z)).to(W.dtype), w):
            # the weight may have moved on the same grid since (e.g. fine-tuned on it): read its codes
            codes = torch.clamp(torch.round(w.to(s.dtype) / s) + z, 0, maxq)
            if not torch.equal((s * (codes - z)).to(W.dtype), w):
                raise ValueError(f"{where}: its weight is not on the grid of {source}")
        stored = self.scales.to(STORAGE_DTYPES[scale_dtype])
        if not torch.isfinite(stored).all() or ((stored == 0) & (self.scales != 0)).any():
            raise ValueError(
                f"{where}: scale_dtype={scale_dtype} cannot represent its scales (range "
                f"[{float(self.scales.abs().min()):.3g}, {float(self.scales.abs().max()):.3g}]); use "
                "scale_dtype=torch.float32"
            )
        config = check_config(self.describe(kind, W, scale_dtype=scale_dtype), where)
        return config, self.pack(config, codes.to(torch.int32), stored, zeros, where)


@dataclass(repr=False, eq=False)
class ScalarNMScheme(ScalarScheme):
    """Scalar codes stored N:M-sparse (description key ``"n_m": [N, M]``, 1 <= N < M <= 256): the codes
    of exactly N entries per group of M inputs (:mod:`obc_lightning.formats.nm`: groups, positions,
    padding, entry order) and their positions.

    Buffers: ``weight_codes`` uint8, the rows * G * N codes of the stored entries in entry order, packed at
    ``bits`` (``ceil(bits * rows * d * N / M / 8)`` bytes); ``weight_positions`` uint8, their positions in
    their groups (0 ... M-1, strictly increasing within a group), same order, packed at ``ceil(log2 M)``
    bits; ``weight_scales``, ``weight_zeros`` as :class:`ScalarScheme`.

    Dequantization: the dense (rows, d) code matrix is the zero point of every column's grid, with the
    stored codes scattered to their columns; then ``W = s * (code - z)`` as for dense codes (an unstored
    weight is exactly 0). A zero weight is stored (padding) or implied with the code of 0 on its grid, its
    zero point. Size: ``ceil(bits * rows * d * N / M / 8) + ceil(ceil(log2 M) * rows * d * N / M / 8) + rows
    * n_groups * (scale bytes + 1)``.
    """

    n_m: tuple[int, int]

    names: ClassVar = SCALAR_SCHEMES
    layout_key: ClassVar = "n_m"

    @classmethod
    def buffers(cls, config):
        n = nm_sizes(config)[3]
        return {
            "weight_codes": packed_buffer(n, config["bits"]),
            "weight_positions": packed_buffer(n, nm_position_bits(config["n_m"][1])),
            **cls._scale_buffers(config),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        super().check_values(config, tensors, where)
        check_nm_positions(config, tensors["weight_positions"], where)

    @classmethod
    def dense_codes(cls, config, tensors):
        """(rows, d) uint8: the stored codes at their columns, every other entry its column's zero point."""
        rows = config["shape"][0]
        k = unpack_bits(tensors["weight_codes"], config["bits"], nm_sizes(config)[3]).view(rows, -1)
        col = nm_columns(config, tensors["weight_positions"])
        out = cls.column_zeros(config, tensors["weight_zeros"]).clone(memory_format=torch.contiguous_format)
        return out.scatter_(1, col, k)

    @classmethod
    def layout(cls, config):
        return super().layout(config)[:-1] + f", {config['n_m'][0]}:{config['n_m'][1]} sparse)"

    @classmethod
    def extra_repr(cls, config):
        return super().extra_repr(config) + f", n_m={tuple(config['n_m'])}"

    @classmethod
    def pack(cls, config, codes, scales, zeros, where: str = "N:M codes"):
        """The stored entries are the weights whose code is not their column's zero point (the non-zero
        weights, since every scale is > 0); ValueError naming the worst group if a group has more than N."""
        nonzero = codes != cls.column_zeros(config, zeros).to(codes.dtype)
        pos, col = nm_select(config, nonzero, where)
        return {
            "weight_codes": pack_bits(codes.gather(1, col), config["bits"]),
            "weight_positions": pack_bits(pos.reshape(-1).to(torch.int32), nm_position_bits(config["n_m"][1])),
            "weight_scales": scales.contiguous(),
            "weight_zeros": zeros.to(torch.uint8),
        }

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return {**super().describe(kind, weight, scale_dtype=scale_dtype), "n_m": list(self.n_m)}
