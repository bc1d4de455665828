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

The record is an attribute (``module.obc_format``), not a buffer: ``state_dict`` and checkpoints stay plain
(a model loaded from a checkpoint carries no records; ``load_quantized`` records the formats of the file
it loads). It follows ``copy.deepcopy``. It is replaced when the module is compressed or fine-tuned again,
and dropped when it no longer applies: a fine-tuning session that is aborted, a model snapshot restored
(:class:`~obc_lightning.pipeline.ModelSnapshot` puts back the records it saw), a module swapped for its
packed form. Tied weights (one Parameter under several modules) give every such module the same record.

This module knows only torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from obc_lightning.formats.schemes import StorageScheme

ATTRIBUTE = "obc_format"


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
