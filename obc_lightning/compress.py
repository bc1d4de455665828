"""Whole-model post-training quantization without Lightning: calibrate, solve each layer, write back.

``compress_model(model, batches, bits=4)`` replaces the weight of every ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` (or the ones ``include`` / ``exclude`` select) by its quantized value, in place, and
returns a :class:`~obc_lightning.reporting.CompressionReport`. Per module the solver minimises the
layer objective 1/2 * sum_rows (w - q) H (w - q)^T with H = 2/N X^T X from
:func:`~obc_lightning.calibration.collect_hessians`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from obc_lightning.allocation import (
    Allocator,
    HeldOutBatches,
    HeldOutMetric,
    check_reachable,
    fixed_bytes,
    solved_cost,
)
from obc_lightning.calibration import (
    CalibrationWarning,
    LayerHessian,
    MatchedHessian,
    call_model,
    collect_hessians,
    collect_matched,
    hessian_shape,
    input_hooks,
)
from obc_lightning.checks import check_flags
from obc_lightning.config import DEFAULT_BITS, METHODS, SOLVERS, CompressionConfig, flat_signature, options_doc
from obc_lightning.formats.bits import FP32_BYTES
from obc_lightning.formats.record import drop_format, set_format
from obc_lightning.formats.schemes import StorageScheme
from obc_lightning.grids import check_scale_dtype
from obc_lightning.reporting import CompressionReport, Progress, progress_of
from obc_lightning.scheduling import (
    Solved,
    SolveSettings,
    check_distributed,
    module_bytes,
    prepare_module,
    quantize_modules,
    relative_error,
    solve_modules,
    tied_objective,
    to_cpu,
)
from obc_lightning.selection import (
    REASON_ATTENTION_PROJECTION,
    attention_projections,
    check_patterns_match,
    full_precision_modules,
    parameter_bytes,
    per_module,
    select_modules,
    unquantized_projections,
)
from obc_lightning.solvers.pq import check_pq_args
from obc_lightning.solvers.prune import obs_prune_trace

__all__ = [  # re-exported: module selection lives in obc_lightning.selection
    "DEFAULT_BITS", "METHODS", "REASON_ATTENTION_PROJECTION", "SOLVERS", "attention_projections",
    "compress_model", "execution_groups", "per_module", "select_modules", "unquantized_projections",
]

def full_precision_message(who: str, skipped: Mapping[str, str]) -> str:
    """The warning that names each layer weight left in full precision, with its reason."""
    lines = "\n".join(f"  {n}: {r}" for n, r in skipped.items())
    return f"{who}: {len(skipped)} layer weight(s) left in full precision:\n{lines}"


def check_weights_exist(targets: Mapping[str, nn.Module], who: str = "compress_model", *,
                        before_fit: bool = False) -> dict[str, nn.Module]:
    """Target weights with values to solve for, else a ``ValueError`` naming the module: not a lazy module
    before its first call (``nn.LazyLinear``: no shape yet), not on the meta device (a shape without
    values), not empty (``nn.Linear(16, 0)``). ``before_fit``: lazy and meta weights may still be
    materialized (by training, by the strategy); they are returned out of the further checks instead."""
    ready = {}
    for name, m in targets.items():
        w = m.weight
        if nn.parameter.is_lazy(w) or w.is_meta:
            if before_fit:
                continue
            what = ("a lazy module whose weight is not initialized yet (its shape comes from its first call): "
                    "run the model on one batch first" if nn.parameter.is_lazy(w) else
                    "on the meta device (a shape without values): materialize and load its weights first, e.g. "
                    "model.to_empty(device=...) and load_state_dict")
            raise ValueError(f"{who}: module '{name}' ({type(m).__name__}) is {what}, or exclude it")
        if w.numel() == 0:
            raise ValueError(f"{who}: module '{name}' ({type(m).__name__}) has an empty weight of shape "
                             f"{tuple(w.shape)}: nothing to quantize; exclude it")
        ready[name] = m
    return ready


def check_against_model(
    config: CompressionConfig, targets: Mapping[str, nn.Module], who: str = "compress_model", *,
    before_fit: bool = False,
) -> None:
    """The checks of ``config`` that need the target modules, before any of them is touched: weights with
    values (:func:`check_weights_exist`; ``before_fit``: lazy and meta ones are left for later), N:M groups
    that divide each module's inputs, product-quantization layouts that fit, floating-point weights."""
    q = config.quantization
    check_patterns_match(q.bits, "bits", targets, who)
    if isinstance(q.bits, Mapping):
        for name in targets:
            per_module(q.bits, name, "bits", who)
    targets = check_weights_exist(targets, who, before_fit=before_fit)  # the modules whose weights can be read
    if q.target is not None:  # every target solved, biases only fixed: the widest range a calibration allows
        check_reachable(q, targets, who, fixed_bytes(targets))
    for name, m in targets.items():
        if not m.weight.is_floating_point():
            raise ValueError(f"{who}: module '{name}' has a {m.weight.dtype} weight; expected floating point")
        if q.n_m is not None and q.method == "scalar":
            d = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups
            if d % q.n_m[1]:
                raise ValueError(
                    f"{who}: N:M pruning needs M={q.n_m[1]} to divide the input channels (per group) of "
                    f"'{name}' ({d}); exclude it"
                )
    if q.method == "scalar":
        return
    check_patterns_match(q.block_size, "block_size", targets, who)
    check_patterns_match(q.n_centroids, "n_centroids", targets, who)
    for name, m in targets.items():
        if getattr(m, "groups", 1) != 1:
            raise ValueError(
                f"{who}: module '{name}' is a grouped convolution (groups={m.groups}); product quantization keeps "
                "one codebook per layer over ungrouped weights: exclude it"
            )
        rows, cols = m.weight.shape[0], m.weight[0].numel()
        check_pq_args(
            who, cols, rows, per_module(q.block_size, name, "block_size", who),
            per_module(q.n_centroids, name, "n_centroids", who), what=f"weight of '{name}'",
        )


def config_of(who: str, config: CompressionConfig | None, options: Mapping, sections=None) -> CompressionConfig:
    """``config`` itself, or the configuration of the flat keywords ``options`` (not both)."""
    if config is None:
        return CompressionConfig.from_flat(who, sections=sections, **options)
    if options:
        raise ValueError(f"{who}: give config=... or flat keywords ({', '.join(options)}), not both")
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"{who}: config must be a CompressionConfig, got {type(config).__name__}")
    return config


def _materialize(batches, argument: str = "calibration_batches") -> Iterable:
    """Re-iterable batches (a one-shot iterator becomes a list); refuse what cannot be batches."""
    if isinstance(batches, Tensor):
        raise ValueError(
            f"compress_model: {argument} must be an iterable of batches (a list, a DataLoader), "
            "not a single tensor; wrap it as [tensor]"
        )
    if isinstance(batches, Iterator):
        batches = list(batches)
    if not isinstance(batches, Iterable):
        raise ValueError(f"compress_model: {argument} must be iterable, got {type(batches).__name__}")
    if isinstance(batches, Sized) and len(batches) == 0:
        raise ValueError(f"compress_model: {argument} is empty")
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


def tied_weights(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """{target: every name of the modules that use its weight Parameter, in model order} for the targets
    whose weight has more than one name: other modules that share the Parameter (a tied weight), and
    further names of the module itself (one module registered twice)."""
    names: dict[int, list[str]] = {}  # id(weight) -> every module name using it
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            names.setdefault(id(w), []).append(n)
    return {name: names[id(m.weight)] for name, m in targets.items() if len(names.get(id(m.weight), ())) > 1}


def _check_tied(model: nn.Module, targets: Mapping[str, nn.Module], tied: Mapping[str, list[str]], block_size,
                n_centroids, pq: bool, bits=None) -> None:
    """A weight shared by several targets is solved once on the sum of their Hessians: they must split
    it the same way (conv groups, PQ layout). Checked before the model is touched."""
    for name, users in tied.items():
        for other in users:
            if other not in targets or other == name:
                continue
            if hessian_shape(targets[other]) != hessian_shape(targets[name]):
                raise ValueError(
                    f"compress_model: modules '{name}' and '{other}' share one weight but use it differently "
                    f"({type(targets[name]).__name__} with groups={getattr(targets[name], 'groups', 1)}, "
                    f"{type(targets[other]).__name__} with groups={getattr(targets[other], 'groups', 1)}); "
                    "exclude one of them"
                )
            if pq and any(per_module(v, name, k) != per_module(v, other, k)
                          for k, v in (("block_size", block_size), ("n_centroids", n_centroids))):
                raise ValueError(
                    f"compress_model: modules '{name}' and '{other}' share one weight: give them the same "
                    "block_size and n_centroids"
                )
            if isinstance(bits, Mapping) and per_module(bits, name, "bits") != per_module(bits, other, "bits"):
                raise ValueError(
                    f"compress_model: modules '{name}' and '{other}' share one weight: give them the same bits, "
                    f"got {per_module(bits, name, 'bits')} and {per_module(bits, other, 'bits')}"
                )


def _fixed_bytes(all_targets: Mapping[str, nn.Module], solved: set[str], model: nn.Module, include,
                 exclude) -> int:
    """The bytes of the report's size that no allocation changes: every target's bias, the weights left
    in full precision (skipped targets, each weight once, and the attention projections)."""
    solved_weights = {id(all_targets[n].weight) for n in solved}
    counted: set[int] = set()
    extra = 0
    for m in all_targets.values():
        w = m.weight
        if id(w) not in solved_weights and id(w) not in counted:
            extra += w.numel() * FP32_BYTES
        counted.add(id(w))
    extra += sum(size for _, size in unquantized_projections(model, include, exclude).values())
    return fixed_bytes(all_targets, extra)


@contextmanager
def _original_weights(backups: Mapping[int, tuple[Tensor, Tensor]], compressed: Mapping[int, Tensor]):
    """Within the block the compressed weights hold their original values again (copied from the CPU
    backups: no second copy of the model on its device); their compressed values are restored on exit."""
    try:
        for weight, original in backups.values():
            weight.copy_(original)
        yield
    finally:
        for weight, _ in backups.values():
            weight.copy_(compressed[id(weight)])


def _summed_hessians(name: str, parts: list[LayerHessian], weight: Tensor) -> LayerHessian:
    """The Hessians of a weight shared by several modules: the sum of theirs (its objective is the sum of
    its users' objectives). With output matching each part's cross moments and energies add too; a user
    whose inputs did not drift (or a plain Hessian) contributes C = H̃, i.e. W C^T = W H̃."""
    first = parts[0]
    device = first.hessians.device
    H = sum(h.hessians.to(device) for h in parts)
    n, calls = sum(h.n_samples for h in parts), sum(h.n_calls for h in parts)
    matched = [h for h in parts if isinstance(h, MatchedHessian) and h.drift]
    if not matched:
        return LayerHessian(name, H, n, calls)
    cross = energy = 0
    for h in parts:
        if isinstance(h, MatchedHessian) and h.drift:
            cross, energy = cross + h.cross.to(device), energy + h.energy.to(device)
        else:  # no drift: W C^T = W H, diag(W H W^T)
            W = torch.stack(h.weight_blocks(weight.detach())).to(device=device, dtype=torch.float64)
            WH = W @ h.hessians.to(device=device, dtype=torch.float64)
            cross, energy = cross + WH, energy + (WH * W).sum(dim=2)
    return MatchedHessian(name, H, n, calls, cross=cross, energy=energy, drift=True)


_UNSET = object()


def compress_model(
    model: nn.Module,
    calibration_batches: Iterable,
    bits: int | dict[str, int] | list[int] | None = _UNSET,
    *,
    config: CompressionConfig | None = None,
    forward_fn: Callable | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    keep_results: bool = False,
    scale_dtype: torch.dtype | None = torch.float16,
    progress: Progress | bool | None = None,
    distributed: bool = False,
    eval_batches: Iterable | HeldOutMetric | None = None,
    **options,
) -> CompressionReport:
    """Quantize (or prune) the Linear / Conv1d / Conv2d weights of ``model`` in place.

    ``compress_model(model, batches, bits=4, group_size=128)`` takes the fields of
    :class:`~obc_lightning.config.QuantizationConfig` and :class:`~obc_lightning.config.CalibrationConfig`
    as keywords (listed with their types and defaults under "Options" below and in the signature, both
    generated from the dataclasses); ``compress_model(model, batches, config=CompressionConfig(...))``
    takes them whole (its ``quantization`` and ``calibration`` parts). Per module the solver minimises the
    layer objective 1/2 * sum_rows (w - q) H (w - q)^T with H = 2/N X^T X from
    :func:`~obc_lightning.calibration.collect_hessians`.

    What the options do, in short: ``bits`` 2 ... 8, or per module ``{"*conv1*": 8, "*": 4}`` (first
    matching pattern wins), ``None`` with ``sparsity`` / ``n_m``: prune only; ``target_bits`` (code bits
    per weight, scales and zero points left out: ``report.avg_code_bits``; ``target_bits=3`` admits
    uniform 3-bit) or ``target_size_mb`` (``report.bytes_after`` in MB, the packed export's size) choose
    each module's width among the candidates ``bits`` (default 2, 3, 4, 8), and ``target_sparsity`` (with
    ``bits=None``) each module's sparsity level, for the least output error within the budget
    (:mod:`obc_lightning.allocation`: every candidate solved from one calibration, an exact allocation for
    per-layer loss weights fitted by ``allocation_steps`` evaluations of the model, then a greedy fill of
    what the budget has left; the assignments are judged on batches the Hessians never saw:
    ``eval_batches``, or ``allocation_holdout`` of the calibration batches set aside; the choice is never
    worse there than the best uniform assignment within the budget, solved on the same batches; then,
    with ``allocation_refit`` (default for widths), the chosen widths are solved again on every
    calibration batch; ``report.allocation`` says what it decided, on both the held-out and the
    calibration batches, and what it cost);
    ``sparsity`` / ``n_m`` prune with OBS first (:func:`~obc_lightning.solvers.prune.obs_prune`;
    unstructured with the global selection over the module's rows, or at most N non-zeros in every M
    inputs, convs along input channels at each kernel position), then the kept weights are quantized
    and pruned ones stay exactly 0; ``sequential=False`` takes all Hessians from the original model in
    one pass, ``True`` calibrates module by module on the inputs of the already-compressed earlier
    modules (modules called in a row on one and the same input tensor, as q, k, v, share a pass:
    :func:`execution_groups`) and, by default (``match_outputs``), fits each module to the *full-precision*
    model's outputs: with X its inputs in the full-precision model and X̃ those in the partly compressed
    one (same samples), the target W* = W Cᵀ H̃⁻¹ (C = 2/N X̃ᵀX, H̃ = 2/N X̃ᵀX̃; damped towards W by
    ``damp``) is compressed on H̃ by the same solver, pruning or product quantization, which then minimises
    ||X Wᵀ - X̃ Qᵀ||² (:mod:`obc_lightning.solvers.match`; two passes per group, one with the original
    weights copied back in, the batches materialised into a list so both see the same samples; the
    report's ``loss`` / ``rel_error`` are against the full-precision outputs and ``drift_loss`` is what
    W* itself leaves; ``match_outputs=False``: each module fitted to its own outputs on the drifted
    inputs, one pass per group); ``method="pq"`` is Hessian-aware product quantization
    (:func:`~obc_lightning.solvers.pq.product_quantize`: sub-vectors of ``block_size`` inputs replaced by
    entries of one codebook of ``n_centroids`` per module), ``"pq-kmeans"`` plain k-means PQ.

    Args:
        model: any ``nn.Module``; weights keep their dtype, device and ``Parameter`` identity.
        calibration_batches: iterable of batches on the model's device; called as ``model(batch)`` (a
            tensor or object), ``model(*batch)`` (tuple / list), ``model(**batch)`` (dict), or
            ``forward_fn(model, batch)``. A one-shot iterator is materialised (sequential mode reruns it).
        config: the whole configuration instead of flat keywords.
        forward_fn: ``fn(model, batch)`` running a batch (for batches the calling convention cannot take).
        reduce_fn: sums a tensor over processes in place (DDP): every rank then holds the same Hessians.
        distributed: share the solving out over the processes of ``torch.distributed``'s default group
            (DDP; it must be initialized): the ranks split the modules, balanced by cost, solve their share
            and broadcast the results, so every rank ends with the same weights and report entries, checked
            (:mod:`obc_lightning.scheduling`). Needs ``reduce_fn`` summing over that group (every rank must
            hold the same Hessians). Sequential mode shares out only modules that share a calibration pass
            (q, k, v). ``False``: every process solves every module.
        keep_results: keep every module's :class:`~obc_lightning.solvers.common.QuantResult` list (one
            per conv group, on the CPU) in ``report.results`` (codes, scales, zeros; with product
            quantization a one-element list holding its :class:`~obc_lightning.solvers.pq.PQResult`).
        scale_dtype: scales (and PQ codebooks) are rounded to values this dtype holds (default float16,
            what :func:`~obc_lightning.export.save_quantized` stores), so the exported file reproduces the
            in-memory weights bit for bit; ``None`` keeps float32 scales.
        progress: ``True``: a progress bar (tqdm) over calibration batches and solved modules; or an
            object with ``start(stage, total)``, ``advance(item)`` and ``close()``
            (:class:`~obc_lightning.reporting.Progress`); ``None``: silent.
        eval_batches: a size target's held-out data: batches (called as the calibration batches are) on
            which the search measures its assignments' output error (``allocation_metric``), every
            calibration batch then going to the Hessians; or a
            :class:`~obc_lightning.allocation.HeldOutMetric` (any metric, lower or higher is better: the
            callback's validation replay). ``None``: ``allocation_holdout`` of the calibration batches.

    Returns:
        :class:`~obc_lightning.reporting.CompressionReport`; modules without a Hessian (not on the
        forward path, or their weight used functionally, e.g. ``F.linear(x, m.weight)``) are left
        unchanged and listed in ``skipped``, as are the q, k, v projection weights of
        ``nn.MultiheadAttention`` (bare Parameters, not modules: :func:`attention_projections`), which
        count at fp32 in the sizes.

        Tied weights: a weight Parameter shared by several target modules is quantized once, on the sum
        of their Hessians (the objective of a shared weight is the sum of its users' objectives), when
        the last user's Hessian is in (``sequential=True``: modules calibrated in between see it in full
        precision); each user has its own entry (its own share of the objective, ``tied`` naming the
        others), the weight counts once in the sizes. A module registered under several names has one
        entry, found under each name. Users of a quantized shared weight that are not targets (a tied
        ``nn.Embedding``) are named in a warning.

    Raises:
        ValueError: bad arguments (before the model is touched) or NaN / Inf activations. If anything
        fails after weights were written, every written weight is restored before the error propagates
        (a shared weight to its original value, once).
    """
    if bits is not _UNSET:
        options = {"bits": bits, **options}
    cfg = config_of("compress_model", config, options, sections=("quantization", "calibration"))
    q, c = cfg.quantization, cfg.calibration
    targets = select_modules(model, q.include, q.exclude)
    check_against_model(cfg, targets)
    if eval_batches is not None and q.target is None:
        raise ValueError("compress_model: eval_batches measures the assignments of a size target; give target_bits=, "
                         "target_size_mb= or target_sparsity=, or leave eval_batches out")
    if q.target is not None and c.sequential:
        return _sequential_at_allocated_widths(model, calibration_batches, cfg, targets, eval_batches=eval_batches,
                                               forward_fn=forward_fn, reduce_fn=reduce_fn, keep_results=keep_results,
                                               scale_dtype=scale_dtype, progress=progress, distributed=distributed)
    check_flags("compress_model", keep_results=keep_results)
    check_scale_dtype("compress_model", "scale_dtype", scale_dtype)
    check_distributed("compress_model", distributed, reduce_fn)
    batches = _materialize(calibration_batches)
    if c.matches_outputs:  # both passes of a group must see the same samples: no reshuffling, no augmentation
        batches = list(batches)
    heldout, every_batch = None, batches
    if q.target is not None:  # select: the batches the assignments are judged on, apart from the Hessians'
        batches, heldout = heldout_split(batches, eval_batches, q)
    run = _Compression(model, cfg, targets, forward_fn=forward_fn, reduce_fn=reduce_fn, keep_results=keep_results,
                       scale_dtype=scale_dtype, progress=progress_of(progress), distributed=distributed)
    try:
        with torch.no_grad():
            run.calibrate_and_solve(batches)  # calibrate -> prepare -> solve (or the allocator's candidates)
            if run.allocator is not None:
                run.allocate(batches, heldout)
    except BaseException:
        run.restore_originals()
        raise
    finally:
        run.progress.close()
    report = run.finish()
    if q.refits_widths and batches is not every_batch:  # the chosen widths solved again on every batch
        run.restore_originals()
        how = f"the chosen widths solved again on all {len(every_batch)} calibration batches (allocation_refit)"
        return _at_chosen_widths(model, every_batch, cfg, targets, report, how, forward_fn=forward_fn,
                                 reduce_fn=reduce_fn, keep_results=keep_results, scale_dtype=scale_dtype,
                                 progress=progress, distributed=distributed)
    return report


def heldout_split(batches: Iterable, eval_batches, q) -> tuple[Iterable, HeldOutBatches | HeldOutMetric | None]:
    """The select stage of a size target: (the batches the Hessians come from, the held-out measure the
    search judges assignments on). ``eval_batches`` (batches, or a :class:`~obc_lightning.allocation.HeldOutMetric`)
    leaves every calibration batch to the Hessians; otherwise ``q.allocation_holdout`` of the calibration
    batches are set aside (evenly spaced, the last one included: batches ordered by length or class are
    represented on both sides). ``allocation_holdout=0``, or a single calibration batch (announced), keeps
    them all and judges on them (``None``: the search measures on the calibration batches)."""
    if isinstance(eval_batches, (HeldOutMetric, HeldOutBatches)):
        return batches, eval_batches
    if eval_batches is not None:
        held = list(_materialize(eval_batches, "eval_batches"))
        return batches, HeldOutBatches(held, f"eval_batches ({len(held)} batches)")
    if q.allocation_holdout == 0:
        return batches, None
    batches = list(batches)
    n = len(batches)
    if n < 2:
        warnings.warn(
            f"compress_model: {q.target[0]} judges its assignments on held-out batches, but there is only one "
            "calibration batch to split: they are judged on the batch the Hessians came from, which favours "
            "assignments that fit it (pass eval_batches=..., or more calibration batches)",
            CalibrationWarning, stacklevel=3,
        )
        return batches, None
    k = min(n - 1, max(1, round(q.allocation_holdout * n)))
    held = {(j + 1) * n // k - 1 for j in range(k)}  # evenly spaced, the last batch included
    fit = [b for i, b in enumerate(batches) if i not in held]
    out = [batches[i] for i in sorted(held)]
    return fit, HeldOutBatches(out, f"{len(out)} of {n} calibration batches held out")


class _Compression:
    """The state of one ``compress_model`` run and its stages, in the order the run calls them:

    - ``__init__`` (select): the target modules that can be solved, the tied weights, the solver settings;
    - :meth:`calibrate_and_solve`: one calibration pass (or one per group of modules, ``sequential``),
      each pass's Hessians handed on as they come;
    - :meth:`prepare`: which Hessians are ready (a shared weight waits for all its users and is solved once
      on their sum);
    - :meth:`solve`: the ready modules through the solvers, each written back by :meth:`apply`; or, with a
      size target, every candidate into the allocator's database (:meth:`add_candidates`), and
      :meth:`allocate` chooses and applies once all are in;
    - :meth:`finish` (report): formats recorded on the modules, sizes, skipped modules, warnings.

    :meth:`restore_originals` puts every written weight back (the run failed).
    """

    def __init__(self, model: nn.Module, cfg: CompressionConfig, targets: Mapping[str, nn.Module], *, forward_fn,
                 reduce_fn, keep_results: bool, scale_dtype, progress: Progress, distributed: bool) -> None:
        q, c = cfg.quantization, cfg.calibration
        self.model, self.q, self.c = model, q, c
        self.forward_fn, self.reduce_fn, self.distributed = forward_fn, reduce_fn, distributed
        self.keep_results, self.progress = keep_results, progress
        self.match_outputs = c.matches_outputs
        pq = q.method != "scalar"
        self.t_start = time.perf_counter()
        self.report = CompressionReport(bits=q.bits, solver=q.solver if not pq else q.method,
                                        sequential=c.sequential, method=q.method, match_outputs=self.match_outputs)
        self.report.results = {} if keep_results else None  # name -> [QuantResult per conv group]
        self.skipped: dict[str, str] = {}  # name -> why it stays in full precision
        for name, m in targets.items():
            if not isinstance(m.weight, nn.Parameter):
                self.skipped[name] = (
                    "weight is not a Parameter (reparametrized, e.g. torch.nn.utils.prune); "
                    "make it permanent (prune.remove, or ModelPruning's default make_pruning_permanent=True) before "
                    "quantizing"
                )
        self.all_targets = targets
        self.targets = {n: m for n, m in targets.items() if n not in self.skipped}
        self.tied = tied_weights(model, self.targets)
        _check_tied(model, self.targets, self.tied, q.block_size, q.n_centroids, pq, q.bits)
        self.allocator = Allocator(q) if q.target is not None else None
        # a shared weight is solved once, when the Hessians of all its target users are in: its objective is
        # the sum of theirs, 1/2 trace(dW (H_a + H_b) dW^T)
        self.waiting: dict[str, LayerHessian] = {}  # users of shared weights whose other users are not in yet
        self.shared: dict[str, dict[str, LayerHessian]] = {}  # a tied weight's solving name -> users' Hessians
        self.backups: dict[int, tuple[Tensor, Tensor]] = {}  # id(Parameter) -> (Parameter, original on the CPU)
        self.compressed: dict[int, Tensor] = {}  # match_outputs: id(Parameter) -> compressed value on the CPU
        self.formats: dict[str, StorageScheme] = {}  # recorded on the modules once every weight is written
        self.uncounted: list[str] = []  # modules using a quantized shared weight that no Hessian measured
        self.calibration_options = dict(
            forward_fn=forward_fn, offload=c.offload, max_memory=c.max_memory, reduce_fn=reduce_fn, warn=False,
            sample_fraction=c.sample_fraction, product_dtype=c.product_dtype,
        )
        self.settings = SolveSettings(
            method=q.method, bits=q.bits, solver=q.solver, group_size=q.group_size, symmetric=q.symmetric,
            mse=q.mse, damp=q.damp, scale_dtype=scale_dtype, sparsity=q.sparsity, n_m=q.n_m,
            block_size=q.block_size, n_centroids=q.n_centroids, seed=q.seed, max_memory=c.max_memory,
        )

    # ------------------------------------------------------------------------------ calibrate
    def calibrate_and_solve(self, batches: Iterable) -> None:
        """Hessians from the batches (one pass over the original model, or sequentially one per execution
        group on the partly compressed model), each pass's modules solved before the next pass."""
        report, kw = self.report, self.calibration_options
        if not self.c.sequential:
            t0 = time.perf_counter()
            calib = collect_hessians(self.model, _Stepped(batches, self.progress, "calibration"), self.targets, **kw)
            report.calibration_seconds = time.perf_counter() - t0
            report.calibration_passes = 1
            self.skipped.update(calib.skipped)
            # a size target solves every candidate width of every module
            candidates = len(self.q.bits) if self.allocator and self.q.bits else 1
            self.progress.start("solving", len(calib.hessians) * candidates)
            self.solve(calib.hessians)  # batched by width (and shared over ranks); each H freed once used
        else:
            first = next(iter(batches), None)
            if first is None:
                raise ValueError("compress_model: calibration_batches is empty")
            groups = execution_groups(self.model, first, self.targets, self.forward_fn)
            if self.reduce_fn is not None:
                _check_same_groups(groups, self.targets, self.reduce_fn)
            self.progress.start("sequential", len(groups))
            for group in groups:
                self.progress.step(", ".join(group))
                t0 = time.perf_counter()
                modules = {name: self.targets[name] for name in group}
                if self.match_outputs and self.compressed:  # (before the first compressed module nothing drifts)
                    calib = collect_matched(
                        self.model, batches, modules, who="compress_model",
                        full_precision=lambda: _original_weights(self.backups, self.compressed), **kw,
                    )
                    report.calibration_passes += 1
                else:
                    calib = collect_hessians(self.model, batches, modules, **kw)
                report.calibration_seconds += time.perf_counter() - t0
                report.calibration_passes += 1
                self.skipped.update(calib.skipped)
                self.solve({name: calib.hessians.pop(name) for name in group if name in calib})
        if self.waiting:  # tied weights some of whose users never got a Hessian: solved with those that did
            self.solve({name: self.waiting.pop(name) for name in list(self.waiting)}, force=True)

    # ------------------------------------------------------------------------------ prepare
    def prepare(self, hessians: dict[str, LayerHessian], force: bool = False) -> dict[str, LayerHessian]:
        """The Hessians ready to solve, by solving name. A weight shared by several targets waits until all
        its users' Hessians are in (``force``: those that came) and is solved once on their sum."""
        ready: dict[str, LayerHessian] = {}
        for name, lh in hessians.items():
            users = [u for u in self.tied.get(name, [name]) if u in self.targets]  # target users of this weight
            if len(users) == 1:
                ready[name] = lh
                if name in self.tied:  # one module under several names: its report entry needs its Hessian
                    self.shared[name] = {name: lh}
                continue
            self.waiting[name] = lh
            if not force and any(u not in self.waiting and u not in self.skipped for u in users):
                continue  # solved when the last user's Hessian comes in (or the others are skipped)
            lhs = {u: self.waiting.pop(u) for u in users if u in self.waiting}
            first = next(iter(lhs))
            self.shared[first] = lhs
            ready[first] = _summed_hessians(first, list(lhs.values()), self.targets[first].weight)
        return ready

    # ------------------------------------------------------------------------------ solve / allocate
    def solve(self, hessians: dict[str, LayerHessian], force: bool = False) -> None:
        """Solve the ready modules (batched by width, shared over ranks) and write their weights back; with
        a size target, put every candidate into the allocator's database instead."""
        ready = self.prepare(hessians, force)
        if self.allocator is not None:  # a size target: every candidate now, the choice once all are in
            self.add_candidates(ready)
            return
        for out in solve_modules(ready, self.targets, self.settings, distributed=self.distributed,
                                 keep_results=self.keep_results):
            self.progress.step(out.name)
            self.apply(out)

    def add_candidates(self, ready: dict[str, LayerHessian]) -> None:
        """Every candidate of these weights into the allocator's database. Widths: the solving stage once
        per candidate width (modules of one input width batched into one solver call, shared over ranks),
        every solution kept on the CPU, its cost the size its report entry gives. Sparsity levels: one
        greedy OBS pass per module prices every level (its trace); a level's kept weights are solved when
        an assignment needs them."""
        if not ready:
            return
        allocator, targets, keep_results = self.allocator, self.targets, self.keep_results
        signals = {}
        for name, lh in ready.items():
            W = targets[name].weight.detach()
            signals[name] = tied_objective(W, W, lh)[1]  # trace(W H W^T): the search's relative weighting
        unit = allocator.unit_kind
        if self.q.bits is not None:
            t0 = time.perf_counter()
            solutions: dict[str, list[Solved]] = {name: [] for name in ready}
            for b in self.q.bits:
                for out in solve_modules(dict(ready), targets, replace(self.settings, bits=b),
                                         distributed=self.distributed, keep_results=keep_results):
                    self.progress.step(f"{out.name} at {b} bits")
                    out.weight = out.weight.cpu()  # every candidate of every module: on the CPU until chosen
                    out.results = [to_cpu(x) for x in out.results] if keep_results else []
                    solutions[out.name].append(out)
            seconds = (time.perf_counter() - t0) / len(ready)
            for name, sols in solutions.items():
                m = targets[name]
                allocator.add(name, m, signals[name], [solved_cost(m, o.report, unit) for o in sols],
                              [o.report.loss for o in sols], sols.__getitem__, seconds)
            return
        levels = allocator.options
        for name, lh in ready.items():
            t0 = time.perf_counter()
            m = targets[name]
            W = m.weight.detach()
            dt = torch.float64 if W.dtype == torch.float64 else torch.float32
            # one greedy pass gives every level; the float64 Hessians: the solver scales them into float32
            traces = [obs_prune_trace(Wb.to(dt), lh.hessians[i].to(device=W.device), damp=self.q.damp)
                      for i, Wb in enumerate(lh.weight_blocks(W))]
            self.progress.step(name)
            allocator.add(
                name, m, signals[name], [allocator.option_cost(m, s) for s in levels],
                [sum(t.loss(s) for t in traces) for s in levels],
                lambda k, name=name, lh=lh, traces=traces: self.prune_level(name, lh, levels[k], traces),
                time.perf_counter() - t0,
            )

    def prune_level(self, name: str, lh: LayerHessian, level: float, traces) -> Solved:
        """Module ``name`` pruned to ``level`` from its OBS traces, through the solving stage."""
        q = self.q
        p = prepare_module(name, self.targets[name], lh, q.group_size, q.damp, sparsity=level, traces=traces)
        Q, rep, results, fmt, n_pruned = quantize_modules(
            [p], None, q.solver, q.symmetric, q.mse, q.damp, self.settings.scale_dtype, self.c.max_memory,
            sparsity=level)[0]
        return Solved(name, Q, rep, results, n_pruned, fmt)

    def allocate(self, batches: Iterable, heldout) -> None:
        """The size target's choice over the database (judged on ``heldout``, see :func:`heldout_split`),
        its solutions written back."""
        allocator = self.allocator
        fixed = _fixed_bytes(self.all_targets, {u.name for u in allocator.units}, self.model, self.q.include,
                             self.q.exclude)
        choice = allocator.choose(self.model, batches, self.set_weight, fixed=fixed, forward_fn=self.forward_fn,
                                  reduce_fn=self.reduce_fn, progress=self.progress, heldout=heldout)
        for u in allocator.units:
            self.apply(u.solution(choice.assignment[u.name]))
        self.report.allocation = choice.summary

    # ------------------------------------------------------------------------------ apply
    def set_weight(self, name: str, Q: Tensor) -> None:
        """Write ``Q`` into target ``name``'s weight, its original backed up once."""
        weight = self.targets[name].weight
        if id(weight) not in self.backups:
            self.backups[id(weight)] = (weight, weight.detach().to("cpu", copy=True))
        weight.copy_(Q.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))

    def apply(self, out: Solved) -> None:
        """A solved weight written into its module and entered in the report: under each of its names, each
        target user of a shared weight with its own share of the objective."""
        report, model = self.report, self.model
        name, rep, m = out.name, out.report, self.targets[out.name]
        Q = out.weight.to(m.weight.device)  # a size target's database holds its candidates on the CPU
        lhs = self.shared.pop(name, None)
        reps = [rep]
        aliases: list[str] = []
        if name in self.tied:  # the weight under each of its names, each target user with its own objective
            W, reps = m.weight.detach(), []
            for u in self.tied[name]:
                mod = model.get_submodule(u)
                if lhs is not None and u in lhs:
                    loss, signal = tied_objective(W, Q.reshape(W.shape), lhs[u])
                    reps.append(replace(
                        rep, name=u, kind=type(mod).__name__, n_samples=lhs[u].n_samples, loss=loss,
                        rel_error=relative_error(loss, signal), seconds=rep.seconds if u == name else 0.0,
                        bytes_before=module_bytes(mod),
                        bytes_after=module_bytes(mod) - module_bytes(m) + rep.bytes_after,
                    ))
                elif mod is m:  # the same module under another name: one entry (one Hessian), both names
                    aliases.append(u)
                else:  # a user whose use of the weight no Hessian measured: not a target, or not called
                    self.uncounted.append(f"'{u}' ({type(mod).__name__}, sharing the weight of '{name}')")
                    self.skipped.pop(u, None)  # its weight is quantized: it is not left in full precision
            for r in reps:
                r.tied = tuple(x.name for x in reps if x is not r) + tuple(aliases)
        weight = m.weight
        self.set_weight(name, Q)
        if self.match_outputs:
            self.compressed[id(weight)] = weight.detach().to("cpu", copy=True)
        report.modules.extend(reps)
        report.quantized_weights += weight.numel()
        report.pruned_weights += out.n_pruned
        report.quantized_weight_bits += rep.weight_bits
        if rep.bits is not None and rep.method == "scalar":
            report.quantized_code_bits += rep.bits * weight.numel()
        for u in [r.name for r in reps] + aliases:  # every module holding the weight carries its format
            self.formats[u] = out.format
        if self.keep_results:  # under every name the state_dict holds the weight under (export packs each)
            for u in [r.name for r in reps] + aliases:
                report.results[u] = [to_cpu(x) for x in out.results]

    def restore_originals(self) -> None:
        """Every written weight back to its original (a shared weight once: one backup per Parameter)."""
        with torch.no_grad():
            for weight, original in self.backups.values():
                weight.copy_(original)

    # ------------------------------------------------------------------------------ report
    def finish(self) -> CompressionReport:
        """The formats recorded on the modules; the report's skipped modules, model order, sizes, widths and
        what a size target reached; the warnings about weights left in full precision or measured in part."""
        model, report, skipped, q = self.model, self.report, self.skipped, self.q
        for name, fmt in self.formats.items():  # the model carries its quantization state (formats.record)
            set_format(model.get_submodule(name), fmt)
        projections = unquantized_projections(model, q.include, q.exclude)
        skipped.update({n: reason for n, (reason, _) in projections.items()})
        order = []  # model order: a module, then the attention projections it holds
        for n, _ in model.named_modules():
            order += [n] if n in self.all_targets else []
            order += [p for p in projections if p.rpartition(".")[0] == n]
        report.skipped = {n: skipped[n] for n in order if n in skipped}
        _in_model_order(report, order)
        done = {rep.name: rep for rep in report.modules}
        counted: set[int] = set()  # a weight shared by several targets is stored once: counted once
        for name, m in self.all_targets.items():  # skipped targets stay fp32: same size before and after
            before = done[name].bytes_before if name in done else module_bytes(m)
            after = done[name].bytes_after if name in done else module_bytes(m)
            if id(m.weight) in counted:
                before = after = module_bytes(m) - m.weight.numel() * FP32_BYTES  # its bias only
            counted.add(id(m.weight))
            report.bytes_before += before
            report.bytes_after += after
        for _, size in projections.values():
            report.bytes_before += size
            report.bytes_after += size
        report.full_precision = full_precision_modules(model, self.all_targets, projections)
        report.model_bytes = parameter_bytes(model)
        if isinstance(q.bits, Mapping) or (self.allocator is not None and q.bits is not None):
            report.bits = {r.name: r.bits for r in report.modules}
        if report.allocation is not None:  # what the target measures, from the report's own totals
            report.allocation.sizes_from(report)
            a = report.allocation
            if a.target != "target_sparsity" and a.achieved > a.value * (1 + 1e-12):
                warnings.warn(f"compress_model: the allocation for {a.target}={a.value:g} reached {a.achieved:.6g} "
                              "(weights shared with modules outside the targets are counted differently)",
                              stacklevel=3)
        report.seconds = time.perf_counter() - self.t_start
        if self.uncounted:
            warnings.warn(
                "compress_model: these modules use a quantized shared weight, but no Hessian measured their use "
                "of it (not a target, or never called), so its objective leaves them out: "
                + ", ".join(self.uncounted),
                CalibrationWarning,
                stacklevel=3,
            )
        if report.skipped:
            warnings.warn(full_precision_message("compress_model", report.skipped), CalibrationWarning, stacklevel=3)
        return report


# every flat keyword of the two sections, with type and default, in the signature and the docstring
compress_model.__signature__ = flat_signature(compress_model, ("quantization", "calibration"),
                                              defaults={"bits": DEFAULT_BITS})
if compress_model.__doc__:  # (python -OO strips docstrings)
    compress_model.__doc__ += "\n    Options:\n" + options_doc(("quantization", "calibration"),
                                                              skip=("calibration_batches",)) + "\n"


def _sequential_at_allocated_widths(model: nn.Module, batches, cfg: CompressionConfig, targets, eval_batches=None,
                                    **kw):
    """A width target with ``sequential=True``: the widths are chosen on the database of one calibration of
    the full-precision model (as without ``sequential``), then the model, restored, is compressed
    sequentially (with output matching by default) at those widths, on the batches the Hessians came from
    (with the held-out ones, unless ``allocation_refit=False``). The size depends on the widths only, so the
    target holds; the allocation's error estimates are those of the one-pass solutions."""
    q = cfg.quantization
    every_batch = list(_materialize(batches))
    fit, heldout = heldout_split(every_batch, eval_batches, q)
    if heldout is None:  # nothing held out (announced once): the one-pass run judges on the calibration batches
        cfg = replace(cfg, quantization=replace(q, allocation_holdout=0.0))
    originals = {id(m.weight): (m.weight, m.weight.detach().to("cpu", copy=True)) for m in targets.values()}
    one_pass = replace(cfg, calibration=replace(cfg.calibration, sequential=False, match_outputs=None))
    chosen = compress_model(model, fit, config=one_pass, eval_batches=heldout,
                            **{**kw, "keep_results": False})
    with torch.no_grad():
        for weight, original in originals.values():
            weight.copy_(original)
    batches = every_batch if q.refits_widths else fit
    how = f"compressed sequentially at the chosen widths on {len(batches)} of {len(every_batch)} calibration batches"
    if len(fit) < len(batches):
        how = f"compressed sequentially at the chosen widths on all {len(batches)} calibration batches (refit)"
    return _at_chosen_widths(model, batches, cfg, targets, chosen, how, **kw)


def _at_chosen_widths(model: nn.Module, batches, cfg: CompressionConfig, targets, chosen: CompressionReport,
                      how: str, **kw):
    """The model, holding its original weights again, compressed at the widths ``chosen`` allocated (with
    ``cfg``'s calibration: sequentially, or on every batch: ``allocation_refit``); its report carries
    ``chosen``'s allocation summary (whose measured errors are those of ``chosen``'s solutions), ``how``
    saying how the returned weights were solved instead."""
    q = cfg.quantization
    for m in targets.values():
        drop_format(m)
    widths = {**{name: b for name, b in chosen.bits.items() if b is not None}, "*": min(q.bits)}
    at_widths = replace(cfg, quantization=replace(q, bits=widths, target_bits=None, target_size_mb=None))
    report = compress_model(model, batches, config=at_widths, **kw)
    report.allocation = chosen.allocation
    report.allocation.sizes_from(report)
    report.allocation.refit = how
    report.seconds += chosen.seconds
    report.calibration_seconds += chosen.calibration_seconds
    report.calibration_passes += chosen.calibration_passes
    return report


class _Stepped:
    """The batches, re-iterable, with a progress step per batch of every pass."""

    def __init__(self, batches: Iterable, progress: Progress, stage: str) -> None:
        self.batches, self.progress, self.stage = batches, progress, stage

    def __iter__(self):
        self.progress.start(self.stage, len(self.batches) if isinstance(self.batches, Sized) else None)
        for i, batch in enumerate(self.batches):
            self.progress.step(f"batch {i + 1}")
            yield batch


def _in_model_order(report: CompressionReport, order: list[str]) -> None:
    """report.modules (and report.results) in model order: modules solved in batches finish out of it."""
    where = {n: i for i, n in enumerate(order)}
    report.modules.sort(key=lambda rep: where.get(rep.name, len(where)))
    if report.results is not None:
        report.results = {n: report.results[n] for n in sorted(report.results, key=lambda n: where.get(n, len(where)))}
