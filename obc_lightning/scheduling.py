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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from obc_lightning.calibration import LayerHessian
from obc_lightning.reporting import ModuleReport

# d x d copies one group holds while its batch is solved (see the module docstring)
COPIES_PER_GROUP = 8


@dataclass(frozen=True)
class SolveSettings:
    """How every module is solved (the quantization options of ``compress_model``)."""

    method: str = "scalar"
    bits: int | None = 4
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


def check_distributed(who: str, distributed: bool, reduce_fn) -> None:
    """``distributed=True`` needs torch.distributed initialized (the default process group) and a
    ``reduce_fn``: the ranks must hold the same Hessians (and agree on which modules have one)."""
    from obc_lightning.checks import check_flags

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
    from obc_lightning.compress import _pq_module, per_module

    if s.method != "scalar":  # product quantization: one codebook per module, per module
        for name in list(hessians):
            m = targets[name]
            b, k = per_module(s.block_size, name, "block_size"), per_module(s.n_centroids, name, "n_centroids")
            Q, rep, res = _pq_module(name, m, hessians.pop(name), s.method, b, k, s.damp, s.scale_dtype, s.seed)
            yield Solved(name, Q, rep, [res], 0)
        return
    for chunk in _batches(hessians, targets, s, batch_by_width):
        yield from _solve_chunk(chunk, hessians, targets, s)


def _batches(hessians, targets, s: SolveSettings, batch_by_width: bool) -> list[list[str]]:
    """The modules in groups solved together: same (d, compute dtype, device), in order of first
    appearance, cut where the group's d x d copies would pass half the solver budget."""
    from obc_lightning.compress import solver_budget
    from obc_lightning.solvers.common import default_memory_budget

    if not batch_by_width or s.bits is None:  # prune only: no quantization to batch
        return [[name] for name in hessians]
    keys: dict[tuple, list[str]] = {}
    for name, lh in hessians.items():
        w = targets[name].weight
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        keys.setdefault((lh.hessians.shape[-1], dt, w.device), []).append(name)
    out = []
    for (d, dt, device), names in keys.items():
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


def _solve_chunk(names: list[str], hessians, targets, s: SolveSettings) -> Iterator[Solved]:
    from obc_lightning.compress import _prepare_module, _quantize_modules
    from obc_lightning.reporting import SCALE_BYTES, ZERO_BYTES

    prepared = [
        _prepare_module(n, targets[n], hessians.pop(n), s.group_size, s.damp, sparsity=s.sparsity, n_m=s.n_m)
        for n in names
    ]
    done = _quantize_modules(prepared, s.bits, s.solver, s.symmetric, s.mse, s.damp, s.scale_dtype, s.max_memory,
                             s.sparsity, s.n_m)
    for name, (Q, rep, results, n_scales, n_pruned) in zip(names, done):
        m = targets[name]
        rep.weight_bits = (32 if s.bits is None else s.bits) * m.weight.numel() + 8 * (
            SCALE_BYTES + ZERO_BYTES) * n_scales
        yield Solved(name, Q, rep, results, n_pruned)


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
    from obc_lightning.compress import _to_cpu

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
            out.results = [_to_cpu(r) for r in out.results] if keep_results else []
            own[out.name] = out
    except Exception as e:  # raised on every rank below, not only here (the others would wait forever)
        error = e
    # every rank's report entries (and results) and failures, in one collective
    meta = {n: (o.report, o.results, o.n_pruned) for n, o in own.items()}
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
        rep, results, n_pruned = gathered[r][1][n]
        yield Solved(n, buf, rep, results, n_pruned)
        own.pop(n, None)
    # the caller has written every weight: the ranks must now hold the same bits
    sums = torch.stack([_bits_checksum(targets[n].weight) for n in names]).reshape(-1)
    if not _agree(sums.to(_comm_device(sums))):
        raise RuntimeError(
            "compress_model: after distributed solving the ranks hold different quantized weights; the "
            "broadcast of the solved weights did not reach every rank intact"
        )
