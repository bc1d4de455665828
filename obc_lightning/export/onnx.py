"""ONNX export of a compressed model: its weights stay low-bit in the file, and ONNX Runtime runs it.

How the graph is made. torch's own exporter (``torch.onnx.export(..., dynamo=True)``) exports the whole
model -- activations, norms, attention, embeddings, control of shapes -- after every compressed Linear /
Conv1d / Conv2d has been swapped, for the length of the export only, for a placeholder that emits one
marker node (``torch.onnx.ops.symbolic``) carrying the module's index and its bias. The markers are then
replaced, with onnx's own API, by the nodes and low-bit initializers of the module's storage scheme
(below), built directly from the packed tensors that :func:`~obc_lightning.export.save_quantized` writes
(:func:`~obc_lightning.export.write.packed_entries`). Why not a custom translation of a torch op: the
translation would have to create the low-bit initializers as graph constants from inside the exporter,
and torch has no int2 / int4 tensors to hand it; why not rewrite the float weights of a float export:
finding a module's weight again after the exporter's constant folding and renaming is guesswork, a
marker is not. The model is put back as it was, whatever happens.

What each scheme becomes (``W`` the weight as ``weight.reshape(out, -1)``, codes ``k``, scales ``s``, zero
points ``z``):

=====================================  =================================================================
module, scheme                         ONNX
=====================================  =================================================================
Linear, scalar grid of 2-4 bits, or    ``com.microsoft::MatMulNBits``: bits 4 (2- and 3-bit codes in 4-bit
5-8 bits with ``mode="fast"``; per     containers) or 8 (5-7-bit codes in 8-bit containers); block = the
row or in groups of a multiple of 16   group (a per-row scale repeated over blocks of 16 ... 256 inputs);
                                       zero points packed (left out when the grid is symmetric); bias input
Linear, any other scalar grid          ``(Cast(k) - z) * s`` on a uint2 / uint4 / uint8 initializer, then
                                       ``MatMul`` (+ ``Add``)
Conv1d / Conv2d, scalar grid           the same weight subgraph, reshaped, then ``Conv`` (groups,
                                       stride, dilation, padding as torch; padding modes as ``Pad``)
N:M pruned + quantized                 dense low-bit codes (the pruned weights are the zero point's code)
product quantization                   ``Gather(Cast(codebook_fp16), Cast(codes))`` + ``Reshape``: codes
                                       in a uint2 / uint4 / uint8 container, the codebook as stored
mixed precision (DiffQ)                ``Cast(k) * step + lo`` (codes in the container of ``max_bits``)
sparse float (pruned only)             the dense weight at ``value_dtype`` (float16), ``Cast``
=====================================  =================================================================

Every weight subgraph starts from initializers only, so ONNX Runtime folds it to a float weight once,
when the session is created (its constant folding), in any session: no session option is needed. With
``qdq=True`` the scalar weights use ``DequantizeLinear`` instead (the standard QDQ form other toolchains
read); ONNX Runtime then keeps the pair and dequantizes on every run unless the session sets
``session.disable_quant_qdq=1`` (:func:`inference_session` does).

Exactness: the dequantization is the library's own expression in float32 (``(k - z) * s`` with the
float32 scales of the in-memory model; a packed module's stored scales), so ONNX Runtime's weights are
the PyTorch compressed model's bit for bit and only the order of summation in the products differs.
``MatMulNBits`` with ``accuracy_level=0`` (``mode="exact"``) computes in float32 too; ``mode="fast"``
(``accuracy_level=4``) quantizes its activations to int8 inside the op: faster on one row, not exact.

onnx, onnxruntime and onnxscript are optional (the ``onnx`` extra): imported when these functions run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from obc_lightning.export.write import NOTHING_TO_EXPORT, atomic_write, packed_entries
from obc_lightning.formats.bits import STORAGE_DTYPES, pack_bits, unpack_bits
from obc_lightning.formats.schemes import (
    MIXED_SCHEME,
    PQ_SCHEME,
    SPARSE_SCHEME,
    MixedScheme,
    dequantize_packed,
    n_groups_of,
    scheme_of,
)
from obc_lightning.packed import QuantizedConv1d, QuantizedConv2d, QuantizedLinear

# the forwards whose computation the ONNX forms reproduce (a subclass with its own forward is refused)
EXPORTABLE_FORWARDS = {
    "Linear": (nn.Linear.forward, QuantizedLinear.forward),
    "Conv1d": (nn.Conv1d.forward, QuantizedConv1d.forward),
    "Conv2d": (nn.Conv2d.forward, QuantizedConv2d.forward),
}
MARKER_DOMAIN = "obc_lightning.export"
MS_DOMAIN = "com.microsoft"
MODES = ("exact", "fast")
ACCURACY_LEVEL = {"exact": 0, "fast": 4}  # MatMulNBits: 0 computes in float, 4 quantizes A to int8
MATMULNBITS_BLOCKS = (16, 32, 64, 128, 256)  # the block lengths ONNX Runtime's CPU kernels serve
MIN_OPSET = 18  # torch's exporter
CONTAINER_OPSET = {2: 25, 4: 21, 8: 1}  # uint2: opset 25; uint4: opset 21


def rows_cols(config: Mapping) -> tuple[int, int]:
    """(rows, d) of the weight a description stores, as ``weight.reshape(out, -1)``."""
    return config["shape"][0], math.prod(config["shape"][1:])


def container_bits(bits: int) -> int:
    """The ONNX integer type (2, 4 or 8 bits) that holds codes of ``bits`` bits."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its size, the opset, and per compressed module the ONNX
    form it took (``modules``) and, where the codes take a wider container than their bits, why the file
    is larger than the packed safetensors file (``containers``)."""

    path: str
    nbytes: int
    opset: int
    mode: str
    modules: dict[str, str] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{self.path}: {self.nbytes / 2**20:.3f} MB, opset {self.opset}, mode {self.mode}"]
        lines += [f"  {name}: {form}" + (f" ({self.containers[name]})" if name in self.containers else "")
                  for name, form in self.modules.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------ markers in place of compressed modules
class _Marker(nn.Module):
    """Stands in for a compressed module during the export: one ``obc_lightning.export::Packed`` node
    with the module's index, its input and its bias; replaced afterwards (:func:`_lower`)."""

    def __init__(self, key: int, module: nn.Module, kind: str):
        super().__init__()
        self.key, self.kind = key, kind
        self.bias = module.bias
        if kind == "Linear":
            self.out = module.out_features
            return
        self.out, self.groups = module.out_channels, module.groups
        self.kernel = tuple(module.kernel_size)
        self.stride, self.dilation = tuple(module.stride), tuple(module.dilation)
        self.pre_pad = None  # padding torch applies with F.pad before the convolution
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            if isinstance(module.padding, str) and module.padding == "valid":
                self.padding = (0,) * len(self.kernel)
            else:
                self.pre_pad = (tuple(module._reversed_padding_repeated_twice), module.padding_mode)
                self.padding = (0,) * len(self.kernel)
        else:
            self.padding = tuple(module.padding)

    def forward(self, x: Tensor) -> Tensor:
        inputs = [x] if self.bias is None else [x, self.bias]
        if self.kind == "Linear":
            shape = (*x.shape[:-1], self.out)
        else:
            if self.pre_pad is not None:
                pad, mode = self.pre_pad
                x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
                inputs[0] = x
            spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                       zip(x.shape[2:], self.padding, self.dilation, self.kernel, self.stride)]
            shape = (x.shape[0], self.out, *spatial)
        return torch.onnx.ops.symbolic(f"{MARKER_DOMAIN}::Packed", inputs, {"key": self.key}, dtype=x.dtype,
                                       shape=shape, version=1)


@contextmanager
def _swapped(model: nn.Module, markers: Mapping[str, nn.Module]):
    """The modules named in ``markers`` replaced by them, the model in eval mode; everything put back."""
    originals = {name: model.get_submodule(name) for name in markers}
    training = {m: m.training for m in model.modules()}
    try:
        for name, marker in markers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, marker)
        model.eval()
        yield
    finally:
        for name, m in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m)
        for m, flag in training.items():
            m.training = flag


# ------------------------------------------------------------------ what each module becomes
@dataclass
class _Plan:
    """One compressed module: its description, packed tensors, its marker (the conv attributes), and the
    ONNX form."""

    name: str
    config: dict
    tensors: dict[str, Tensor]
    module: nn.Module  # the marker
    form: str = ""
    container: str = ""
    opset: int = 1
    matmulnbits: tuple[int, int] | None = None  # (bits, block) when a MatMulNBits serves it


def _matmulnbits_bits(bits: int) -> int:
    return max(4, container_bits(bits))


def _matmulnbits_block(config: Mapping) -> int | None:
    """The MatMulNBits block for a scalar Linear, or None: a group size must be a multiple of a block
    length (the group's scale repeated over its blocks); a per-row grid takes the block of the smallest
    file (codes padded to whole blocks, one float32 scale per block)."""
    rows, cols = rows_cols(config)
    gs = config["group_size"]
    if gs is not None and gs < cols:
        fits = [b for b in MATMULNBITS_BLOCKS if gs % b == 0]
        return max(fits) if fits else None
    cb = _matmulnbits_bits(config["bits"])

    def nbytes(b):
        nb = -(-cols // b)
        return nb * b * cb / 8 + nb * 4 + math.ceil(nb * cb / 8)

    return min(MATMULNBITS_BLOCKS, key=lambda b: (nbytes(b), -b))


def _plan(name: str, config: dict, tensors: dict, module: nn.Module, qdq: bool, mode: str) -> _Plan:
    plan = _Plan(name, config, tensors, module)
    scheme, kind = config["scheme"], config["kind"]
    if config["dtype"] != "float32":
        raise ValueError(
            f"export_onnx: module '{name}' is {config['dtype']}; the ONNX export is verified in float32 only: "
            "call model.float() first"
        )
    if scheme in ("affine", "symmetric"):
        bits = config["bits"]
        # 5-8-bit codes: MatMulNBits in fast mode only (its 8-bit float path ran 8x slower than float on one
        # row); in exact mode the weight folds to float at load
        served = kind == "Linear" and not qdq and (bits <= 4 or mode == "fast")
        block = _matmulnbits_block(config) if served else None
        # MatMulNBits: 2-bit codes in its 4-bit form (ONNX Runtime 1.32's 2-bit CPU kernel ran 35x slower
        # than float on one row, docs/deploy.md); elsewhere the narrowest ONNX integer type
        cb = _matmulnbits_bits(bits) if block is not None else container_bits(bits)
        if block is not None:
            plan.matmulnbits = (cb, block)
            plan.form = f"MatMulNBits {cb}-bit, block {block}"
        else:
            plan.opset = CONTAINER_OPSET[cb]
            op = "DequantizeLinear" if qdq else "Cast-Sub-Mul"
            plan.form = f"{op} uint{cb} + {'MatMul' if kind == 'Linear' else 'Conv'}"
        if cb != bits:
            plan.container = f"{bits}-bit codes in {cb}-bit containers"
        if config.get("n_m") is not None:
            n, m = config["n_m"]
            plan.container = ", ".join(filter(None, [plan.container, f"{n}:{m} sparse codes stored dense"]))
    elif scheme == PQ_SCHEME:
        cb = container_bits(config["bits"])
        plan.opset = CONTAINER_OPSET[cb]
        plan.form = f"Gather of a codebook by uint{cb} codes + {'MatMul' if kind == 'Linear' else 'Conv'}"
        if cb != config["bits"]:
            plan.container = f"{config['bits']}-bit codes in {cb}-bit containers"
    elif scheme == MIXED_SCHEME:
        cb = container_bits(config["max_bits"])
        plan.opset = CONTAINER_OPSET[cb]
        plan.form = f"Cast-Mul-Add uint{cb} + {'MatMul' if kind == 'Linear' else 'Conv'}"
        plan.container = f"{config['min_bits']}...{config['max_bits']}-bit codes in {cb}-bit containers"
    elif scheme == SPARSE_SCHEME:
        plan.form = f"dense {config['value_dtype']} + Cast + {'MatMul' if kind == 'Linear' else 'Conv'}"
        plan.container = f"pruned weights stored dense in {config['value_dtype']}"
    else:  # pragma: no cover  (check_config admits no other scheme)
        raise ValueError(f"export_onnx: module '{name}': scheme {scheme!r} has no ONNX form")
    return plan


# ------------------------------------------------------------------ building the nodes
class _Builder:
    """New nodes and initializers, with names under the module's name."""

    def __init__(self, onnx_mod, prefix: str):
        self.onnx, self.prefix = onnx_mod, prefix
        self.nodes: list = []
        self.initializers: list = []

    def init(self, suffix: str, array: Tensor | None = None, *, onnx_type: int | None = None,
             dims: Sequence[int] | None = None, raw: bytes | None = None) -> str:
        """An initializer: a torch tensor as it is, or raw packed bytes of ``onnx_type`` and ``dims``."""
        name = f"{self.prefix}.{suffix}"
        if raw is None:
            t = array.detach().cpu().contiguous()
            np_dtype = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16",
                        torch.float64: "DOUBLE", torch.uint8: "UINT8", torch.int64: "INT64",
                        torch.int32: "INT32"}[t.dtype]
            onnx_type, dims = getattr(self.onnx.TensorProto, np_dtype), list(t.shape)
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.initializers.append(self.onnx.helper.make_tensor(name, onnx_type, list(dims), raw, raw=True))
        return name

    def node(self, op: str, inputs: Sequence[str], suffix: str, output: str | None = None, domain: str = "",
             **attrs) -> str:
        out = output or f"{self.prefix}.{suffix}"
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], domain=domain, **attrs))
        return out


def _packed_codes(codes: Tensor, bits: int) -> bytes:
    """Row-major codes as ONNX packs uint2 / uint4 (first value in the lowest bits): pack_bits' order."""
    return pack_bits(codes.reshape(-1).to(torch.int32), bits).numpy().tobytes()


def _uint(onnx_mod, bits: int) -> int:
    return {2: onnx_mod.TensorProto.UINT2, 4: onnx_mod.TensorProto.UINT4, 8: onnx_mod.TensorProto.UINT8}[bits]


def _grouped(b: _Builder, codes: Tensor, bits: int, group_size: int | None, affine, qdq: bool) -> str:
    """The float32 (rows, d) weight from (rows, d) codes: ``affine(b, codes_name)`` computes it from the
    codes cast to float, laid out (rows, n_groups, group) for grouped grids (padded to whole groups)."""
    rows, cols = codes.shape
    cb = container_bits(bits)
    ng = n_groups_of(cols, group_size)
    g = cols if ng == 1 else group_size
    if ng * g != cols:
        codes = F.pad(codes, (0, ng * g - cols))
    name = b.init("weight_codes", onnx_type=_uint(b.onnx, cb), dims=(rows, ng, g), raw=_packed_codes(codes, cb))
    w = affine(b, b.node("Cast", [name], "codes_float", to=b.onnx.TensorProto.FLOAT), name)
    w = b.node("Reshape", [w, b.init("flat_shape", torch.tensor([rows, ng * g]))], "weight_padded")
    if ng * g != cols:
        w = b.node("Slice", [w, b.init("slice_start", torch.tensor([0])), b.init("slice_end", torch.tensor([cols])),
                             b.init("slice_axis", torch.tensor([1]))], "weight_2d")
    return w


def _scalar_weight(b: _Builder, plan: _Plan, qdq: bool) -> str:
    config, tensors = plan.config, plan.tensors
    codes = scheme_of(config).dense_codes(config, tensors)
    scales = tensors["weight_scales"].float()
    zeros = tensors["weight_zeros"]
    rows, cols = codes.shape
    ng = scales.shape[1]
    cb = container_bits(config["bits"])
    if qdq:  # DequantizeLinear: per row (axis 0) or blocked along the inputs (axis 1, block = group)
        name = b.init("weight_codes", onnx_type=_uint(b.onnx, cb), dims=(rows, cols), raw=_packed_codes(codes, cb))
        zp = b.init("weight_zeros", onnx_type=_uint(b.onnx, cb), dims=(rows,) if ng == 1 else (rows, ng),
                    raw=_packed_codes(zeros, cb))
        s = b.init("weight_scales", scales.reshape(rows) if ng == 1 else scales)
        attrs = {"axis": 0} if ng == 1 else {"axis": 1, "block_size": config["group_size"]}
        return b.node("DequantizeLinear", [name, s, zp], "weight_2d", **attrs)

    def affine(b, k, _):  # (k - z) * s in float32, as ScalarScheme.dequantize
        z = b.init("weight_zeros", zeros.float().reshape(rows, ng, 1))
        s = b.init("weight_scales", scales.reshape(rows, ng, 1))
        return b.node("Mul", [b.node("Sub", [k, z], "codes_centered"), s], "weight_groups")

    return _grouped(b, codes, config["bits"], config["group_size"], affine, qdq)


def _mixed_weight(b: _Builder, plan: _Plan) -> str:
    config, tensors = plan.config, plan.tensors
    codes, entry = MixedScheme.codes_and_bits(config, tensors)
    rng = tensors["weight_range"].float()
    rows, cols = codes.shape
    gs = config["group_size"]
    ng = n_groups_of(cols, gs)
    lo, hi = rng[:, :1], rng[:, 1:]
    group_bits = entry[:, torch.arange(ng) * gs].float()  # (rows, ng): every group's width
    step = (hi - lo) / (2 ** group_bits - 1)  # the step MixedScheme.dequantize computes, per group

    def affine(b, k, _):  # lo + k * step, as MixedScheme.dequantize
        st = b.init("weight_step", step.reshape(rows, ng, 1))
        return b.node("Add", [b.init("weight_lo", lo.reshape(rows, 1, 1)), b.node("Mul", [k, st], "codes_scaled")],
                      "weight_groups")

    return _grouped(b, codes.to(torch.uint8), config["max_bits"], gs, affine, False)


def _pq_weight(b: _Builder, plan: _Plan) -> str:
    config, tensors = plan.config, plan.tensors
    rows, cols = rows_cols(config)
    bs, bits = config["block_size"], config["bits"]
    cb = container_bits(bits)
    J = cols // bs
    codes = unpack_bits(tensors["weight_codes"], bits, rows * J).view(rows, J)
    codebook = tensors["weight_codebook"]
    if codebook.dtype == torch.float32 and torch.equal(codebook.half().float(), codebook):
        codebook = codebook.half()  # the codebook product_quantize rounded to float16, stored as such
    book = b.init("weight_codebook", codebook)
    if codebook.dtype != torch.float32:
        book = b.node("Cast", [book], "codebook_float", to=b.onnx.TensorProto.FLOAT)
    k = b.init("weight_codes", onnx_type=_uint(b.onnx, cb), dims=(rows, J), raw=_packed_codes(codes, cb))
    idx = b.node("Cast", [k], "codes_index", to=b.onnx.TensorProto.INT32)
    w = b.node("Gather", [book, idx], "weight_blocks", axis=0)  # (rows, J, block_size)
    return b.node("Reshape", [w, b.init("flat_shape", torch.tensor([rows, cols]))], "weight_2d")


def _sparse_weight(b: _Builder, plan: _Plan) -> str:
    config = plan.config
    stored = STORAGE_DTYPES[config["value_dtype"]]
    w = dequantize_packed(config, plan.tensors, stored).reshape(config["shape"][0], -1)
    name = b.init("weight_values", w)
    if stored == torch.float32:
        return name
    return b.node("Cast", [name], "weight_2d", to=b.onnx.TensorProto.FLOAT)


def _matmulnbits(b: _Builder, plan: _Plan, x: str, bias: str | None, out: str, mode: str) -> None:
    config, tensors = plan.config, plan.tensors
    cb, block = plan.matmulnbits
    codes = scheme_of(config).dense_codes(config, tensors)
    scales = tensors["weight_scales"].float()
    zeros = tensors["weight_zeros"]
    N, K = codes.shape
    nb = -(-K // block)
    gs = config["group_size"]
    group_of_block = (torch.arange(nb) * block) // gs if gs is not None and scales.shape[1] > 1 else torch.zeros(
        nb, dtype=torch.long)
    block_scales, block_zeros = scales[:, group_of_block], zeros[:, group_of_block]
    codes = F.pad(codes, (0, nb * block - K))
    B = b.init("weight_codes", onnx_type=b.onnx.TensorProto.UINT8, dims=(N, nb, block * cb // 8),
               raw=_packed_codes(codes, cb))
    inputs = [x, B, b.init("weight_scales", block_scales)]
    if not bool((block_zeros == 2 ** (cb - 1)).all()):  # the op's default zero point is 2^(bits-1)
        zp_bytes = -(-nb * cb // 8)
        zp = F.pad(block_zeros, (0, zp_bytes * 8 // cb - nb))
        inputs.append(b.init("weight_zeros", onnx_type=b.onnx.TensorProto.UINT8, dims=(N, zp_bytes),
                             raw=_packed_codes(zp, cb)))
    if bias is not None:
        inputs += [""] * (5 - len(inputs)) + [bias]
    b.node("MatMulNBits", inputs, "matmul", output=out, domain=MS_DOMAIN, K=K, N=N, bits=cb, block_size=block,
           accuracy_level=ACCURACY_LEVEL[mode])


def _lower(onnx_mod, plan: _Plan, node, qdq: bool, mode: str) -> _Builder:
    """The nodes and initializers that replace the marker ``node`` of ``plan``'s module."""
    b = _Builder(onnx_mod, plan.name)
    x, bias = node.input[0], (node.input[1] if len(node.input) > 1 else None)
    out = node.output[0]
    config = plan.config
    if plan.matmulnbits is not None:
        _matmulnbits(b, plan, x, bias, out, mode)
        return b
    scheme = config["scheme"]
    if scheme == PQ_SCHEME:
        w = _pq_weight(b, plan)
    elif scheme == MIXED_SCHEME:
        w = _mixed_weight(b, plan)
    elif scheme == SPARSE_SCHEME:
        w = _sparse_weight(b, plan)
    else:
        w = _scalar_weight(b, plan, qdq)
    if config["kind"] == "Linear":
        wt = b.node("Transpose", [w], "weight_t", perm=[1, 0])
        if bias is None:
            b.node("MatMul", [x, wt], "matmul", output=out)
        else:
            b.node("Add", [b.node("MatMul", [x, wt], "matmul"), bias], "add", output=out)
        return b
    marker = plan.module  # the conv attributes as the marker recorded them
    w = b.node("Reshape", [w, b.init("weight_shape", torch.tensor(config["shape"]))], "weight")
    pads = list(marker.padding) * 2
    b.node("Conv", [x, w] + ([bias] if bias is not None else []), "conv", output=out,
           kernel_shape=list(marker.kernel), strides=list(marker.stride), dilations=list(marker.dilation),
           pads=pads, group=int(marker.groups))
    return b


# ------------------------------------------------------------------ the public functions
def _import_onnx():
    if not hasattr(torch.onnx, "ops"):
        raise ImportError(f"export_onnx needs torch >= 2.8 (torch.onnx.ops.symbolic), this is {torch.__version__}")
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError:
        raise ImportError(
            "export_onnx needs onnx and onnxscript (and onnxruntime to run the file): pip install "
            "'obc_lightning[onnx]'"
        ) from None
    return onnx


def _check_args(path, example_input, mode, opset):
    if mode not in MODES:
        raise ValueError(f"export_onnx: mode must be one of {MODES}, got {mode!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise ValueError(f"export_onnx: opset must be an integer or None, got {opset!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise ValueError(
            "export_onnx: example_input must be a tensor or a tuple of tensors (the model's forward arguments), "
            f"got {type(example_input).__name__}"
        )
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"export_onnx: cannot write {path}: directory {directory} does not exist")
    return path, args


def export_onnx(
    model: nn.Module,
    path,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    mode: str = "exact",
    opset: int | None = None,
    qdq: bool = False,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> OnnxExport:
    """Write ``model`` as an ONNX file whose compressed modules keep their low-bit codes
    (:mod:`obc_lightning.export.onnx` gives the op of every scheme), for ONNX Runtime.

    Args:
        model: a model after :func:`~obc_lightning.compress.compress_model`, fine-tuning,
            :func:`~obc_lightning.export.load_quantized` or :func:`~obc_lightning.export.pack_model` (the
            modules that :func:`~obc_lightning.export.save_quantized` would write packed), in float32. It is
            left as it was (its modules are swapped for markers during the export and put back).
        path: the ``.onnx`` file, written atomically (an existing file is replaced only by a complete one).
        example_input: the forward arguments for torch's exporter (a tensor or a tuple of tensors).
        mode: ``"exact"``: ``MatMulNBits`` computes in float32 (outputs equal the PyTorch compressed model's
            to float32 rounding), and Linears of 5-8 bits fold to float at load (ONNX Runtime's float path of
            8-bit ``MatMulNBits`` is slower than float); ``"fast"``: every scalar Linear a ``MatMulNBits``
            with ``accuracy_level=4`` (int8 activations inside the op). :func:`inference_session` can switch
            the ``MatMulNBits`` nodes of a file between the modes when it opens it.
        opset: the ONNX opset; ``None``: the lowest that holds the codes (21 for uint4 codes, 25 for uint2).
        qdq: the scalar weights of convolutions and of Linears without ``MatMulNBits`` as
            ``DequantizeLinear`` (the QDQ form) instead of ``Cast``/``Sub``/``Mul``; ONNX Runtime then needs
            ``session.disable_quant_qdq=1`` to run them at float speed (:func:`inference_session` sets it).
        dynamic_batch: the first dimension of every input is dynamic (torch's exporter keeps a dimension of
            size 1 static: give a batch of two or more rows).
        dynamic_shapes: torch.export's ``dynamic_shapes`` for the inputs (e.g. ``({0: Dim.AUTO, 1: Dim.AUTO},)``
            for a batch of sequences of any length); overrides ``dynamic_batch``.
        input_names, output_names: names of the graph's inputs and outputs.

    Returns an :class:`OnnxExport` (size, opset, the form of every module, the modules whose codes take
    wider containers than their bits). Raises ``ValueError`` naming the module and the remedy when nothing
    is compressed, when a module cannot be exported, or when ``opset`` is too old for its codes.
    """
    path, args = _check_args(path, example_input, mode, opset)
    onnx = _import_onnx()
    entries = packed_entries(model, scale_dtype=torch.float32)
    if not entries:
        raise ValueError(f"export_onnx: {NOTHING_TO_EXPORT}")
    plans: list[_Plan] = []
    markers: dict[str, nn.Module] = {}
    for name, (config, tensors, _) in entries.items():
        if not name:
            raise ValueError("export_onnx: the model itself is a compressed module; wrap it in a container")
        m = model.get_submodule(name)
        kind = config["kind"]
        if type(m).forward not in EXPORTABLE_FORWARDS[kind]:
            raise ValueError(
                f"export_onnx: module '{name}' is a {type(m).__name__} whose forward is not nn.{kind}'s: its ONNX "
                f"form would compute nn.{kind}'s, not its own; leave it out of the compression (exclude=['{name}']) "
                f"or give it nn.{kind}'s forward"
            )
        markers[name] = _Marker(len(plans), m, kind)
        plan = _plan(name, config, {k: t.detach().cpu() for k, t in tensors.items()}, markers[name], qdq, mode)
        plans.append(plan)
    needed = max([MIN_OPSET, *(p.opset for p in plans)])
    if opset is None:
        opset = needed
    elif opset < needed:
        worst = max(plans, key=lambda p: p.opset)
        raise ValueError(
            f"export_onnx: opset={opset} is too old for module '{worst.name}': its codes are stored as "
            f"{worst.form.split(' + ')[0]}, which ONNX allows from opset {worst.opset}; pass opset={needed} or "
            "later (or leave opset out)"
        )
    elif opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset={opset} is too old for torch's exporter; pass opset={MIN_OPSET} or later")
    dynamic = dynamic_shapes
    if dynamic is None and dynamic_batch:
        auto = torch.export.Dim.AUTO
        dynamic = tuple({0: auto} if a.dim() else None for a in args)
    with _swapped(model, markers), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*training mode.*")
        try:
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                        input_names=input_names, output_names=output_names, verbose=False,
                                        optimize=True, external_data=False)
        except Exception as e:
            raise ValueError(
                f"export_onnx: torch.onnx.export (dynamo=True) could not export the model: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
    proto = program.model_proto
    graph = proto.graph
    done: set[int] = set()
    new_nodes, new_inits = [], []
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        built = _lower(onnx, plans[key], node, qdq, mode)
        new_nodes += built.nodes
        new_inits += built.initializers
        done.add(key)
    missing = [p.name for i, p in enumerate(plans) if i not in done]
    if missing:
        raise ValueError(
            f"export_onnx: module(s) {missing} were not called at the top level of the exported graph (inside "
            "a loop or a condition, or not called by forward with this example_input); they cannot be exported"
        )
    for node in new_nodes:  # the exporter's debugging records (fx node, stack, class names): most of a small file
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # intermediate shapes: ONNX Runtime infers them
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    imports = [o for o in proto.opset_import if o.domain != MARKER_DOMAIN]
    if any(p.matmulnbits for p in plans):
        imports.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    proto.metadata_props.add(key="obc_lightning.mode", value=mode)
    proto.producer_name = "obc_lightning"
    data = proto.SerializeToString()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return OnnxExport(path, os.path.getsize(path), opset, mode, {p.name: p.form for p in plans},
                      {p.name: p.container for p in plans if p.container})


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def inference_session(path, *, mode: str | None = None, threads: int | None = None,
                      providers: Sequence[str] = ("CPUExecutionProvider",), **config: Any):
    """An ``onnxruntime.InferenceSession`` for a file of :func:`export_onnx`, set up for speed.

    Args:
        path: the ``.onnx`` file.
        mode: ``None``: as exported; ``"exact"`` / ``"fast"``: every ``MatMulNBits`` set to
            ``accuracy_level`` 0 / 4 in memory (the file is not changed).
        threads: ``intra_op_num_threads`` (``None``: ONNX Runtime's default).
        providers: execution providers.
        config: more session configuration entries (``session.*`` keys as strings).

    ``session.disable_quant_qdq=1`` is set, so that ``DequantizeLinear`` weights (``qdq=True`` files, or
    QDQ files of other tools) fold to float once at load instead of being dequantized on every run.
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if mode is not None and mode not in MODES:
        raise ValueError(f"inference_session: mode must be None or one of {MODES}, got {mode!r}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    for k, v in config.items():
        options.add_session_config_entry(k, str(v))
    source: Any = path
    if mode is not None:
        onnx = _import_onnx()
        proto = onnx.load(path)
        level = ACCURACY_LEVEL[mode]
        changed = False
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
                for a in node.attribute:
                    if a.name == "accuracy_level" and a.i != level:
                        a.i, changed = level, True
        if changed:
            source = proto.SerializeToString()
    return ort.InferenceSession(source, options, providers=list(providers))
