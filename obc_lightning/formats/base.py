"""What every storage scheme owns (:class:`StorageScheme`), and what works on a description of any scheme:
:func:`scheme_of` (the one dispatch on the scheme), :func:`check_config`, :func:`check_packed_tensors`,
:func:`dequantize_packed`, the buffer specs and the payload size.

The schemes themselves: :mod:`~obc_lightning.formats.scalar`, :mod:`~obc_lightning.formats.pq`,
:mod:`~obc_lightning.formats.mixed`, :mod:`~obc_lightning.formats.sparse` (an overview in
:mod:`~obc_lightning.formats.schemes`). This module knows only torch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from obc_lightning.formats.bits import STORAGE_DTYPES, dtype_name, element_bits, packed_nbytes
from obc_lightning.formats.nm import MAX_NM_M

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


def is_int(v: Any) -> bool:
    """An int and not a bool (JSON descriptions are checked with it)."""
    return isinstance(v, int) and not isinstance(v, bool)


def rows_cols(config: Mapping) -> tuple[int, int]:
    """(rows, d) of the weight a description stores, as ``weight.reshape(out, -1)``."""
    return config["shape"][0], math.prod(config["shape"][1:])


def weight_header(kind: str, weight: Tensor) -> dict:
    """The keys every description has: the module's kind, the weight's shape and dtype."""
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


def packed_buffer(n: int, bits: int) -> Buffer:
    """``n`` values bit-packed at ``bits`` bits (uint8)."""
    return Buffer(torch.uint8, (packed_nbytes(n, bits),), n * bits)


def plain_buffer(dtype: torch.dtype, shape: Sequence[int]) -> Buffer:
    """A tensor stored as it is."""
    return Buffer(dtype, tuple(shape), math.prod(shape) * element_bits(dtype))


REGISTRY: dict[tuple[str, bool], type[StorageScheme]] = {}  # (config["scheme"], stored N:M) -> its class


class StorageScheme(ABC):
    """A storage scheme (classmethods: the layout of a description) and, as an instance, the format one
    module's weight is in (everything but the codes). A subclass that declares ``names`` is the scheme of
    those ``config["scheme"]`` values (with ``layout_key`` "n_m": of their N:M layout)."""

    names: ClassVar[tuple[str, ...]] = ()  # the values of config["scheme"] it stores
    keys: ClassVar[tuple[str, ...]] = ()  # the description's required keys
    layout_key: ClassVar[str | None] = None  # "n_m" / "nnz": the key that chooses this layout of the scheme
    storage_key: ClassVar[str] = "scale_dtype"  # the key naming the floating-point buffers' dtype
    takes_n_m: ClassVar[bool] = False  # has an N:M layout (scalar codes, sparse values)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("names", ()):
            REGISTRY[(name, cls.layout_key == "n_m")] = cls

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


# ------------------------------------------------------------------------------- descriptions, any scheme
def scheme_of(config: Mapping) -> type[StorageScheme]:
    """The class of the scheme a description names (its ``scheme``, and ``n_m`` for the two layouts of
    scalar codes and of sparse values); an ``n_m`` on a scheme without an N:M layout, and unknown names
    (they fall to the scalar scheme), are then refused by :func:`check_config`."""
    name, nm = config.get("scheme"), config.get("n_m") is not None
    return REGISTRY.get((name, nm)) or REGISTRY.get((name, False)) or REGISTRY[(SCALAR_SCHEMES[0], nm)]


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
    if not isinstance(shape, (list, tuple)) or not all(is_int(s) and s > 0 for s in shape):
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
            or not all(is_int(x) for x in nm)
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
