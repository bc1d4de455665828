"""Storage schemes: how a compressed weight is stored as tensors, one class per scheme.

A module's *description* (``config``: the JSON object an export file's metadata and a packed module's
extra state hold) names its scheme. The scheme's class owns everything about that layout: the
description's validation (:func:`check_config`), its buffers with their dtypes, shapes and bits
(:meth:`StorageScheme.buffers`), the payload size (:meth:`~StorageScheme.payload_nbytes`, the one size
formula: the report, the fine-tuning quantizers and the file writer all use it), the checks of the
buffers' values on load and before save (:meth:`~StorageScheme.check_values`), the dequantization
(:meth:`~StorageScheme.dequantize`), and the write direction: from a solver's results, or from a
weight, to buffers (:meth:`~StorageScheme.from_results`, :meth:`~StorageScheme.encode`).

An *instance* of a scheme is the format one module's weight is in, without its codes: the grid (scales
and zero points), the codebook, DiffQ's mixed grid, or the sparsity pattern. ``compress_model`` and
fine-tuning attach it to the module (:mod:`obc_lightning.formats.record`); export recomputes the codes
from the weight (:meth:`~StorageScheme.encode`: exactly, since the weight is on its grid, each PQ
sub-vector equals a codebook row, ...), and refuses a weight that no longer is.

==================  ==============================  ==========================================================
class               ``scheme`` (layout key)         buffers
==================  ==============================  ==========================================================
ScalarScheme        "affine", "symmetric"           weight_codes, weight_scales, weight_zeros
ScalarNMScheme      "affine", "symmetric" (n_m)     weight_codes, weight_positions, weight_scales, weight_zeros
PQScheme            "pq"                            weight_codes, weight_codebook
MixedScheme         "mixed"                         weight_codes, weight_bits, weight_range
SparseMaskScheme    "sparse" (nnz)                  weight_mask, weight_values
SparseNMScheme      "sparse" (n_m)                  weight_values, weight_positions
==================  ==============================  ==========================================================

Each class's docstring gives its buffers, dequantization and size. In all of them ``W`` is the weight as
the (rows, d) matrix ``weight.reshape(out, -1)`` (d = in * kh * kw); a conv with g groups is g stacked
row blocks sharing one layout, so nothing in a description depends on g. Floating-point buffers keep
the dtype the description names (``scale_dtype`` / ``value_dtype``): it is part of the format.

This module knows only torch (and the grids).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from obc_lightning.formats.bits import (
    STORAGE_DTYPES,
    dtype_name,
    element_bits,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from obc_lightning.formats.nm import (
    MAX_NM_M,
    check_nm_positions,
    nm_columns,
    nm_position_bits,
    nm_select,
    nm_sizes,
)
from obc_lightning.grids import Grid, MixedGrid

SCALAR_SCHEMES = ("affine", "symmetric")
PQ_SCHEME = "pq"
SPARSE_SCHEME = "sparse"
MIXED_SCHEME = "mixed"
SCHEMES = (*SCALAR_SCHEMES, PQ_SCHEME, SPARSE_SCHEME, MIXED_SCHEME)
# the keys of a module's description, per scheme ("sparse": plus n_m, or nnz for the bitmask layout)
SCALAR_KEYS = ("kind", "bits", "group_size", "shape", "scheme", "scale_dtype", "dtype")
PQ_KEYS = ("kind", "scheme", "bits", "block_size", "n_centroids", "shape", "scale_dtype", "dtype")
SPARSE_KEYS = ("kind", "scheme", "shape", "value_dtype", "dtype")
MIXED_KEYS = ("kind", "scheme", "shape", "group_size", "min_bits", "max_bits", "bit_counts", "scale_dtype", "dtype")
MAX_PQ_CENTROIDS = 256  # codes are bit-packed at <= 8 bits
KINDS = ("Linear", "Conv1d", "Conv2d")
DENSE_CLASSES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
MATCH_ELEMENTS = 1 << 24  # sub-vector x centroid x entry products at a time (PQ codes from a weight)


def kind_of(m: nn.Module) -> str | None:
    """The kind ("Linear", "Conv1d", "Conv2d") of a dense module of that class or a subclass, else None."""
    for kind, cls in DENSE_CLASSES.items():
        if isinstance(m, cls):
            return kind
    return None


def n_groups_of(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def pq_code_bits(n_centroids: int) -> int:
    """Bits of one PQ code: ceil(log2 n_centroids), at least 1."""
    return max(1, (n_centroids - 1).bit_length())


def mixed_width_bits(config: Mapping) -> int:
    """Bits of one stored group width of a "mixed" description: ceil(log2(max_bits - min_bits + 1))."""
    return (config["max_bits"] - config["min_bits"]).bit_length()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rows_cols(config: Mapping) -> tuple[int, int]:
    return config["shape"][0], math.prod(config["shape"][1:])


def _header(kind: str, weight: Tensor) -> dict:
    return {"kind": kind, "shape": list(weight.shape), "dtype": dtype_name(weight.dtype)}


@dataclass(frozen=True)
class Buffer:
    """One stored tensor: its dtype and shape, and the bits of information it holds before byte padding
    (``n * bits`` for ``n`` values bit-packed at ``bits``; every bit of a floating-point tensor)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_bits(self.dtype) // 8


def _packed(n: int, bits: int) -> Buffer:
    return Buffer(torch.uint8, (packed_nbytes(n, bits),), n * bits)


def _plain(dtype: torch.dtype, shape: Sequence[int]) -> Buffer:
    return Buffer(dtype, tuple(shape), math.prod(shape) * element_bits(dtype))


class StorageScheme(ABC):
    """A storage scheme (classmethods: the layout of a description) and, as an instance, the format one
    module's weight is in (everything but the codes)."""

    keys: ClassVar[tuple[str, ...]] = ()  # the description's required keys
    layout_key: ClassVar[str | None] = None  # "n_m" / "nnz": the key that chooses this layout of the scheme
    storage_key: ClassVar[str] = "scale_dtype"  # the key naming the floating-point buffers' dtype
    takes_n_m: ClassVar[bool] = False  # has an N:M layout (scalar codes, sparse values)

    # ------------------------------------------------------------------ the description
    @classmethod  # noqa: B027  (a scheme may have nothing to check here)
    def check_fields(cls, config: dict, where: str, cols: int) -> None:
        """The scheme's own keys (kind, shape and dtypes are checked by :func:`check_config`)."""

    @classmethod  # noqa: B027  (a scheme may have nothing to check here)
    def check_layout(cls, config: dict, where: str) -> None:
        """The layout key (``n_m`` is checked by :func:`check_config` for the schemes that take it)."""

    @classmethod
    @abstractmethod
    def buffers(cls, config: Mapping) -> dict[str, Buffer]:
        """name -> :class:`Buffer` of every packed tensor of a (validated) description, in order."""

    @classmethod
    def buffer_specs(cls, config: Mapping) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (b.dtype, b.shape) for name, b in cls.buffers(config).items()}

    @classmethod
    def payload_nbytes(cls, config: Mapping) -> int:
        """Bytes of the packed tensors (what a file holds for the module, what a packed module keeps)."""
        return sum(b.nbytes for b in cls.buffers(config).values())

    @classmethod
    def payload_bits(cls, config: Mapping) -> int:
        """The same payload in bits before the byte padding of each bit-packed tensor."""
        return sum(b.bits for b in cls.buffers(config).values())

    @classmethod
    @abstractmethod
    def check_values(cls, config: Mapping, tensors: Mapping[str, Tensor], where: str) -> None:
        """The values of buffers whose names, dtypes and shapes are right (:func:`check_packed_tensors`)."""

    @classmethod
    @abstractmethod
    def dequantize(cls, config: Mapping, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """The weight, shape ``config["shape"]``, in ``dtype``, from checked buffers."""

    @classmethod
    @abstractmethod
    def layout(cls, config: Mapping) -> str:
        """The layout in words, for error messages."""

    @classmethod
    @abstractmethod
    def extra_repr(cls, config: Mapping) -> str:
        """The layout as a packed module's repr shows it."""

    # ------------------------------------------------------------------ a module's format (an instance)
    @classmethod
    @abstractmethod
    def from_packed(cls, config: Mapping, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> StorageScheme:
        """The format of a weight stored as ``tensors`` and dequantized to ``dtype`` (read direction)."""

    @abstractmethod
    def describe(self, kind: str, weight: Tensor, *, scale_dtype: str = "float16",
                 value_dtype: str = "float16") -> dict:
        """The description of ``weight`` stored in this format (no codes computed: sizes come from it)."""

    @abstractmethod
    def encode(self, where: str, kind: str, weight: Tensor, *, scale_dtype: str = "float16",
               value_dtype: str = "float16") -> tuple[dict, dict[str, Tensor]]:
        """(description, buffers) of ``weight`` in this format, its codes recomputed from it; ValueError
        naming ``where`` if the weight is not in this format (any more)."""

    def with_n_m(self, n_m: tuple[int, int]) -> StorageScheme:
        """The same format stored N:M (scalar codes, sparse values); the others are unchanged."""
        return self

    def to(self, device) -> StorageScheme:
        """The format with its tensors on ``device`` (itself if they are there already)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        if all(t.device == torch.device(device) for t in tensors.values()):
            return self
        return replace(self, **{k: t.to(device) for k, t in tensors.items()})

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}=<{dtype_name(v.dtype)} {tuple(v.shape)}>" if isinstance(v, Tensor)
                         else f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# ---------------------------------------------------------------------------------------------- scalar
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

    keys: ClassVar = SCALAR_KEYS
    takes_n_m: ClassVar = True

    @classmethod
    def check_fields(cls, config, where, cols):
        if not _is_int(config["bits"]) or not 2 <= config["bits"] <= 8:
            raise ValueError(f"{where}: bits must be an integer in [2, 8], got {config['bits']!r}")
        gs = config["group_size"]
        if gs is not None and (not _is_int(gs) or not 1 <= gs <= cols):
            raise ValueError(f"{where}: group_size must be null or an integer in [1, {cols}], got {gs!r}")

    @classmethod
    def _scale_buffers(cls, config) -> dict[str, Buffer]:
        rows, cols = _rows_cols(config)
        ng = n_groups_of(cols, config["group_size"])
        return {
            "weight_scales": _plain(STORAGE_DTYPES[config["scale_dtype"]], (rows, ng)),
            "weight_zeros": _plain(torch.uint8, (rows, ng)),
        }

    @classmethod
    def buffers(cls, config):
        rows, cols = _rows_cols(config)
        return {"weight_codes": _packed(rows * cols, config["bits"]), **cls._scale_buffers(config)}

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
        cols = _rows_cols(config)[1]
        gs = config["group_size"]
        if gs is None or zeros.shape[1] == 1:
            return zeros[:, :1].expand(-1, cols)
        return zeros[:, torch.arange(cols, device=zeros.device) // gs]

    @classmethod
    def dense_codes(cls, config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
        """(rows, d) uint8: the code of every weight."""
        rows, cols = _rows_cols(config)
        return unpack_bits(tensors["weight_codes"], config["bits"], rows * cols).view(rows, cols)

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        scales, zeros = tensors["weight_scales"], tensors["weight_zeros"]
        compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
        k = cls.dense_codes(config, tensors).to(compute)
        s, z = scales.to(compute), zeros.to(compute)
        gs, cols = config["group_size"], _rows_cols(config)[1]
        if gs is not None and s.shape[1] > 1:
            g = torch.arange(cols, device=k.device) // gs
            s, z = s[:, g], z[:, g]
        # the same expression, in the same order, as Grid.dequantize: s * (k - z)
        return (s * (k - z)).to(dtype).view(config["shape"])

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
        return {**_header(kind, weight), "bits": self.bits, "group_size": self.group_size,
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

    layout_key: ClassVar = "n_m"

    @classmethod
    def buffers(cls, config):
        n = nm_sizes(config)[3]
        return {
            "weight_codes": _packed(n, config["bits"]),
            "weight_positions": _packed(n, nm_position_bits(config["n_m"][1])),
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


# ---------------------------------------------------------------------------------- product quantization
@dataclass(repr=False, eq=False)
class PQScheme(StorageScheme):
    """Product quantization ("pq", :func:`~obc_lightning.solvers.pq.product_quantize`): sub-vectors of
    ``block_size`` consecutive inputs of a row replaced by entries of one codebook per module. A ternary
    module (TTQ) is a "pq" module with ``block_size`` 1 and the 3-entry codebook {0, +w_p, -w_n}.

    Buffers: ``weight_codes`` uint8, the (rows, J) sub-vector codes (J = d / block_size) in row-major order,
    packed at ``bits = ceil(log2 n_centroids)`` bits (``ceil(bits * rows * J / 8)`` bytes; so at most 256
    centroids); ``weight_codebook`` (n_centroids, block_size) in ``scale_dtype`` (float16 by default).

    Dequantization: ``W[r, j*b:(j+1)*b] = codebook[code[r, j]]`` (gathered in the codebook's dtype promoted
    to float32, then cast to the module's dtype: exact for a float16 codebook). A codebook is never
    rounded on export: it must be exactly representable in ``scale_dtype``.
    Size: ``ceil(bits * rows * J / 8) + n_centroids * block_size * (codebook entry bytes)``.

    As a format: the ``codebook`` (n_centroids, block_size); the codes are the rows of the codebook that
    the weight's sub-vectors equal.
    """

    codebook: Tensor
    block_size: int

    keys: ClassVar = PQ_KEYS

    @classmethod
    def check_fields(cls, config, where, cols):
        K, b, bits = config["n_centroids"], config["block_size"], config["bits"]
        if not _is_int(K) or not 2 <= K <= MAX_PQ_CENTROIDS:
            raise ValueError(f"{where}: n_centroids must be an integer in [2, {MAX_PQ_CENTROIDS}], got {K!r}")
        if bits != pq_code_bits(K):
            raise ValueError(
                f"{where}: bits must be ceil(log2 n_centroids) = {pq_code_bits(K)} for n_centroids={K}, got {bits!r}"
            )
        if not _is_int(b) or not 1 <= b <= cols or cols % b:
            raise ValueError(
                f"{where}: block_size must be an integer that divides the {cols} inputs per row of a weight of "
                f"shape {list(config['shape'])}, got {b!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = _rows_cols(config)
        b = config["block_size"]
        return {
            "weight_codes": _packed(rows * (cols // b), config["bits"]),
            "weight_codebook": _plain(STORAGE_DTYPES[config["scale_dtype"]], (config["n_centroids"], b)),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_codebook"]).all():
            raise ValueError(f"{where}: weight_codebook contains NaN or Inf")
        K, bits = config["n_centroids"], config["bits"]
        if K < 2**bits:  # codes K ... 2**bits - 1 fit in the bits but name no centroid
            rows, cols = _rows_cols(config)
            n = rows * (cols // config["block_size"])
            top = int(unpack_bits(tensors["weight_codes"], bits, n).max()) if n else 0
            if top >= K:
                raise ValueError(f"{where}: weight_codes holds code {top}, beyond the n_centroids={K} codebook entries")

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = _rows_cols(config)
        codebook = tensors["weight_codebook"]
        k = unpack_bits(tensors["weight_codes"], config["bits"], rows * (cols // config["block_size"])).long()
        compute = torch.promote_types(codebook.dtype, torch.float32)
        return codebook.to(compute)[k].to(dtype).view(config["shape"])

    @classmethod
    def layout(cls, config):
        return (
            f"a product-quantized weight of shape {config['shape']} (block_size={config['block_size']}, "
            f"n_centroids={config['n_centroids']}, {config['bits']}-bit codes)"
        )

    @classmethod
    def extra_repr(cls, config):
        return (
            f"scheme=pq, bits={config['bits']}, block_size={config['block_size']}, "
            f"n_centroids={config['n_centroids']}, codebook_dtype={config['scale_dtype']}"
        )

    @classmethod
    def pack(cls, config: Mapping, codes: Tensor, codebook: Tensor) -> dict[str, Tensor]:
        """Buffers from the (rows, J) codes and the stored codebook."""
        return {"weight_codes": pack_bits(codes.to(torch.int32), config["bits"]),
                "weight_codebook": codebook.contiguous()}

    # ------------------------------------------------------------------ the format
    @classmethod
    def from_results(cls, where, kind, weight, results, groups=1, scale_dtype="float16"):
        """(description, buffers) of a weight from its one PQResult (``codes``, ``codebook``,
        ``block_size``, ``n_centroids``), checked against it; a grouped conv's weight (out, in / g, kh, kw)
        is g stacked row blocks, as for scalars."""
        if len(results) != 1:
            raise ValueError(f"{where}: a product-quantized module takes one PQResult, got {len(results)} results")
        res = results[0]
        rows, cols = weight.shape[0], weight[0].numel()
        b, K = res.block_size, res.n_centroids
        cls._check_exportable(where, K, b, cols, weight.shape)
        codes, codebook = res.codes.detach().cpu(), res.codebook.detach().cpu()
        J = cols // b
        if (
            tuple(codes.shape) != (rows, J)
            or codes.is_floating_point()
            or codes.is_complex()
            or codes.dtype == torch.bool
            or tuple(codebook.shape) != (K, b)
            or not codebook.is_floating_point()
        ):
            raise ValueError(
                f"{where}: a PQResult with codes {codes.dtype} of shape {tuple(codes.shape)} and codebook "
                f"{codebook.dtype} of shape {tuple(codebook.shape)} does not fit its weight of shape "
                f"{tuple(weight.shape)} (integer codes of shape ({rows}, {J}) and a floating-point codebook of "
                f"shape ({K}, {b}) expected)"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"{where}: codes must be in [0, {K - 1}] for n_centroids={K}")
        return cls(codebook, b)._encode(where, kind, weight, scale_dtype, codes.long())

    @staticmethod
    def _check_exportable(where, K, b, cols, shape):
        if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= MAX_PQ_CENTROIDS:
            raise ValueError(
                f"{where}: n_centroids={K!r} cannot be exported: codes are bit-packed at 8 bits at most, so "
                f"n_centroids must be in [2, {MAX_PQ_CENTROIDS}]"
            )
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or cols % b:
            raise ValueError(
                f"{where}: block_size={b!r} does not divide the {cols} inputs per row of its weight of shape "
                f"{tuple(shape)}"
            )

    @classmethod
    def from_packed(cls, config, tensors, dtype):
        codebook = tensors["weight_codebook"]
        return cls(codebook.detach().to("cpu", torch.promote_types(codebook.dtype, torch.float32)),
                   config["block_size"])

    @property
    def n_centroids(self) -> int:
        return self.codebook.shape[0]

    def codes(self, where: str, weight: Tensor) -> Tensor:
        """(rows, J) long: the codebook row each sub-vector of ``weight`` equals (the first, if two rows
        are equal), compared in the weight's dtype; ValueError naming ``where`` if a sub-vector equals
        none.

        The nearest row by ||s - c||^2 = ||c||^2 - 2 s.c + ||s||^2 (one matrix product per chunk), then
        the equality checked entry by entry; only sub-vectors whose nearest row is not equal to them (a
        rounding near-tie between almost equal rows, or no match) are compared with every row."""
        rows, b = weight.shape[0], self.block_size
        sub = weight.detach().reshape(-1, b)
        book = self.codebook.to(device=sub.device, dtype=sub.dtype)
        compute = torch.promote_types(sub.dtype, torch.float32)
        bk = book.to(compute)
        norms = bk.square().sum(dim=1)
        out = torch.empty(sub.shape[0], dtype=torch.long, device=sub.device)
        step = max(1, MATCH_ELEMENTS // max(1, book.numel()))
        for i in range(0, sub.shape[0], step):
            out[i : i + step] = (norms - 2 * sub[i : i + step].to(compute) @ bk.T).argmin(dim=1)
        for j in (~(book[out] == sub).all(dim=1)).nonzero().flatten().tolist():
            eq = (book == sub[j]).all(dim=1)
            if not bool(eq.any()):
                r, c = divmod(j, sub.shape[0] // rows)
                raise ValueError(
                    f"{where}: its weight is not made of the entries of its recorded codebook: sub-vector {c} of row "
                    f"{r} (inputs {c * b} ... {c * b + b - 1}) is none of its {self.n_centroids} entries (was the "
                    "weight trained or changed after it was quantized?); quantize it again"
                )
            out[j] = int(eq.to(torch.uint8).argmax())
        return out.view(rows, -1)

    def describe(self, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        K = self.n_centroids
        return {**_header(kind, weight), "scheme": PQ_SCHEME, "bits": pq_code_bits(K), "block_size": self.block_size,
                "n_centroids": K, "scale_dtype": scale_dtype}

    def encode(self, where, kind, weight, *, scale_dtype="float16", value_dtype="float16"):
        return self._encode(where, kind, weight, scale_dtype, None)

    def _encode(self, where, kind, weight, scale_dtype, codes):
        W = weight.detach().cpu()
        codebook = self.codebook.detach().cpu()
        self._check_exportable(where, self.n_centroids, self.block_size, W[0].numel(), W.shape)
        if not torch.isfinite(codebook).all():
            raise ValueError(f"{where}: the codebook contains NaN or Inf")
        if codes is None:
            codes = self.codes(where, W)
        elif not torch.equal(codebook[codes].reshape(W.shape).to(W.dtype), W):
            raise ValueError(
                f"{where}: its weight is not codebook[codes] of the given PQResult (was the model changed after "
                "quantization? after fine-tuning the centroids, pass a result holding the updated codebook)"
            )
        stored = codebook.to(STORAGE_DTYPES[scale_dtype])
        if not torch.equal(stored.to(codebook.dtype), codebook):
            raise ValueError(
                f"{where}: scale_dtype={scale_dtype} cannot represent its {dtype_name(codebook.dtype)} codebook "
                "exactly; round the codebook to it first (product_quantize(..., codebook_dtype=torch.float16), the "
                f"default) or pass scale_dtype=torch.{dtype_name(codebook.dtype)}"
            )
        config = check_config(self.describe(kind, W, scale_dtype=scale_dtype), where)
        return config, self.pack(config, codes, stored)


# ------------------------------------------------------------------------------------- mixed precision
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

    keys: ClassVar = MIXED_KEYS

    @classmethod
    def check_fields(cls, config, where, cols):
        gs, lo, hi, counts = config["group_size"], config["min_bits"], config["max_bits"], config["bit_counts"]
        if not _is_int(gs) or not 1 <= gs <= cols:
            raise ValueError(f"{where}: group_size must be an integer in [1, {cols}], got {gs!r}")
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo < hi <= 8):
            raise ValueError(f"{where}: need integers 1 <= min_bits < max_bits <= 8, got {lo!r}, {hi!r}")
        rows = config["shape"][0]
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != hi - lo + 1
            or not all(_is_int(n) and n >= 0 for n in counts)
            or sum(counts) != rows * cols
        ):
            raise ValueError(
                f"{where}: bit_counts must be {hi - lo + 1} non-negative integers (weights per width {lo} ... {hi}) "
                f"summing to the {rows * cols} weights, got {counts!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = _rows_cols(config)
        lo = config["min_bits"]
        ng = n_groups_of(cols, config["group_size"])
        segments = [(n, lo + i) for i, n in enumerate(config["bit_counts"])]
        return {
            "weight_codes": Buffer(torch.uint8, (sum(packed_nbytes(n, b) for n, b in segments),),
                                   sum(n * b for n, b in segments)),
            "weight_bits": _packed(rows * ng, mixed_width_bits(config)),
            "weight_range": _plain(STORAGE_DTYPES[config["scale_dtype"]], (rows, 2)),
        }

    @classmethod
    def entry_bits(cls, config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
        """(rows, d) uint8: the bit width of every weight."""
        rows, cols = _rows_cols(config)
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
        rows, cols = _rows_cols(config)
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
        return {**_header(kind, weight), "scheme": MIXED_SCHEME, "group_size": self.grid.group_size,
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


# --------------------------------------------------------------------------------------- sparse floats
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

    keys: ClassVar = SPARSE_KEYS
    layout_key: ClassVar = "nnz"
    storage_key: ClassVar = "value_dtype"
    takes_n_m: ClassVar = True

    @classmethod
    def check_layout(cls, config, where):
        rows, cols = _rows_cols(config)
        nnz, numel = config.get("nnz"), rows * cols
        if not _is_int(nnz) or not 0 <= nnz <= numel:
            raise ValueError(
                f"{where}: a sparse weight without n_m needs nnz, an integer in [0, {numel}] (the stored weights "
                f"of shape {list(config['shape'])}), got {nnz!r}"
            )

    @classmethod
    def buffers(cls, config):
        rows, cols = _rows_cols(config)
        return {
            "weight_mask": _packed(rows * cols, 1),
            "weight_values": _plain(STORAGE_DTYPES[config["value_dtype"]], (config["nnz"],)),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_values"]).all():
            raise ValueError(f"{where}: weight_values contains NaN or Inf")
        rows, cols = _rows_cols(config)
        n_set = int(unpack_bits(tensors["weight_mask"], 1, rows * cols).sum())
        if n_set != config["nnz"]:
            raise ValueError(f"{where}: weight_mask has {n_set} bits set, nnz={config['nnz']} values are stored")

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = _rows_cols(config)
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
        return {**_header(kind, weight), "scheme": SPARSE_SCHEME, "value_dtype": value_dtype,
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
            "weight_values": _plain(STORAGE_DTYPES[config["value_dtype"]], (n,)),
            "weight_positions": _packed(n, nm_position_bits(config["n_m"][1])),
        }

    @classmethod
    def check_values(cls, config, tensors, where):
        if not torch.isfinite(tensors["weight_values"]).all():
            raise ValueError(f"{where}: weight_values contains NaN or Inf")
        check_nm_positions(config, tensors["weight_positions"], where)

    @classmethod
    def dequantize(cls, config, tensors, dtype):
        rows, cols = _rows_cols(config)
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
        return {**_header(kind, weight), "scheme": SPARSE_SCHEME, "value_dtype": value_dtype, "n_m": list(self.n_m)}


# ------------------------------------------------------------------------------- descriptions, any scheme
def scheme_of(config: Mapping) -> type[StorageScheme]:
    """The class of the scheme a description names (its ``scheme``, and ``n_m`` for the two layouts of
    scalar codes and of sparse values); unknown names fall to :class:`ScalarScheme`, whose check then
    refuses them."""
    name = config.get("scheme")
    if name == PQ_SCHEME:
        return PQScheme
    if name == MIXED_SCHEME:
        return MixedScheme
    nm = config.get("n_m") is not None
    if name == SPARSE_SCHEME:
        return SparseNMScheme if nm else SparseMaskScheme
    return ScalarNMScheme if nm else ScalarScheme


def check_config(config: Any, where: str) -> dict:
    """A packed weight's description, validated (keys: ``keys`` of its scheme's class, plus ``n_m`` for
    N:M storage and ``nnz`` for a sparse bitmask); returned with lists for ``shape``, ``n_m``,
    ``bit_counts``."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: metadata must be a JSON object, got {type(config).__name__}")
    scheme = scheme_of(config)
    missing = [k for k in scheme.keys if k not in config]
    if missing:
        raise ValueError(f"{where}: metadata lacks {missing}")
    kind, shape = config["kind"], config["shape"]
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if config["scheme"] not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {config['scheme']!r}")
    if scheme is ScalarScheme or scheme is ScalarNMScheme:  # bits first: the one key every scalar file has
        if not _is_int(config["bits"]) or not 2 <= config["bits"] <= 8:
            raise ValueError(f"{where}: bits must be an integer in [2, 8], got {config['bits']!r}")
    if not isinstance(shape, (list, tuple)) or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of positive integers, got {shape!r}")
    if len(shape) != {"Linear": 2, "Conv1d": 3, "Conv2d": 4}[kind]:
        raise ValueError(f"{where}: a {kind} weight cannot have shape {list(shape)}")
    scheme.check_fields(config, where, math.prod(shape[1:]))
    need = scheme.keys
    if "n_m" in config:
        nm = config["n_m"]
        if not scheme.takes_n_m:
            raise ValueError(
                f"{where}: n_m applies to the scalar and sparse schemes only, not to scheme {config['scheme']!r}"
            )
        if (
            not isinstance(nm, (list, tuple))
            or len(nm) != 2
            or not all(_is_int(x) for x in nm)
            or not 1 <= nm[0] < nm[1] <= MAX_NM_M
        ):
            raise ValueError(
                f"{where}: n_m must be a pair of integers [N, M] with 1 <= N < M <= {MAX_NM_M}, got {nm!r}"
            )
        per_group = shape[1]  # Linear: in_features; conv: in_channels / groups (at each kernel position)
        if per_group % nm[1]:
            what = "inputs" if kind == "Linear" else "input channels per conv group"
            raise ValueError(f"{where}: n_m={list(nm)}: M={nm[1]} does not divide the {per_group} {what}")
    scheme.check_layout(config, where)
    if scheme.layout_key is not None:
        need = (*need, scheme.layout_key)
    for key in (scheme.storage_key, "dtype"):
        if config[key] not in STORAGE_DTYPES:
            raise ValueError(f"{where}: {key} must be one of {list(STORAGE_DTYPES)}, got {config[key]!r}")
    return {k: (list(config[k]) if k in ("shape", "n_m", "bit_counts") else config[k]) for k in need}


def buffer_names(config: Mapping) -> tuple[str, ...]:
    """The packed tensors of a module of this description, in their usual order."""
    return tuple(scheme_of(config).buffers(config))


def buffer_specs(config: Mapping) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of each packed tensor of a (validated) description."""
    return scheme_of(config).buffer_specs(config)


def payload_nbytes(config: Mapping) -> int:
    """Bytes of the packed tensors of one module: the size formula of its scheme."""
    return scheme_of(config).payload_nbytes(config)


def payload_bits(config: Mapping) -> int:
    """Bits of the packed tensors of one module before byte padding."""
    return scheme_of(config).payload_bits(config)


def check_packed_tensors(config: dict, tensors: Mapping[str, Tensor], where: str) -> None:
    """The packed tensors {buffer name: tensor} agree with ``config``: names, dtypes, sizes, and values
    (zero points on the code range, finite scales > 0, finite codebook / sparse values, finite DiffQ
    ranges with lo <= hi, PQ codes below n_centroids, N:M positions below M and increasing in a group,
    nnz bits set in a sparse mask)."""
    scheme = scheme_of(config)
    specs = scheme.buffer_specs(config)
    missing = [k for k in specs if k not in tensors]
    unexpected = [k for k in tensors if k not in specs]
    if missing or unexpected:
        raise ValueError(
            f"{where}: {scheme.layout(config)} takes the tensors {list(specs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected}" if unexpected else "")
        )
    for name, (dtype, shape) in specs.items():
        t = tensors[name]
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{dtype_name(t.dtype)} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{where}: {name} must be {dtype_name(dtype)} of shape {shape} for {scheme.layout(config)}, got {got}"
            )
    scheme.check_values(config, tensors, where)


def dequantize_packed(config: dict, tensors: Mapping[str, Tensor], dtype=None) -> Tensor:
    """The weight, shape ``config["shape"]``, in ``dtype`` (default: ``config["dtype"]``), from the packed
    tensors {buffer name: tensor} of any scheme."""
    return scheme_of(config).dequantize(config, tensors, dtype or STORAGE_DTYPES[config["dtype"]])


def format_from_packed(config: Mapping, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> StorageScheme:
    """The format of a weight stored as ``tensors`` under ``config`` and dequantized to ``dtype``."""
    return scheme_of(config).from_packed(config, tensors, dtype)
