"""Writing: a compressed model -> packed tensors per module -> a checksummed safetensors file (or packed
modules in memory).

Where each module's tensors come from (:func:`packed_entries`): a packed module's own buffers; else, with
no report, the format the module carries (:mod:`obc_lightning.formats.record`), its codes recomputed from
its weight; else the solver results passed in. Every module's tensors are checked as the reader will
check them before the first byte is written.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor, nn

from obc_lightning.export.file import (
    CHECKSUM_KEY,
    FILE_FORMAT,
    FORMAT_VERSION,
    METADATA_DIGEST,
    canonical,
    metadata_digest,
    raw_bytes,
    st_dtype,
    tensor_digest,
)
from obc_lightning.formats.bits import STORAGE_DTYPES, dtype_name
from obc_lightning.formats.record import format_of
from obc_lightning.formats.schemes import (
    MixedScheme,
    PQScheme,
    ScalarScheme,
    SparseMaskScheme,
    check_config,
    check_packed_tensors,
    dequantize_packed,
    format_from_packed,
    kind_of,
    scheme_of,
)
from obc_lightning.grids import MixedResult
from obc_lightning.packed import ALL_BUFFERS, PACKED_CLASSES, QuantizedModule, swap_module
from obc_lightning.selection import matches
from obc_lightning.solvers.pq import PQResult
from obc_lightning.version import __version__

try:  # advisory locks on the temporary file of a save in progress (POSIX)
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

NOTHING_TO_EXPORT = (
    "nothing to export: no module carries a quantization format (compress the model with compress_model, or "
    "load a file with load_quantized; a model restored with load_from_checkpoint gets the formats of a "
    "checkpoint written after compression from load_checkpoint_formats(model, ckpt_path)), none is packed "
    "(pack_model), and no report of compress_model(..., keep_results=True) or pruned float modules "
    "(sparse=...) were given"
)


# ------------------------------------------------------------------ where each module's tensors come from
def _results_map(report_or_results) -> dict[str, list]:
    """name -> [QuantResult per conv group], [PQResult], [MixedResult], or [] (pruned only: a float weight)
    from a CompressionReport or a mapping."""
    if hasattr(report_or_results, "modules") and hasattr(report_or_results, "results"):
        report = report_or_results
        pruned_only = getattr(report, "bits", 0) is None and getattr(report, "method", "") == "scalar"
        if pruned_only:  # no codes: the pruned float weights are the result, with or without keep_results
            return {name: [] for name in report.quantized}
        if report.results is None:
            raise ValueError(
                "the report holds no codes (compress_model(..., keep_results=True) keeps them); leave the report "
                "out instead: the compressed model carries its formats (save_quantized(model, path))"
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
    if name not in STORAGE_DTYPES:
        raise ValueError(f"{arg} must be one of torch.{', torch.'.join(STORAGE_DTYPES)}, got {dtype!r}")
    return name


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


def _kind(name: str, m: nn.Module) -> str:
    kind = kind_of(m)
    if kind is None:
        raise ValueError(f"module '{name}' is a {type(m).__name__}; only Linear / Conv1d / Conv2d are exported")
    return kind


def _from_results(name: str, m: nn.Module, results: list, scale_dtype: str) -> tuple[dict, dict[str, Tensor]]:
    """(config, buffers) of module ``m`` from its solver results: QuantResults (one per conv group), one
    PQResult (a ternary module's too) or one MixedResult, checked against its weight."""
    kind = _kind(name, m)
    if any(isinstance(r, PQResult) for r in results):
        scheme = PQScheme
    elif any(isinstance(r, MixedResult) for r in results):
        scheme = MixedScheme
    else:
        scheme = ScalarScheme
    weight = m.weight.detach().cpu()
    return scheme.from_results(f"module '{name}'", kind, weight, results, getattr(m, "groups", 1), scale_dtype)


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


def _to_nm(name: str, config: dict, tensors: Mapping[str, Tensor], n_m: tuple[int, int]):
    """(config, tensors) of a scalar or sparse module stored N:M-sparse (unchanged if it already is, at this
    N:M, or its scheme has no N:M layout): the same weight, re-encoded from its stored values; ValueError
    naming the module and its worst group if the weight violates it."""
    if not scheme_of(config).takes_n_m or config.get("n_m") == list(n_m):
        return config, tensors
    exact = STORAGE_DTYPES[config.get("value_dtype") or config["scale_dtype"]]
    compute = torch.promote_types(exact, torch.float32) if "value_dtype" not in config else exact
    weight = dequantize_packed(config, tensors, compute)  # exactly the stored values
    fmt = format_from_packed(config, tensors, compute).with_n_m(n_m)
    key = "value_dtype" if "value_dtype" in config else "scale_dtype"
    new_cfg, new = fmt.encode(f"module '{name}'", config["kind"], weight, **{key: config[key]})
    return dict(new_cfg, dtype=config["dtype"]), new


def packed_entries(
    model: nn.Module, report_or_results=None, scale_dtype=torch.float16, n_m=None, sparse=None,
    value_dtype=torch.float16,
) -> dict[str, tuple]:
    """name -> (config, {buffer name: tensor}, is_packed_module) for every packed module, every module
    carrying a format (no ``report_or_results``) or named by the results, and the sparse ones; with ``n_m``
    every scalar and sparse module in N:M storage (all checked here, before anything is written)."""
    scale_dtype = _check_storage_dtype("scale_dtype", scale_dtype)
    value_dtype = _check_storage_dtype("value_dtype", value_dtype)
    n_m = _check_n_m("n_m", n_m)
    entries: dict[str, tuple] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            entries[name] = (m.config, m.packed_tensors(), True)
    pruned = []  # float modules: the sparse scheme
    if report_or_results is None:  # the formats the modules carry, under every name of a module
        for name, m in model.named_modules(remove_duplicate=False):
            fmt = format_of(m)
            if fmt is None or name in entries or isinstance(m, QuantizedModule):
                continue
            if n_m is not None:
                fmt = fmt.with_n_m(n_m)
            config, tensors = fmt.encode(f"module '{name}'", _kind(name, m), m.weight, scale_dtype=scale_dtype,
                                         value_dtype=value_dtype)
            entries[name] = (config, tensors, False)
    else:
        for name, res in _results_map(report_or_results).items():
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the results name module '{name}', which the model does not have") from None
            if name in entries:
                continue  # already packed: its buffers are the codes
            if res:
                entries[name] = (*_from_results(name, m, res, scale_dtype), False)
            else:
                pruned.append(name)
    pruned += [n for n in _sparse_names(model, sparse, set(entries)) if n not in pruned]
    for name in pruned:
        fmt = SparseMaskScheme() if n_m is None else SparseMaskScheme().with_n_m(n_m)
        m = model.get_submodule(name)
        entries[name] = (*fmt.encode(f"module '{name}'", _kind(name, m), m.weight, value_dtype=value_dtype), False)
    if n_m is not None:
        for name, (config, tensors, is_packed) in list(entries.items()):
            entries[name] = (*_to_nm(name, config, tensors, n_m), is_packed)
    return entries


# ------------------------------------------------------------------ the file
def write_file(path: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file with a ``sha256`` metadata entry (checksums of every tensor and of the other
    metadata), atomically (:func:`atomic_write`).

    Deterministic bytes: the header is canonical JSON (sorted keys, no spaces) padded with spaces to a
    multiple of 8 bytes, as safetensors pads it; the tensors follow in decreasing element size, then by
    name (each one aligned to its element size, as safetensors orders them); nothing depends on time
    or on the process. The same tensors and metadata always give the same file.
    """
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    sums = {key: tensor_digest(key, t) for key, t in tensors.items()}
    sums[METADATA_DIGEST] = metadata_digest(meta)
    meta[CHECKSUM_KEY] = canonical(sums).decode()
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": st_dtype(key, t), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = canonical(header)
    head += b" " * (-len(head) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _write_safetensors(f, head, [tensors[key] for key in order])

    atomic_write(path, write)


def _write_safetensors(f, header: bytes, tensors: list[Tensor]) -> None:
    """The file's bytes: the header's length (u64, little-endian), the header, the tensors' bytes."""
    f.write(len(header).to_bytes(8, "little"))
    f.write(header)
    for t in tensors:
        f.write(raw_bytes(t).data)


# a save writes ".<file name>.<random>" + PARTIAL_SUFFIX next to its file, then renames it over the file
PARTIAL_SUFFIX = ".obc-partial"


def abandoned_partial_files(directory: str, *, remove: bool) -> list[str]:
    """The temporary files of saves into ``directory`` that were killed before their rename (removed when
    ``remove``): the files named as :func:`atomic_write` names them that no save holds.

    A save holds an exclusive ``flock`` on its temporary file from its creation to its rename; the kernel
    releases the lock of a killed process, so a file of ours that can be locked belongs to no living save.
    Without ``fcntl`` (Windows) nothing can tell a dead save from a running one: the files are listed, never
    removed.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
            continue
        p = os.path.join(directory, name)
        if fcntl is None:
            found.append(p)
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
        except OSError:
            continue  # renamed or removed meanwhile, a link, or not ours to read
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a save in progress holds it
            if os.stat(p, follow_symlinks=False).st_ino != st.st_ino:
                continue  # the name now belongs to another file
            if remove:
                os.unlink(p)  # while locked: a save that opens it meanwhile sees st_nlink == 0 and starts over
            found.append(p)
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


def _new_partial_file(directory: str, base: str) -> tuple[int, str]:
    """(descriptor, path) of a new temporary file for ``base``, locked (:func:`abandoned_partial_files`)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=PARTIAL_SUFFIX)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another save's cleanup is looking at it
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # that cleanup took it for abandoned in the moment before the lock: take another


def atomic_write(path: str, write: Callable[[str], None], who: str = "save_quantized") -> None:
    """``write(tmp)`` into a temporary file next to ``path``, fsync it, then rename it over ``path``.

    The new file gets the mode of the file it replaces (a 0600 file stays 0600), else the usual one
    (0666 & ~umask). Temporary files that killed saves left in the folder are removed first
    (:func:`abandoned_partial_files`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path}: directory {directory} does not exist")
    left = abandoned_partial_files(directory, remove=fcntl is not None)
    if left and fcntl is None:
        warnings.warn(
            f"{who}: {directory} holds temporary files of saves that were interrupted or are still running "
            f"(this platform cannot tell which): {left}; delete them when no save is running",
            stacklevel=3,
        )
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except OSError:
        mode = None
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # mkstemp creates 0600; a new file gets the usual permissions
    fd, tmp = _new_partial_file(directory, os.path.basename(path))
    if fcntl is None:
        os.close(fd)  # Windows renames no open file
        fd = -1
    try:
        write(tmp)
        sync = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(sync)
        finally:
            os.close(sync)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock
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
        model: the model after :func:`~obc_lightning.compress.compress_model` or fine-tuning (every module
            they compressed carries its format: :mod:`obc_lightning.formats.record`), after
            :func:`load_quantized`, or after :func:`pack_model` (packed modules are written as they are).
        report_or_results: leave it out (``None``): every module is written in the format it carries, its
            codes recomputed from its weight (a weight no longer in its format is refused, naming the
            module). Or, as before modules carried their formats: the
            :class:`~obc_lightning.reporting.CompressionReport` of ``compress_model(..., keep_results=True)``,
            or a mapping module name -> QuantResult list (one per conv group), ``[PQResult]`` (product
            quantization over ``weight.reshape(out, -1)``; a ternary module's
            :meth:`~obc_lightning.finetune.TernaryQuantizer.result`) or ``[MixedResult]`` (DiffQ,
            :meth:`~obc_lightning.finetune.NoiseQuantizer.result`): only those modules (and packed ones) are
            written packed. The report of a prune-only run (``bits=None``; no ``keep_results`` needed), or an
            empty result list, names float modules: they are written in the "sparse" scheme.
        scale_dtype: storage of the scales (and of the PQ codebooks, the DiffQ ranges) of dense modules:
            float16 (default), bfloat16, float32 (bit-exact round trip of scales), float64. A PQ codebook
            and DiffQ ranges must be exactly representable in it. Packed modules keep theirs.
        n_m: ``(N, M)``: store every scalar-quantized module N:M-sparse (the codes of N entries per group
            of M inputs and their positions, see :mod:`obc_lightning.formats.nm`: conv groups run along the
            input channels at each kernel position, as ``compress_model(..., n_m=...)`` prunes them), and
            every sparse module as N values per group and their positions. Every such module must have at
            most N non-zero weights per group. ``None`` (default): each module as its format says (N:M for a
            module ``compress_model`` pruned N:M; results: dense codes), sparse modules selected by
            ``sparse`` as a bitmask plus the non-zero values (packed modules keep their storage).
            Product-quantized and mixed-precision modules are not affected.
        sparse: more float modules to write in the "sparse" scheme (pruned by other means): ``True``: every
            Linear / Conv1d / Conv2d that is neither quantized nor packed; or module names / fnmatch
            patterns among those (a parent selects its children), each matching at least one. Any weight
            is valid (a dense one only gains nothing).
        value_dtype: storage of the kept values of sparse modules: float16 (default; the loaded weights
            are the weights rounded to float16), bfloat16, float32 (bit-exact round trip of an fp32, fp16
            or bf16 model), float64. Packed modules keep theirs.

    The file holds a SHA-256 of every tensor and of the metadata (:mod:`obc_lightning.export`); the same
    model and arguments always give the same bytes.

    Returns the size of the file in bytes. Raises ``ValueError`` (and writes nothing) if a result does
    not fit its module, a packed tensor would be refused on load (e.g. a scale not finite and > 0),
    a module's weight is not in its format (not on the grid, not ``codebook[codes]``), a
    sparse weight is not finite in ``value_dtype``, or, with ``n_m``, a module's weight is not N:M sparse
    (naming the module and its worst group).
    """
    entries = packed_entries(model, report_or_results, scale_dtype, n_m, sparse, value_dtype)
    if not entries:
        raise ValueError(f"save_quantized: {NOTHING_TO_EXPORT}")
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

    metadata = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "modules": json.dumps({name: e[0] for name, e in entries.items()}, sort_keys=True),
    }
    path = os.fspath(path)
    write_file(path, tensors, metadata)
    return os.path.getsize(path)


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
    ``model``. The arguments are those of :func:`save_quantized` (no report: every module that carries a
    format).

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
    entries = packed_entries(model, report_or_results, scale_dtype, n_m, sparse, value_dtype)
    new = {}
    for name, (config, packed, is_packed) in entries.items():
        m = model.get_submodule(name)
        if is_packed and m.same_layout(config):
            continue
        dev = next(iter(m.packed_tensors().values())).device if is_packed else m.weight.device
        new[name] = PACKED_CLASSES[config["kind"]].from_dense(m, config, {k: t.to(dev) for k, t in packed.items()})
    if "" in new:
        raise ValueError("pack_model: the model itself is the quantized module; wrap it in a container")
    for name, q in new.items():
        swap_module(model, name, q)
    return model
