"""Modules that hold a packed weight: ``QuantizedLinear``, ``QuantizedConv1d``, ``QuantizedConv2d``.

A packed module keeps, instead of a float weight, the buffers of its storage scheme (the layouts, sizes,
checks and dequantization of every scheme are in :mod:`obc_lightning.formats.schemes`) and its
description (``config``, also its ``_extra_state``). It dequantizes the weight on every forward (or once,
with ``cache_weight=True``) and computes exactly what the dense module would with that weight: one
module's dense weight exists at a time, for the length of its forward. The stored precision is part of
the format: ``.half()`` or ``.to(dtype)`` change the dtype the weight is dequantized to, never the buffers'
dtypes.

``QuantizedLinear.kernel = "auto"`` (or :func:`set_kernel`) lets a Linear with a scalar grid run one of
torch's low-bit matmul kernels instead (:mod:`obc_lightning.kernels.lowbit`: int4 on CPU and CUDA, int8
per-row grids), where torch provides one for the device and activation dtype, it is not known to be slow
there (float32 activations on CPU are), and no gradient is needed; ``"kernel"`` uses one wherever it runs.
The outputs then equal the dequantize path's within float rounding (the bound in
:func:`obc_lightning.kernels.lowbit.rounding_bound`). The default, ``"dequantize"``, is exact.

This module knows only torch. The names of the formats layer that were defined here
(:func:`pack_bits`, :func:`check_config`, :func:`payload_nbytes`, the key tuples, ...) are re-exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from obc_lightning.formats.bits import (  # noqa: F401  (re-exported)
    PACK_CHUNK,
    dtype_name,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from obc_lightning.formats.bits import STORAGE_DTYPES as SCALE_DTYPES
from obc_lightning.formats.nm import MAX_NM_M, nm_position_bits  # noqa: F401  (re-exported)
from obc_lightning.formats.scalar import ScalarScheme
from obc_lightning.formats.schemes import (  # noqa: F401  (re-exported)
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
    buffer_names,
    buffer_specs,
    check_config,
    check_packed_tensors,
    dequantize_packed,
    kind_of,
    n_groups_of,
    payload_bits,
    payload_nbytes,
    pq_code_bits,
    scheme_of,
)
from obc_lightning.kernels import lowbit

PACKED_FORMAT = "obc_lightning.packed"
# QuantizedLinear.kernel: the exact reference; a low-bit kernel where one serves and is fast; wherever one runs
KERNELS = ("dequantize", "auto", "kernel")
# every buffer name any scheme uses (and the tensors an export file holds per module)
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


class QuantizedModule(nn.Module):
    """The common part of :class:`QuantizedLinear`, :class:`QuantizedConv1d` and :class:`QuantizedConv2d`:
    buffers, dequantization, extra state, dtype bookkeeping."""

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
        self.kernel = "dequantize"
        self._lowbit: dict[tuple, lowbit.LowbitWeight | str] = {}  # (device, dtype) -> kernel layout, or why none

    def __getstate__(self):
        # pickling and deepcopy: the kernel layouts hold closures over this module's tensors; rebuilt on demand
        return {**self.__dict__, "_lowbit": {}}

    def clear_caches(self) -> None:
        """Forget the cached dense weight and kernel layouts (after writing into the buffers in place)."""
        self._weight_cache = None
        self._lowbit = {}

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (read only: assigning to it has no effect on the codes)."""
        if self._weight_cache is not None:
            return self._weight_cache
        w = dequantize_packed(self.config, self.packed_tensors(), self._dtype)
        if self.cache_weight:
            self._weight_cache = w
        return w

    def same_layout(self, config: Mapping) -> bool:
        """Whether this module stores the description ``config`` (equal apart from the dense dtype, which
        follows ``.to(dtype)``)."""
        mine = {k: v for k, v in self.config.items() if k != "dtype"}
        return mine == {k: v for k, v in config.items() if k != "dtype"}

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
        self.clear_caches()
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
        self.clear_caches()
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        layout = scheme_of(self.config).extra_repr(self.config)
        return f"{self._shape_repr()}, {layout}, bias={self.bias is not None}"

    def _shape_repr(self) -> str:
        return ""


class QuantizedLinear(QuantizedModule):
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
        if self.kernel != "dequantize" and not (
            torch.is_grad_enabled() and (input.requires_grad or (self.bias is not None and self.bias.requires_grad))
        ):
            lw = self.lowbit_weight(input.device, input.dtype)
            if not isinstance(lw, str):
                return lw.linear(input, self.bias)
        return F.linear(input, self.weight, self.bias)

    def lowbit_weight(self, device: torch.device, dtype: torch.dtype) -> lowbit.LowbitWeight | str:
        """This weight in the layout of the low-bit kernel that serves ``dtype`` activations on ``device``
        (built at the first call, then held: about half a byte per weight for int4, one for int8), or why
        none does (then forward dequantizes)."""
        key = (torch.device(device), dtype)
        if key not in self._lowbit:
            self._lowbit[key] = self._make_lowbit(*key)
        return self._lowbit[key]

    def _make_lowbit(self, device: torch.device, dtype: torch.dtype) -> lowbit.LowbitWeight | str:
        if self.kernel not in KERNELS:
            raise ValueError(f"{type(self).__name__}.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.scheme not in SCALAR_SCHEMES or self.n_m is not None:
            return f"no kernel for the {self.scheme}{' N:M' if self.n_m else ''} scheme"
        if dtype != self._dtype:
            return f"activations in {dtype_name(dtype)}, the module in {dtype_name(self._dtype)}"
        if self.weight_codes.device != device:
            return f"activations on {device}, the module on {self.weight_codes.device}"
        codes = ScalarScheme.dense_codes(self.config, self.packed_tensors())
        return lowbit.prepare(
            codes, self.weight_scales, self.weight_zeros, self.bits, self.group_size, dtype,
            include_slow=self.kernel == "kernel",
        )

    def kernel_path(self, device=None, dtype=None) -> str:
        """What forward runs for activations of ``dtype`` on ``device`` (default: the module's own) without
        gradients: the kernel's op, or "dequantize" and the reason."""
        device = self.weight_codes.device if device is None else device
        if self.kernel == "dequantize":
            return "dequantize (kernel = 'dequantize')"
        lw = self.lowbit_weight(device, dtype or self._dtype)
        return f"dequantize ({lw})" if isinstance(lw, str) else lw.op

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


class _QuantizedConv(QuantizedModule):
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


_QuantizedBase = QuantizedModule  # the former name

PACKED_CLASSES = {"Linear": QuantizedLinear, "Conv1d": QuantizedConv1d, "Conv2d": QuantizedConv2d}


def set_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, str]:
    """Set ``kernel`` on every :class:`QuantizedLinear` of ``model``: ``"auto"`` (torch's low-bit kernels where
    they serve and are fast), ``"kernel"`` (wherever they run) or ``"dequantize"`` (the exact path). Returns
    {module name: what its forward runs} for the module's own device and dtype
    (:meth:`QuantizedLinear.kernel_path`). Convolutions always dequantize."""
    if kernel not in KERNELS:
        raise ValueError(f"set_kernel: kernel must be one of {KERNELS}, got {kernel!r}")
    paths = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            m.kernel = kernel
            paths[name] = m.kernel_path()
    return paths


def swap_module(model: nn.Module, name: str, new: nn.Module, who: str = "") -> None:
    """Put ``new`` in place of the submodule ``name`` of ``model``."""
    if not name:
        raise ValueError(f"{who + ': ' if who else ''}the model itself is the quantized module; wrap it in a container")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
