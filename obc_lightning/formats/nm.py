"""The N:M group layout: which inputs of a weight form a group of M, and which N of them a group stores.

The d = in * kh * kw columns of ``weight.reshape(out, -1)`` fall in G = d / M groups of M columns:

- Linear: column c is in group ``c // M``, at position ``c % M`` (:func:`nm_group_index`);
- Conv1d / Conv2d (columns c = i * K + k, i the input channel within the conv group, k the flattened
  kernel position, K = kh * kw): group ``k * (in / M) + i // M``, position ``i % M`` -- M consecutive
  input channels at one kernel position, as NVIDIA's sparse tensor cores read them
  (:func:`conv_nm_group_index`; M must divide in_channels / groups).

In both cases the position of a column is its rank among the columns of its group in increasing column
order. The pruning solver (:func:`~obc_lightning.solvers.prune.obs_prune`) prunes along these groups and
the storage schemes store along them (:mod:`obc_lightning.formats.schemes`). Each stored group holds
exactly N entries: its non-zero weights plus, when it has fewer than N, the zero weights at its smallest
remaining positions. Stored entry e = (r * G + g) * N + j is the j-th of row r, group g (groups in
increasing group id, the N entries of a group in strictly increasing position).

This module knows only torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from obc_lightning.formats.bits import unpack_bits

MAX_NM_M = 256  # N:M positions are bit-packed at <= 8 bits


def nm_group_index(d: int, m: int) -> Tensor:
    """N:M groups of a Linear weight (out, d): M consecutive inputs, column c in group c // M."""
    return torch.arange(d) // m


def conv_nm_group_index(in_channels: int, kernel_numel: int, m: int) -> Tensor:
    """N:M groups of a conv weight flattened to (out, in * kh * kw) (column c = i * kernel_numel + k):
    M consecutive input channels at one kernel position, as NVIDIA's sparse tensor cores read them.
    Group of (i, k) = k * (in / M) + i // M. ``in_channels`` per conv group; M must divide it."""
    if in_channels % m:
        raise ValueError(f"conv N:M groups: M={m} must divide the input channels per group ({in_channels})")
    i = torch.arange(in_channels).unsqueeze(1)
    k = torch.arange(kernel_numel).unsqueeze(0)
    return (k * (in_channels // m) + i // m).reshape(-1)


def nm_position_bits(m: int) -> int:
    """Bits of one N:M position: ceil(log2 M), at least 1."""
    return max(1, (m - 1).bit_length())


def nm_sizes(config: Mapping) -> tuple[int, int, int, int]:
    """(rows, d, G, stored entries) of a description with ``n_m`` (kind, shape, n_m)."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    N, M = config["n_m"]
    return rows, cols, cols // M, rows * (cols // M) * N


def nm_group_of(config: Mapping) -> Tensor:
    """(d,) long: the N:M group id of every column of ``weight.reshape(out, -1)``."""
    shape, M = config["shape"], config["n_m"][1]
    if config["kind"] == "Linear":
        return nm_group_index(shape[1], M)
    return conv_nm_group_index(shape[1], math.prod(shape[2:]), M).long()


def nm_members(config: Mapping) -> Tensor:
    """(G, M) long: ``members[g, p]`` = the column at position p of group g (increasing column order)."""
    group = nm_group_of(config)
    return torch.argsort(group, stable=True).view(-1, config["n_m"][1])


def nm_select(config: Mapping, nonzero: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """The stored entries of an N:M description, from the (rows, d) mask of non-zero weights: (positions
    (rows, G, N), columns (rows, G * N)), long, in entry order. Each group keeps its non-zeros, padded
    with zeros at its smallest remaining positions; ValueError naming the worst group if a group has
    more than N non-zeros."""
    N, M = config["n_m"]
    rows, cols, G, _ = nm_sizes(config)
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
    order, from the packed positions (``weight_positions``) of an N:M description."""
    N, M = config["n_m"]
    rows, _, G, n = nm_sizes(config)
    pos = unpack_bits(positions, nm_position_bits(M), n).view(rows, G, N).long()
    members = nm_members(config).to(positions.device)  # (G, M)
    return members.unsqueeze(0).expand(rows, G, M).gather(2, pos).view(rows, -1)


def check_nm_positions(config: Mapping, positions: Tensor, where: str) -> None:
    """Packed positions below M and strictly increasing within each group."""
    N, M = config["n_m"]
    n = nm_sizes(config)[3]
    pos = unpack_bits(positions, nm_position_bits(M), n).view(-1, N).long()
    if n and int(pos.max()) >= M:
        raise ValueError(f"{where}: weight_positions holds position {int(pos.max())}, beyond M-1 = {M - 1}")
    if N > 1 and n and not bool((pos[:, 1:] > pos[:, :-1]).all()):
        raise ValueError(f"{where}: weight_positions must be strictly increasing within each group of {M}")
