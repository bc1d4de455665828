"""Fused column steps of the solvers (Triton), and the switch between them and the plain torch loops.

The greedy ExactOBC engine, GPTQ's column loop and the coordinate-descent polish take one Python-level
step per weight column, and each step is a dozen or more ATen ops: on a GPU each op is a kernel launch
(microseconds of overhead however small the work). :mod:`obc_lightning.kernels.fused` runs each
*block* of steps as one persistent Triton kernel (one program per row, or per tile of rows, looping
over the block's columns) and keeps the per-block products (ExactOBC's flush H_f -= U U^T, GPTQ's and
the polish's deferred updates) as one batched torch matmul per block.

``OBC_LIGHTNING_KERNELS`` selects the path, read at every solver call:

- ``torch``: the plain torch loops everywhere (the oracle);
- ``triton``: the fused kernels; on CPU tensors they run in Triton's interpreter (``TRITON_INTERPRET``
  semantics: slow, for tests), on CUDA tensors compiled;
- unset (or ``auto``): ``triton`` for CUDA tensors when ``triton`` imports, ``torch`` otherwise.

``triton`` stays an optional dependency: nothing here imports it until a fused kernel is asked for.
"""

from __future__ import annotations

import os

import torch

ENV = "OBC_LIGHTNING_KERNELS"
CHOICES = ("auto", "triton", "torch")

_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """Whether ``import triton`` works (cached)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception:  # ImportError, or a broken install (missing compiler libraries)
            _TRITON_OK = False
        else:
            _TRITON_OK = True
    return _TRITON_OK


def kernel_choice() -> str:
    """The value of ``OBC_LIGHTNING_KERNELS`` (``auto`` when unset), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"environment variable {ENV}={os.environ.get(ENV)!r}: must be one of {', '.join(CHOICES)}")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """Whether the solvers run the fused Triton kernels on tensors like ``t``."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "auto":
        return t.device.type == "cuda" and triton_available()
    if not triton_available():
        raise ValueError(f"{ENV}=triton, but the triton package does not import; install triton or set {ENV}=torch")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{ENV}=triton: tensors on {t.device} are not supported (CUDA, or CPU via the interpreter)")
    return True


class LaunchLog:
    """Counts fused-kernel launches; ``in_launch`` is True while one runs (op counters skip its host copies)."""

    launches = 0
    in_launch = False


LOG = LaunchLog()
