"""Bit-packed integer codes and the modules that hold them: ``QuantizedLinear``, ``QuantizedConv1d``,
``QuantizedConv2d``.

A packed module keeps, instead of a float weight, three buffers:

- ``weight_codes``: uint8, the codes of ``weight.reshape(out, -1)`` in row-major order, packed by
  :func:`pack_bits` (``ceil(numel * bits / 8)`` bytes);
- ``weight_scales``: (out, n_groups), float16 by default (the dtype is part of the format: ``.half()`` or
  ``.to(dtype)`` move it between devices but never change its precision);
- ``weight_zeros``: (out, n_groups) uint8, the integer zero points (0 <= z <= 2**bits - 1).

and dequantizes ``W[r, c] = s[r, c // group_size] * (code[r, c] - z[r, c // group_size])`` on every
forward (computed in float32, float64 if the scales or the module are float64, then cast to the
module's dtype), or once with ``cache_weight=True``. Column c is in group ``c // group_size`` of the
row; a conv with g groups is g stacked row blocks sharing the same layout, so nothing in the format
depends on g. This module knows only torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PACKED_FORMAT = "obc_lightning.packed"
SCHEMES = ("affine", "symmetric")
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


def check_config(config: Any, where: str) -> dict:
    """A packed weight's description, validated: kind, bits, group_size, shape, scheme, scale_dtype, dtype."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: metadata must be a JSON object, got {type(config).__name__}")
    need = ("kind", "bits", "group_size", "shape", "scheme", "scale_dtype", "dtype")
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(f"{where}: metadata lacks {missing}")
    kind, bits, gs, shape = config["kind"], config["bits"], config["group_size"], config["shape"]
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{where}: bits must be an integer in [2, 8], got {bits!r}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"{where}: shape must be a list of positive integers, got {shape!r}")
    if len(shape) != {"Linear": 2, "Conv1d": 3, "Conv2d": 4}[kind]:
        raise ValueError(f"{where}: a {kind} weight cannot have shape {list(shape)}")
    cols = math.prod(shape[1:])
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or not 1 <= gs <= cols):
        raise ValueError(f"{where}: group_size must be null or an integer in [1, {cols}], got {gs!r}")
    if config["scheme"] not in SCHEMES:
        raise ValueError(f"{where}: scheme must be one of {SCHEMES}, got {config['scheme']!r}")
    for key in ("scale_dtype", "dtype"):
        if config[key] not in SCALE_DTYPES:
            raise ValueError(f"{where}: {key} must be one of {list(SCALE_DTYPES)}, got {config[key]!r}")
    return {k: (list(config[k]) if k == "shape" else config[k]) for k in need}


def check_packed_tensors(config: dict, codes: Tensor, scales: Tensor, zeros: Tensor, where: str) -> None:
    """The three tensors agree with ``config`` (dtypes, sizes, zero points on the code range)."""
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    n_groups = n_groups_of(cols, config["group_size"])
    expect = (
        ("weight_codes", codes, torch.uint8, (packed_nbytes(rows * cols, config["bits"]),)),
        ("weight_scales", scales, SCALE_DTYPES[config["scale_dtype"]], (rows, n_groups)),
        ("weight_zeros", zeros, torch.uint8, (rows, n_groups)),
    )
    for name, t, dtype, shape in expect:
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{where}: {name} must be {dtype_name(dtype)} of shape {shape} for a {config['bits']}-bit "
                f"weight of shape {config['shape']} (group_size={config['group_size']}), got "
                f"{dtype_name(t.dtype)} of shape {tuple(t.shape)}"
            )
    if zeros.numel() and int(zeros.max()) > 2 ** config["bits"] - 1:
        raise ValueError(
            f"{where}: zero points exceed {2 ** config['bits'] - 1}, the largest {config['bits']}-bit code"
        )
    if not torch.isfinite(scales).all():
        raise ValueError(f"{where}: weight_scales contains NaN or Inf")


def dequantize_packed(config: dict, codes: Tensor, scales: Tensor, zeros: Tensor, dtype=None) -> Tensor:
    """The weight, shape ``config["shape"]``, in ``dtype`` (default: ``config["dtype"]``)."""
    dtype = dtype or SCALE_DTYPES[config["dtype"]]
    rows, cols = config["shape"][0], math.prod(config["shape"][1:])
    compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
    k = unpack_bits(codes, config["bits"], rows * cols).view(rows, cols).to(compute)
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

    def _init_packed(self, config: dict, codes: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None):
        config = check_config(dict(config, kind=self._kind), type(self).__name__)
        check_packed_tensors(config, codes, scales, zeros, type(self).__name__)
        self.config = config
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zeros", zeros)
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
        w = dequantize_packed(self.config, self.weight_codes, self.weight_scales, self.weight_zeros, self._dtype)
        if self.cache_weight:
            self._weight_cache = w
        return w

    @property
    def bits(self) -> int:
        return self.config["bits"]

    @property
    def group_size(self) -> int | None:
        return self.config["group_size"]

    def _apply(self, fn, recurse=True):
        scales = self.weight_scales
        super()._apply(fn, recurse)
        if self.weight_scales.dtype != scales.dtype:  # the stored precision is the format: only move it
            self.weight_scales = scales.to(self.weight_scales.device)
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
        gs = self.config["group_size"]
        return (
            f"{self._shape_repr()}, bits={self.bits}, group_size={gs}, scheme={self.config['scheme']}, "
            f"scale_dtype={self.config['scale_dtype']}, bias={self.bias is not None}"
        )

    def _shape_repr(self) -> str:
        return ""


class QuantizedLinear(_QuantizedBase):
    """``nn.Linear`` with a bit-packed weight (see the module docstring for the buffers)."""

    _kind = "Linear"

    def __init__(self, in_features: int, out_features: int, config: dict, codes, scales, zeros, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(dict(config, shape=[out_features, in_features]), codes, scales, zeros, bias)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @classmethod
    def from_dense(cls, m: nn.Linear, config: dict, codes, scales, zeros) -> QuantizedLinear:
        return cls(m.in_features, m.out_features, config, codes, scales, zeros, m.bias)

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

    def __init__(self, conv_args: dict, config: dict, codes, scales, zeros, bias=None):
        super().__init__()
        for k in _CONV_ATTRS:
            setattr(self, k, conv_args[k])
        shape = [self.out_channels, self.in_channels // self.groups, *self.kernel_size]
        self._init_packed(dict(config, shape=shape), codes, scales, zeros, bias)

    def forward(self, input: Tensor) -> Tensor:
        # padding modes, stride, dilation and groups exactly as the dense conv handles them
        return self._dense._conv_forward(self, input, self.weight, self.bias)

    def _shape_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}"
        )

    @classmethod
    def from_dense(cls, m: nn.Module, config: dict, codes, scales, zeros):
        return cls({k: getattr(m, k) for k in _CONV_ATTRS}, config, codes, scales, zeros, m.bias)

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
