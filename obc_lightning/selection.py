"""Which modules are compressed: names, parents and fnmatch patterns; per-module values by pattern.

A pattern selects a module by its exact name, as a parent ("encoder" selects ``encoder.*``), or as an
fnmatch pattern ("blocks.*.fc1"). A pattern that matches nothing is an error, never a silent no-op: a
typo would otherwise compress everything, or nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from obc_lightning.calibration import SUPPORTED_MODULES
from obc_lightning.formats.bits import FP32_BYTES

REASON_ATTENTION_PROJECTION = (
    "q, k, v input projections of nn.MultiheadAttention '{owner}': a bare Parameter it multiplies "
    "functionally, not a Linear module (only Linear / Conv1d / Conv2d weights are quantized), so it "
    "stays in full precision; obc_lightning.split_attention_projections(model), or "
    "OBCQuantize(split_attention=True), makes them Linears"
)


def matches(name: str, pattern: str) -> bool:
    """Exact name, fnmatch pattern ("blocks.*.fc1"), or a parent module ("encoder" selects encoder.*)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def as_patterns(arg, what: str, who: str = "compress_model") -> list[str]:
    if arg is None:
        return []
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, Sequence) and all(isinstance(p, str) for p in arg):
        return list(arg)
    raise ValueError(f"{who}: {what} must be a module name, an fnmatch pattern or a list of them, got {arg!r}")


def attention_projections(model: nn.Module) -> dict[str, tuple[str, int]]:
    """{name: (reason, fp32 bytes)} of the input-projection weights of every ``nn.MultiheadAttention``.

    ``in_proj_weight`` (3·embed_dim x embed_dim), or ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight`` when kdim / vdim differ from embed_dim; the bytes include the matching rows of
    ``in_proj_bias``. They are weights of layers, but no module holds them: reported, never silent.
    """
    out: dict[str, tuple[str, int]] = {}
    for owner, mha in model.named_modules():
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        prefix = f"{owner}." if owner else ""
        bias = mha.in_proj_bias
        reason = REASON_ATTENTION_PROJECTION.format(owner=owner or "<model>")
        if mha.in_proj_weight is not None:
            numel = mha.in_proj_weight.numel() + (bias.numel() if bias is not None else 0)
            out[prefix + "in_proj_weight"] = (reason, numel * FP32_BYTES)
            continue
        for role in ("q", "k", "v"):
            w = getattr(mha, f"{role}_proj_weight")
            numel = w.numel() + (w.shape[0] if bias is not None else 0)
            out[f"{prefix}{role}_proj_weight"] = (reason, numel * FP32_BYTES)
    return out


def _selected(name: str, inc: list[str], exc: list[str]) -> bool:
    return (not inc or any(matches(name, p) for p in inc)) and not any(matches(name, p) for p in exc)


def select_modules(
    model: nn.Module, include=None, exclude=None, *, who: str = "compress_model"
) -> dict[str, nn.Module]:
    """The target modules of ``model``: every Linear / Conv1d / Conv2d, filtered by include / exclude.

    A pattern that selects no supported module is an error (a typo would otherwise quantize
    everything, or nothing, silently); a pattern may also name an attention projection weight
    (:func:`attention_projections`), e.g. to exclude it from the report of what stays unquantized.
    """
    inc, exc = as_patterns(include, "include", who), as_patterns(exclude, "exclude", who)
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_MODULES)}
    if not candidates:
        raise ValueError(f"{who}: the model has no nn.Linear, nn.Conv1d or nn.Conv2d module")
    names = [*candidates, *attention_projections(model)]
    for kind, pats in (("include", inc), ("exclude", exc)):
        for p in pats:
            if not any(matches(n, p) for n in names):
                shown = ", ".join(list(candidates)[:20]) + (", ..." if len(candidates) > 20 else "")
                raise ValueError(
                    f"{who}: {kind} pattern {p!r} matches no Linear/Conv1d/Conv2d module; available: {shown}"
                )
    targets = {n: m for n, m in candidates.items() if _selected(n, inc, exc)}
    if not targets:
        raise ValueError(f"{who}: include={include!r} / exclude={exclude!r} leave no module to quantize")
    return targets


def unquantized_projections(model: nn.Module, include=None, exclude=None) -> dict[str, tuple[str, int]]:
    """:func:`attention_projections` that ``include`` / ``exclude`` select (a pattern naming the
    attention or a parent selects them too): the weights of layers the report names as full precision."""
    inc, exc = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    return {n: v for n, v in attention_projections(model).items() if _selected(n, inc, exc)}


NORMS = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t
)


def full_precision_reason(module: nn.Module) -> str:
    """Why the parameters of a module that is not a target stay in full precision, by its type."""
    kind = type(module).__name__
    if isinstance(module, SUPPORTED_MODULES):
        return f"a {kind} that include / exclude leave out of the targets"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"an embedding table ({kind}: looked up, not multiplied with the input); only Linear / Conv1d / " \
               "Conv2d weights are quantized"
    if isinstance(module, nn.RNNBase):
        return f"a recurrent layer ({kind}: its weights are used inside the fused recurrent kernel, not by Linear " \
               "modules); only Linear / Conv1d / Conv2d weights are quantized"
    if isinstance(module, NORMS):
        return f"normalization scale and shift ({kind}, one per channel): kept in full precision"
    return f"parameters held by a {kind} itself (not a Linear / Conv1d / Conv2d module): not quantized"


def full_precision_modules(
    model: nn.Module, targets: Mapping[str, nn.Module], projections: Iterable[str] = ()
) -> dict[str, tuple[str, str, int]]:
    """``{name: (module type, reason, fp32 bytes)}`` of every module that holds parameters of its own (not through a
    submodule) that are neither a target's (weight, bias, parametrizations) nor an attention projection
    (``projections``, reported with the skipped targets): embeddings, recurrent layers, norms, excluded
    layers, bare ``nn.Parameter`` attributes (under the name of the module that holds them, ``"<model>"``
    for the model itself). A Parameter shared by several modules is counted once, under the first; one
    shared with a target is the target's. Bytes at fp32, as the rest of the report counts them."""
    accounted = {id(p) for m in targets.values() for p in m.parameters()}
    for name in projections:
        owner, _, attr = name.rpartition(".")
        mha = model.get_submodule(owner) if owner else model
        accounted |= {id(p) for p in (getattr(mha, attr, None), mha.in_proj_bias) if p is not None}
    out: dict[str, tuple[str, str, int]] = {}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in accounted]
        accounted |= {id(p) for p in own}
        if own:
            size = sum(p.numel() for p in own) * FP32_BYTES
            out[name or "<model>"] = (type(m).__name__, full_precision_reason(m), size)
    return out


def parameter_bytes(model: nn.Module) -> int:
    """fp32 bytes of all the model's parameters, each shared one once."""
    return sum(p.numel() for p in model.parameters()) * FP32_BYTES


def per_module(value, name: str, what: str, who: str = "compress_model"):
    """``value`` itself, or for a mapping {name or fnmatch pattern: value} the first entry matching ``name``."""
    if not isinstance(value, Mapping):
        return value
    for pattern, v in value.items():
        if matches(name, pattern):
            return v
    raise ValueError(
        f"{who}: {what}={dict(value)!r} gives no value for module '{name}'; add a '*' entry as the default"
    )


def check_patterns_match(value, what: str, targets: Mapping[str, nn.Module], who: str = "compress_model") -> None:
    """Every key of a per-module mapping matches at least one target."""
    if not isinstance(value, Mapping):
        return
    for pattern in value:
        if not any(matches(n, pattern) for n in targets):
            raise ValueError(
                f"{who}: {what} pattern {pattern!r} matches no target module; targets: " + ", ".join(list(targets)[:20])
            )
