"""Bit-packed integer codes, sparse float weights, and the modules that hold them: ``QuantizedLinear``,
``QuantizedConv1d``, ``QuantizedConv2d``.

A packed module keeps, instead of a float weight, the buffers of its scheme (``buffer_names(config)``).

Scalar schemes ("affine", "symmetric"), three buffers:

- ``weight_codes``: uint8, the codes of ``weight.reshape(out, -1)`` in row-major order, packed by
  :func:`pack_bits` (``ceil(numel * bits / 8)`` bytes);
- ``weight_scales``: (out, n_groups), float16 by default (the dtype is part of the format: ``.half()`` or
  ``.to(dtype)`` move it between devices but never change its precision);
- ``weight_zeros``: (out, n_groups) uint8, the integer zero points (0 <= z <= 2**bits - 1).

and dequantizes ``W[r, c] = s[r, c // group_size] * (code[r, c] - z[r, c // group_size])`` on every
forward (computed in float32, float64 if the scales or the module are float64, then cast to the
module's dtype), or once with ``cache_weight=True``. Column c is in group ``c // group_size`` of the
row; a conv with g groups is g stacked row blocks sharing the same layout, so nothing in the format
depends on g. Size: ``ceil(bits * numel / 8) + out * n_groups * (scale bytes + 1)``.

N:M-sparse scalar weights (config key ``"n_m": [N, M]``, 1 <= N < M <= 256; absent: dense as above),
four buffers: ``weight_codes``, ``weight_positions``, ``weight_scales``, ``weight_zeros`` (the last two
exactly as above). The d = in * kh * kw columns of a row fall in G = d / M groups of M columns:

- Linear: column c is in group ``c // M``, at position ``c % M``;
- Conv1d / Conv2d (columns c = i * K + k, i the input channel within the conv group, k the flattened
  kernel position, K = kh * kw): group ``k * (in / M) + i // M``, position ``i % M`` -- M consecutive
  input channels at one kernel position (:func:`obc_lightning.solvers.prune.conv_nm_group_index`;
  M must divide in_channels / groups). In both cases the position of a column is its rank among the
  columns of its group in increasing column order.

Each group stores exactly N entries: its non-zero weights plus, when it has fewer than N, the zero
weights at its smallest remaining positions (code = the zero point of that column's grid, so they are
0). Stored entry e = (r * G + g) * N + j is the j-th of row r, group g (groups in increasing group id,
the N entries of a group in strictly increasing position):

- ``weight_codes``: uint8, the rows * G * N codes of the stored entries in that order, packed by
  :func:`pack_bits` at ``bits`` (``ceil(bits * rows * d * N / M / 8)`` bytes);
- ``weight_positions``: uint8, their positions within their groups (0 ... M-1, strictly increasing
  within a group), same order, packed at ``ceil(log2 M)`` bits.

Dequantization: the dense (rows, d) code matrix is the zero point of every column's grid, with the
stored codes scattered to their columns; then ``W = s * (code - z)`` exactly as for dense weights (so
an unstored weight is exactly 0). Size: ``ceil(bits * rows * d * N / M / 8) + ceil(ceil(log2 M) * rows
* d * N / M / 8) + out * n_groups * (scale bytes + 1)``.

Product quantization ("pq", see :mod:`obc_lightning.solvers.pq`), two buffers:

- ``weight_codes``: uint8, the (out, J) sub-vector codes (J = d / block_size, d = in * kh * kw) in
  row-major order, packed by :func:`pack_bits` at ``bits = ceil(log2 n_centroids)`` bits each
  (``ceil(bits * out * J / 8)`` bytes; so at most 256 centroids);
- ``weight_codebook``: (n_centroids, block_size), float16 by default (``scale_dtype`` names its
  dtype, which, as for the scales, ``.to(dtype)`` never changes).

and dequantizes ``W.reshape(out, -1)[r, j*b:(j+1)*b] = codebook[code[r, j]]`` (gathered in the
codebook's dtype promoted to float32, then cast to the module's dtype: exact for a float16 codebook).
Size: ``ceil(bits * out * J / 8) + n_centroids * block_size * (codebook entry bytes)``.

Sparse float weights ("sparse": pruned, not quantized), the kept weights at their float value in
``value_dtype`` (float16 by default; as for the scales, the dtype is part of the format and ``.to(dtype)``
never changes it); an unstored weight is exactly 0. Two layouts:

- N:M (config key ``"n_m": [N, M]``): the groups, positions, padding and entry order of the N:M scalar
  weights above (each group stores exactly N entries: its non-zero weights, plus zero weights at its
  smallest remaining positions when it has fewer than N), two buffers:

  - ``weight_values``: (rows * G * N,) in ``value_dtype``, the value of stored entry e at index e;
  - ``weight_positions``: uint8, their positions, packed at ``ceil(log2 M)`` bits exactly as above.

  Dequantization: ``W.reshape(rows, d)[r, column of entry e] = values[e]``, every other weight 0. Size:
  ``rows * d * N / M * (value bytes) + ceil(ceil(log2 M) * rows * d * N / M / 8)`` (2:4, float16: 9 bits
  per weight, 0.5625 of dense float16).
- unstructured (config key ``"nnz"``, the number of stored weights; no ``n_m``), two buffers:

  - ``weight_mask``: uint8, bit i set iff weight i of ``weight.reshape(-1)`` (row-major over
    ``weight.reshape(out, -1)``) is stored, packed by :func:`pack_bits` at 1 bit
    (``ceil(rows * d / 8)`` bytes); exactly ``nnz`` bits are set;
  - ``weight_values``: (nnz,) in ``value_dtype``, the stored weights in the same row-major order.

  Dequantization: ``W.reshape(-1)[mask] = values``, every other weight 0. Size: ``ceil(rows * d / 8) +
  nnz * (value bytes)``.

Mixed precision ("mixed": DiffQ's evaluation grid, :class:`~obc_lightning.grids.MixedGrid`): per row r a
range [lo_r, hi_r], per group of ``group_size`` consecutive columns of the row (the last one may be
shorter) its own bit width b in [min_bits, max_bits] (config keys; 1 <= min_bits < max_bits <= 8), and
``bit_counts`` (config key, max_bits - min_bits + 1 integers: how many weights have width min_bits,
min_bits + 1, ...). Three buffers:

- ``weight_range``: (rows, 2) in ``scale_dtype`` (float16 by default): lo_r, hi_r;
- ``weight_bits``: uint8, the rows * n_groups widths minus min_bits in row-major order, packed at
  ``ceil(log2(max_bits - min_bits + 1))`` bits;
- ``weight_codes``: uint8, one segment per width b = min_bits ... max_bits, in that order: the codes of
  every weight whose group has width b, in row-major order over ``weight.reshape(out, -1)``, packed at b
  bits (``ceil(bit_counts[b - min_bits] * b / 8)`` bytes; each segment starts on a byte).

Dequantization (float32, float64 if the module is float64): Δ = (hi_r - lo_r) / (2^b - 1) and
``W[r, c] = lo_r + code[r, c] * Δ``. Size: ``Σ_b ceil(n_b * b / 8) + ceil(width bits * rows * n_groups /
8) + rows * 2 * (range bytes)``.

The values are written into a zero weight of the module's dtype (exact when it holds ``value_dtype``).
A writer (:func:`sparse_pack`) stores the non-zero weights of the weight rounded to ``value_dtype``, so
a weight that rounds to 0 is not stored. A conv with g groups is g stacked row blocks, as for the
scalar schemes.

This module knows only torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PACKED_FORMAT = "obc_lightning.packed"
SCALAR_SCHEMES = ("affine", "symmetric")
PQ_SCHEME = "pq"
SPARSE_SCHEME = "sparse"
MIXED_SCHEME = "mixed"
SCHEMES = (*SCALAR_SCHEMES, PQ_SCHEME, SPARSE_SCHEME, MIXED_SCHEME)
# the buffers a packed module of each scheme holds (and the tensors an export file holds per module)
SCALAR_BUFFERS = ("weight_codes", "weight_scales", "weight_zeros")
NM_BUFFERS = ("weight_codes", "weight_positions", "weight_scales", "weight_zeros")
PQ_BUFFERS = ("weight_codes", "weight_codebook")
SPARSE_NM_BUFFERS = ("weight_values", "weight_positions")
SPARSE_MASK_BUFFERS = ("weight_mask", "weight_values")
MIXED_BUFFERS = ("weight_codes", "weight_bits", "weight_range")
ALL_BUFFERS = (
    "weight_codes",
    "weight_positions",
    "weight_scales",
    "weight_zeros",
    "weight_codebook",
    "weight_values",
    "weight_mask",
    "weight_bits",
    "weight_range",
)
# the keys of a module's description, per scheme ("sparse": plus n_m, or nnz for the bitmask layout)
SCALAR_KEYS = ("kind", "bits", "group_size", "shape", "scheme", "scale_dtype", "dtype")
PQ_KEYS = ("kind", "scheme", "bits", "block_size", "n_centroids", "shape", "scale_dtype", "dtype")
SPARSE_KEYS = ("kind", "scheme", "shape", "value_dtype", "dtype")
MIXED_KEYS = ("kind", "scheme", "shape", "group_size", "min_bits", "max_bits", "bit_counts", "scale_dtype", "dtype")
MAX_PQ_CENTROIDS = 256  # codes are bit-packed at <= 8 bits
MAX_NM_M = 256  # N:M positions are bit-packed at <= 8 bits
SCALE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
KINDS = ("Linear", "Conv1d", "Conv2d")
PACK_CHUNK = 1 << 18  # groups of 8 values widened to int64 at a time (bounds the temporary memory)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def packed_nbytes(n: int, bits: int) -> int:
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
    n_words = -(-n // 8)
    d = F.pad(data, (0, n_words * bits - data.numel())).view(n_words, bits)
    shifts = torch.arange(8, device=d.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=d.device, dtype=torch.int64) * 8
    out = torch.empty(n_words, 8, dtype=torch.uint8, device=d.device)
    for i in range(0, n_words, PACK_CHUNK):
        word = (d[i : i + PACK_CHUNK].to(torch.int64) << byte_shifts).sum(dim=1)
        out[i : i + PACK_CHUNK] = ((word.unsqueeze(1) >> shifts) & (2**bits - 1)).to(torch.uint8)
    return out.view(-1)[:n]


def n_groups_of(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def pq_code_bits(n_centroids: int) -> int:
    """Bits of one PQ code: ceil(log2 n_centroids), at least 1."""
    return max(1, (n_centroids - 1).bit_length())


def is_pq(config: Mapping) -> bool:
    return config.get("scheme") == PQ_SCHEME


def is_sparse(config: Mapping) -> bool:
    """A pruned float weight (scheme "sparse"), N:M or bitmask."""
    return config.get("scheme") == SPARSE_SCHEME


def is_mixed(config: Mapping) -> bool:
    """Mixed precision (scheme "mixed": DiffQ), a bit width per group and a range per row."""
    return config.get("scheme") == MIXED_SCHEME


def mixed_width_bits(config: Mapping) -> int:
    """Bits of one stored group width: ceil(log2(max_bits - min_bits + 1))."""
    return (config["max_bits"] - config["min_bits"]).bit_length()


def is_nm(config: Mapping) -> bool:
    """N:M storage (config key ``n_m``): of scalar codes, or of sparse float values."""
    return config.get("n_m") is not None


def buffer_names(config: Mapping) -> tuple[str, ...]:
    """The packed tensors of a module of this description, in their usual order."""
    if is_pq(config):
        return PQ_BUFFERS
    if is_mixed(config):
        return MIXED_BUFFERS
    if is_sparse(config):
        return SPARSE_NM_BUFFERS if is_nm(config) else SPARSE_MASK_BUFFERS
    return NM_BUFFERS if is_nm(config) else SCALAR_BUFFERS


def nm_position_bits(m: int) -> int:
    """Bits of one N:M position: ceil(log2 M), at least 1."""
    return max(1, (m - 1).bit_length())


def nm_group_of(config: Mapping) -> Tensor:
    """(d,) long: the N:M group id of every column of ``weight.reshape(out, -1)`` (module docstring)."""
    shape, M = config["shape"], config["n_m"][1]
    if config["kind"] == "Linear":
        return torch.arange(shape[1]) // M
    from obc_lightning.solvers.prune import conv_nm_group_index  # torch only; lazy: solvers import grids

    return conv_nm_group_index(shape[1], math.prod(shape[2:]), M).long()


def nm_members(config: Mapping) -> Tensor:
    """(G, M) long: ``members[g, p]`` = the column at position p of group g (increasing column order)."""
    group = nm_group_of(config)
    return torch.argsort(group, stable=True).view(-1, config["n_m"][1])


def _nm_sizes(config: Mapping) -> tuple[int, int, int, int]:
    """(rows, d, G, stored entries) of an N:M description."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    N, M = config["n_m"]
    return rows, cols, cols // M, rows * (cols // M) * N


def nm_select(config: Mapping, nonzero: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """The stored entries of an N:M description, from the (rows, d) mask of non-zero weights: (positions
    (rows, G, N), columns (rows, G * N)), long, in entry order. Each group keeps its non-zeros, padded
    with zeros at its smallest remaining positions; ValueError naming the worst group if a group has
    more than N non-zeros."""
    N, M = config["n_m"]
    rows, cols, G, _ = _nm_sizes(config)
    members = nm_members(config).to(nonzero.device)  # (G, M)
    nz = nonzero.reshape(rows, cols)[:, members]  # (rows, G, M)
    count = nz.sum(dim=2)
    if rows and int(count.max()) > N:
        flat = int(count.argmax())
        r, g = divmod(flat, G)
        raise ValueError(
            f"{where}: the weight is not {N}:{M} sparse: row {r}, group {g} (columns {members[g].tolist()} of "
            f"weight.reshape(out, -1)) has {int(count[r, g])} non-zero weights, at most {N} allowed"
        )
    ar = torch.arange(M, device=nonzero.device)
    key = (~nz).long() * M + ar  # non-zeros first, then zeros, each by increasing position
    pos = key.argsort(dim=2)[..., :N].sort(dim=2).values  # (rows, G, N), strictly increasing
    return pos, members.unsqueeze(0).expand(rows, G, M).gather(2, pos).view(rows, -1)


def nm_columns(config: Mapping, positions: Tensor) -> Tensor:
    """(rows, G * N) long: the column of ``weight.reshape(out, -1)`` of every stored entry, in entry
    order, from the packed ``weight_positions`` of an N:M description."""
    N, M = config["n_m"]
    rows, _, G, n = _nm_sizes(config)
    pos = unpack_bits(positions, nm_position_bits(M), n).view(rows, G, N).long()
    members = nm_members(config).to(positions.device)  # (G, M)
    return members.unsqueeze(0).expand(rows, G, M).gather(2, pos).view(rows, -1)


def _check_nm_positions(config: Mapping, positions: Tensor, where: str) -> None:
    N, M = config["n_m"]
    n = _nm_sizes(config)[3]
    pos = unpack_bits(positions, nm_position_bits(M), n).view(-1, N).long()
    if n and int(pos.max()) >= M:
        raise ValueError(f"{where}: weight_positions holds position {int(pos.max())}, beyond M-1 = {M - 1}")
    if N > 1 and n and not bool((pos[:, 1:] > pos[:, :-1]).all()):
        raise ValueError(f"{where}: weight_positions must be strictly increasing within each group of {M}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(config: Any, where: str) -> dict:
    """A packed weight's description, validated.

    Scalar schemes: kind, bits, group_size, shape, scheme, scale_dtype, dtype, and optionally n_m = [N, M]
    (N:M-sparse storage; absent: dense). Scheme "pq": kind, scheme, bits (= ceil(log2 n_centroids)),
    block_size, n_centroids, shape, scale_dtype (the codebook's), dtype. Scheme "sparse": kind, scheme,
    shape, value_dtype, dtype, and either n_m = [N, M] or nnz (the bitmask layout).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where}: metadata must be a JSON object, got {type(config).__name__}")
    pq, sparse, mixed = is_pq(config), is_sparse(config), is_mixed(config)
    need = PQ_KEYS if pq else SPARSE_KEYS if sparse else MIXED_KEYS if mixed else SCALAR_KEYS
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(f"{where}: metadata lacks {missing}")
    kind, shape = config["kind"], config["shape"]
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if config["scheme"] not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {config['scheme']!r}")
    if not (pq or sparse or mixed) and (not _is_int(config["bits"]) or not 2 <= config["bits"] <= 8):
        raise ValueError(f"{where}: bits must be an integer in [2, 8], got {config['bits']!r}")
    if not isinstance(shape, (list, tuple)) or not all(_is_int(s) and s > 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of positive integers, got {shape!r}")
    if len(shape) != {"Linear": 2, "Conv1d": 3, "Conv2d": 4}[kind]:
        raise ValueError(f"{where}: a {kind} weight cannot have shape {list(shape)}")
    cols = math.prod(shape[1:])
    if pq:
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
                f"shape {list(shape)}, got {b!r}"
            )
    elif mixed:
        gs, lo, hi, counts = config["group_size"], config["min_bits"], config["max_bits"], config["bit_counts"]
        if not _is_int(gs) or not 1 <= gs <= cols:
            raise ValueError(f"{where}: group_size must be an integer in [1, {cols}], got {gs!r}")
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo < hi <= 8):
            raise ValueError(f"{where}: need integers 1 <= min_bits < max_bits <= 8, got {lo!r}, {hi!r}")
        if (
            not isinstance(counts, (list, tuple))
            or len(counts) != hi - lo + 1
            or not all(_is_int(n) and n >= 0 for n in counts)
            or sum(counts) != shape[0] * cols
        ):
            raise ValueError(
                f"{where}: bit_counts must be {hi - lo + 1} non-negative integers (weights per width {lo} ... {hi}) "
                f"summing to the {shape[0] * cols} weights, got {counts!r}"
            )
    elif not sparse:
        gs = config["group_size"]
        if gs is not None and (not _is_int(gs) or not 1 <= gs <= cols):
            raise ValueError(f"{where}: group_size must be null or an integer in [1, {cols}], got {gs!r}")
    if "n_m" in config:
        nm = config["n_m"]
        if pq or mixed:
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
        need = (*need, "n_m")
    if sparse and "n_m" in config and "nnz" in config:
        raise ValueError(f"{where}: a sparse weight stores either n_m (N:M layout) or nnz (bitmask layout), not both")
    if sparse and "n_m" not in config:
        nnz, numel = config.get("nnz"), shape[0] * cols
        if not _is_int(nnz) or not 0 <= nnz <= numel:
            raise ValueError(
                f"{where}: a sparse weight without n_m needs nnz, an integer in [0, {numel}] (the stored weights "
                f"of shape {list(shape)}), got {nnz!r}"
            )
        need = (*need, "nnz")
    for key in ("value_dtype" if sparse else "scale_dtype", "dtype"):
        if config[key] not in SCALE_DTYPES:
            raise ValueError(f"{where}: {key} must be one of {list(SCALE_DTYPES)}, got {config[key]!r}")
    return {k: (list(config[k]) if k in ("shape", "n_m", "bit_counts") else config[k]) for k in need}


def buffer_specs(config: Mapping) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of each packed tensor of a (validated) description."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    if is_sparse(config):
        values = SCALE_DTYPES[config["value_dtype"]]
        if is_nm(config):
            n = _nm_sizes(config)[3]
            return {
                "weight_values": (values, (n,)),
                "weight_positions": (torch.uint8, (packed_nbytes(n, nm_position_bits(config["n_m"][1])),)),
            }
        return {
            "weight_mask": (torch.uint8, (packed_nbytes(rows * cols, 1),)),
            "weight_values": (values, (config["nnz"],)),
        }
    stored = SCALE_DTYPES[config["scale_dtype"]]
    if is_mixed(config):
        lo = config["min_bits"]
        codes = sum(packed_nbytes(n, lo + i) for i, n in enumerate(config["bit_counts"]))
        ng = n_groups_of(cols, config["group_size"])
        return {
            "weight_codes": (torch.uint8, (codes,)),
            "weight_bits": (torch.uint8, (packed_nbytes(rows * ng, mixed_width_bits(config)),)),
            "weight_range": (stored, (rows, 2)),
        }
    if is_pq(config):
        b = config["block_size"]
        return {
            "weight_codes": (torch.uint8, (packed_nbytes(rows * (cols // b), config["bits"]),)),
            "weight_codebook": (stored, (config["n_centroids"], b)),
        }
    ng = n_groups_of(cols, config["group_size"])
    if is_nm(config):
        n = _nm_sizes(config)[3]
        return {
            "weight_codes": (torch.uint8, (packed_nbytes(n, config["bits"]),)),
            "weight_positions": (torch.uint8, (packed_nbytes(n, nm_position_bits(config["n_m"][1])),)),
            "weight_scales": (stored, (rows, ng)),
            "weight_zeros": (torch.uint8, (rows, ng)),
        }
    return {
        "weight_codes": (torch.uint8, (packed_nbytes(rows * cols, config["bits"]),)),
        "weight_scales": (stored, (rows, ng)),
        "weight_zeros": (torch.uint8, (rows, ng)),
    }


def payload_nbytes(config: Mapping) -> int:
    """Bytes of the packed tensors of one module (the size formulas of the module docstring)."""
    return sum(
        math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for dtype, shape in buffer_specs(config).values()
    )


def _layout(config: Mapping) -> str:
    if is_mixed(config):
        return (
            f"a mixed-precision weight of shape {config['shape']} (group_size={config['group_size']}, "
            f"{config['min_bits']} ... {config['max_bits']} bits, bit_counts={config['bit_counts']})"
        )
    if is_pq(config):
        return (
            f"a product-quantized weight of shape {config['shape']} (block_size={config['block_size']}, "
            f"n_centroids={config['n_centroids']}, {config['bits']}-bit codes)"
        )
    if is_sparse(config):
        stored = "{}:{}".format(*config["n_m"]) if is_nm(config) else f"bitmask, nnz={config['nnz']}"
        return f"a sparse weight of shape {config['shape']} ({stored}, value_dtype={config['value_dtype']})"
    nm = f", {config['n_m'][0]}:{config['n_m'][1]} sparse" if is_nm(config) else ""
    return f"a {config['bits']}-bit weight of shape {config['shape']} (group_size={config['group_size']}{nm})"


def check_packed_tensors(config: dict, tensors: Mapping[str, Tensor], where: str) -> None:
    """The packed tensors {buffer name: tensor} agree with ``config``: names, dtypes, sizes, and values
    (zero points on the code range, finite scales > 0, finite codebook / sparse values, finite DiffQ
    ranges with lo <= hi, PQ codes below n_centroids,
    N:M positions below M and increasing in a group, nnz bits set in a sparse mask)."""
    specs = buffer_specs(config)
    missing = [k for k in specs if k not in tensors]
    unexpected = [k for k in tensors if k not in specs]
    if missing or unexpected:
        raise ValueError(
            f"{where}: {_layout(config)} takes the tensors {list(specs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected}" if unexpected else "")
        )
    for name, (dtype, shape) in specs.items():
        t = tensors[name]
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{dtype_name(t.dtype)} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{where}: {name} must be {dtype_name(dtype)} of shape {shape} for {_layout(config)}, got {got}"
            )
    if is_sparse(config):
        if not torch.isfinite(tensors["weight_values"]).all():
            raise ValueError(f"{where}: weight_values contains NaN or Inf")
        if is_nm(config):
            _check_nm_positions(config, tensors["weight_positions"], where)
            return
        numel = config["shape"][0] * math.prod(config["shape"][1:])
        n_set = int(unpack_bits(tensors["weight_mask"], 1, numel).sum())
        if n_set != config["nnz"]:
            raise ValueError(f"{where}: weight_mask has {n_set} bits set, nnz={config['nnz']} values are stored")
        return
    if is_mixed(config):
        rng = tensors["weight_range"]
        bad = ~torch.isfinite(rng).all(dim=1) | (rng[:, 0] > rng[:, 1])
        if bool(bad.any()):
            r = int(bad.to(torch.uint8).argmax())
            raise ValueError(
                f"{where}: weight_range must hold finite (lo, hi) with lo <= hi in every row, got "
                f"({float(rng[r, 0])!r}, {float(rng[r, 1])!r}) in row {r}"
            )
        counts = torch.bincount(mixed_entry_bits(config, tensors).reshape(-1).long(), minlength=config["max_bits"] + 1)
        if counts[config["max_bits"] + 1 :].any() or counts[: config["min_bits"]].sum() != 0:
            raise ValueError(f"{where}: weight_bits holds widths beyond max_bits={config['max_bits']}")
        if counts[config["min_bits"] :].tolist() != list(config["bit_counts"]):
            raise ValueError(
                f"{where}: weight_bits gives {counts[config['min_bits'] :].tolist()} weights per width, the metadata "
                f"says bit_counts={config['bit_counts']}"
            )
        return
    if is_pq(config):
        if not torch.isfinite(tensors["weight_codebook"]).all():
            raise ValueError(f"{where}: weight_codebook contains NaN or Inf")
        K, bits = config["n_centroids"], config["bits"]
        if K < 2**bits:  # codes K ... 2**bits - 1 fit in the bits but name no centroid
            rows, cols = config["shape"][0], math.prod(config["shape"][1:])
            n = rows * (cols // config["block_size"])
            top = int(unpack_bits(tensors["weight_codes"], bits, n).max()) if n else 0
            if top >= K:
                raise ValueError(f"{where}: weight_codes holds code {top}, beyond the n_centroids={K} codebook entries")
        return
    zeros, scales = tensors["weight_zeros"], tensors["weight_scales"]
    if zeros.numel() and int(zeros.max()) > 2 ** config["bits"] - 1:
        raise ValueError(
            f"{where}: zero points exceed {2 ** config['bits'] - 1}, the largest {config['bits']}-bit code"
        )
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bool(bad.any()):
        r, g = divmod(int(bad.reshape(-1).to(torch.uint8).argmax()), scales.shape[1])
        raise ValueError(
            f"{where}: weight_scales must be finite and > 0 (the grid's step), got {float(scales[r, g])!r} in row {r}"
            + (f", group {g}" if scales.shape[1] > 1 else "")
        )
    if is_nm(config):
        _check_nm_positions(config, tensors["weight_positions"], where)


def _column_zeros(config: Mapping, zeros: Tensor, cols: int) -> Tensor:
    """(rows, cols): the zero point of every column's grid."""
    gs = config["group_size"]
    if gs is None or zeros.shape[1] == 1:
        return zeros[:, :1].expand(-1, cols)
    return zeros[:, torch.arange(cols, device=zeros.device) // gs]


def mixed_entry_bits(config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
    """(rows, d) uint8: the bit width of every weight of a mixed-precision description."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    ng = n_groups_of(cols, config["group_size"])
    widths = unpack_bits(tensors["weight_bits"], mixed_width_bits(config), rows * ng).view(rows, ng)
    return (widths + config["min_bits"])[:, torch.arange(cols, device=widths.device) // config["group_size"]]


def mixed_pack(config: Mapping, codes: Tensor, group_bits: Tensor) -> dict[str, Tensor]:
    """{weight_codes, weight_bits} of a mixed-precision description from the (rows, d) codes and the
    (rows, n_groups) integer widths (each in [min_bits, max_bits])."""
    lo = config["min_bits"]
    bits = {"weight_bits": pack_bits((group_bits - lo).reshape(-1).to(torch.int32), mixed_width_bits(config))}
    entry = mixed_entry_bits(config, bits)
    segments = [pack_bits(codes[entry == lo + i].to(torch.int32), lo + i) for i in range(len(config["bit_counts"]))]
    return {"weight_codes": torch.cat(segments), **bits}


def mixed_codes(config: Mapping, tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """((rows, d) int32 codes, (rows, d) uint8 widths) of a mixed-precision description."""
    entry = mixed_entry_bits(config, tensors)
    codes = torch.zeros(entry.shape, dtype=torch.int32, device=entry.device)
    data, start = tensors["weight_codes"], 0
    for i, n in enumerate(config["bit_counts"]):
        b = config["min_bits"] + i
        end = start + packed_nbytes(n, b)
        if n:
            codes[entry == b] = unpack_bits(data[start:end], b, n).to(torch.int32)
        start = end
    return codes, entry


def dense_codes(config: Mapping, tensors: Mapping[str, Tensor]) -> Tensor:
    """(rows, d) uint8: the codes of every weight of a scalar description, dense or N:M (unstored entries
    of an N:M weight: the zero point of their column's grid)."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    codes = tensors["weight_codes"]
    if not is_nm(config):
        return unpack_bits(codes, config["bits"], rows * cols).view(rows, cols)
    k = unpack_bits(codes, config["bits"], _nm_sizes(config)[3]).view(rows, -1)
    col = nm_columns(config, tensors["weight_positions"])
    out = _column_zeros(config, tensors["weight_zeros"], cols).clone(memory_format=torch.contiguous_format)
    return out.scatter_(1, col, k)


def nm_pack(config: Mapping, codes: Tensor, zeros: Tensor, nonzero: Tensor, where: str) -> dict[str, Tensor]:
    """{weight_codes, weight_positions} of an N:M description from the dense (rows, d) codes, the
    (rows, n_groups) zero points and the (rows, d) mask of non-zero weights; ValueError naming the worst
    group if a group has more than N non-zeros."""
    rows, cols, _, _ = _nm_sizes(config)
    pos, col = nm_select(config, nonzero, where)
    # a zero weight is stored (padding) or implied with the code of 0 on its grid: the zero point
    canonical = torch.where(
        nonzero.reshape(rows, cols),
        codes.reshape(rows, cols).to(torch.int32),
        _column_zeros(config, zeros, cols).to(torch.int32),
    )
    return {
        "weight_codes": pack_bits(canonical.gather(1, col), config["bits"]),
        "weight_positions": pack_bits(pos.reshape(-1).to(torch.int32), nm_position_bits(config["n_m"][1])),
    }


def sparse_pack(config: Mapping, weight: Tensor, where: str) -> dict[str, Tensor]:
    """The buffers of a "sparse" description from the weight already rounded to its ``value_dtype``: its
    non-zero weights are the stored ones (the bitmask layout's ``nnz`` must be their number); with
    ``n_m``, ValueError naming the worst group if a group has more than N non-zeros."""
    rows = config["shape"][0]
    w = weight.reshape(rows, -1)
    if is_nm(config):
        pos, col = nm_select(config, w != 0, where)
        return {
            "weight_values": w.gather(1, col).reshape(-1).contiguous(),
            "weight_positions": pack_bits(pos.reshape(-1).to(torch.int32), nm_position_bits(config["n_m"][1])),
        }
    kept = w.reshape(-1) != 0
    return {"weight_mask": pack_bits(kept.to(torch.int32), 1), "weight_values": w.reshape(-1)[kept]}


def dequantize_packed(config: dict, tensors: Mapping[str, Tensor], dtype=None) -> Tensor:
    """The weight, shape ``config["shape"]``, in ``dtype`` (default: ``config["dtype"]``), from the packed
    tensors {buffer name: tensor} of any scheme."""
    dtype = dtype or SCALE_DTYPES[config["dtype"]]
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    if is_sparse(config):
        values = tensors["weight_values"].to(dtype)
        w = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        if is_nm(config):
            w.scatter_(1, nm_columns(config, tensors["weight_positions"]), values.view(rows, -1))
        else:
            w.view(-1)[unpack_bits(tensors["weight_mask"], 1, rows * cols).bool()] = values
        return w.view(config["shape"])
    if is_mixed(config):
        rng = tensors["weight_range"]
        compute = torch.float64 if torch.float64 in (dtype, rng.dtype) else torch.float32
        codes, entry = mixed_codes(config, tensors)
        lo, hi = rng[:, :1].to(compute), rng[:, 1:].to(compute)
        # the same expression, in the same order, as MixedGrid.dequantize: lo + k * (hi - lo) / (2^b - 1)
        w = lo + codes.to(compute) * ((hi - lo) / (2 ** entry.to(compute) - 1))
        return w.to(dtype).view(config["shape"])
    codes = tensors["weight_codes"]
    if is_pq(config):
        codebook = tensors["weight_codebook"]
        k = unpack_bits(codes, config["bits"], rows * (cols // config["block_size"])).long()
        compute = torch.promote_types(codebook.dtype, torch.float32)
        return codebook.to(compute)[k].to(dtype).view(config["shape"])
    scales, zeros = tensors["weight_scales"], tensors["weight_zeros"]
    compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
    k = dense_codes(config, tensors).to(compute)
    s, z = scales.to(compute), zeros.to(compute)
    gs = config["group_size"]
    if gs is not None and s.shape[1] > 1:
        g = torch.arange(cols, device=codes.device) // gs
        s, z = s[:, g], z[:, g]
    # the same expression, in the same order, as Grid.dequantize: s * (k - z)
    return (s * (k - z)).to(dtype).view(config["shape"])


class _QuantizedBase(nn.Module):
    """Common part of the packed modules: buffers, dequantization, extra state, dtype bookkeeping."""

    _kind = ""

    def _init_packed(self, config: dict, tensors: Mapping[str, Tensor], bias: Tensor | None, check: bool = True):
        config = check_config(dict(config, kind=self._kind), type(self).__name__)
        if check:
            check_packed_tensors(config, tensors, type(self).__name__)
        self.config = config
        for name in buffer_names(config):  # the scheme's buffers (module docstring)
            self.register_buffer(name, tensors[name])
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone())
        self.register_parameter("bias", bias)  # the dense module's own Parameter: optimizers keep tracking it
        self._dtype = SCALE_DTYPES[config["dtype"]]  # the dense weight's dtype; follows .to(dtype)
        self.cache_weight = False
        self._weight_cache: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (read only: assigning to it has no effect on the codes)."""
        if self._weight_cache is not None:
            return self._weight_cache
        w = dequantize_packed(self.config, self.packed_tensors(), self._dtype)
        if self.cache_weight:
            self._weight_cache = w
        return w

    def packed_tensors(self) -> dict[str, Tensor]:
        """{buffer name: buffer} of this module's scheme (what an export file holds for it)."""
        return {name: getattr(self, name) for name in buffer_names(self.config)}

    @property
    def scheme(self) -> str:
        """The scheme: "affine" / "symmetric" (scalar grid), "pq" (product quantization) or "sparse"
        (pruned float weights)."""
        return self.config["scheme"]

    @property
    def bits(self) -> int | None:
        """Bits per code: per weight (scalar schemes), per sub-vector of ``block_size`` weights ("pq");
        None for "sparse", which stores float values."""
        return self.config.get("bits")

    @property
    def group_size(self) -> int | None:
        """Inputs per scale (None: one per row; also None for "pq", which has no groups)."""
        return self.config.get("group_size")

    @property
    def block_size(self) -> int | None:
        """Inputs per PQ sub-vector (None for the scalar schemes)."""
        return self.config.get("block_size")

    @property
    def n_centroids(self) -> int | None:
        """PQ codebook entries (None for the scalar schemes)."""
        return self.config.get("n_centroids")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) of a weight stored N:M-sparse (scalar codes or sparse values), None otherwise."""
        nm = self.config.get("n_m")
        return None if nm is None else (nm[0], nm[1])

    def _apply(self, fn, recurse=True):
        before = self.packed_tensors()
        super()._apply(fn, recurse)
        for name, t in before.items():  # the stored precision is the format: scales / codebook / values only move
            now = getattr(self, name)
            if now.dtype != t.dtype:
                setattr(self, name, t.to(now.device))
        self._dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        self.config = dict(self.config, dtype=dtype_name(self._dtype))
        self._weight_cache = None
        return self

    def get_extra_state(self) -> dict:
        return {"format": PACKED_FORMAT, **self.config}

    def set_extra_state(self, state: Any) -> None:
        where = f"{type(self).__name__} extra state"
        if not isinstance(state, dict) or state.get("format") != PACKED_FORMAT:
            raise ValueError(f"{where}: not an {PACKED_FORMAT} description: {state!r}")
        other = check_config({k: v for k, v in state.items() if k != "format"}, where)
        mine = {k: v for k, v in self.config.items() if k != "dtype"}
        if {k: v for k, v in other.items() if k != "dtype"} != mine:
            raise ValueError(
                f"{where}: the state was saved for {other}, this module is {self.config}; rebuild the module "
                "first (obc_lightning.export.prepare_for_load)"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "_extra_state" in state_dict:  # refuse another layout before any buffer is copied
            self.set_extra_state(state_dict[prefix + "_extra_state"])
        self._weight_cache = None
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        if is_sparse(c):
            layout = f"scheme=sparse, value_dtype={c['value_dtype']}, " + (
                f"n_m={tuple(c['n_m'])}" if is_nm(c) else f"nnz={c['nnz']}"
            )
        elif is_mixed(c):
            layout = (
                f"scheme=mixed, bits={c['min_bits']}...{c['max_bits']}, group_size={c['group_size']}, "
                f"range_dtype={c['scale_dtype']}"
            )
        elif is_pq(c):
            layout = (
                f"scheme=pq, bits={c['bits']}, block_size={c['block_size']}, n_centroids={c['n_centroids']}, "
                f"codebook_dtype={c['scale_dtype']}"
            )
        else:
            layout = (
                f"bits={c['bits']}, group_size={c['group_size']}, scheme={c['scheme']}, scale_dtype={c['scale_dtype']}"
            )
            if is_nm(c):
                layout += f", n_m={tuple(c['n_m'])}"
        return f"{self._shape_repr()}, {layout}, bias={self.bias is not None}"

    def _shape_repr(self) -> str:
        return ""


class QuantizedLinear(_QuantizedBase):
    """``nn.Linear`` with a bit-packed weight (see the module docstring for the buffers).

    ``tensors``: {buffer name: tensor} of the scheme of ``config`` (:func:`buffer_names`), checked
    against it unless ``check=False`` (only for placeholders that ``load_state_dict`` then fills).
    """

    _kind = "Linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: dict,
        tensors: Mapping[str, Tensor],
        bias=None,
        *,
        check: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(dict(config, shape=[out_features, in_features]), tensors, bias, check)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @classmethod
    def from_dense(
        cls, m: nn.Linear, config: dict, tensors: Mapping[str, Tensor], *, check: bool = True
    ) -> QuantizedLinear:
        return cls(m.in_features, m.out_features, config, tensors, m.bias, check=check)

    def to_dense(self) -> nn.Linear:
        w = self.weight
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


# the attributes nn.ConvNd._conv_forward and the constructor read
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _QuantizedConv(_QuantizedBase):
    _dense: type[nn.Module] = nn.Conv2d

    def __init__(self, conv_args: dict, config: dict, tensors: Mapping[str, Tensor], bias=None, *, check: bool = True):
        super().__init__()
        for k in _CONV_ATTRS:
            setattr(self, k, conv_args[k])
        shape = [self.out_channels, self.in_channels // self.groups, *self.kernel_size]
        self._init_packed(dict(config, shape=shape), tensors, bias, check)

    def forward(self, input: Tensor) -> Tensor:
        # padding modes, stride, dilation and groups exactly as the dense conv handles them
        return self._dense._conv_forward(self, input, self.weight, self.bias)

    def _shape_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}"
        )

    @classmethod
    def from_dense(cls, m: nn.Module, config: dict, tensors: Mapping[str, Tensor], *, check: bool = True):
        return cls({k: getattr(m, k) for k in _CONV_ATTRS}, config, tensors, m.bias, check=check)

    def to_dense(self) -> nn.Module:
        w = self.weight
        m = self._dense(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


class QuantizedConv1d(_QuantizedConv):
    """``nn.Conv1d`` with a bit-packed weight."""

    _kind = "Conv1d"
    _dense = nn.Conv1d


class QuantizedConv2d(_QuantizedConv):
    """``nn.Conv2d`` with a bit-packed weight."""

    _kind = "Conv2d"
    _dense = nn.Conv2d


PACKED_CLASSES = {"Linear": QuantizedLinear, "Conv1d": QuantizedConv1d, "Conv2d": QuantizedConv2d}
DENSE_CLASSES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


def kind_of(m: nn.Module) -> str | None:
    """The kind ("Linear", "Conv1d", "Conv2d") of a dense module of that class or a subclass, else None."""
    for kind, cls in DENSE_CLASSES.items():
        if isinstance(m, cls):
            return kind
    return None
