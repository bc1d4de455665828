"""Mixed precision (:class:`MixedScheme`, DiffQ): a bit width per group of a row, a range per row. This
module knows only torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from obc_lightning.formats.base import (
    MIXED_KEYS,
    MIXED_SCHEME,
    Buffer,
    StorageScheme,
    check_config,
    is_int,
    mixed_width_bits,
    n_groups_of,
    packed_buffer,
    plain_buffer,
    rows_cols,
    weight_header,
)
from obc_lightning.formats.bits import STORAGE_DTYPES, dtype_name, pack_bits, packed_nbytes, unpack_bits
from obc_lightning.grids import MixedGrid


@dataclass(repr=False, eq=False)
class MixedScheme(StorageScheme):
    """Mixed precision ("mixed": DiffQ's evaluation grid, :class:`~obc_lightning.grids.MixedGrid`): per row r
    a range [lo_r, hi_r], per group of ``group_size`` consecutive columns of the row (the last one may be
    shorter) its own bit width b in [min_bits, max_bits] (1 <= min_bits < max_bits <= 8), and
    ``bit_counts`` (max_bits - min_bits + 1 integers: how many weights have width min_bits, min_bits + 1,
    ...).

    Buffers: ``weight_range`` (rows, 2) in ``scale_dtype`` (float16 by default): lo_r, hi_r;
    ``weight_bits`` uint8, the rows * n_groups widths minus min_bits in row-major order, packed at
    ``ceil(log2(max_bits - min_bits + 1))`` bits; ``weight_codes`` uint8, one segment per width b =
    min_bits ... max_bits, in that order: the codes of every weight whose group has width b, in row-major
    order, packed at b bits (``ceil(bit_counts[b - min_bits] * b / 8)`` bytes; each segment starts on a
    byte).

    Dequantization (float32, float64 if the module is float64): Δ = (hi_r - lo_r) / (2^b - 1) and
    ``W[r, c] = lo_r + code[r, c] * Δ``. Size: ``Σ_b ceil(n_b * b / 8) + ceil(width bits * rows * n_groups
    / 8) + rows * 2 * (range bytes)``.

    As a format: the ``grid`` (its row ranges and group widths), ``min_bits`` / ``max_bits``, and
    ``range_dtype``, the dtype its ranges were rounded to (the one to store them in).
    """

    grid: MixedGrid
    min_bits: int
    max_bits: int
    range_dtype: torch.dtype = torch.float16

    names: ClassVar = (MIXED_SCHEME,)
    keys: ClassVar = MIXED_KEYS

    @classmethod
    def check_fields(cls, config, where, cols):
        gs, lo, hi, counts = config["group_size"], config["min_bits"], config["max_bits"], config["bit_counts"]
        if not is_int(gs) or not 1 <= gs <= cols:
            raise ValueError(f"{where}: group_size must be an integer in [1, {cols}], got {gs!r}")
        if not (is_int(lo) and is_int(hi) and 1 <= lo < hi <= 8):
            raise ValueError(f"{where}: need integers 1 <= min_bits < max_bits <= 8, got {lo!r}, {hi!r}")
        rows = config["shape"][0]
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != hi - lo + 1
            or not all(is_int(n) and n >= 0 for n in counts)
            or sum(counts) != rows * cols
        ):
            raise ValueError(
                f"{where}: bit_counts must be {hi - lo + 1} non-negative integers (weights per width {lo} ... {hi}) "
                f"summing to the {rows * cols} weights, got {counts!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = rows_cols(config)
        lo = config["min_bits"]
        ng = n_groups_of(cols, config["group_size"])
        segments = [(n, lo + i) for i, n in enumerate(config["bit_counts"])]
        return {
            "weight_codes": Buffer(torch.uint8, (sum(packed_nbytes(n, b) for n, b in segments),),
                                   sum(n * b for n, b in segments)),
            "weight_bits": packed_buffer(rows * ng, mixed_width_bits(config)),
            "weight_range": plain_buffer(STORAGE_DTYPES[config["scale_dtype"]], (rows, 2)),
        }

    @classmethod
    def entry_bits(cls, config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
        """(rows, d) uint8: the bit width of every weight."""
        rows, cols = rows_cols(config)
        ng = n_groups_of(cols, config["group_size"])
        widths = unpack_bits(tensors["weight_bits"], mixed_width_bits(config), rows * ng).view(rows, ng)
        return (widths + config["min_bits"])[:, torch.arange(cols, device=widths.device) // config["group_size"]]

    @classmethod
    def codes_and_bits(cls, config: Mapping, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """((rows, d) int32 codes, (rows, d) uint8 widths)."""
        entry = cls.entry_bits(config, tensors)
        codes = torch.zeros(entry.shape, dtype=torch.int32, device=entry.device)
        data, start = tensors["weight_codes"], 0
        for i, n in enumerate(config["bit_counts"]):
            b = config["min_bits"] + i
            end = start + packed_nbytes(n, b)
            if n:
                codes[entry == b] = unpack_bits(data[start:end], b, n).to(torch.int32)
            start = end
        return codes, entry

    @classmethod
    def check_values(cls, config, tensors, where):
        rng = tensors["weight_range"]
        bad = ~torch.isfinite(rng).all(dim=1) | (rng[:, 0] > rng[:, 1])
        if bool(bad.any()):
            r = int(bad.to(torch.uint8).argmax())
            raise ValueError(
                f"{where}: weight_range must hold finite (lo, hi) with lo <= hi in every row, got "
                f"({float(rng[r, 0])!r}, {float(rng[r, 1])!r}) in row {r}"
            )
        counts = torch.bincount(cls.entry_bits(config, tensors).reshape(-1).long(), minlength=config["max_bits"] + 1)
        if counts[config["max_bits"] + 1 :].any() or counts[: config["min_bits"]].sum() != 0:
            raise ValueError(f"{where}: weight_bits holds widths beyond max_bits={config['max_bits']}")
        if counts[config["min_bits"] :].tolist() != list(config["bit_counts"]):
            raise ValueError(
                f"{where}: weight_bits gives {counts[config['min_bits'] :].tolist()} weights per width, the metadata "
                f"says bit_counts={config['bit_counts']}"
            )

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rng = tensors["weight_range"]
        compute = torch.float64 if torch.float64 in (dtype, rng.dtype) else torch.float32
        codes, entry = cls.codes_and_bits(config, tensors)
        lo, hi = rng[:, :1].to(compute), rng[:, 1:].to(compute)
        # the same expression, in the same order, as MixedGrid.dequantize: lo + k * (hi - lo) / (2^b - 1)
        w = lo + codes.to(compute) * ((hi - lo) / (2 ** entry.to(compute) - 1))
        return w.to(dtype).view(config["shape"])

    @classmethod
    def layout(cls, config):
        return (
            f"a mixed-precision weight of shape {config['shape']} (group_size={config['group_size']}, "
            f"{config['min_bits']} ... {config['max_bits']} bits, bit_counts={config['bit_counts']})"
        )

    @classmethod
    def extra_repr(cls, config):
        return (
            f"scheme=mixed, bits={config['min_bits']}...{config['max_bits']}, group_size={config['group_size']}, "
            f"range_dtype={config['scale_dtype']}"
        )

    @classmethod
    def pack(cls, config: Mapping, codes: Tensor, group_bits: Tensor, ranges: Tensor) -> dict[str, Tensor]:
        """Buffers from the (rows, d) codes, the (rows, n_groups) integer widths (each in [min_bits,
        max_bits]) and the stored (rows, 2) ranges."""
        lo = config["min_bits"]
        bits = {"weight_bits": pack_bits((group_bits - lo).reshape(-1).to(torch.int32), mixed_width_bits(config))}
        entry = cls.entry_bits(config, bits)
        segments = [pack_bits(codes[entry == lo + i].to(torch.int32), lo + i) for i in range(len(config["bit_counts"]))]
        return {"weight_codes": torch.cat(segments), **bits, "weight_range": ranges.contiguous()}

    # ------------------------------------------------------------------ the format
    @classmethod
    def from_results(cls, where, kind, weight, results, groups=1, scale_dtype="float16"):
        """(description, buffers) of a weight from its one MixedResult (DiffQ: ``codes``, ``grid``,
        ``min_bits``, ``max_bits``, ``range_dtype``), checked against it."""
        if len(results) != 1:
            raise ValueError(
                f"{where}: a mixed-precision module takes one MixedResult, got {len(results)} results"
            )
        res = results[0]
        grid = res.grid.to("cpu")
        rows, cols = weight.shape[0], weight[0].numel()
        codes, bits = res.codes.detach().cpu(), grid.bits.detach()
        ng = n_groups_of(cols, grid.group_size)
        if tuple(codes.shape) != (rows, cols) or tuple(bits.shape) != (rows, ng) or grid.cols != cols:
            raise ValueError(
                f"{where}: a MixedResult with codes of shape {tuple(codes.shape)} and bit widths of shape "
                f"{tuple(bits.shape)} does not fit its weight of shape {tuple(weight.shape)} ({rows} x {cols}, {ng} "
                "groups per row)"
            )
        fmt = cls(grid, res.min_bits, res.max_bits, res.range_dtype)
        return fmt._encode(where, kind, weight, scale_dtype, codes,
                           "its weight is not the dequantized MixedResult (was the model changed after fine-tuning?)")

    @classmethod
    def from_packed(cls, config, tensors, dtype):
        rng = tensors["weight_range"].detach().cpu()
        compute = torch.float64 if torch.float64 in (dtype, rng.dtype) else torch.float32
        rows, cols = rows_cols(config)
        ng = n_groups_of(cols, config["group_size"])
        widths = unpack_bits(tensors["weight_bits"].cpu(), mixed_width_bits(config), rows * ng).view(rows, ng)
        grid = MixedGrid(rng[:, :1].to(compute), rng[:, 1:].to(compute), (widths + config["min_bits"]).to(compute),
                         config["group_size"], cols)
        return cls(grid, config["min_bits"], config["max_bits"], STORAGE_DTYPES[config["scale_dtype"]])

    def to(self, device):
        if self.grid.lo.device == torch.device(device):
            return self
        return replace(self, grid=self.grid.to(device))

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        entry = self.grid.per_column_bits().round().long().reshape(-1) - self.min_bits
        counts = torch.bincount(entry.cpu(), minlength=self.max_bits - self.min_bits + 1).tolist()
        return {**weight_header(kind, weight), "scheme": MIXED_SCHEME, "group_size": self.grid.group_size,
                "min_bits": self.min_bits, "max_bits": self.max_bits, "bit_counts": counts, "scale_dtype": scale_dtype}

    def encode(self, where, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return self._encode(where, kind, weight, scale_dtype, None,
                            "its weight is not on its recorded mixed-precision grid (was it trained or changed after "
                            "fine-tuning?); quantize it again")

    def _encode(self, where, kind, weight, scale_dtype, codes, mismatch):
        W = weight.detach().cpu()
        rows, cols = W.shape[0], W[0].numel()
        grid = self.grid.to("cpu")
        if tuple(grid.lo.shape) != (rows, 1) or grid.cols != cols:
            raise ValueError(
                f"{where}: its mixed-precision grid ({grid.lo.shape[0]} x {grid.cols}) does not fit its weight of "
                f"shape {tuple(W.shape)}"
            )
        bits = grid.bits
        if not torch.equal(bits, bits.round()) or bits.min() < self.min_bits or bits.max() > self.max_bits:
            raise ValueError(f"{where}: bit widths must be integers in [{self.min_bits}, {self.max_bits}]")
        if not 1 <= self.min_bits < self.max_bits <= 8:
            raise ValueError(
                f"{where}: mixed-precision codes are packed at 1 ... 8 bits; its widths range over "
                f"[{self.min_bits}, {self.max_bits}] (use max_bits <= 8)"
            )
        w = W.reshape(rows, cols)
        if codes is None:
            codes = grid.codes(w.to(grid.lo.dtype))
        if not torch.equal(grid.dequantize(codes).to(W.dtype), w):
            raise ValueError(f"{where}: {mismatch}")
        rng = torch.cat([grid.lo, grid.hi], dim=1)
        stored = rng.to(STORAGE_DTYPES[scale_dtype])
        if not torch.equal(stored.to(rng.dtype), rng):
            raise ValueError(
                f"{where}: scale_dtype={scale_dtype} cannot represent its ranges exactly (rounded to "
                f"{dtype_name(self.range_dtype)} where that dtype holds them, range [{float(rng.min()):.3g}, "
                f"{float(rng.max()):.3g}]); pass scale_dtype=torch.float32"
            )
        config = check_config(self.describe(kind, W, scale_dtype=scale_dtype), where)
        return config, self.pack(config, codes, bits.long(), stored)
