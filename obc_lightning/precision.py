"""Full float32 matmul precision for the solvers and the Hessian products, whatever the global setting.

Lightning suggests ``torch.set_float32_matmul_precision("high")`` on tensor-core GPUs; it makes every
float32 matmul a TF32 one (10-bit mantissa): in the solvers' H^-1 flushes and corrections that is ~3
digits lost per product, more rows breaking down and worse codes, silently. :func:`full_fp32_matmul`
sets "highest" (IEEE float32: cuBLAS without TF32, oneDNN without bf16) for its block and restores the
caller's setting after, through the same API family the caller's setting is readable with (torch 2.9+
has per-backend ``fp32_precision`` flags, and some versions refuse to read the legacy flag once the new
one was written). Convolutions (cuDNN's own TF32 flag) are not involved: the solvers and the Hessian
products are matmuls only.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


def _new_api_flags() -> list[tuple[object, str]]:
    """The per-backend float32 matmul precision flags of torch 2.9+ (empty before)."""
    flags = []
    for backend in (getattr(torch.backends, "cuda", None), getattr(torch.backends, "mkldnn", None)):
        matmul = getattr(backend, "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            flags.append((matmul, "fp32_precision"))
    return flags


@contextmanager
def full_fp32_matmul():
    """Float32 matmuls in IEEE precision inside the block; the caller's setting restored after."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller set the new per-backend flags; this torch refuses the legacy read
        legacy = None
    if legacy is not None:
        if legacy == "highest":
            yield
            return
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy)
        return
    flags = _new_api_flags()
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, "ieee")
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


def fp32_matmul(fn):
    """Decorator: ``fn`` runs inside :func:`full_fp32_matmul`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_fp32_matmul():
            return fn(*args, **kwargs)

    return wrapper
