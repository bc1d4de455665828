"""The compressed model carries its quantization state: each compressed module holds the format its
weight is in, as a plain attribute.

``compress_model`` and :meth:`~obc_lightning.finetune.FinetuneSession.finish` record on every module they
compress an instance of its storage scheme (:mod:`obc_lightning.formats.schemes`): the grid's scales and
zero points (per conv group, stacked by rows), the PQ codebook and block size (TTQ: the 3-entry
codebook), DiffQ's mixed grid (row ranges and group widths), or the sparsity pattern (N:M, or a
bitmask of the non-zero weights). A record holds no codes: export recomputes them from the weight
(exactly: the weight is on its grid, each PQ sub-vector equals a codebook row), and refuses, naming the
module, a weight that is not in its recorded format any more (trained or changed since). So after
``compress_model(model, batches)``, ``save_quantized(model, path)`` and ``pack_model(model)`` need no report
and no flag.

The record is an attribute (``module.obc_format``), not a buffer: ``state_dict`` stays plain, so a
checkpoint loads into the module as the user defined it. A checkpoint carries the records beside the
state dict instead: :func:`formats_state` turns them into plain data (tensors, numbers, strings: what
``torch.load(weights_only=True)`` reads) that the callback writes under the checkpoint's
:data:`CHECKPOINT_KEY`, and :func:`load_formats_state` puts them back on a model restored from it
(``load_quantized`` records the formats of the file it loads). It follows ``copy.deepcopy``. It is
replaced when the module is compressed or fine-tuned again, and dropped when it no longer applies: a
fine-tuning session that is aborted, a model snapshot restored
(:class:`~obc_lightning.pipeline.ModelSnapshot` puts back the records it saw), a module swapped for its
packed form. Tied weights (one Parameter under several modules) give every such module the same record.

This module knows only torch (and the grids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass

import torch
from torch import Tensor, nn

from obc_lightning.formats.base import REGISTRY
from obc_lightning.formats.bits import STORAGE_DTYPES, dtype_name
from obc_lightning.formats.schemes import StorageScheme
from obc_lightning.grids import MixedGrid

ATTRIBUTE = "obc_format"
CHECKPOINT_KEY = "obc_lightning_formats"  # a checkpoint's entry holding formats_state(model)


def format_of(module: nn.Module) -> StorageScheme | None:
    """The format recorded on ``module`` (None if there is none)."""
    fmt = module.__dict__.get(ATTRIBUTE)
    return fmt if isinstance(fmt, StorageScheme) else None


def set_format(module: nn.Module, fmt: StorageScheme) -> None:
    """Record ``fmt`` (its tensors on the CPU) as the format of ``module``'s weight."""
    if not isinstance(fmt, StorageScheme):
        raise TypeError(f"set_format: expected a storage scheme instance, got {type(fmt).__name__}")
    module.__dict__[ATTRIBUTE] = fmt.to("cpu")


def drop_format(module: nn.Module) -> None:
    """Forget the format recorded on ``module`` (its weight is not in it any more)."""
    module.__dict__.pop(ATTRIBUTE, None)


def model_formats(model: nn.Module) -> dict[str, StorageScheme]:
    """{module name: recorded format} of every module of ``model`` that carries one, under every name of a
    module registered more than once."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        fmt = format_of(m)
        if fmt is not None:
            out[name] = fmt
    return out


def restore_formats(model: nn.Module, formats: Mapping[str, StorageScheme]) -> None:
    """Exactly the records of ``formats`` (a :func:`model_formats`), every other one dropped."""
    for name, m in model.named_modules(remove_duplicate=False):
        if name in formats:
            m.__dict__[ATTRIBUTE] = formats[name]
        else:
            drop_format(m)


# ------------------------------------------------------------------------------- records as plain data
def _classes() -> dict[str, type]:
    """The classes a stored record may name (nothing else is instantiated from a checkpoint)."""
    return {cls.__name__: cls for cls in (*REGISTRY.values(), MixedGrid)}


def _to_plain(value):
    if is_dataclass(value) and not isinstance(value, type):
        return {"class": type(value).__name__, "fields": {f.name: _to_plain(getattr(value, f.name))
                                                           for f in fields(value)}}
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, tuple):
        return {"tuple": [_to_plain(v) for v in value]}
    return value


def _from_plain(value, where: str):
    if not isinstance(value, dict):
        return value
    if "dtype" in value:
        return STORAGE_DTYPES[value["dtype"]]
    if "tuple" in value:
        return tuple(_from_plain(v, where) for v in value["tuple"])
    cls = _classes().get(value.get("class"))
    if cls is None:
        raise ValueError(f"{where}: unknown format class {value.get('class')!r}")
    return cls(**{k: _from_plain(v, where) for k, v in value["fields"].items()})


def formats_state(model: nn.Module) -> dict[str, dict]:
    """{module name: its record as plain data} of every module of ``model`` that carries one."""
    return {name: _to_plain(fmt) for name, fmt in model_formats(model).items()}


def load_formats_state(model: nn.Module, state: Mapping[str, Mapping], who: str = "load_formats_state") -> list[str]:
    """Record on ``model``'s modules the formats of a :func:`formats_state` (every other record dropped);
    returns the names. A name that is not a module of ``model`` is a ``ValueError`` naming ``who``, and
    nothing is recorded."""
    modules = dict(model.named_modules(remove_duplicate=False))
    missing = [name for name in state if name not in modules]
    if missing:
        raise ValueError(f"{who}: the checkpoint's formats name modules that this model does not have: {missing}")
    formats = {name: _from_plain(value, f"{who}: module '{name}'") for name, value in state.items()}
    restore_formats(model, {name: fmt.to("cpu") for name, fmt in formats.items()})
    return list(formats)
