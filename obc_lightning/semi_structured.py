"""Inference on sparse tensor cores: 2:4-pruned ``nn.Linear`` weights as semi-structured sparse tensors.

After ``n_m=(2, 4)`` pruning (``obs_prune``, ``compress_model``, ``OBCPrune``) every Linear weight row has
at most 2 non-zeros in each group of 4 consecutive inputs: the layout NVIDIA's sparse tensor cores
(compute capability 8.0 and later) multiply at up to twice the dense rate. ``to_semi_structured``
replaces such weights by ``torch.sparse`` semi-structured tensors (the kept half plus 2-bit metadata),
which ``F.linear`` runs on those kernels. CUDA only: on the CPU the weights stay dense (zeros included).
Convolutions are left dense (torch has no semi-structured convolution).

    model = load_quantized("pruned_2of4.safetensors", model)   # dense weights with the 2:4 zeros
    model.half().cuda().eval()
    to_semi_structured(model)                                  # the eligible Linear layers, in place
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.sparse import (
    SparseSemiStructuredTensor,
    SparseSemiStructuredTensorCUSPARSELT,
    SparseSemiStructuredTensorCUTLASS,
)

from obc_lightning.selection import select_modules

BACKENDS = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and later


def default_backend() -> str:
    """What ``torch.sparse.to_sparse_semi_structured`` uses: cuSPARSELt unless CUTLASS is forced or
    cuSPARSELt is not in this build of torch."""
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return "cutlass"
    return "cusparselt"


def _backend(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"to_semi_structured: backend must be one of {sorted(BACKENDS)} or None, got {backend!r}")
    return backend


def is_2_to_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def semi_structured_plan(model: nn.Module, include=None, exclude=None, *, backend: str | None = None
                         ) -> dict[str, str | None]:
    """For every selected ``nn.Linear``: ``None`` if its weight can become a semi-structured sparse tensor
    on a supporting GPU with ``backend`` (default: :func:`default_backend`), else why not (not 2:4, its
    dtype, its shape). Device-independent: what :func:`to_semi_structured` would convert."""
    cls = BACKENDS[_backend(backend)]
    plan: dict[str, str | None] = {}
    for name, m in select_modules(model, include, exclude).items():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        rows, cols = w.shape
        limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
        if limits is None:
            dtypes = ", ".join(str(d).removeprefix("torch.") for d in cls._DTYPE_SHAPE_CONSTRAINTS)
            dtype = str(w.dtype).removeprefix("torch.")
            plan[name] = f"weight dtype {dtype} (this backend: {dtypes}; e.g. model.half())"
        elif rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            plan[name] = (
                f"shape {rows} x {cols}: out_features must be a multiple of {limits.sparse_min_rows} and "
                f"in_features of {limits.sparse_min_cols}"
            )
        elif not is_2_to_4(w.detach()):
            plan[name] = "weight not 2:4 sparse along the inputs (prune with n_m=(2, 4) first)"
        else:
            plan[name] = None
    return plan


@torch.no_grad()
def to_semi_structured(model: nn.Module, include=None, exclude=None, *, backend: str | None = None) -> list[str]:
    """Replace the weights of the eligible 2:4-sparse ``nn.Linear`` modules by semi-structured sparse
    tensors (in place, for inference: the new weights take no gradient) and return their names.

    Every selected module is checked before any is changed: on a CPU, a GPU below compute capability
    8.0, or with no eligible Linear, a ``RuntimeError`` says why and the model is left as it was.
    Selected Linear modules that are not eligible stay dense, listed with the reason in a warning.
    """
    backend = _backend(backend)
    plan = semi_structured_plan(model, include, exclude, backend=backend)
    eligible = [n for n, reason in plan.items() if reason is None]
    if not eligible:
        reasons = "\n".join(f"  {n}: {r}" for n, r in plan.items()) or "  (no nn.Linear selected)"
        raise RuntimeError(f"to_semi_structured: no Linear layer can be converted:\n{reasons}")
    modules = dict(model.named_modules())
    for name in eligible:
        dev = modules[name].weight.device
        if dev.type != "cuda":
            raise RuntimeError(
                f"to_semi_structured: module '{name}' is on {dev}; semi-structured sparse kernels need a "
                f"CUDA GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (on the CPU "
                f"the 2:4 weights stay dense)"
            )
        if torch.cuda.get_device_capability(dev) < MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(dev)
            raise RuntimeError(
                f"to_semi_structured: module '{name}' is on {torch.cuda.get_device_name(dev)} (compute "
                f"capability {major}.{minor}); sparse tensor cores need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
            )
    skipped = {n: r for n, r in plan.items() if r is not None}
    if skipped:
        lines = "\n".join(f"  {n}: {r}" for n, r in skipped.items())
        warnings.warn(f"to_semi_structured: {len(skipped)} Linear layer(s) stay dense:\n{lines}", stacklevel=2)
    cls = BACKENDS[backend]
    sparse = {name: cls.from_dense(modules[name].weight.detach().contiguous()) for name in eligible}  # all, then swap
    for name, weight in sparse.items():
        modules[name].weight = nn.Parameter(weight, requires_grad=False)
    return eligible
