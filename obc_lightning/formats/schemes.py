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

Where they are: the base class and what works on a description of any scheme (:func:`scheme_of`, the
one dispatch on the scheme; :func:`check_config`; :func:`check_packed_tensors`; :func:`dequantize_packed`)
in :mod:`~obc_lightning.formats.base`; the schemes in :mod:`~obc_lightning.formats.scalar`,
:mod:`~obc_lightning.formats.pq`, :mod:`~obc_lightning.formats.mixed` and :mod:`~obc_lightning.formats.sparse`.
This module gathers their names. The formats layer knows only torch (and the grids).
"""

from obc_lightning.formats.base import (  # noqa: F401  (the names of every scheme, in one place)
    DENSE_CLASSES,
    KINDS,
    MAX_PQ_CENTROIDS,
    MIXED_KEYS,
    MIXED_SCHEME,
    PQ_KEYS,
    PQ_SCHEME,
    SCALAR_KEYS,
    SCALAR_SCHEMES,
    SCHEMES,
    SPARSE_KEYS,
    SPARSE_SCHEME,
    Buffer,
    StorageScheme,
    buffer_names,
    buffer_specs,
    check_config,
    check_packed_tensors,
    dequantize_packed,
    format_from_packed,
    kind_of,
    mixed_width_bits,
    n_groups_of,
    payload_bits,
    payload_nbytes,
    pq_code_bits,
    scheme_of,
)
from obc_lightning.formats.mixed import MixedScheme  # noqa: F401
from obc_lightning.formats.pq import PQScheme  # noqa: F401
from obc_lightning.formats.scalar import ScalarNMScheme, ScalarScheme  # noqa: F401
from obc_lightning.formats.sparse import SparseMaskScheme, SparseNMScheme  # noqa: F401
