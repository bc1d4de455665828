"""Packed export: quantized and pruned models in safetensors, loaded back without pickle and without a
Trainer.

File layout (safetensors; every key is the one the packed model's ``state_dict`` uses):

- per scalar-quantized module ``m`` (scheme "affine" / "symmetric"): ``m.weight_codes`` (uint8, codes of
  ``weight.reshape(out, -1)`` row-major, bit-packed by :func:`obc_lightning.packed.pack_bits`),
  ``m.weight_scales`` ((out, n_groups), float16 by default), ``m.weight_zeros`` ((out, n_groups) uint8
  integer zero points);
- with ``save_quantized(..., n_m=(N, M))``, per scalar module ``m`` instead: ``m.weight_codes`` (the codes
  of exactly N entries per group of M inputs -- the kept weights, padded with zeros -- bit-packed at
  ``bits``), ``m.weight_positions`` (each entry's position 0 ... M-1 in its group, bit-packed at
  ceil(log2 M) bits), ``m.weight_scales``, ``m.weight_zeros``; groups, entry order and dequantization in
  :mod:`obc_lightning.packed`;
- per product-quantized module ``m`` (scheme "pq", :func:`obc_lightning.solvers.pq.product_quantize`):
  ``m.weight_codes`` (uint8, the (out, J) sub-vector codes row-major, J = in * kh * kw / block_size,
  bit-packed at bits = ceil(log2 n_centroids); at most 256 centroids) and ``m.weight_codebook``
  ((n_centroids, block_size), float16 by default: ``scale_dtype`` names its dtype too); the weight is
  ``codebook[codes]`` reshaped to the weight's shape;
- per DiffQ module ``m`` (scheme "mixed", :class:`obc_lightning.finetune.MixedResult`): ``m.weight_codes``
  (the codes of each bit width in turn, bit-packed at that width), ``m.weight_bits`` (every group's
  width, bit-packed), ``m.weight_range`` ((out, 2) row minima and maxima, float16 by default); a
  ternary module (TTQ) is a "pq" module with ``block_size`` 1 and the codebook {0, +w_p, -w_n};
- per pruned float module ``m`` (scheme "sparse": a prune-only ``compress_model(..., bits=None)`` report,
  or ``save_quantized(..., sparse=...)``), the kept weights in ``value_dtype`` (float16 by default):
  with ``n_m=(N, M)`` ``m.weight_values`` (exactly N values per group of M inputs -- the non-zeros,
  padded with zeros -- in the entry order of the N:M codes) and ``m.weight_positions`` (as above);
  without, ``m.weight_mask`` (1 bit per weight of ``weight.reshape(-1)``, set for the stored ones) and
  ``m.weight_values`` (the non-zero weights, row-major);
- every other entry of ``model.state_dict()`` (biases, unquantized weights, BatchNorm statistics) at
  its own dtype and full precision;
- string metadata: ``format`` = "obc_lightning", ``format_version`` = "2", ``library_version``,
  ``sha256`` (below), and ``modules``: JSON ``{name: {kind, bits, group_size, shape, scheme,
  scale_dtype, dtype}}`` for scalar modules (plus ``n_m: [N, M]`` for N:M-sparse storage; absent:
  dense), ``{name: {kind, scheme: "pq", bits, block_size, n_centroids, shape, scale_dtype, dtype}}`` for
  product-quantized ones, ``{name: {kind, scheme: "sparse", shape, value_dtype, dtype, n_m: [N, M] |
  nnz}}`` for sparse ones, ``{name: {kind, scheme: "mixed", shape, group_size, min_bits, max_bits,
  bit_counts, scale_dtype, dtype}}`` for DiffQ ones (sizes and layouts of every scheme in
  :mod:`obc_lightning.packed`).

Size: sum over scalar modules of ceil(bits * numel / 8) + rows * n_groups * (scale bytes + 1) (N:M:
ceil(bits * numel * N / M / 8) + ceil(ceil(log2 M) * numel * N / M / 8) + the same scales / zeros), over
PQ modules of ceil(bits * rows * J / 8) + n_centroids * block_size * (codebook entry bytes), over sparse
modules of numel * N / M * (value bytes) + ceil(ceil(log2 M) * numel * N / M / 8) (N:M; 2:4 with float16
values: 9 bits per weight) or ceil(numel / 8) + nnz * (value bytes) (bitmask), plus the other tensors,
plus the safetensors header (JSON, a few hundred bytes per module).

Precision of the loaded weight: ``W = float(s) * (code - z)`` with the *stored* scale s. With the default
``scale_dtype=torch.float16`` the loaded weights differ from the in-memory result of ``compress_model``
(fp32 scales) by the fp16 rounding of each scale: a relative error of at most 2**-11 per row / group,
far below the quantization step. ``scale_dtype=torch.float32`` gives a bit-exact round trip of an fp32
(or fp16 / bf16) model at 2 more bytes per scale. A PQ codebook is never rounded on export: it must be
exactly representable in ``scale_dtype`` (``product_quantize`` rounds it to float16 by default), so a PQ
module always round-trips bit-exactly. A sparse weight loads as its weight rounded to ``value_dtype``
(``value_dtype=torch.float32``: bit-exact for an fp32, fp16 or bf16 model). Either way, loading the same
file always gives the same bits, and ``QuantizedLinear`` / ``QuantizedConv2d`` compute exactly the
weights that ``load_quantized`` writes into a dense model.

Integrity: ``sha256`` is canonical JSON (sorted keys, no spaces) mapping every tensor's name to the
SHA-256 of ``[dtype, shape]`` as canonical JSON (e.g. ``["F16",[8,1]]``) followed by its raw bytes
(:func:`tensor_digest`), and ``"__metadata__"`` to the SHA-256 of the other metadata entries as canonical
JSON (:func:`metadata_digest`). Every digest is verified on load before anything else is read from the
file: a changed bit anywhere (a tensor, a shape, a name, the metadata, the checksums) is refused with a
``ValueError`` naming the file and the tensor. Files of format_version "1" (no checksums; same layout
otherwise) still load, with an :class:`UnverifiedFileWarning`. On load, and before any file is written,
the packed tensors are checked: scales finite and > 0, codebooks and sparse values finite, DiffQ ranges
finite with lo <= hi, codes within their ranges (:func:`obc_lightning.packed.check_packed_tensors`).

Determinism: the same model and arguments give the same bytes (:func:`write_file`: canonical header,
tensors in a fixed order, no timestamps).

Safety: no pickle (safetensors only); every check on the file and on the model happens before the first
weight is written, and each failure is a ``ValueError`` that names the file, the module or the tensor;
writes go to a temporary file in the target directory, fsync-ed, then ``os.replace``-d into place.

Lightning checkpoints of a model with packed modules (after :func:`pack_model`) hold the packed buffers
and each module's description as its ``_extra_state``. Loading weights needs the packed modules in place
first; in the LightningModule::

    def on_load_checkpoint(self, checkpoint):
        obc_lightning.export.prepare_for_load(self, checkpoint)

(Lightning calls it before ``load_state_dict``, both in ``load_from_checkpoint`` and in
``trainer.fit/validate/test(ckpt_path=...)``), or call ``prepare_for_load(model, torch.load(path))``
yourself before ``model.load_state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from obc_lightning.finetune import MixedResult
from obc_lightning.packed import (
    ALL_BUFFERS,
    MAX_PQ_CENTROIDS,
    MIXED_SCHEME,
    PACKED_CLASSES,
    PACKED_FORMAT,
    PQ_SCHEME,
    SCALE_DTYPES,
    SPARSE_SCHEME,
    _QuantizedBase,
    buffer_names,
    buffer_specs,
    check_config,
    check_packed_tensors,
    dense_codes,
    dequantize_packed,
    dtype_name,
    is_mixed,
    is_pq,
    is_sparse,
    kind_of,
    mixed_pack,
    n_groups_of,
    nm_pack,
    pack_bits,
    payload_nbytes,
    pq_code_bits,
    sparse_pack,
)
from obc_lightning.selection import matches
from obc_lightning.solvers.pq import PQResult

FILE_FORMAT = "obc_lightning"
FORMAT_VERSION = "2"  # "1": the same layout without checksums (read, with a warning)
CHECKSUM_KEY = "sha256"
METADATA_DIGEST = "__metadata__"  # the checksums' entry for the metadata (safetensors reserves the name)


class UnverifiedFileWarning(UserWarning):
    """A file written before checksums (format_version "1") was loaded: its integrity cannot be verified."""


# ------------------------------------------------------------------ from solver results to packed tensors
def _results_map(report_or_results) -> dict[str, list]:
    """name -> [QuantResult per conv group], [PQResult], or [] (pruned only: a float weight) from a
    CompressionReport or a mapping."""
    if report_or_results is None:
        return {}
    if hasattr(report_or_results, "modules") and hasattr(report_or_results, "results"):
        report = report_or_results
        pruned_only = getattr(report, "bits", 0) is None and getattr(report, "method", "") == "scalar"
        if pruned_only:  # no codes: the pruned float weights are the result, with or without keep_results
            return {name: [] for name in report.quantized}
        if report.results is None:
            raise ValueError(
                "the report holds no codes: run compress_model(..., keep_results=True) to export its result"
            )
        report_or_results = report_or_results.results
    if not isinstance(report_or_results, Mapping):
        raise ValueError(
            "report_or_results must be a CompressionReport or a mapping module name -> QuantResult list "
            f"(or [PQResult]), got {type(report_or_results).__name__}"
        )
    out = {}
    for name, res in report_or_results.items():
        out[name] = list(res) if isinstance(res, (list, tuple)) else [res]
    return out


def _check_storage_dtype(arg: str, dtype) -> str:
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else None
    if name not in SCALE_DTYPES:
        raise ValueError(f"{arg} must be one of torch.{', torch.'.join(SCALE_DTYPES)}, got {dtype!r}")
    return name


def _packed_from_results(name: str, m: nn.Module, results: list, scale_dtype: str) -> tuple[dict, dict[str, Tensor]]:
    """(config, {buffer name: tensor}) of module ``m`` from its QuantResults (one per conv group) or its
    one PQResult, checked against its weight."""
    kind = kind_of(m)
    if kind is None:
        raise ValueError(f"module '{name}' is a {type(m).__name__}; only Linear / Conv1d / Conv2d are exported")
    if any(isinstance(r, PQResult) for r in results):
        return _pq_from_result(name, m, kind, results, scale_dtype)
    if any(isinstance(r, MixedResult) for r in results):
        return _mixed_from_result(name, m, kind, results, scale_dtype)
    groups = getattr(m, "groups", 1)
    if len(results) != groups:
        raise ValueError(f"module '{name}' has {groups} conv group(s) but {len(results)} result(s)")
    grids = [r.grid for r in results]
    bits, gs, sym = grids[0].n_bits, grids[0].group_size, grids[0].symmetric
    if any((g.n_bits, g.group_size, g.symmetric) != (bits, gs, sym) for g in grids):
        raise ValueError(f"module '{name}': its conv groups were quantized on different grids")
    W = m.weight.detach().cpu()
    rows, cols = W.shape[0], W[0].numel()
    codes = torch.cat([r.codes.cpu() for r in results])
    scales = torch.cat([r.scales.cpu() for r in results])
    zeros = torch.cat([r.rounded_zeros.cpu() for r in results])
    ng = n_groups_of(cols, gs)
    if tuple(codes.shape) != (rows, cols) or tuple(scales.shape) != (rows, ng) or zeros.shape != scales.shape:
        raise ValueError(
            f"module '{name}': results of shapes codes {tuple(codes.shape)}, scales {tuple(scales.shape)} do not "
            f"fit its weight of shape {tuple(W.shape)} ({rows} x {cols}, {ng} group(s) per row)"
        )
    maxq = 2**bits - 1
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > maxq:
        raise ValueError(f"module '{name}': zero points must be integers in [0, {maxq}]")
    w = W.reshape(rows, cols)
    g = torch.arange(cols) // gs if gs is not None else torch.zeros(cols, dtype=torch.long)
    s, z = scales[:, g], zeros[:, g].to(scales.dtype)
    if not torch.equal((s * (codes.to(s.dtype) - z)).to(W.dtype), w):
        # the weight may have moved on the same grid since (e.g. fine-tuned on it): read its codes
        codes = torch.clamp(torch.round(w.to(s.dtype) / s) + z, 0, maxq)
        if not torch.equal((s * (codes - z)).to(W.dtype), w):
            raise ValueError(
                f"module '{name}': its weight is not on the grid of the given results (was the model changed "
                "after compress_model?)"
            )
    stored = scales.to(SCALE_DTYPES[scale_dtype])
    if not torch.isfinite(stored).all() or ((stored == 0) & (scales != 0)).any():
        raise ValueError(
            f"module '{name}': scale_dtype={scale_dtype} cannot represent its scales (range "
            f"[{float(scales.abs().min()):.3g}, {float(scales.abs().max()):.3g}]); use scale_dtype=torch.float32"
        )
    config = {
        "kind": kind,
        "bits": bits,
        "group_size": gs,
        "shape": list(W.shape),
        "scheme": "symmetric" if sym else "affine",
        "scale_dtype": scale_dtype,
        "dtype": dtype_name(W.dtype),
    }
    tensors = {
        "weight_codes": pack_bits(codes.to(torch.int32), bits),
        "weight_scales": stored.contiguous(),
        "weight_zeros": zeros.to(torch.uint8),
    }
    return config, tensors


def _pq_from_result(name: str, m: nn.Module, kind: str, results: list, scale_dtype: str):
    """(config, {weight_codes, weight_codebook}) of module ``m`` from its PQResult, checked against its weight."""
    if len(results) != 1:
        raise ValueError(f"module '{name}': a product-quantized module takes one PQResult, got {len(results)} results")
    res = results[0]  # a grouped conv's weight (out, in / g, kh, kw) is g stacked row blocks, as for scalars
    W = m.weight.detach().cpu()
    rows, cols = W.shape[0], W[0].numel()
    b, K = res.block_size, res.n_centroids
    if isinstance(K, bool) or not isinstance(K, int) or not 2 <= K <= MAX_PQ_CENTROIDS:
        raise ValueError(
            f"module '{name}': n_centroids={K!r} cannot be exported: codes are bit-packed at 8 bits at most, so "
            f"n_centroids must be in [2, {MAX_PQ_CENTROIDS}]"
        )
    if isinstance(b, bool) or not isinstance(b, int) or b < 1 or cols % b:
        raise ValueError(
            f"module '{name}': block_size={b!r} does not divide the {cols} inputs per row of its weight of shape "
            f"{tuple(W.shape)}"
        )
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
            f"module '{name}': a PQResult with codes {codes.dtype} of shape {tuple(codes.shape)} and codebook "
            f"{codebook.dtype} of shape {tuple(codebook.shape)} does not fit its weight of shape {tuple(W.shape)} "
            f"(integer codes of shape ({rows}, {J}) and a floating-point codebook of shape ({K}, {b}) expected)"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
        raise ValueError(f"module '{name}': codes must be in [0, {K - 1}] for n_centroids={K}")
    if not torch.isfinite(codebook).all():
        raise ValueError(f"module '{name}': the codebook contains NaN or Inf")
    if not torch.equal(codebook[codes.long()].reshape(W.shape).to(W.dtype), W):
        raise ValueError(
            f"module '{name}': its weight is not codebook[codes] of the given PQResult (was the model changed "
            "after quantization? after fine-tuning the centroids, pass a result holding the updated codebook)"
        )
    stored = codebook.to(SCALE_DTYPES[scale_dtype])
    if not torch.equal(stored.to(codebook.dtype), codebook):
        raise ValueError(
            f"module '{name}': scale_dtype={scale_dtype} cannot represent its {dtype_name(codebook.dtype)} codebook "
            "exactly; round the codebook to it first (product_quantize(..., codebook_dtype=torch.float16), the "
            f"default) or pass scale_dtype=torch.{dtype_name(codebook.dtype)}"
        )
    bits = pq_code_bits(K)
    config = {
        "kind": kind,
        "scheme": PQ_SCHEME,
        "bits": bits,
        "block_size": b,
        "n_centroids": K,
        "shape": list(W.shape),
        "scale_dtype": scale_dtype,
        "dtype": dtype_name(W.dtype),
    }
    tensors = {"weight_codes": pack_bits(codes.to(torch.int32), bits), "weight_codebook": stored.contiguous()}
    return config, tensors


def _mixed_from_result(name: str, m: nn.Module, kind: str, results: list, scale_dtype: str):
    """(config, {weight_codes, weight_bits, weight_range}) of module ``m`` from its MixedResult (DiffQ),
    checked against its weight."""
    if len(results) != 1:
        raise ValueError(f"module '{name}': a mixed-precision module takes one MixedResult, got {len(results)} results")
    res = results[0]
    grid = res.grid
    W = m.weight.detach().cpu()
    rows, cols = W.shape[0], W[0].numel()
    codes, bits = res.codes.detach().cpu(), grid.bits.detach().cpu()
    ng = n_groups_of(cols, grid.group_size)
    if tuple(codes.shape) != (rows, cols) or tuple(bits.shape) != (rows, ng) or grid.cols != cols:
        raise ValueError(
            f"module '{name}': a MixedResult with codes of shape {tuple(codes.shape)} and bit widths of shape "
            f"{tuple(bits.shape)} does not fit its weight of shape {tuple(W.shape)} ({rows} x {cols}, {ng} groups "
            "per row)"
        )
    if not torch.equal(bits, bits.round()) or bits.min() < res.min_bits or bits.max() > res.max_bits:
        raise ValueError(f"module '{name}': bit widths must be integers in [{res.min_bits}, {res.max_bits}]")
    if not 1 <= res.min_bits < res.max_bits <= 8:
        raise ValueError(
            f"module '{name}': mixed-precision codes are packed at 1 ... 8 bits; its widths range over "
            f"[{res.min_bits}, {res.max_bits}] (use max_bits <= 8)"
        )
    if not torch.equal(grid.to("cpu").dequantize(codes).to(W.dtype), W.reshape(rows, cols)):
        raise ValueError(
            f"module '{name}': its weight is not the dequantized MixedResult (was the model changed after "
            "fine-tuning?)"
        )
    rng = torch.cat([grid.lo, grid.hi], dim=1).detach().cpu()
    stored = rng.to(SCALE_DTYPES[scale_dtype])
    if not torch.equal(stored.to(rng.dtype), rng):
        raise ValueError(
            f"module '{name}': scale_dtype={scale_dtype} cannot represent its ranges exactly (rounded to "
            f"{dtype_name(res.range_dtype)} where that dtype holds them, range [{float(rng.min()):.3g}, "
            f"{float(rng.max()):.3g}]); pass scale_dtype=torch.float32"
        )
    lo = res.min_bits
    entry = bits.long()[:, torch.arange(cols) // grid.group_size]
    counts = torch.bincount(entry.reshape(-1) - lo, minlength=res.max_bits - lo + 1).tolist()
    config = {
        "kind": kind,
        "scheme": MIXED_SCHEME,
        "shape": list(W.shape),
        "group_size": grid.group_size,
        "min_bits": lo,
        "max_bits": res.max_bits,
        "bit_counts": counts,
        "scale_dtype": scale_dtype,
        "dtype": dtype_name(W.dtype),
    }
    return config, {**mixed_pack(config, codes, bits.long()), "weight_range": stored.contiguous()}


def _sparse_from_weight(name: str, m: nn.Module, value_dtype: str, n_m: tuple[int, int] | None):
    """(config, buffers) of a pruned float module in the "sparse" scheme: N:M with ``n_m`` (ValueError
    naming the module and its worst group if the weight violates it), else bitmask + values."""
    kind = kind_of(m)
    if kind is None:
        raise ValueError(f"module '{name}' is a {type(m).__name__}; only Linear / Conv1d / Conv2d are exported")
    where = f"module '{name}'"
    W = m.weight.detach().cpu()
    if not torch.isfinite(W).all():
        raise ValueError(f"{where}: its weight contains NaN or Inf")
    stored = W.to(SCALE_DTYPES[value_dtype])
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"{where}: value_dtype={value_dtype} cannot represent its weights (largest |w| = "
            f"{float(W.abs().max()):.3g}); use value_dtype=torch.float32"
        )
    config = {
        "kind": kind,
        "scheme": SPARSE_SCHEME,
        "shape": list(W.shape),
        "value_dtype": value_dtype,
        "dtype": dtype_name(W.dtype),
    }
    if n_m is not None:
        config["n_m"] = list(n_m)
    else:
        config["nnz"] = int(torch.count_nonzero(stored))  # sparse_pack stores exactly these
    config = check_config(config, where)
    return config, sparse_pack(config, stored, where)


def _sparse_names(model: nn.Module, sparse, quantized: set[str]) -> list[str]:
    """The float modules ``sparse`` selects among the Linear / Conv1d / Conv2d not in ``quantized``: all of
    them (True), or those matching a name or fnmatch pattern (a parent selects its children, as in
    ``compress_model``'s include), each pattern matching at least one."""
    if sparse is None or sparse is False:
        return []
    floats = [n for n, m in model.named_modules() if kind_of(m) is not None and n not in quantized]
    if sparse is True:
        return floats
    patterns = [sparse] if isinstance(sparse, str) else list(sparse) if isinstance(sparse, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"sparse must be True, a module name / fnmatch pattern or a list of them, got {sparse!r}")
    for p in patterns:
        if not any(matches(n, p) for n in floats):
            shown = ", ".join(floats[:20]) + (", ..." if len(floats) > 20 else "")
            raise ValueError(
                f"sparse: {p!r} matches no float Linear / Conv1d / Conv2d module (quantized and packed modules "
                f"excluded); available: {shown or 'none'}"
            )
    return [n for n in floats if any(matches(n, p) for p in patterns)]


def _check_n_m(fn: str, n_m) -> tuple[int, int] | None:
    if n_m is None:
        return None
    ok = (
        isinstance(n_m, (tuple, list))
        and len(n_m) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in n_m)
    )
    if not ok or not 1 <= n_m[0] < n_m[1]:
        raise ValueError(f"{fn}: n_m must be a pair of integers (N, M) with 1 <= N < M, got {n_m!r}")
    return int(n_m[0]), int(n_m[1])


def _to_nm(name: str, config: dict, tensors: Mapping[str, Tensor], n_m: tuple[int, int]):
    """(config, tensors) of a scalar or sparse module stored N:M-sparse (unchanged if it already is, at this
    N:M, or is product-quantized); ValueError naming the module and its worst group if the weight violates
    it."""
    if is_pq(config) or is_mixed(config) or config.get("n_m") == list(n_m):
        return config, tensors
    where = f"module '{name}'"
    if is_sparse(config):  # from the bitmask layout (or another N:M): the same values, exactly
        weight = dequantize_packed(config, tensors, SCALE_DTYPES[config["value_dtype"]])
        bitmask_cfg = {k: v for k, v in config.items() if k not in ("n_m", "nnz")}
        new_cfg = check_config(dict(bitmask_cfg, n_m=list(n_m)), where)
        return new_cfg, sparse_pack(new_cfg, weight, where)
    dense_cfg = {k: v for k, v in config.items() if k != "n_m"}
    new_cfg = check_config(dict(dense_cfg, n_m=list(n_m)), where)
    rows = config["shape"][0]
    codes = dense_codes(config, tensors)
    nonzero = dequantize_packed(config, tensors).reshape(rows, -1) != 0  # the weight as exported
    out = {
        **nm_pack(new_cfg, codes, tensors["weight_zeros"], nonzero, where),
        "weight_scales": tensors["weight_scales"],
        "weight_zeros": tensors["weight_zeros"],
    }
    return new_cfg, {k: out[k] for k in buffer_names(new_cfg)}


def _packed_entries(
    model: nn.Module, report_or_results, scale_dtype, n_m=None, sparse=None, value_dtype=torch.float16
) -> dict[str, tuple]:
    """name -> (config, {buffer name: tensor}, is_packed_module) for every quantized, sparse or packed
    module; with ``n_m`` every scalar and sparse module in N:M storage (all checked here, before anything
    is written)."""
    scale_dtype = _check_storage_dtype("scale_dtype", scale_dtype)
    value_dtype = _check_storage_dtype("value_dtype", value_dtype)
    n_m = _check_n_m("n_m", n_m)
    results = _results_map(report_or_results)
    entries = {}
    for name, m in model.named_modules():
        if isinstance(m, _QuantizedBase):
            entries[name] = (m.config, m.packed_tensors(), True)
    pruned = []  # float modules: the sparse scheme
    for name, res in results.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the results name module '{name}', which the model does not have") from None
        if name in entries:
            continue  # already packed: its buffers are the codes
        if res:
            entries[name] = (*_packed_from_results(name, m, res, scale_dtype), False)
        else:
            pruned.append(name)
    pruned += [n for n in _sparse_names(model, sparse, set(entries)) if n not in pruned]
    for name in pruned:
        entries[name] = (*_sparse_from_weight(name, model.get_submodule(name), value_dtype, n_m), False)
    if n_m is not None:
        for name, (config, tensors, is_packed) in list(entries.items()):
            entries[name] = (*_to_nm(name, config, tensors, n_m), is_packed)
    return entries


# ------------------------------------------------------------------ bytes on disk
# safetensors' names of the dtypes a state_dict may hold
_ST_DTYPES = {
    getattr(torch, name): code
    for name, code in (
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
        ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
        ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"), ("complex64", "C64"),
    )
    if hasattr(torch, name)
}


def _raw(t: Tensor):
    """The tensor's bytes as safetensors stores them (row-major, little-endian: torch's layout on every
    little-endian machine), as a buffer."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _st_dtype(key: str, t: Tensor) -> str:
    if t.dtype not in _ST_DTYPES:
        raise ValueError(f"save_quantized: tensor '{key}' has dtype {t.dtype}, which safetensors cannot store")
    return _ST_DTYPES[t.dtype]


def _canonical(obj) -> bytes:
    """One JSON text per value: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tensor_digest(key: str, t: Tensor) -> str:
    """SHA-256 (hex) of ``[dtype, shape]`` as canonical JSON (e.g. ``["F16",[8,1]]``) followed by the
    tensor's raw bytes: what a file's ``sha256`` metadata holds for each tensor."""
    h = hashlib.sha256(_canonical([_st_dtype(key, t), list(t.shape)]))
    h.update(_raw(t))
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the canonical JSON of every metadata entry but the checksums themselves."""
    return hashlib.sha256(_canonical({k: v for k, v in metadata.items() if k != CHECKSUM_KEY})).hexdigest()


def write_file(path: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file with a ``sha256`` metadata entry (checksums of every tensor and of the other
    metadata), atomically (:func:`_atomic_write`).

    Deterministic bytes: the header is canonical JSON (sorted keys, no spaces) padded with spaces to a
    multiple of 8 bytes, as safetensors pads it; the tensors follow in decreasing element size, then by
    name (each one aligned to its element size, as safetensors orders them); nothing depends on time
    or on the process. The same tensors and metadata always give the same file.
    """
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    sums = {key: tensor_digest(key, t) for key, t in tensors.items()}
    sums[METADATA_DIGEST] = metadata_digest(meta)
    meta[CHECKSUM_KEY] = _canonical(sums).decode()
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _st_dtype(key, t), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = _canonical(header)
    head += b" " * (-len(head) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _write_safetensors(f, head, [tensors[key] for key in order])

    _atomic_write(path, write)


def _write_safetensors(f, header: bytes, tensors: list[Tensor]) -> None:
    """The file's bytes: the header's length (u64, little-endian), the header, the tensors' bytes."""
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    for t in tensors:
        f.write(_raw(t).data)


def _verify(path: str, meta: Mapping[str, str], tensors: Mapping[str, Tensor]) -> None:
    """Every tensor and the metadata against the file's checksums; ValueError naming the first mismatch."""
    try:
        sums = json.loads(meta[CHECKSUM_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(
            f"{path}: format_version {FORMAT_VERSION} files hold a valid '{CHECKSUM_KEY}' metadata entry, this one "
            "does not (the file is corrupted or was modified after saving)"
        ) from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ValueError(f"{path}: metadata '{CHECKSUM_KEY}' must map names to hex digests")
    unlisted = sorted(set(tensors) - set(sums))
    absent = sorted(set(sums) - set(tensors) - {METADATA_DIGEST})
    if unlisted or absent or METADATA_DIGEST not in sums:
        raise ValueError(
            f"{path}: the file's tensors do not match its checksums (corrupted or modified after saving): "
            + "; ".join(
                f"{what} {keys[:10]}"
                for what, keys in (
                    ("tensors without a checksum:", unlisted),
                    ("checksums of tensors the file lacks:", absent),
                    ("no checksum of the metadata", [] if METADATA_DIGEST in sums else [""]),
                )
                if keys
            )
        )
    if metadata_digest(meta) != sums[METADATA_DIGEST]:
        raise ValueError(f"{path}: the metadata does not match its checksum (corrupted or modified after saving)")
    for key in sorted(tensors):
        if tensor_digest(key, tensors[key]) != sums[key]:
            raise ValueError(
                f"{path}: tensor '{key}' does not match its checksum (the file is corrupted or was modified "
                "after saving)"
            )


# ------------------------------------------------------------------ writing
def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        with suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def save_quantized(
    model: nn.Module,
    path,
    report_or_results=None,
    *,
    scale_dtype=torch.float16,
    n_m: tuple[int, int] | None = None,
    sparse: bool | str | Iterable[str] | None = None,
    value_dtype=torch.float16,
) -> int:
    """Write ``model`` with its quantized modules bit-packed, its pruned float modules sparse, to the
    safetensors file ``path``.

    Args:
        model: the model after :func:`~obc_lightning.compress.compress_model` (dense weights on the grid,
            or pruned float weights), or after :func:`pack_model` (packed modules are written as they are).
        report_or_results: the :class:`~obc_lightning.reporting.CompressionReport` of
            ``compress_model(..., keep_results=True)``, or a mapping module name -> QuantResult list (one
            per conv group), ``[PQResult]`` (product quantization over ``weight.reshape(out, -1)``; a
            ternary module's :meth:`~obc_lightning.finetune.TernaryQuantizer.result`) or
            ``[MixedResult]`` (DiffQ, :meth:`~obc_lightning.finetune.NoiseQuantizer.result`); ``None``
            if every quantized module is already packed. The report of a prune-only run (``bits=None``; no
            ``keep_results`` needed), or an empty result list, names float modules: they are written in
            the "sparse" scheme.
        scale_dtype: storage of the scales (and of the PQ codebooks, the DiffQ ranges) of dense modules:
            float16 (default), bfloat16, float32 (bit-exact round trip of scales), float64. A PQ codebook
            and DiffQ ranges must be exactly representable in it. Packed modules keep theirs.
        n_m: ``(N, M)``: store every scalar-quantized module N:M-sparse (the codes of N entries per group
            of M inputs and their positions, see :mod:`obc_lightning.packed`; conv groups run along the
            input channels at each kernel position, as ``compress_model(..., n_m=...)`` prunes them), and
            every sparse module as N values per group and their positions. Every such module must have at
            most N non-zero weights per group. ``None`` (default): dense codes, and sparse modules as a
            bitmask plus the non-zero values (packed modules keep their storage). Product-quantized
            modules are not affected.
        sparse: more float modules to write in the "sparse" scheme (pruned by other means): ``True``: every
            Linear / Conv1d / Conv2d that is neither quantized nor packed; or module names / fnmatch
            patterns among those (a parent selects its children), each matching at least one. Any weight
            is valid (a dense one only gains nothing).
        value_dtype: storage of the kept values of sparse modules: float16 (default; the loaded weights
            are the weights rounded to float16), bfloat16, float32 (bit-exact round trip of an fp32, fp16
            or bf16 model), float64. Packed modules keep theirs.

    The file holds a SHA-256 of every tensor and of the metadata (module docstring); the same model and
    arguments always give the same bytes.

    Returns the size of the file in bytes. Raises ``ValueError`` (and writes nothing) if a result does
    not fit its module, a packed tensor would be refused on load (e.g. a scale not finite and > 0),
    the module's weight is not on the result's grid (not ``codebook[codes]``), a
    sparse weight is not finite in ``value_dtype``, or, with ``n_m``, a module's weight is not N:M sparse
    (naming the module and its worst group).
    """
    entries = _packed_entries(model, report_or_results, scale_dtype, n_m, sparse, value_dtype)
    if not entries:
        raise ValueError(
            "save_quantized: nothing to export: pass the report of compress_model(..., keep_results=True), "
            "name the pruned float modules with sparse=..., or pack the model with pack_model first"
        )
    for name, (config, packed, _) in entries.items():  # what load_quantized checks: no file it would refuse
        where = f"save_quantized: module '{name}'"
        check_packed_tensors(check_config(config, where), {k: t.detach().cpu() for k, t in packed.items()}, where)
    sd = model.state_dict()
    skip = set()
    tensors: dict[str, Tensor] = {}
    for name, (_config, packed, is_packed) in entries.items():
        prefix = f"{name}." if name else ""
        skip.update([prefix + "_extra_state", prefix + "weight"])
        if is_packed:  # its buffers (of whichever storage) are replaced by the entry's tensors
            skip.update(prefix + k for k in ALL_BUFFERS)
        for key, t in packed.items():
            if not is_packed and prefix + key in sd:
                raise ValueError(f"save_quantized: the model already has a tensor named '{prefix + key}'")
            skip.add(prefix + key)
            tensors[prefix + key] = t.detach().cpu()
    seen: set[int] = set()
    for key, value in sd.items():
        if key in skip:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(
                f"save_quantized: state_dict entry '{key}' is a {type(value).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        tensors[key] = value.detach().cpu()
    for key, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # safetensors refuses tensors that share memory (tied weights)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t

    import obc_lightning

    metadata = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": obc_lightning.__version__,
        "modules": json.dumps({name: e[0] for name, e in entries.items()}, sort_keys=True),
    }
    path = os.fspath(path)
    write_file(path, tensors, metadata)
    return os.path.getsize(path)


def theoretical_bytes(path) -> int:
    """The payload a file should hold, no header: packed codes + scales + zero points (scalar modules;
    + packed positions when N:M-sparse), packed codes + codebook (PQ modules), values + packed positions
    or bitmask (sparse modules), + other tensors."""
    configs, tensors = _read(os.fspath(path))
    total = 0
    quantized = set()
    for name, cfg in configs.items():
        total += payload_nbytes(cfg)
        quantized.update(f"{name}.{k}" if name else k for k in buffer_names(cfg))
    total += sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in quantized)
    return total


# ------------------------------------------------------------------ reading
def _read(path: str) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """(module configs, all tensors) of a file, or a ValueError saying what is wrong with it."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if not meta or meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: not an obc_lightning export (metadata 'format' is {(meta or {}).get('format')!r})")
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        _verify(path, meta, tensors)  # before anything else is read from the file
    elif version == "1" and CHECKSUM_KEY not in meta:
        warnings.warn(
            f"{path}: written by obc_lightning {meta.get('library_version')!r} in format_version 1, without "
            "checksums: its integrity cannot be verified (a changed bit loads silently); save it again to add them",
            UnverifiedFileWarning,
            stacklevel=3,
        )
    else:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported (this library reads {FORMAT_VERSION!r} and "
            f"'1' without checksums; written by obc_lightning {meta.get('library_version')!r})"
        )
    try:
        modules = json.loads(meta.get("modules", ""))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata 'modules' is not valid JSON: {e}") from None
    if not isinstance(modules, dict):
        raise ValueError(f"{path}: metadata 'modules' must be a JSON object, got {type(modules).__name__}")
    configs = {name: check_config(cfg, f"{path}: module '{name}'") for name, cfg in modules.items()}
    for name, cfg in configs.items():
        prefix = f"{name}." if name else ""
        missing = [prefix + k for k in buffer_names(cfg) if prefix + k not in tensors]
        if missing:
            raise ValueError(f"{path}: module '{name}' lacks the tensors {missing}")
        check_packed_tensors(cfg, {k: tensors[prefix + k] for k in buffer_names(cfg)}, f"{path}: module '{name}'")
    return configs, tensors


def read_metadata(path) -> dict[str, dict]:
    """The per-module descriptions of a file (validated), without touching any model."""
    return _read(os.fspath(path))[0]


def _same_config(a: dict, b: dict) -> bool:
    """Equal apart from the dense dtype (a packed module may have been moved to another dtype)."""
    return {k: v for k, v in a.items() if k != "dtype"} == {k: v for k, v in b.items() if k != "dtype"}


def _check_target(name: str, m: nn.Module | None, cfg: dict, where: str) -> None:
    if m is None:
        raise ValueError(f"{where}: the file quantizes module '{name}', which the model does not have")
    if isinstance(m, _QuantizedBase):
        if not _same_config(m.config, cfg):
            raise ValueError(f"{where}: module '{name}' is packed as {m.config}, the file holds {cfg}")
        return
    if kind_of(m) != cfg["kind"]:
        raise ValueError(f"{where}: module '{name}' is a {type(m).__name__}, the file holds a {cfg['kind']}")
    if list(m.weight.shape) != cfg["shape"]:
        raise ValueError(
            f"{where}: module '{name}' has a weight of shape {list(m.weight.shape)}, the file holds {cfg['shape']}"
        )


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is the quantized module; wrap it in a container to swap it")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def load_quantized(path, model: nn.Module, *, packed: bool = False) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (same architecture), in place.

    Every quantized weight becomes ``float(scale) * (code - zero)`` (scalar) or ``codebook[codes]`` (PQ),
    every sparse one its stored values (0 elsewhere), in the weight's dtype (see the module docstring),
    every other tensor its saved value. With ``packed=True`` the quantized and sparse Linear / Conv
    modules are replaced by :class:`~obc_lightning.packed.QuantizedLinear` / ``QuantizedConv1d`` /
    ``QuantizedConv2d`` holding the packed tensors (the memory saving at inference). Modules already
    packed in ``model`` receive the packed tensors either way.

    Raises ``ValueError`` naming the problem (unreadable, truncated or corrupted file; a tensor or the
    metadata that does not match its checksum; bad metadata; tensor of the wrong size; scales not finite
    and > 0; module missing or of another shape; tensors missing or unexpected) before anything in
    ``model`` is written. A format_version "1" file (no checksums) loads with an
    :class:`UnverifiedFileWarning`.
    """
    path = os.fspath(path)
    configs, tensors = _read(path)
    sd = model.state_dict()
    quantized_keys: set[str] = set()
    for name, cfg in configs.items():
        m = _submodule(model, name)
        _check_target(name, m, cfg, path)
        prefix = f"{name}." if name else ""
        quantized_keys.update(prefix + k for k in (*buffer_names(cfg), "_extra_state", "weight"))
    plain = {k: v for k, v in sd.items() if k not in quantized_keys and isinstance(v, Tensor)}
    file_plain = {k for k in tensors if k not in quantized_keys}
    missing, unexpected = sorted(set(plain) - file_plain), sorted(file_plain - set(plain))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the file does not match the model: "
            + "; ".join(
                f"{what} {keys[:10]}{' ...' if len(keys) > 10 else ''}"
                for what, keys in (("missing from the file:", missing), ("not in the model:", unexpected))
                if keys
            )
        )
    for k, v in plain.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: tensor '{k}' has shape {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model"
            )

    # everything checked: from here on only writes
    with torch.no_grad():
        for k, v in plain.items():  # first: biases of swapped modules are carried over by identity
            v.copy_(tensors[k])
        for name, cfg in configs.items():
            m = model.get_submodule(name)
            prefix = f"{name}." if name else ""
            packed_t = {k: tensors[prefix + k] for k in buffer_names(cfg)}
            if isinstance(m, _QuantizedBase):
                for k, t in packed_t.items():
                    getattr(m, k).copy_(t)
                m._weight_cache = None
            elif packed:
                dev = m.weight.device
                cfg = dict(cfg, dtype=dtype_name(m.weight.dtype))
                moved = {k: t.to(dev) for k, t in packed_t.items()}
                _swap(model, name, PACKED_CLASSES[cfg["kind"]].from_dense(m, cfg, moved))
            else:
                m.weight.copy_(dequantize_packed(cfg, packed_t, m.weight.dtype))
    return model


# ------------------------------------------------------------------ packed modules in memory
def pack_model(
    model: nn.Module,
    report_or_results=None,
    *,
    scale_dtype=torch.float16,
    n_m: tuple[int, int] | None = None,
    sparse: bool | str | Iterable[str] | None = None,
    value_dtype=torch.float16,
) -> nn.Module:
    """Replace each quantized (or sparse) Linear / Conv1d / Conv2d by its packed module, in place; returns
    ``model``. The arguments are those of :func:`save_quantized`.

    The packed modules compute ``float(scale) * (code - zero)`` with scales stored in ``scale_dtype``
    (float16 by default: outputs differ from the dense quantized model by the fp16 rounding of the
    scales; ``torch.float32`` reproduces them exactly), or ``codebook[codes]`` for product-quantized
    modules (codebook stored exactly in ``scale_dtype``: the dense model's outputs, bit for bit).
    With ``n_m=(N, M)`` every scalar-quantized module holds its codes N:M-sparse, every sparse module its
    values (as ``save_quantized(..., n_m=...)`` writes them; modules already packed densely or as a
    bitmask are re-packed; the weights are the same bits). Pruned float modules (a prune-only report,
    ``sparse``) hold their values in ``value_dtype`` and compute with the weight rounded to it
    (``torch.float32``: the dense outputs). Forward hooks on the replaced modules are not carried over.
    All modules are checked before the first is replaced.
    """
    entries = _packed_entries(model, report_or_results, scale_dtype, n_m, sparse, value_dtype)
    new = {}
    for name, (config, packed, is_packed) in entries.items():
        m = model.get_submodule(name)
        if is_packed and _same_config(config, m.config):
            continue
        dev = next(iter(m.packed_tensors().values())).device if is_packed else m.weight.device
        new[name] = PACKED_CLASSES[config["kind"]].from_dense(m, config, {k: t.to(dev) for k, t in packed.items()})
    if "" in new:
        raise ValueError("pack_model: the model itself is the quantized module; wrap it in a container")
    for name, q in new.items():
        _swap(model, name, q)
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    """Replace every packed module by a dense Linear / Conv with the dequantized weight, in place."""
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantizedBase)]
    if any(n == "" for n, _ in packed):
        raise ValueError("unpack_model: the model itself is a packed module; call its to_dense()")
    for name, m in packed:
        _swap(model, name, m.to_dense())
    return model


def _placeholder(m: nn.Module, cfg: dict) -> nn.Module:
    """A packed module of the right layout (any scheme) whose buffers ``load_state_dict`` will fill."""
    dev = m.weight.device
    tensors = {k: torch.zeros(shape, dtype=dtype, device=dev) for k, (dtype, shape) in buffer_specs(cfg).items()}
    # zero buffers of the right sizes; their values (N:M positions, a bitmask's nnz, mixed widths that
    # match bit_counts) need not be valid: load_state_dict overwrites them before any use
    cls = PACKED_CLASSES[cfg["kind"]]
    return cls.from_dense(m, dict(cfg, dtype=dtype_name(m.weight.dtype)), tensors, check=False)


def prepare_for_load(model: nn.Module, checkpoint_or_state_dict) -> list[str]:
    """Swap in the packed modules that a checkpoint (or state dict, or export file path) describes.

    Call before ``model.load_state_dict`` (e.g. in ``LightningModule.on_load_checkpoint``): it reads
    the ``<module>._extra_state`` descriptions written by packed modules (or the metadata of a
    :func:`save_quantized` file), checks every module first, and replaces the matching dense modules by
    packed ones with placeholder buffers. Modules already packed with the same layout are left alone.
    Returns the names of the replaced modules.
    """
    src: Any = checkpoint_or_state_dict
    if isinstance(src, (str, os.PathLike)):
        configs = read_metadata(src)
        where = os.fspath(src)
    else:
        if isinstance(src, Mapping) and isinstance(src.get("state_dict"), Mapping):
            src = src["state_dict"]  # a Lightning checkpoint
        if not isinstance(src, Mapping):
            raise ValueError(
                f"prepare_for_load: expected a checkpoint, a state dict or a file path, got {type(src).__name__}"
            )
        where = "checkpoint"
        configs = {}
        for key, value in src.items():
            if key.rpartition(".")[2] == "_extra_state" and isinstance(value, Mapping):
                if value.get("format") == PACKED_FORMAT:
                    name = key[: -len("._extra_state")] if key != "_extra_state" else ""
                    cfg = {k: v for k, v in value.items() if k != "format"}
                    configs[name] = check_config(cfg, f"checkpoint: module '{name}'")
    todo = []
    for name, cfg in configs.items():
        m = _submodule(model, name)
        _check_target(name, m, cfg, where)
        if not isinstance(m, _QuantizedBase):
            todo.append(name)
    if "" in todo:
        raise ValueError("prepare_for_load: the model itself is the quantized module; wrap it in a container")
    for name in todo:
        _swap(model, name, _placeholder(model.get_submodule(name), configs[name]))
    return todo
