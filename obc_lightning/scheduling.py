"""Which modules are solved together, and where: layers batched by width, and shared out over DDP ranks.

:func:`solve_modules` is the solving stage of :func:`~obc_lightning.compress.compress_model` (no
calibration, no writing back): it takes the modules' Hessians and yields each module's new weight and
report entry.

- **Batched by width.** With a scalar grid and ``bits`` set, modules whose groups have the same input
  width d (and compute dtype and device) go through one
  :func:`~obc_lightning.solvers.quantize.quantize_weights` call: one column loop per solver for all their
  rows, so a network's many small layers fill a GPU together instead of one after the other. Each
  result equals what the module gets alone (same codes, bit for bit: the rows are independent and take
  the same steps). Pruning (``sparsity`` / ``n_m``) runs per module first, then the kept weights are
  quantized in the batch; prune-only (``bits=None``) and product quantization run per module.
  A batch holds about 8 d x d copies per group (the Hessian in the compute dtype, the damped one, its
  inverse, GPTQ's factor, the stacks) at once: batches are cut so that those fit in half the solver
  budget (``max_memory``; default half the free GPU memory, 1 GiB on CPU); the solvers' row batches
  span the batch's layers within the budget.
- **Sharded over ranks** (``distributed=True`` with an initialized ``torch.distributed`` default group of
  more than one process). Every rank holds the same Hessians (the calibration all-reduced them), so the
  ranks split the modules, balanced by cost (rows * d^3 of every group: the downdates) with the greedy
  longest-processing-time rule, each solves its share (batched by width), then every module's new weight
  is broadcast from its owner and its report entry (and solver results) gathered from it: every rank ends
  with bit-identical weights and identical report entries, checked at the end (the weights' bit patterns
  compared over ranks). A failure on one rank is raised on every rank. The plan depends only on names
  and shapes, and is checked to be the same on every rank before anything is solved.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from obc_lightning.calibration import LayerHessian, MatchedHessian
from obc_lightning.checks import check_flags
from obc_lightning.formats.bits import FP32_BYTES, dtype_name
from obc_lightning.formats.nm import conv_nm_group_index
from obc_lightning.formats.schemes import PQScheme, ScalarScheme, SparseMaskScheme, StorageScheme, kind_of, scheme_of
from obc_lightning.reporting import ModuleReport
from obc_lightning.selection import per_module
from obc_lightning.solvers.common import default_memory_budget, hessian_unit, layer_objective
from obc_lightning.solvers.match import matched_objective, matched_weight
from obc_lightning.solvers.pq import product_quantize
from obc_lightning.solvers.prune import obs_prune
from obc_lightning.solvers.quantize import quantize_weights

# d x d copies one group holds while its batch is solved (see the module docstring)
COPIES_PER_GROUP = 8


@dataclass(frozen=True)
class SolveSettings:
    """How every module is solved (the quantization options of ``compress_model``)."""

    method: str = "scalar"
    bits: int | Mapping[str, int] | None = 4  # a mapping: {module name or pattern: bits}
    solver: str = "auto"
    group_size: int | None = None
    symmetric: bool = False
    mse: bool = True
    damp: float = 0.01
    scale_dtype: torch.dtype | None = torch.float16
    sparsity: float | None = None
    n_m: tuple[int, int] | None = None
    block_size: int | Mapping[str, int] = 8
    n_centroids: int | Mapping[str, int] = 256
    seed: int = 0
    max_memory: int | Mapping[str, int] | None = None


@dataclass
class Solved:
    """One module's outcome: its new weight (the module's shape), report entry, solver results and
    number of pruned weights."""

    name: str
    weight: Tensor
    report: ModuleReport  # weight_bits set
    results: list
    n_pruned: int
    format: object = None  # the storage scheme the weight is in (obc_lightning.formats), recorded on the module


# ------------------------------------------------------------------ one module through the solvers
def module_bytes(m: nn.Module) -> int:
    """fp32 bytes of the module's weight and bias."""
    return (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) * FP32_BYTES


def relative_error(loss: float, signal: float) -> float:
    """trace(dW H dW^T) / trace(W H W^T) from loss = 1/2 trace(dW H dW^T) and signal = trace(W H W^T)."""
    return 2 * loss / signal if signal > 0 else (0.0 if loss == 0 else float("inf"))


def nm_group_index_of(m: nn.Module, n_m):
    """Conv weights prune N:M along input channels at each kernel position; Linear along its inputs."""
    if n_m is None or not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return None
    return conv_nm_group_index(m.in_channels // m.groups, math.prod(m.kernel_size), n_m[1]).to(m.weight.device)


def solver_budget(max_memory: int | Mapping[str, int] | None, device: torch.device) -> int | None:
    """The solvers' share of ``max_memory`` on ``device`` (an int, or the mapping's entry; None: default)."""
    if isinstance(max_memory, Mapping):
        return max_memory.get(str(device))
    return max_memory


@dataclass
class PreparedModule:
    """One module between its (per-module) pruning and its (possibly batched) quantization."""

    name: str
    module: nn.Module
    lh: LayerHessian
    group_size: int | None  # None where one group would span the whole row
    blocks: list[tuple[Tensor, Tensor, Tensor]]  # per conv group: (W_i, pruned W_i, H_i) in the compute dtype
    pruned: int
    damp: float
    seconds: float  # spent on this module alone so far
    target: Tensor | None = None  # output matching: W* (the weight's shape), which the blocks hold
    unit: float = 1.0  # the blocks hold H / unit (see hessians_in): their losses are in units of ``unit``


def matched_target(name: str, m: nn.Module, lh: LayerHessian, damp: float) -> Tensor | None:
    """Output matching: W* = W C^T H̃^-1 per conv group (:func:`~obc_lightning.solvers.match.matched_weight`),
    in the weight's shape; None where the inputs did not drift (C = H̃: W* = W, the plain problem)."""
    if not (isinstance(lh, MatchedHessian) and lh.drift):
        return None
    W = m.weight.detach()
    blocks = []
    for i, Wb in enumerate(lh.weight_blocks(W)):
        what = f"module '{name}'" + (f" (group {i})" if lh.groups > 1 else "")
        Wstar, _ = matched_weight(Wb, lh.cross[i], lh.hessians[i], damp, fn="compress_model", what=what)
        blocks.append(Wstar)
    return torch.cat(blocks).reshape(W.shape)


def matched_loss(lh: MatchedHessian, weight: Tensor) -> float:
    """The loss of ``weight`` against the full-precision outputs, summed over rows and conv groups:
    1/2 * 2/N ||X w - X̃ q||^2 per row (:func:`~obc_lightning.solvers.match.matched_objective`)."""
    return sum(float(matched_objective(b, lh.cross[i], lh.energy[i], lh.hessians[i]).sum())
               for i, b in enumerate(lh.weight_blocks(weight)))


def _report_matched(rep: ModuleReport, lh: LayerHessian, Q: Tensor, target: Tensor | None) -> None:
    """With output matching, the report's loss is against the full-precision outputs (+ drift_loss)."""
    if target is not None:
        rep.loss, rep.drift_loss = matched_loss(lh, Q), matched_loss(lh, target)
        rep.rel_error = relative_error(rep.loss, float(lh.energy.sum()))  # signal: trace(W H W^T)


def hessians_in(lh: LayerHessian, dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], float]:
    """The module's Hessians in the solvers' ``dtype`` and the unit they are in: divided by the power of 4
    :func:`~obc_lightning.solvers.common.hessian_unit` of all of them (in float64, exact) before they are
    rounded, so that activations of any scale (1e-23 or 1e20) reach the solvers as the same problem
    instead of underflowing or overflowing float32. Losses on them are multiplied back by ``unit``."""
    unit = hessian_unit(lh.hessians)
    return [(h if unit == 1.0 else h / unit).to(device=device, dtype=dtype) for h in lh.hessians], unit


def prepare_module(name, m, lh: LayerHessian, group_size, damp, sparsity=None, n_m=None,
                   traces=None) -> PreparedModule:
    """Every group's (W_i, H_i) in the compute dtype, pruned first with OBS when ``sparsity`` / ``n_m``
    (unstructured: from the groups' :class:`~obc_lightning.solvers.prune.PruneTrace` when ``traces``
    are given, the same result without a second greedy pass). With output matching (a drifted
    :class:`~obc_lightning.calibration.MatchedHessian`) W_i is the least-squares target W*_i on H̃_i
    (:func:`matched_target`)."""
    t0 = time.perf_counter()
    target = matched_target(name, m, lh, damp)
    W = m.weight.detach() if target is None else target
    if group_size is not None and group_size >= lh.hessians.shape[-1]:
        group_size = None  # one group spans the whole row: per-channel (small layers of a grouped config)
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    group_index = nm_group_index_of(m, n_m)
    blocks, pruned, damp_used = [], 0, 0.0
    hessians, unit = hessians_in(lh, dt, W.device)
    for i, Wb in enumerate(lh.weight_blocks(W)):
        Wb = Wb.to(dt)
        H = hessians[i]
        Pb = Wb
        if sparsity is not None or n_m is not None:
            pres = (traces[i].at(sparsity) if traces is not None else
                    obs_prune(Wb, H, sparsity=sparsity, n_m=n_m, damp=damp, group_index=group_index))
            Pb, pruned, damp_used = pres.pruned_matrix, pruned + int((~pres.mask).sum()), max(damp_used, pres.damp)
        blocks.append((Wb, Pb, H))
    return PreparedModule(name, m, lh, group_size, blocks, pruned, damp_used, time.perf_counter() - t0, target,
                          unit)


def finish_module(p: PreparedModule, results: list, bits, n_m, prune: bool, solve_seconds: float):
    """The new weight and the report of a prepared module from its groups' results (empty: prune only);
    ``solve_seconds``: its share of the solver time. Returns Q (weight's shape, compute dtype), the report,
    the results, the weight's format (:mod:`obc_lightning.formats`) and the number of pruned weights."""
    t0 = time.perf_counter()
    m, W = p.module, p.module.weight.detach()
    Qs = []
    loss = 0.0
    signal = 0.0  # sum_rows w H w^T = trace(W H W^T)
    damp_used = p.damp
    rows_won: dict[str, int] = {}
    for i, (Wb, Pb, H) in enumerate(p.blocks):
        if bits is None:
            Qb = Pb
        else:  # quantize_weight keeps exact zeros at 0: the mask survives
            res = results[i]
            Qb = res.quantized_matrix
            damp_used = max(damp_used, res.damp)
            for k, v in res.solver_rows.items():
                rows_won[k] = rows_won.get(k, 0) + int(v)
        Qs.append(Qb)
        # the objective against the caller's weights: 1/2 trace((Q - W) H (Q - W)^T), H = unit * (the block's)
        loss += p.unit * (float(layer_objective(Wb, Qb, H).sum()) if prune else float(res.loss.double().sum()))
        signal += p.unit * float(2 * layer_objective(Wb, torch.zeros_like(Wb), H).sum())
        if bits is not None and p.unit != 1.0:  # the result's loss in the units of the module's Hessian
            res.loss = (res.loss.double() * p.unit).to(res.loss.dtype)
    Q = torch.cat(Qs, dim=0).reshape(W.shape)
    rel = relative_error(loss, signal)
    pruned = p.pruned
    # the format the weight is in (recorded on the module), and its size as save_quantized stores it by
    # default: N:M-pruned weights as their kept entries and positions, pruned float weights as float16
    # values, quantized unstructured-sparse weights as dense codes
    if bits is None:
        fmt = SparseMaskScheme() if n_m is None else SparseMaskScheme().with_n_m(n_m)
    else:
        fmt = ScalarScheme.from_grids([r.grid for r in results], n_m)
    nbytes, nbits = stored_size(fmt, m, Q.to(W.dtype), "float16")
    before = module_bytes(m)
    rep = ModuleReport(
        name=p.name,
        kind=type(m).__name__,
        shape=tuple(W.shape),
        bits=bits,
        groups=p.lh.groups,
        group_size=p.group_size,
        n_samples=p.lh.n_samples,
        loss=loss,
        rel_error=rel,
        seconds=p.seconds + solve_seconds + time.perf_counter() - t0,
        obc_rows=rows_won.get("obc", 0),
        gptq_rows=rows_won.get("gptq", 0),
        damp=damp_used,
        bytes_before=before,
        bytes_after=before - W.numel() * FP32_BYTES + nbytes,
        sparsity=pruned / W.numel(),
        weight_bits=nbits,
    )
    _report_matched(rep, p.lh, Q, p.target)
    rep.seconds = p.seconds + solve_seconds + time.perf_counter() - t0
    return Q, rep, results, fmt, pruned


def quantize_modules(prepared: list[PreparedModule], bits, solver, symmetric, mse, damp, scale_dtype, max_memory,
                      sparsity=None, n_m=None) -> list[tuple]:
    """Quantize the kept weights of prepared modules whose groups all have the same width d (and compute
    dtype, device): every group of every module in one :func:`~obc_lightning.solvers.quantize.quantize_weights`
    call, each result what the module gets alone. Its time is shared out by rows (the cost per row is
    the same at one d). Returns :func:`finish_module`'s tuple per module, in order."""
    prune = sparsity is not None or n_m is not None
    if bits is None:
        return [finish_module(p, [], bits, n_m, True, 0.0) for p in prepared]
    problems = [(Pb, H) for p in prepared for _, Pb, H in p.blocks]
    device = prepared[0].module.weight.device
    t0 = time.perf_counter()
    results = quantize_weights(
        problems, bits, solver=solver, group_size=prepared[0].group_size, symmetric=symmetric, mse=mse, damp=damp,
        scale_dtype=scale_dtype, max_memory=solver_budget(max_memory, device),
    )
    seconds = time.perf_counter() - t0
    rows = [sum(b[0].shape[0] for b in p.blocks) for p in prepared]
    out, k = [], 0
    for p, r in zip(prepared, rows):
        n = len(p.blocks)
        out.append(finish_module(p, results[k : k + n], bits, n_m, prune, seconds * r / sum(rows)))
        k += n
    return out


def quantize_module(name, m, lh: LayerHessian, bits, solver, group_size, symmetric, mse, damp, scale_dtype,
                     sparsity=None, n_m=None, max_memory=None):
    """Solve every group's (W_i, H_i): prune first (``sparsity`` / ``n_m``, OBS), then quantize the kept
    weights (``bits``; None: prune only). Returns Q (weight's shape, compute dtype), the report, the
    results, the number of scales and the number of pruned weights."""
    p = prepare_module(name, m, lh, group_size, damp, sparsity=sparsity, n_m=n_m)
    return quantize_modules([p], bits, solver, symmetric, mse, damp, scale_dtype, max_memory, sparsity, n_m)[0]


def stored_size(fmt: StorageScheme, m: nn.Module, weight: Tensor, scale_dtype: str) -> tuple[int, int]:
    """(bytes, bits before byte padding) of ``weight`` stored in ``fmt``: its scheme's size formula, the
    one the file writer's payload follows."""
    config = fmt.describe(kind_of(m), weight, scale_dtype=scale_dtype)
    scheme = scheme_of(config)
    return scheme.payload_nbytes(config), scheme.payload_bits(config)


def pq_module(name, m, lh: LayerHessian, method, block_size, n_centroids, damp, scale_dtype, seed):
    """Product-quantize one (ungrouped) module (with output matching: its target W*, see
    :func:`prepare_module`); returns Q, the report, the result and the weight's format."""
    t0 = time.perf_counter()
    target = matched_target(name, m, lh, damp)
    W = m.weight.detach() if target is None else target
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    Wm = W.reshape(W.shape[0], -1).to(dt)
    (H,), unit = hessians_in(lh, dt, W.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = product_quantize(
            Wm,
            H if method == "pq" else None,
            block_size=block_size,
            n_centroids=n_centroids,
            seed=seed,
            damp=damp,
            codebook_dtype=scale_dtype,
        )
    for w in caught:  # the solver's warnings, said of this module and in compress_model's argument names
        text = str(w.message).replace("product_quantize: ", "").replace("codebook_dtype=", "scale_dtype=")
        warnings.warn(f"compress_model: module '{name}': {text}", w.category, stacklevel=4)
    Q = res.quantized_matrix
    loss = unit * float(layer_objective(Wm, Q, H).sum())  # pq-kmeans' own loss is Euclidean: price it with H
    signal = unit * float(2 * layer_objective(Wm, torch.zeros_like(Wm), H).sum())
    fmt = PQScheme(res.codebook.detach().cpu(), block_size)
    # the codebook as it is exactly representable: in scale_dtype (float32 when not rounded)
    nbytes, nbits = stored_size(fmt, m, Q.reshape(W.shape), dtype_name(scale_dtype or torch.float32))
    before = module_bytes(m)
    rep = ModuleReport(
        name=name,
        kind=type(m).__name__,
        shape=tuple(W.shape),
        bits=None,
        groups=1,
        group_size=None,
        n_samples=lh.n_samples,
        loss=loss,
        rel_error=relative_error(loss, signal),
        seconds=time.perf_counter() - t0,
        damp=res.damp,
        bytes_before=before,
        bytes_after=before - W.numel() * FP32_BYTES + nbytes,
        method=method,
        block_size=block_size,
        n_centroids=n_centroids,
        weight_bits=nbits,
    )
    _report_matched(rep, lh, Q.reshape(W.shape), target)
    rep.seconds = time.perf_counter() - t0
    return Q.reshape(W.shape), rep, res, fmt


def tied_objective(W: Tensor, Q: Tensor, lh: LayerHessian) -> tuple[float, float]:
    """(1/2 trace((Q - W) H (Q - W)^T), trace(W H W^T)) of one module's Hessians, in float64; with output
    matching (a drifted MatchedHessian) the objective against its full-precision outputs."""
    if isinstance(lh, MatchedHessian) and lh.drift:
        return matched_loss(lh, Q), float(lh.energy.sum())
    loss = signal = 0.0
    for i, (Wb, Qb) in enumerate(zip(lh.weight_blocks(W), lh.weight_blocks(Q))):
        H = lh.hessians[i].to(device=W.device, dtype=torch.float64)
        Wb = Wb.to(torch.float64)
        loss += float(layer_objective(Wb, Qb.to(torch.float64), H).sum())
        signal += float(2 * layer_objective(Wb, torch.zeros_like(Wb), H).sum())
    return loss, signal




def to_cpu(res):
    """A solver result (QuantResult or PQResult) with every tensor field, and the grid, on the CPU."""
    moved = {f.name: getattr(res, f.name).cpu() for f in fields(res) if isinstance(getattr(res, f.name), Tensor)}
    if hasattr(res, "grid"):
        moved["grid"] = res.grid.to("cpu")
    return replace(res, **moved)


def check_distributed(who: str, distributed: bool, reduce_fn) -> None:
    """``distributed=True`` needs torch.distributed initialized (the default process group) and a
    ``reduce_fn``: the ranks must hold the same Hessians (and agree on which modules have one)."""
    check_flags(who, distributed=distributed)
    if distributed and reduce_fn is None:
        raise ValueError(
            f"{who}: distributed=True needs reduce_fn (summing the calibration sums over the ranks): every rank "
            "must hold the same Hessians for the modules it solves for the others"
        )
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            f"{who}: distributed=True shares the solving out over the processes of torch.distributed's default "
            "group, but no process group is initialized (torch.distributed.init_process_group)"
        )


def solve_modules(
    hessians: dict[str, LayerHessian],
    targets: Mapping[str, nn.Module],
    settings: SolveSettings,
    *,
    distributed: bool = False,
    keep_results: bool = False,
    batch_by_width: bool = True,
) -> Iterator[Solved]:
    """Solve the modules named in ``hessians`` (popped from it once used, to free them); yield a
    :class:`Solved` per module. Locally: as batches complete (model order within a batch); sharded: in
    the order of ``hessians`` once every rank is done. The caller writes each weight into its module
    before asking for the next (the sharded run checks, after the last, that the ranks' weights agree).
    ``batch_by_width=False`` solves one module at a time (for comparison)."""
    dist = torch.distributed
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    if world > 1 and len(hessians) > 1:
        yield from _solve_sharded(hessians, targets, settings, keep_results, batch_by_width)
    else:
        yield from _solve_local(hessians, targets, settings, batch_by_width)


# ------------------------------------------------------------------ local: batched by width
def _solve_local(hessians, targets, s: SolveSettings, batch_by_width: bool = True) -> Iterator[Solved]:
    if s.method != "scalar":  # product quantization: one codebook per module, per module
        for name in list(hessians):
            m = targets[name]
            b, k = per_module(s.block_size, name, "block_size"), per_module(s.n_centroids, name, "n_centroids")
            Q, rep, res, fmt = pq_module(name, m, hessians.pop(name), s.method, b, k, s.damp, s.scale_dtype, s.seed)
            yield Solved(name, Q, rep, [res], 0, fmt)
        return
    for chunk in _batches(hessians, targets, s, batch_by_width):
        yield from _solve_chunk(chunk, hessians, targets, s)


def _batches(hessians, targets, s: SolveSettings, batch_by_width: bool) -> list[list[str]]:
    """The modules in groups solved together: same (d, compute dtype, device, bits), in order of first
    appearance, cut where the group's d x d copies would pass half the solver budget."""
    if not batch_by_width or s.bits is None:  # prune only: no quantization to batch
        return [[name] for name in hessians]
    keys: dict[tuple, list[str]] = {}
    for name, lh in hessians.items():
        w = targets[name].weight
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        keys.setdefault((lh.hessians.shape[-1], dt, w.device, module_bits(s, name)), []).append(name)
    out = []
    for (d, dt, device, _), names in keys.items():
        budget = solver_budget(s.max_memory, device)
        budget = default_memory_budget(device) if budget is None else budget
        per_group = COPIES_PER_GROUP * d * d * torch.finfo(dt).bits // 8
        chunk, used = [], 0
        for name in names:
            need = hessians[name].groups * per_group
            if chunk and used + need > budget // 2:
                out.append(chunk)
                chunk, used = [], 0
            chunk.append(name)
            used += need
        out.append(chunk)
    return out


def module_bits(s: SolveSettings, name: str) -> int | None:
    """The width module ``name`` is quantized at (``s.bits``, or its entry of a per-module mapping)."""
    return per_module(s.bits, name, "bits")


def _solve_chunk(names: list[str], hessians, targets, s: SolveSettings) -> Iterator[Solved]:
    """Modules of one width d and one bits (a batch of :func:`_batches`) through one quantize call."""
    prepared = [
        prepare_module(n, targets[n], hessians.pop(n), s.group_size, s.damp, sparsity=s.sparsity, n_m=s.n_m)
        for n in names
    ]
    done = quantize_modules(prepared, module_bits(s, names[0]), s.solver, s.symmetric, s.mse, s.damp,
                            s.scale_dtype, s.max_memory, s.sparsity, s.n_m)
    for name, (Q, rep, results, fmt, n_pruned) in zip(names, done):
        yield Solved(name, Q, rep, results, n_pruned, fmt)


# ------------------------------------------------------------------ sharded over ranks
def module_cost(module: nn.Module, lh: LayerHessian) -> float:
    """rows * d^3 summed over the module's groups: the greedy downdates' arithmetic."""
    d = lh.hessians.shape[-1]
    return float(module.weight.shape[0]) * float(d) ** 3


def shard_plan(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Owner rank of every name: longest processing time first, each to the least loaded rank (ties: the
    lower rank; equal costs keep their order). Depends only on ``costs``: the same on every rank."""
    order = sorted(costs, key=lambda n: -costs[n])  # stable: equal costs keep their order
    load = [0.0] * world
    owner = {}
    for name in order:
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += costs[name]
    return owner


def _comm_device(like: Tensor) -> torch.device:
    """Where a collective on tensors like ``like`` runs: NCCL reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl" and like.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def _agree(codes: Tensor) -> bool:
    """Whether every rank holds the same int64 vector (all-reduced min == max), the same verdict on all."""
    dist = torch.distributed
    lo, hi = codes.clone(), codes.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def _bits_checksum(w: Tensor) -> Tensor:
    """Two int64 sums of the bit patterns of ``w`` (plain and position-weighted; wrapping on overflow)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[w.element_size()]
    b = w.detach().contiguous().reshape(-1).view(ints).to(torch.int64)
    pos = torch.arange(b.numel(), device=b.device) % 65521 + 1
    return torch.stack([b.sum(), (b * pos).sum()])


def _broadcast(t: Tensor, src: int) -> None:
    dev = _comm_device(t)
    if dev == t.device:
        torch.distributed.broadcast(t, src=src)
    else:
        on = t.to(dev)
        torch.distributed.broadcast(on, src=src)
        t.copy_(on)


def _solve_sharded(hessians, targets, s: SolveSettings, keep_results: bool, batch_by_width: bool):
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    names = list(hessians)
    owner = shard_plan({n: module_cost(targets[n], hessians[n]) for n in names}, world)
    like = targets[names[0]].weight
    index = {n: i for i, n in enumerate(targets)}
    plan = torch.full((len(targets),), -1, dtype=torch.int64)
    for n in names:
        plan[index[n]] = owner[n]
    if not _agree(plan.to(_comm_device(like))):
        raise ValueError(
            "compress_model: distributed solving needs the same modules with Hessians on every rank, but the "
            "ranks hold different sets (modules called depending on the data?); solve without distributed=True"
        )
    mine = {}
    for n in names:  # keep this rank's Hessians, free the others'
        lh = hessians.pop(n)
        if owner[n] == rank:
            mine[n] = lh
    own: dict[str, Solved] = {}
    error = None
    try:
        for out in _solve_local(mine, targets, s, batch_by_width):
            w = targets[out.name].weight
            out.weight = out.weight.to(dtype=w.dtype, device=w.device).reshape(w.shape).contiguous()
            out.results = [to_cpu(r) for r in out.results] if keep_results else []
            own[out.name] = out
    except Exception as e:  # raised on every rank below, not only here (the others would wait forever)
        error = e
    # every rank's report entries (and results) and failures, in one collective
    meta = {n: (o.report, o.results, o.n_pruned, o.format) for n, o in own.items()}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (None if error is None else f"{type(error).__name__}: {error}", meta))
    failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
    if error is not None:
        raise error
    if failed:
        r, msg = failed[0]
        raise RuntimeError(f"compress_model: rank {r} failed while solving its share of the modules: {msg}")
    for n in names:
        w = targets[n].weight
        r = owner[n]
        buf = own[n].weight if r == rank else torch.empty(w.shape, dtype=w.dtype, device=w.device)
        _broadcast(buf, r)
        rep, results, n_pruned, fmt = gathered[r][1][n]
        yield Solved(n, buf, rep, results, n_pruned, fmt)
        own.pop(n, None)
    # the caller has written every weight: the ranks must now hold the same bits
    sums = torch.stack([_bits_checksum(targets[n].weight) for n in names]).reshape(-1)
    if not _agree(sums.to(_comm_device(sums))):
        raise RuntimeError(
            "compress_model: after distributed solving the ranks hold different quantized weights; the "
            "broadcast of the solved weights did not reach every rank intact"
        )
