"""Whole-model post-training quantization without Lightning: calibrate, solve each layer, write back.

``compress_model(model, batches, bits=4)`` replaces the weight of every ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` (or the ones ``include`` / ``exclude`` select) by its quantized value, in place, and
returns a :class:`~obc_lightning.reporting.CompressionReport`. Per module the solver minimises the
layer objective 1/2 * sum_rows (w - q) H (w - q)^T with H = 2/N X^T X from
:func:`~obc_lightning.calibration.collect_hessians`.
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from obc_lightning.calibration import (
    SUPPORTED_MODULES,
    CalibrationWarning,
    LayerHessian,
    MatchedHessian,
    call_model,
    collect_hessians,
    collect_matched,
    input_hooks,
    product_dtype_of,
)
from obc_lightning.checks import check_flags, check_nonnegative
from obc_lightning.grids import check_bits, check_group_size
from obc_lightning.reporting import (
    FP32_BYTES,
    SCALE_BYTES,
    ZERO_BYTES,
    CompressionReport,
    ModuleReport,
    packed_weight_bytes,
    sparse_weight_bytes,
)

SOLVERS = ("auto", "obc", "gptq")
# "scalar": a uniform grid per row / group (the solvers above); "pq": Hessian-aware product quantization;
# "pq-kmeans": plain k-means product quantization (fairseq's iPQ), for comparison
METHODS = ("scalar", "pq", "pq-kmeans")
DEFAULT_BITS = 4


def _as_patterns(arg, what: str) -> list[str]:
    if arg is None:
        return []
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, Sequence) and all(isinstance(p, str) for p in arg):
        return list(arg)
    raise ValueError(f"{what} must be a module name, an fnmatch pattern or a list of them, got {arg!r}")


def _matches(name: str, pattern: str) -> bool:
    """Exact name, fnmatch pattern ("blocks.*.fc1"), or a parent module ("encoder" selects encoder.*)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


REASON_ATTENTION_PROJECTION = (
    "q, k, v input projections of nn.MultiheadAttention '{owner}': a bare Parameter it multiplies "
    "functionally, not a Linear module (only Linear / Conv1d / Conv2d weights are quantized), so it "
    "stays in full precision; obc_lightning.split_attention_projections(model), or "
    "OBCQuantize(split_attention=True), makes them Linears"
)


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
    return (not inc or any(_matches(name, p) for p in inc)) and not any(_matches(name, p) for p in exc)


def select_modules(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Module]:
    """The target modules of ``model``: every Linear / Conv1d / Conv2d, filtered by include / exclude.

    A pattern that selects no supported module is an error (a typo would otherwise quantize
    everything, or nothing, silently); a pattern may also name an attention projection weight
    (:func:`attention_projections`), e.g. to exclude it from the report of what stays unquantized.
    """
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_MODULES)}
    if not candidates:
        raise ValueError("compress_model: the model has no nn.Linear, nn.Conv1d or nn.Conv2d module")
    names = [*candidates, *attention_projections(model)]
    for kind, pats in (("include", inc), ("exclude", exc)):
        for p in pats:
            if not any(_matches(n, p) for n in names):
                shown = ", ".join(list(candidates)[:20]) + (", ..." if len(candidates) > 20 else "")
                raise ValueError(
                    f"compress_model: {kind} pattern {p!r} matches no Linear/Conv1d/Conv2d module; "
                    f"available: {shown}"
                )
    targets = {n: m for n, m in candidates.items() if _selected(n, inc, exc)}
    if not targets:
        raise ValueError(
            f"compress_model: include={include!r} / exclude={exclude!r} leave no module to quantize"
        )
    return targets


def unquantized_projections(model: nn.Module, include=None, exclude=None) -> dict[str, tuple[str, int]]:
    """:func:`attention_projections` that ``include`` / ``exclude`` select (a pattern naming the
    attention or a parent selects them too): the weights of layers the report names as full precision."""
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    return {n: v for n, v in attention_projections(model).items() if _selected(n, inc, exc)}


def full_precision_message(who: str, skipped: Mapping[str, str]) -> str:
    """The warning that names each layer weight left in full precision, with its reason."""
    lines = "\n".join(f"  {n}: {r}" for n, r in skipped.items())
    return f"{who}: {len(skipped)} layer weight(s) left in full precision:\n{lines}"


def _check_prune_args(bits, sparsity, n_m, targets) -> None:
    """Pruning arguments, checked against every target before the model is touched."""
    if sparsity is not None and n_m is not None:
        raise ValueError(f"compress_model: give at most one of sparsity and n_m, got {sparsity=!r}, {n_m=!r}")
    if bits is None and sparsity is None and n_m is None:
        raise ValueError("compress_model: bits=None (no quantization) needs sparsity=... or n_m=(N, M)")
    from obc_lightning.solvers.prune import check_sparsity_pattern

    check_sparsity_pattern("compress_model", sparsity, n_m)
    if n_m is None:
        return
    for name, m in targets.items():
        d = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups
        if d % n_m[1]:
            raise ValueError(
                f"compress_model: N:M pruning needs M={n_m[1]} to divide the input channels (per group) of "
                f"'{name}' ({d}); exclude it"
            )


def per_module(value, name: str, what: str):
    """``value`` itself, or for a mapping {name or fnmatch pattern: value} the first entry matching ``name``."""
    if not isinstance(value, Mapping):
        return value
    for pattern, v in value.items():
        if _matches(name, pattern):
            return v
    raise ValueError(
        f"compress_model: {what}={dict(value)!r} gives no value for module '{name}'; add a '*' entry as the default"
    )


def _check_pq_args(method, bits, block_size, n_centroids, sparsity, n_m, group_size, symmetric, targets) -> None:
    """Product-quantization arguments, checked against every target before the model is touched."""
    if method not in METHODS:
        raise ValueError(f"compress_model: method must be one of {METHODS}, got {method!r}")
    if method == "scalar":
        return
    if bits not in (None, DEFAULT_BITS):
        raise ValueError(
            f"compress_model: bits={bits!r} does not apply to method={method!r}: its size is "
            "log2(n_centroids) / block_size bits per weight plus the codebook"
        )
    for arg, value in (("sparsity", sparsity), ("n_m", n_m), ("group_size", group_size)):
        if value is not None:
            raise ValueError(f"compress_model: {arg} does not apply to method={method!r}")
    if symmetric:
        raise ValueError(f"compress_model: symmetric does not apply to method={method!r}")
    from obc_lightning.solvers.pq import check_pq_args

    for what, value in (("block_size", block_size), ("n_centroids", n_centroids)):
        if isinstance(value, Mapping):  # (no targets: the callback's early check of the values alone)
            for pattern in value:
                if not isinstance(pattern, str) or (targets and not any(_matches(n, pattern) for n in targets)):
                    raise ValueError(
                        f"compress_model: {what} pattern {pattern!r} matches no target module; targets: "
                        + ", ".join(list(targets)[:20])
                    )
        lo = 1 if what == "block_size" else 2
        for v in value.values() if isinstance(value, Mapping) else [value]:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"compress_model: {what} must be an integer >= {lo} (or a mapping of them), got {v!r}")
    for name, m in targets.items():
        if getattr(m, "groups", 1) != 1:
            raise ValueError(
                f"compress_model: module '{name}' is a grouped convolution (groups={m.groups}); product "
                "quantization keeps one codebook per layer over ungrouped weights: exclude it"
            )
        rows, cols = m.weight.shape[0], m.weight[0].numel()
        check_pq_args(
            "compress_model",
            cols,
            rows,
            per_module(block_size, name, "block_size"),
            per_module(n_centroids, name, "n_centroids"),
            what=f"weight of '{name}'",
        )


def _check_args(bits, solver, group_size, symmetric, mse, damp, sequential, offload, targets) -> None:
    if bits is not None:
        check_bits(bits)
    if solver not in SOLVERS:
        raise ValueError(f"compress_model: solver must be one of {SOLVERS}, got {solver!r}")
    check_flags("compress_model", symmetric=symmetric, mse=mse, sequential=sequential, offload=offload)
    check_nonnegative("compress_model", "damp", damp)
    try:
        check_group_size(group_size, 2**62)
    except ValueError as e:
        raise ValueError(f"compress_model: {e}") from None
    for name, m in targets.items():
        if not m.weight.is_floating_point():
            raise ValueError(
                f"compress_model: module '{name}' has a {m.weight.dtype} weight; expected floating point"
            )


def _materialize(batches) -> Iterable:
    """Re-iterable batches (a one-shot iterator becomes a list); refuse what cannot be batches."""
    if isinstance(batches, Tensor):
        raise ValueError(
            "compress_model: calibration_batches must be an iterable of batches (a list, a DataLoader), "
            "not a single tensor; wrap it as [tensor]"
        )
    if isinstance(batches, Iterator):
        batches = list(batches)
    if not isinstance(batches, Iterable):
        raise ValueError(
            f"compress_model: calibration_batches must be iterable, got {type(batches).__name__}"
        )
    if isinstance(batches, Sized) and len(batches) == 0:
        raise ValueError("compress_model: calibration_batches is empty")
    return batches


@torch.no_grad()
def execution_groups(model: nn.Module, batch, targets: Mapping[str, nn.Module], forward_fn=None) -> list[list[str]]:
    """Target names in the order of their first call on ``batch``, grouped for sequential calibration;
    those never called come last, one per group.

    A module joins the group before it when its first call receives the very tensor object that the
    group's first module received, unmodified in between (same ``_version``), as q, k and v receive one
    hidden state: that tensor existed before the group ran, so it cannot depend on any module of the
    group, and one calibration pass serves them all, with the same Hessians as one pass each.
    """
    groups: list[list[str]] = []
    seen: set[str] = set()
    group_input: list = [None, -1]  # the group's input (held, so its address cannot be reused) and _version

    def recorder(name: str):
        def record(x):
            if name in seen:
                return
            seen.add(name)
            if groups and x is group_input[0] and x._version == group_input[1]:
                groups[-1].append(name)
            else:
                groups.append([name])
                group_input[:] = [x, x._version]

        return record

    with input_hooks(model, {name: (m, recorder(name)) for name, m in targets.items()}):
        call_model(model, batch, forward_fn)
    return groups + [[n] for n in targets if n not in seen]


def _check_same_groups(groups: list[list[str]], targets: Mapping[str, nn.Module], reduce_fn) -> None:
    """Under DDP every rank must run the same sequence of calibration passes (each pass all-reduces its
    modules' sums): refuse, on every rank alike, when the ranks found different sequences on their first
    batches (modules called depending on the data). Each target's group and place in it are summed over
    the ranks with their squares: the ranks agree iff ranks * sum(c^2) == sum(c)^2 for every code c, a
    test on reduced values only, so that every rank reaches the same verdict (exact in float64 while
    ranks * the largest code stays below 2^26: 64 ranks and a million targets)."""
    where = {name: (g, i) for g, group in enumerate(groups) for i, name in enumerate(group)}
    codes = torch.tensor([where[n] for n in targets], dtype=torch.float64).flatten()
    stats = torch.cat([codes, codes.square(), torch.ones(1, dtype=torch.float64)])
    stats = stats.to(next(iter(targets.values())).weight.device)  # where reduce_fn gets the Hessian sums
    out = reduce_fn(stats)
    stats = (stats if out is None else out).cpu()
    n = len(codes)
    summed, squares, ranks = stats[:n], stats[n : 2 * n], stats[2 * n]
    if not torch.equal(ranks * squares, summed.square()):
        raise ValueError(
            "compress_model: sequential calibration needs the same order of modules on every rank, but the "
            "ranks' first calibration batches called the target modules in different orders (modules called "
            "depending on the data); use sequential=False, or calibrate on the same batches on every rank"
        )


def _size(m: nn.Module) -> int:
    """fp32 bytes of the module's weight and bias."""
    return (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) * FP32_BYTES


def _relative_error(loss: float, signal: float) -> float:
    """trace(dW H dW^T) / trace(W H W^T) from loss = 1/2 trace(dW H dW^T) and signal = trace(W H W^T)."""
    return 2 * loss / signal if signal > 0 else (0.0 if loss == 0 else float("inf"))


def _nm_group_index(m: nn.Module, n_m):
    """Conv weights prune N:M along input channels at each kernel position; Linear along its inputs."""
    if n_m is None or not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return None
    from obc_lightning.solvers.prune import conv_nm_group_index

    return conv_nm_group_index(m.in_channels // m.groups, math.prod(m.kernel_size), n_m[1]).to(m.weight.device)


def _quantize_module(name, m, lh: LayerHessian, bits, solver, group_size, symmetric, mse, damp, scale_dtype,
                     sparsity=None, n_m=None, weight=None):
    """Solve every group's (W_i, H_i): prune first (``sparsity`` / ``n_m``, OBS), then quantize the kept
    weights (``bits``; None: prune only). ``weight``: the target to compress instead of the module's
    weight (output matching's W*). Returns Q (weight's shape, compute dtype), the report, the results,
    the number of scales and the number of pruned weights."""
    from obc_lightning.solvers.common import layer_objective
    from obc_lightning.solvers.prune import obs_prune
    from obc_lightning.solvers.quantize import quantize_weight  # lazily: solvers are a separate stage

    t0 = time.perf_counter()
    W = m.weight.detach() if weight is None else weight
    if group_size is not None and group_size >= lh.hessians.shape[-1]:
        group_size = None  # one group spans the whole row: per-channel (small layers of a grouped config)
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    prune = sparsity is not None or n_m is not None
    group_index = _nm_group_index(m, n_m)
    Qs, results = [], []
    loss = 0.0
    signal = 0.0  # sum_rows w H w^T = trace(W H W^T)
    pruned = 0
    damp_used = 0.0
    rows_won: dict[str, int] = {}
    for i, Wb in enumerate(lh.weight_blocks(W)):
        Wb = Wb.to(dt)
        H = lh.hessians[i].to(device=W.device, dtype=dt)
        Pb = Wb
        if prune:
            pres = obs_prune(Wb, H, sparsity=sparsity, n_m=n_m, damp=damp, group_index=group_index)
            Pb, pruned, damp_used = pres.pruned_matrix, pruned + int((~pres.mask).sum()), max(damp_used, pres.damp)
        if bits is None:
            Qb = Pb
        else:  # quantize_weight keeps exact zeros at 0: the mask survives
            res = quantize_weight(
                Pb, H, bits, solver=solver, group_size=group_size, symmetric=symmetric, mse=mse, damp=damp,
                scale_dtype=scale_dtype,
            )
            Qb = res.quantized_matrix
            results.append(res)
            damp_used = max(damp_used, res.damp)
            for k, v in res.solver_rows.items():
                rows_won[k] = rows_won.get(k, 0) + int(v)
        Qs.append(Qb)
        # the objective against the caller's weights: 1/2 trace((Q - W) H (Q - W)^T)
        loss += float(layer_objective(Wb, Qb, H).sum()) if prune else float(res.loss.sum())
        signal += float(2 * layer_objective(Wb, torch.zeros_like(Wb), H).sum())
    Q = torch.cat(Qs, dim=0).reshape(W.shape)
    rel = _relative_error(loss, signal)
    rows = W.shape[0]
    n_groups = results[0].scales.shape[1] if results else 0
    before = _size(m)
    # the weight as save_quantized stores it by default (N:M: the kept entries and their positions;
    # pruned float weights: float16 values; quantized unstructured-sparse weights: dense codes)
    if bits is None:
        weight_bytes = sparse_weight_bytes(W.numel(), n_m=n_m, nnz=W.numel() - pruned)
    elif n_m is not None:
        weight_bytes = sparse_weight_bytes(W.numel(), n_m=n_m, bits=bits, n_scales=rows * n_groups)
    else:
        weight_bytes = packed_weight_bytes(W.numel(), rows, n_groups, bits)
    after = before - W.numel() * FP32_BYTES + weight_bytes
    rep = ModuleReport(
        name=name,
        kind=type(m).__name__,
        shape=tuple(W.shape),
        bits=bits,
        groups=lh.groups,
        group_size=group_size,
        n_samples=lh.n_samples,
        loss=loss,
        rel_error=rel,
        seconds=time.perf_counter() - t0,
        obc_rows=rows_won.get("obc", 0),
        gptq_rows=rows_won.get("gptq", 0),
        damp=damp_used,
        bytes_before=before,
        bytes_after=after,
        sparsity=pruned / W.numel(),
    )
    return Q, rep, results, rows * n_groups, pruned


def _pq_module(name, m, lh: LayerHessian, method, block_size, n_centroids, damp, scale_dtype, seed, weight=None):
    """Product-quantize one (ungrouped) module (or the target ``weight``); returns Q, the report and the result."""
    from obc_lightning.solvers.common import layer_objective
    from obc_lightning.solvers.pq import product_quantize

    t0 = time.perf_counter()
    W = m.weight.detach() if weight is None else weight
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wm = W.reshape(W.shape[0], -1).to(dt)
    H = lh.hessians[0].to(device=W.device, dtype=dt)
    res = product_quantize(
        Wm,
        H if method == "pq" else None,
        block_size=block_size,
        n_centroids=n_centroids,
        seed=seed,
        damp=damp,
        codebook_dtype=scale_dtype,
    )
    Q = res.quantized_matrix
    loss = float(layer_objective(Wm, Q, H).sum())  # pq-kmeans' own loss is Euclidean: price it with H
    signal = float(2 * layer_objective(Wm, torch.zeros_like(Wm), H).sum())
    entry = torch.empty(0, dtype=scale_dtype or torch.float32).element_size()
    weight_bits = res.codes.numel() * res.code_bits + res.codebook.numel() * 8 * entry
    before = _size(m)
    rep = ModuleReport(
        name=name,
        kind=type(m).__name__,
        shape=tuple(W.shape),
        bits=None,
        groups=1,
        group_size=None,
        n_samples=lh.n_samples,
        loss=loss,
        rel_error=_relative_error(loss, signal),
        seconds=time.perf_counter() - t0,
        damp=res.damp,
        bytes_before=before,
        bytes_after=before - W.numel() * FP32_BYTES + -(-weight_bits // 8),
        method=method,
        block_size=block_size,
        n_centroids=n_centroids,
        weight_bits=weight_bits,
    )
    return Q.reshape(W.shape), rep, res


def _matched_target(name: str, m: nn.Module, lh: MatchedHessian, damp: float) -> Tensor:
    """W* = W C^T H̃^-1 per conv group (:func:`~obc_lightning.solvers.match.matched_weight`), the weight's shape."""
    from obc_lightning.solvers.match import matched_weight

    W = m.weight.detach()
    blocks = []
    for i, Wb in enumerate(lh.weight_blocks(W)):
        what = f"module '{name}'" + (f" (group {i})" if lh.groups > 1 else "")
        Wstar, _ = matched_weight(Wb, lh.cross[i], lh.hessians[i], damp, fn="compress_model", what=what)
        blocks.append(Wstar)
    return torch.cat(blocks).reshape(W.shape)


def _matched_losses(lh: MatchedHessian, Q: Tensor, target: Tensor) -> tuple[float, float, float]:
    """(loss of Q, loss of the target W*, signal) against the full-precision outputs: per row
    1/2 * 2/N ||X w - X̃ q||^2 (:func:`~obc_lightning.solvers.match.matched_objective`), and
    sum_rows 2/N ||X w||^2 = trace(W H W^T)."""
    from obc_lightning.solvers.match import matched_objective

    loss = at_target = 0.0
    for i, (Qb, Tb) in enumerate(zip(lh.weight_blocks(Q), lh.weight_blocks(target))):
        loss += float(matched_objective(Qb, lh.cross[i], lh.energy[i], lh.hessians[i]).sum())
        at_target += float(matched_objective(Tb, lh.cross[i], lh.energy[i], lh.hessians[i]).sum())
    return loss, at_target, float(lh.energy.sum())


@contextmanager
def _original_weights(targets: Mapping[str, nn.Module], backups: Mapping[str, Tensor],
                      compressed: Mapping[str, Tensor]):
    """Within the block the compressed modules hold their original weights again (copied from the CPU
    backups: no second copy of the model on its device); their compressed weights are restored on exit."""
    try:
        for name, w in backups.items():
            targets[name].weight.copy_(w)
        yield
    finally:
        for name, q in compressed.items():
            targets[name].weight.copy_(q)


def compress_model(
    model: nn.Module,
    calibration_batches: Iterable,
    bits: int | None = DEFAULT_BITS,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    forward_fn: Callable | None = None,
    sequential: bool = False,
    solver: str = "auto",
    group_size: int | None = None,
    symmetric: bool = False,
    mse: bool = True,
    damp: float = 0.01,
    offload: bool = False,
    max_memory: int | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    keep_results: bool = False,
    scale_dtype: torch.dtype | None = torch.float16,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    sample_fraction: float = 1.0,
    product_dtype: str | torch.dtype | None = None,
    method: str = "scalar",
    block_size: int | Mapping[str, int] = 8,
    n_centroids: int | Mapping[str, int] = 256,
    seed: int = 0,
    match_outputs: bool | None = None,
) -> CompressionReport:
    """Quantize the Linear / Conv1d / Conv2d weights of ``model`` in place to ``bits`` bits.

    Args:
        model: any ``nn.Module``; weights keep their dtype, device and ``Parameter`` identity.
        calibration_batches: iterable of batches on the model's device; called as ``model(batch)`` (a
            tensor or object), ``model(*batch)`` (tuple / list), ``model(**batch)`` (dict), or
            ``forward_fn(model, batch)``. A one-shot iterator is materialised (sequential mode reruns it).
        bits: 2 ... 8; ``None`` with ``sparsity`` / ``n_m``: prune only (weights stay float).
        sparsity / n_m: prune every module first with OBS (:func:`~obc_lightning.solvers.prune.obs_prune`,
            on the module's Hessian, with ``damp``): ``sparsity`` unstructured (the global selection over
            the module's rows), ``n_m=(N, M)`` at most N non-zeros in every M consecutive inputs (convs:
            input channels at each kernel position). The kept weights are then quantized; pruned ones stay
            exactly 0. ``loss`` / ``rel_error`` compare the final weights with the original ones;
            ``report[name].sparsity`` and ``report.sparsity`` give the fraction pruned.
        include / exclude: module names, parents ("encoder"), or fnmatch patterns ("*.fc?"); every
            pattern must match a supported module.
        sequential: ``False``: all Hessians from the original model in one pass. ``True``: module by
            module in execution order, each calibrated on the inputs produced by the already-quantized
            earlier modules: one pass over the batches per module (two with ``match_outputs``, the
            default), except that modules called in a row on one and the same input tensor (q, k, v)
            share the passes (:func:`execution_groups`).
        match_outputs: ``None`` (default): ``True`` with ``sequential=True``, else ``False``. ``True``
            (needs ``sequential=True``): fit each module to the *full-precision* model's outputs
            instead of its own outputs on the drifted inputs: with X its inputs in the full-precision
            model and X̃ those in the partly compressed one (same samples), the target
            W* = W C^T H̃^-1 (C = 2/N X̃^T X, H̃ = 2/N X̃^T X̃; damped towards W by ``damp``) is compressed
            on H̃ by the same solver, pruning or product quantization, which then minimises
            ||X W^T - X̃ Q^T||^2 (:mod:`obc_lightning.solvers.match`). Each group after the first
            compressed one costs two passes (one with the original weights swapped back in) and keeps
            its inputs from the first pass until the second (:func:`~obc_lightning.calibration.collect_matched`);
            the batches are materialised into a list so that both passes see the same samples.
            ``loss`` / ``rel_error`` are then against the full-precision outputs, and
            ``report[name].drift_loss`` is the part of it that W* itself leaves. ``False`` with
            ``sequential=True``: each module fitted to its own outputs on the drifted inputs (one pass per
            group).
        solver, group_size, symmetric, mse, damp: passed to
            :func:`obc_lightning.solvers.quantize.quantize_weight` (``"auto"``: per row the best of
            ExactOBC and GPTQ, polished).
        offload, max_memory, reduce_fn, sample_fraction, product_dtype: see
            :func:`~obc_lightning.calibration.collect_hessians` (``sample_fraction < 1`` builds each
            Hessian from a random fraction of the samples, ``product_dtype="bfloat16"`` multiplies
            X^T X in bfloat16: calibration cost for CNNs, see the README).
        scale_dtype: scales are rounded to values this dtype holds (default float16, what
            :func:`~obc_lightning.export.save_quantized` stores), so the exported file reproduces the
            in-memory weights bit for bit; ``None`` keeps float32 scales.
        keep_results: keep every module's :class:`~obc_lightning.solvers.common.QuantResult` list (one
            per conv group, on the CPU) in ``report.results`` (codes, scales, zeros for export; with
            product quantization a one-element list holding its :class:`~obc_lightning.solvers.pq.PQResult`).
        method: ``"scalar"`` (default): a uniform ``bits``-bit grid per row or group. ``"pq"``: product
            quantization (:func:`~obc_lightning.solvers.pq.product_quantize`), Hessian-aware: sub-vectors of
            ``block_size`` consecutive inputs replaced by entries of one codebook of ``n_centroids`` per
            module, minimising the layer objective; ``"pq-kmeans"``: the same layout with plain k-means
            (fairseq's iPQ, minimising ||W - Q||^2). ``bits``, ``sparsity``, ``n_m``, ``group_size`` and
            ``symmetric`` do not apply; the codebook is rounded to ``scale_dtype``. Size per module:
            ceil(log2 n_centroids) bits per sub-vector plus the codebook (``report[name].bits_per_weight``).
        block_size, n_centroids: an int for every module, or a mapping {name or fnmatch pattern: int}
            (first match wins; e.g. ``{"*conv*": 9, "*": 4}``: whole 3x3 kernels in convs, 4 elsewhere).
        seed: k-means initialisation of product quantization (deterministic for a seed and a device).

    Returns:
        :class:`~obc_lightning.reporting.CompressionReport`; modules without a Hessian (not on the
        forward path, or their weight used functionally, e.g. ``F.linear(x, m.weight)``) are left
        unchanged and listed in ``skipped``, as are the q, k, v projection weights of
        ``nn.MultiheadAttention`` (bare Parameters, not modules: :func:`attention_projections`), which
        count at fp32 in the sizes.

    Raises:
        ValueError: bad arguments (before the model is touched) or NaN / Inf activations. If anything
        fails after weights were written, every written weight is restored before the error propagates.
    """
    targets = select_modules(model, include, exclude)
    product_dtype_of(product_dtype, "compress_model")  # checked before the model is touched
    _check_args(bits, solver, group_size, symmetric, mse, damp, sequential, offload, targets)
    if match_outputs is None:
        match_outputs = sequential is True
    check_flags("compress_model", match_outputs=match_outputs)
    if match_outputs and not sequential:
        raise ValueError(
            "compress_model: match_outputs=True needs sequential=True (it fits each module to the full-precision "
            "outputs on the inputs that the already-compressed modules before it produce)"
        )
    pq = method != "scalar"
    _check_pq_args(method, bits, block_size, n_centroids, sparsity, n_m, group_size, symmetric, targets)
    if pq:
        bits = None
    else:
        _check_prune_args(bits, sparsity, n_m, targets)
    batches = _materialize(calibration_batches)
    if match_outputs:  # both passes of a group must see the same samples: no reshuffling, no augmentation
        batches = list(batches)

    t_start = time.perf_counter()
    report = CompressionReport(bits=bits, solver=solver if not pq else method, sequential=sequential, method=method,
                               match_outputs=match_outputs)
    report.results = {} if keep_results else None  # name -> [QuantResult per conv group]
    skipped: dict[str, str] = {}
    for name, m in targets.items():
        if not isinstance(m.weight, nn.Parameter):
            skipped[name] = (
                "weight is not a Parameter (reparametrized, e.g. torch.nn.utils.prune); "
                "make it permanent (prune.remove) before quantizing"
            )
    all_targets = targets
    targets = {n: m for n, m in targets.items() if n not in skipped}
    backups: dict[str, Tensor] = {}
    compressed: dict[str, Tensor] = {}  # match_outputs: the compressed weights, on the CPU, while originals are in
    kw = dict(
        forward_fn=forward_fn,
        offload=offload,
        max_memory=max_memory,
        reduce_fn=reduce_fn,
        warn=False,
        sample_fraction=sample_fraction,
        product_dtype=product_dtype,
    )

    def solve(name: str, lh: LayerHessian) -> None:
        m = targets[name]
        t0 = time.perf_counter()
        matched = isinstance(lh, MatchedHessian) and lh.drift  # no drift: C = H̃, W* = W, the plain result
        target = _matched_target(name, m, lh, damp) if matched else None
        if pq:
            b, k = per_module(block_size, name, "block_size"), per_module(n_centroids, name, "n_centroids")
            Q, rep, res = _pq_module(name, m, lh, method, b, k, damp, scale_dtype, seed, weight=target)
            results, n_pruned = [res], 0
        else:
            Q, rep, results, n_scales, n_pruned = _quantize_module(
                name, m, lh, bits, solver, group_size, symmetric, mse, damp, scale_dtype, sparsity=sparsity, n_m=n_m,
                weight=target,
            )
            rep.weight_bits = (32 if bits is None else bits) * m.weight.numel() + 8 * (
                SCALE_BYTES + ZERO_BYTES) * n_scales
        if matched:
            rep.loss, rep.drift_loss, signal = _matched_losses(lh, Q, target)
            rep.rel_error = _relative_error(rep.loss, signal)
            rep.seconds = time.perf_counter() - t0
        backups[name] = m.weight.detach().to("cpu", copy=True)
        m.weight.copy_(Q.to(m.weight.dtype))
        if match_outputs:
            compressed[name] = m.weight.detach().to("cpu", copy=True)
        report.modules.append(rep)
        report.quantized_weights += m.weight.numel()
        report.pruned_weights += n_pruned
        report.quantized_weight_bits += rep.weight_bits
        if keep_results:
            report.results[name] = [_to_cpu(r) for r in results]

    try:
        with torch.no_grad():
            if not sequential:
                t0 = time.perf_counter()
                calib = collect_hessians(model, batches, targets, **kw)
                report.calibration_seconds = time.perf_counter() - t0
                report.calibration_passes = 1
                skipped.update(calib.skipped)
                for name in list(calib.hessians):
                    solve(name, calib.hessians.pop(name))  # pop: free each H once used
            else:
                first = next(iter(batches), None)
                if first is None:
                    raise ValueError("compress_model: calibration_batches is empty")
                groups = execution_groups(model, first, targets, forward_fn)
                if reduce_fn is not None:
                    _check_same_groups(groups, targets, reduce_fn)
                for group in groups:
                    t0 = time.perf_counter()
                    modules = {name: targets[name] for name in group}
                    if match_outputs and compressed:  # (before the first compressed module nothing drifts)
                        calib = collect_matched(
                            model, batches, modules, who="compress_model",
                            full_precision=lambda: _original_weights(targets, backups, compressed), **kw,
                        )
                        report.calibration_passes += 1
                    else:
                        calib = collect_hessians(model, batches, modules, **kw)
                    report.calibration_seconds += time.perf_counter() - t0
                    report.calibration_passes += 1
                    skipped.update(calib.skipped)
                    for name in group:
                        if name in calib:
                            solve(name, calib.hessians.pop(name))
    except BaseException:
        with torch.no_grad():
            for name, w in backups.items():
                targets[name].weight.copy_(w)
        raise

    projections = unquantized_projections(model, include, exclude)
    skipped.update({n: reason for n, (reason, _) in projections.items()})
    order = []  # model order: a module, then the attention projections it holds
    for n, _ in model.named_modules():
        order += [n] if n in all_targets else []
        order += [p for p in projections if p.rpartition(".")[0] == n]
    report.skipped = {n: skipped[n] for n in order if n in skipped}
    done = {rep.name: rep for rep in report.modules}
    for name, m in all_targets.items():  # skipped targets stay fp32: same size before and after
        report.bytes_before += done[name].bytes_before if name in done else _size(m)
        report.bytes_after += done[name].bytes_after if name in done else _size(m)
    for _, size in projections.values():
        report.bytes_before += size
        report.bytes_after += size
    report.seconds = time.perf_counter() - t_start
    if report.skipped:
        warnings.warn(full_precision_message("compress_model", report.skipped), CalibrationWarning, stacklevel=2)
    return report


def _to_cpu(res):
    """A solver result (QuantResult or PQResult) with every tensor field, and the grid, on the CPU."""
    from dataclasses import fields, replace

    moved = {f.name: getattr(res, f.name).cpu() for f in fields(res) if isinstance(getattr(res, f.name), Tensor)}
    if hasattr(res, "grid"):
        moved["grid"] = res.grid.to("cpu")
    return replace(res, **moved)
