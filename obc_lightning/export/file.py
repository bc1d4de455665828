"""The export file's format: its identity, version, and checksums (shared by the writer and the reader).

A file is safetensors with string metadata ``format`` = "obc_lightning", ``format_version`` = "2",
``library_version``, ``modules`` (JSON: each packed module's description) and ``sha256``: canonical JSON
(sorted keys, no spaces) mapping every tensor's name to the SHA-256 of ``[dtype, shape]`` as canonical
JSON (e.g. ``["F16",[8,1]]``) followed by its raw bytes (:func:`tensor_digest`), and ``"__metadata__"`` to
the SHA-256 of the other metadata entries as canonical JSON (:func:`metadata_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import Tensor

FILE_FORMAT = "obc_lightning"
FORMAT_VERSION = "2"  # "1": the same layout without checksums (read, with a warning)
CHECKSUM_KEY = "sha256"
METADATA_DIGEST = "__metadata__"  # the checksums' entry for the metadata (safetensors reserves the name)

# safetensors' names of the dtypes a state_dict may hold
ST_DTYPES = {
    getattr(torch, name): code
    for name, code in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
        ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
        ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"), ("complex64", "C64"),
    )
    if hasattr(torch, name)
}


def raw_bytes(t: Tensor):
    """The tensor's bytes as safetensors stores them (row-major, little-endian: torch's layout on every
    little-endian machine), as a buffer."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def st_dtype(key: str, t: Tensor) -> str:
    if t.dtype not in ST_DTYPES:
        raise ValueError(f"save_quantized: tensor '{key}' has dtype {t.dtype}, which safetensors cannot store")
    return ST_DTYPES[t.dtype]


def canonical(obj) -> bytes:
    """One JSON text per value: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tensor_digest(key: str, t: Tensor) -> str:
    """SHA-256 (hex) of ``[dtype, shape]`` as canonical JSON (e.g. ``["F16",[8,1]]``) followed by the
    tensor's raw bytes: what a file's ``sha256`` metadata holds for each tensor."""
    h = hashlib.sha256(canonical([st_dtype(key, t), list(t.shape)]))
    h.update(raw_bytes(t))
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the canonical JSON of every metadata entry but the checksums themselves."""
    return hashlib.sha256(canonical({k: v for k, v in metadata.items() if k != CHECKSUM_KEY})).hexdigest()
