"""Reading: a file -> verified tensors -> the model (dense weights, or packed modules).

Every checksum, then every description and every packed tensor, is checked before anything is read into
the model; the dense modules a file quantizes then carry the file's formats
(:mod:`obc_lightning.formats.record`), so that a loaded model saves again as it was.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from obc_lightning.export.file import (
    CHECKSUM_KEY,
    FILE_FORMAT,
    FORMAT_VERSION,
    METADATA_DIGEST,
    metadata_digest,
    tensor_digest,
)
from obc_lightning.formats.bits import dtype_name
from obc_lightning.formats.record import CHECKPOINT_KEY, load_formats_state, set_format
from obc_lightning.formats.schemes import (
    buffer_names,
    buffer_specs,
    check_config,
    check_packed_tensors,
    dequantize_packed,
    format_from_packed,
    kind_of,
    payload_nbytes,
)
from obc_lightning.packed import PACKED_CLASSES, PACKED_FORMAT, QuantizedModule, swap_module


class UnverifiedFileWarning(UserWarning):
    """A file written before checksums (format_version "1") was loaded: its integrity cannot be verified."""


# what a path that is not a regular file is, for the message
_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_readable_file(path: str, who: str) -> None:
    """Refuse, before anything reads it, what :func:`read_file` must not open: a path that is not a regular
    file (``ValueError``; a FIFO would block the reader forever, a device never end) or one this process may
    not read (``PermissionError`` saying so). A missing file raises ``FileNotFoundError``.

    The path is opened non-blocking (a FIFO opens at once) and the opened file's type checked, so the answer is
    about the file that was opened, not one a link pointed at a moment before.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise PermissionError(
            errno.EACCES,
            f"{who}: {path} exists but cannot be read by this process (permission denied: check the file's "
            "mode and owner, and that its folders can be entered)",
            path,
        ) from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
        raise ValueError(f"{who}: {path} is {what}, not a regular file: only a file written by save_quantized loads")


def read_file(path: str, who: str = "load_quantized") -> tuple[dict[str, dict], dict[str, Tensor]]:
    """(module configs, all tensors) of a file, verified and checked, or a ValueError saying what is wrong
    with it (``PermissionError`` / ``FileNotFoundError`` for a file that cannot be read / does not exist,
    :func:`check_readable_file`)."""
    check_readable_file(path, who)
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


def read_metadata(path) -> dict[str, dict]:
    """The per-module descriptions of a file (validated), without touching any model."""
    return read_file(os.fspath(path), "read_metadata")[0]


def theoretical_bytes(path) -> int:
    """The payload a file should hold, no header: the packed tensors of every module (its scheme's size
    formula) + the other tensors."""
    configs, tensors = read_file(os.fspath(path), "theoretical_bytes")
    total = 0
    quantized = set()
    for name, cfg in configs.items():
        total += payload_nbytes(cfg)
        quantized.update(f"{name}.{k}" if name else k for k in buffer_names(cfg))
    total += sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in quantized)
    return total


# ------------------------------------------------------------------ into a model
def _check_target(name: str, m: nn.Module | None, cfg: dict, where: str) -> None:
    if m is None:
        raise ValueError(f"{where}: the file quantizes module '{name}', which the model does not have")
    if isinstance(m, QuantizedModule):
        if not m.same_layout(cfg):
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


def load_quantized(path, model: nn.Module, *, packed: bool = False) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (same architecture), in place.

    Every quantized weight becomes ``float(scale) * (code - zero)`` (scalar) or ``codebook[codes]`` (PQ),
    every sparse one its stored values (0 elsewhere), in the weight's dtype (see :mod:`obc_lightning.export`),
    every other tensor its saved value; each such module then carries the file's format, so the model
    saves again to the same file. With ``packed=True`` the quantized and sparse Linear / Conv modules are
    replaced by :class:`~obc_lightning.packed.QuantizedLinear` / ``QuantizedConv1d`` /
    ``QuantizedConv2d`` holding the packed tensors (the memory saving at inference). Modules already
    packed in ``model`` receive the packed tensors either way.

    Raises ``ValueError`` naming the problem (a path that is not a regular file: a FIFO, a directory, a
    device; a truncated or corrupted file; a tensor or the metadata that does not match its checksum; bad
    metadata; tensor of the wrong size; scales not finite and > 0; module missing or of another shape;
    tensors missing or unexpected) before anything in
    ``model`` is written. A format_version "1" file (no checksums) loads with an
    :class:`UnverifiedFileWarning`. A file this process may not read raises ``PermissionError`` saying so,
    a missing one ``FileNotFoundError``.
    """
    path = os.fspath(path)
    configs, tensors = read_file(path)
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
            if isinstance(m, QuantizedModule):
                for k, t in packed_t.items():
                    getattr(m, k).copy_(t)
                m.clear_caches()
            elif packed:
                dev = m.weight.device
                cfg = dict(cfg, dtype=dtype_name(m.weight.dtype))
                moved = {k: t.to(dev) for k, t in packed_t.items()}
                swap_module(model, name, PACKED_CLASSES[cfg["kind"]].from_dense(m, cfg, moved))
            else:
                m.weight.copy_(dequantize_packed(cfg, packed_t, m.weight.dtype))
                set_format(m, format_from_packed(cfg, packed_t, m.weight.dtype))
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    """Replace every packed module by a dense Linear / Conv with the dequantized weight, in place; each
    carries its packed module's format."""
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    if any(n == "" for n, _ in packed):
        raise ValueError("unpack_model: the model itself is a packed module; call its to_dense()")
    for name, m in packed:
        dense = m.to_dense()
        set_format(dense, format_from_packed(m.config, m.packed_tensors(), dense.weight.dtype))
        swap_module(model, name, dense)
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
        configs = read_file(os.fspath(src), "prepare_for_load")[0]
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
        if not isinstance(m, QuantizedModule):
            todo.append(name)
    if "" in todo:
        raise ValueError("prepare_for_load: the model itself is the quantized module; wrap it in a container")
    for name in todo:
        swap_module(model, name, _placeholder(model.get_submodule(name), configs[name]))
    return todo


def load_checkpoint_formats(model: nn.Module, checkpoint) -> list[str]:
    """Record on ``model``'s modules the quantization formats a checkpoint written after compression
    carries, so that :func:`~obc_lightning.export.save_quantized` exports the restored model exactly as it
    exported the model in memory. Returns the names of the modules given a format (none: the checkpoint
    was written before compression, or by a Trainer without the callback).

    ``checkpoint``: a Lightning checkpoint's path or its loaded dict. The callback writes the formats into
    every checkpoint saved after compression (the rewritten ``last``, ``trainer.save_checkpoint``) and
    restores them itself on ``fit`` / ``validate`` / ``test(ckpt_path=...)``; after
    ``Module.load_from_checkpoint(path)`` call ``load_checkpoint_formats(model, path)``, or once in the
    module's ``on_load_checkpoint(self, checkpoint)`` hook. The weights themselves are the state dict's.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"load_checkpoint_formats: expected a checkpoint's path or its dict, got {type(checkpoint).__name__}"
        )
    state = checkpoint.get(CHECKPOINT_KEY)
    if not state:
        return []
    return load_formats_state(model, state, who="load_checkpoint_formats")
