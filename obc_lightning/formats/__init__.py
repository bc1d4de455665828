"""How a compressed weight is represented: bit packing (:mod:`~obc_lightning.formats.bits`), the N:M group
layout (:mod:`~obc_lightning.formats.nm`), the storage schemes -- one class per scheme, owning its
buffers, size, checks, dequantization and packing (overview: :mod:`~obc_lightning.formats.schemes`; the
base class in :mod:`~obc_lightning.formats.base`, the schemes in :mod:`~obc_lightning.formats.scalar`,
:mod:`~obc_lightning.formats.pq`, :mod:`~obc_lightning.formats.mixed`, :mod:`~obc_lightning.formats.sparse`)
-- and the format each compressed module carries (:mod:`~obc_lightning.formats.record`).

This package knows only torch (and :mod:`obc_lightning.grids`): the solvers, compression, fine-tuning,
export and reporting build on it.
"""

from obc_lightning.formats.record import drop_format, format_of, model_formats, restore_formats, set_format
from obc_lightning.formats.schemes import (
    MixedScheme,
    PQScheme,
    ScalarNMScheme,
    ScalarScheme,
    SparseMaskScheme,
    SparseNMScheme,
    StorageScheme,
    scheme_of,
)

__all__ = [
    "MixedScheme",
    "PQScheme",
    "ScalarNMScheme",
    "ScalarScheme",
    "SparseMaskScheme",
    "SparseNMScheme",
    "StorageScheme",
    "drop_format",
    "format_of",
    "model_formats",
    "restore_formats",
    "scheme_of",
    "set_format",
]
