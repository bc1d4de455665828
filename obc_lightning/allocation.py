"""Mixed precision (or sparsity) to a size target: a loss database, an exact allocation, a weighting search, a fill.

``compress_model(model, batches, bits=(2, 3, 4, 8), target_bits=3.0)`` gives each module one of the
candidate widths so that the model meets the budget with the least output error. Four parts:

1. **The database** (the OBC paper's): from one calibration, every module (every weight, for tied ones)
   solved at every candidate, with its cost c_lk (integer: code bits, bytes or kept weights: the size its
   report entry gives, i.e. its storage scheme's payload, :mod:`obc_lightning.formats`) and its layer loss
   e_lk = 1/2 trace(dW H dW^T). Widths: one solve per width (the Hessian is shared; the caller batches
   the modules of one width through one solver call). Sparsity: one greedy OBS pass per module gives
   every level (:class:`~obc_lightning.solvers.prune.PruneTrace`), the kept weights of a level computed
   only when an assignment needs them.

2. **The allocation** for weights c_l > 0: minimise sum_l c_l e_l,k_l subject to sum_l cost_l,k_l <= budget,
   exactly, by dynamic programming over the layers on the Pareto frontier of (cost, loss) prefixes
   (:func:`pareto_allocate`): no size grid, integer costs. A prefix dominated by another (no more cost, no
   more loss) can be swapped for it in any completion without losing feasibility or loss, so keeping the
   non-dominated prefixes only is exact; prefixes that cannot be completed within budget (their cost plus
   the cheapest rest exceeds it) are dropped, and among prefixes that fit whatever follows (their cost
   plus the dearest rest is within budget) only the least-loss one is kept. Only if the frontier grows
   beyond ``max_points`` are costs merged in buckets of u, keeping the least loss of each bucket: the
   result then stays within the budget and is no worse than the optimum for budget - L·u (announced in
   the summary, ``exact=False``; never seen on the models measured).

3. **The weighting**: layer losses are not on one scale (a unit of loss in the first conv is not worth a
   unit in the classifier), so the c_l are fitted to the model's own output error (SPDY, Frantar &
   Alistarh 2022): the error E(k) of an assignment is measured by running batches through the model with
   those weights (MSE of the outputs relative to their energy, or KL of their softmax from the
   full-precision one; or any :class:`HeldOutMetric`); the search starts from c_l = 1 (raw losses) and
   c_l = 1 / trace(W H W^T) (relative errors), then perturbs log c at random layers, keeping what lowers
   E, for ``allocation_steps`` evaluations (an assignment already measured is not measured again).

4. **The fill**: widths come in steps, so the exact allocation often leaves part of the budget unused;
   single-layer moves to a dearer candidate that still fits are tried (most weighted loss saved per unit
   of cost first) and kept when they lower E, until none fits or none helps (:meth:`_Search.greedy_fill`).

E is measured on **held-out** batches, never the ones the Hessians came from (``compress_model``'s
``eval_batches``, or ``allocation_holdout`` of the calibration batches; the callback's validation data):
the layer solutions are fitted to the calibration batches, and judging them there rewards assignments
that fit those batches rather than the data the model will see. Every uniform assignment within the
budget is measured too, and the result is the assignment of least measured E: never worse on the
held-out measure than the best uniform width that fits. ``target_bits`` counts code bits per weight
(scales and zero points cost the same at every width), so ``target_bits=b`` admits uniform b-bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from obc_lightning.calibration import call_model, hessian_shape
from obc_lightning.formats.bits import FP32_BYTES
from obc_lightning.formats.schemes import ScalarScheme, SparseMaskScheme
from obc_lightning.reporting import AllocationSummary, ModuleReport

MAX_POINTS = 1 << 18  # frontier size beyond which costs are bucketed (see the module docstring)
MAX_STALE_TRIES = 50  # weightings in a row proposing only assignments measured already: the search stops


# ------------------------------------------------------------------------------------------ costs
# Before calibration (the reachable range) the costs are predicted from the storage schemes' size formulas;
# in the database each candidate's cost is its solved report entry's own size. The two agree (tested).
def bias_bytes(m: nn.Module) -> int:
    return m.bias.numel() * FP32_BYTES if m.bias is not None else 0


def quantized_cost(m: nn.Module, bits: int, group_size: int | None, unit: str) -> int:
    """The size of ``m``'s weight at ``bits`` (a dense scalar grid, fp16 scales and uint8 zero points:
    :class:`~obc_lightning.formats.schemes.ScalarScheme`): ``unit`` "code" (the integer codes alone,
    bits x weights: what ``target_bits`` counts), "bits" (the payload before byte padding, the report's
    ``weight_bits``) or "bytes" (the payload, ``bytes_after`` less the bias)."""
    if unit == "code":
        return bits * m.weight.numel()
    _, d, _ = hessian_shape(m)
    gs = None if group_size is None or group_size >= d else group_size  # as the solving stage does
    config = {"shape": list(m.weight.shape), "bits": bits, "group_size": gs, "scale_dtype": "float16"}
    return ScalarScheme.payload_bits(config) if unit == "bits" else ScalarScheme.payload_nbytes(config)


def removals(m: nn.Module, sparsity: float) -> int:
    """Weights a prune to ``sparsity`` removes from ``m`` (each conv group rounds its own count)."""
    g, d, _ = hessian_shape(m)
    return g * round(sparsity * (m.weight.shape[0] // g) * d)


def pruned_cost(m: nn.Module, sparsity: float, unit: str) -> int:
    """Kept weights ("kept") or the bytes of the pruned float weight ("bytes": a 1-bit mask and float16
    values, :class:`~obc_lightning.formats.schemes.SparseMaskScheme`). Weights that are zero already (or
    round to 0 in float16) are removed first, so the true count can only be lower: the budget holds."""
    kept = m.weight.numel() - removals(m, sparsity)
    if unit == "kept":
        return kept
    return SparseMaskScheme.payload_nbytes({"shape": list(m.weight.shape), "nnz": kept, "value_dtype": "float16"})


def solved_cost(m: nn.Module, rep: ModuleReport, unit: str) -> int:
    """c_lk of a solved candidate: its report entry's own size (the weight's storage scheme): the weight's
    code bits ("code"), stored bits ("bits"), its payload bytes ("bytes"), or its kept weights ("kept")."""
    if unit == "code":
        return rep.bits * m.weight.numel()
    if unit == "bits":
        return rep.weight_bits
    if unit == "bytes":
        return rep.bytes_after - bias_bytes(m)
    return m.weight.numel() - round(rep.sparsity * m.weight.numel())


def _unit(target: str, prune: bool) -> str:
    return {"target_bits": "code", "target_size_mb": "bytes", "target_sparsity": "kept"}[target] if not (
        prune and target == "target_size_mb") else "bytes"


def _options(q) -> list:
    """The candidate widths, or the candidate sparsity levels (prune-only)."""
    return list(q.bits) if q.bits is not None else list(q.sparsity)


def _cost(q, m: nn.Module, option, unit: str) -> int:
    return pruned_cost(m, option, unit) if q.bits is None else quantized_cost(m, option, q.group_size, unit)


def _budget(value: float) -> int:
    """floor(value), forgiving the float rounding of a value computed as an exact integer over N (a
    report's avg_bits times N): a relative 1e-12 is far below any meaningful size."""
    return math.floor(value * (1 + 1e-12))


def _describe(target: str, amount: float) -> str:
    if target == "target_bits":
        return f"{amount:.4f} code bits per weight"
    if target == "target_size_mb":
        return f"{amount:.4f} MB"
    return f"{amount:.2%} sparsity"


def _range_error(who: str, target: str, value: float, low: float, high: float, candidates) -> ValueError:
    if target == "target_sparsity":
        return ValueError(
            f"{who}: target_sparsity={value:g} is not reachable: the sparsity levels {candidates} reach at most "
            f"{high:.4%} (every module at its highest level); at least {low:.4%}"
        )
    return ValueError(
        f"{who}: {target}={value:g} is not reachable with the candidates {candidates}: the smallest achievable "
        f"is {_describe(target, low)} (every module at its smallest candidate), the largest "
        f"{_describe(target, high)}"
    )


def check_reachable(q, targets: Mapping[str, nn.Module], who: str, fixed_bytes: int = 0,
                    units: Iterable[str] | None = None) -> None:
    """Refuse a target that no assignment meets, naming the smallest and largest achievable sizes. Before
    calibration over every target (``fixed_bytes``: the biases and other fp32 bytes the size counts);
    after it over the modules solved."""
    target, value = q.target
    prune = q.bits is None
    unit = _unit(target, prune)
    names = list(targets if units is None else units)
    seen: set[int] = set()
    low = high = numel = 0
    for name in names:
        m = targets[name]
        if id(m.weight) in seen:  # a shared weight is stored once
            continue
        seen.add(id(m.weight))
        costs = [_cost(q, m, o, unit) for o in _options(q)]
        low, high, numel = low + min(costs), high + max(costs), numel + m.weight.numel()
    if target == "target_bits":
        lo, hi = low / numel, high / numel
        ok = _budget(value * numel) >= low
    elif target == "target_size_mb":
        lo, hi = (fixed_bytes + low) / 2**20, (fixed_bytes + high) / 2**20
        ok = _budget(value * 2**20) - fixed_bytes >= low
    else:  # kept weights: the most sparse assignment keeps `low`
        lo, hi = 1 - high / numel, 1 - low / numel
        ok = sparsity_budget(value, [targets[n] for n in names]) >= low
    if not ok:
        raise _range_error(who, target, value, lo, hi, tuple(_options(q)))


def sparsity_budget(sparsity: float, modules: Iterable[nn.Module]) -> int:
    """Kept weights allowed by ``target_sparsity``: what uniform pruning at that level keeps (each module
    rounding its count as :func:`~obc_lightning.solvers.prune.obs_prune` does), so that the uniform
    assignment is always within budget (the sparsity reached differs from the target by that rounding)."""
    seen: set[int] = set()
    kept = 0
    for m in modules:
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            kept += pruned_cost(m, sparsity, "kept")
    return kept


def fixed_bytes(targets: Mapping[str, nn.Module], extra: int = 0) -> int:
    """Bytes of the size that no choice changes, every target weight assumed solved: the biases (a
    shared weight's users each with their own bias) plus ``extra`` (fp32 weights left unquantized)."""
    return extra + sum(bias_bytes(m) for m in targets.values())


# ----------------------------------------------------------------------------------- allocation
def pareto_allocate(
    costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int, max_points: int = MAX_POINTS
) -> tuple[list[int], float, bool]:
    """argmin_k sum_l losses[l][k_l] subject to sum_l costs[l][k_l] <= budget, by dynamic programming over
    the Pareto frontier of (cost, loss) prefixes (see the module docstring for why it is exact).

    Returns (the candidate index of each layer, its total loss, exact); raises ValueError when even the
    cheapest assignment exceeds the budget. Cost: O(sum_l K_l · F_l) with F_l the frontier size (a few
    hundred points on ResNet-20 with four widths).
    """
    L = len(costs)
    min_rest, max_rest = [0] * (L + 1), [0] * (L + 1)
    for i in range(L - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + min(costs[i])
        max_rest[i] = max_rest[i + 1] + max(costs[i])
    if min_rest[0] > budget:
        raise ValueError(f"pareto_allocate: the cheapest assignment costs {min_rest[0]} > budget {budget}")
    C = torch.zeros(1, dtype=torch.long)
    E = torch.zeros(1, dtype=torch.float64)
    back: list[tuple[Tensor, int]] = []
    exact = True
    for i in range(L):
        c = torch.tensor(list(costs[i]), dtype=torch.long)
        e = torch.tensor(list(losses[i]), dtype=torch.float64)
        K = len(c)
        C2, E2 = (C[:, None] + c[None, :]).reshape(-1), (E[:, None] + e[None, :]).reshape(-1)
        src = torch.arange(C2.numel())
        ok = C2 + min_rest[i + 1] <= budget  # completable
        C2, E2, src = C2[ok], E2[ok], src[ok]
        o = torch.argsort(E2, stable=True)
        o = o[torch.argsort(C2[o], stable=True)]  # by cost, then loss
        C2, E2, src = C2[o], E2[o], src[o]
        keep = torch.ones_like(C2, dtype=torch.bool)  # strictly less loss than every cheaper prefix
        keep[1:] = E2[1:] < torch.cummin(E2, 0).values[:-1]
        C2, E2, src = C2[keep], E2[keep], src[keep]
        free = int((C2 + max_rest[i + 1] <= budget).sum())  # fit whatever follows: the last is best
        if free > 1:
            C2, E2, src = C2[free - 1:], E2[free - 1:], src[free - 1:]
        if C2.numel() > max_points:  # buckets of u in cost, the least loss (the last point) of each
            exact = False
            u = -(-int(C2[-1] - C2[0] + 1) // max_points)
            bucket = (C2 - C2[0]) // u
            last = torch.ones_like(bucket, dtype=torch.bool)
            last[:-1] = bucket[1:] != bucket[:-1]
            C2, E2, src = C2[last], E2[last], src[last]
        back.append((src, K))
        C, E = C2, E2
    j = C.numel() - 1  # losses decrease along the frontier: the last point is the least
    total = float(E[j])
    choice = [0] * L
    for i in range(L - 1, -1, -1):
        src, K = back[i]
        s = int(src[j])
        choice[i], j = s % K, s // K
    return choice, total, exact


# ------------------------------------------------------------------------------ output error
def _float_tensors(out) -> list[Tensor]:
    """The floating-point tensors of a model's output (a tensor, or mappings / sequences of them)."""
    if isinstance(out, Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _float_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _float_tensors(v)]
    return []


class OutputError:
    """The model's output error against its full-precision outputs on some batches (the calibration
    batches, or held-out ones).

    The outputs are what the model's ``forward`` returns (captured by a forward hook on the model, so the
    batches may run through any ``forward_fn`` that calls it), every floating-point tensor in it; the
    full-precision ones are kept on the CPU (taken at construction: the model must hold its original
    weights then). ``"mse"``: sum ||y - y0||^2 / sum ||y0||^2 over all of them; ``"kl"``: the mean over rows
    (all but the last dimension) of KL(softmax(y0) || softmax(y)). Under DDP the sums are all-reduced:
    every rank gets the same number. Runs in eval mode, without gradients. Lower is better (``mode``).
    """

    mode = "min"

    def __init__(self, model: nn.Module, batches: Iterable, metric: str, forward_fn=None, reduce_fn=None,
                 who: str = "compress_model", what: str = "calibration batches") -> None:
        self.model, self.batches, self.metric = model, batches, metric
        self.forward_fn, self.reduce_fn, self.who, self.what = forward_fn, reduce_fn, who, what
        self.name = f"output {metric}"
        self.reference: list[list[Tensor]] = []
        self.passes = 0
        self._run(lambda i, outs: self.reference.append([t.to("cpu", copy=True) for t in outs]))
        if not any(self.reference):
            raise ValueError(
                f"{who}: a size target compares the model's outputs with and without compression, but no "
                f"floating-point output came from the model's forward on the {what} (forward never "
                "called on the model itself, or it returns no tensor)"
            )

    @torch.no_grad()
    def _run(self, consume: Callable[[int, list[Tensor]], None]) -> None:
        captured: list[Tensor] = []
        handle = self.model.register_forward_hook(lambda mod, inp, out: captured.extend(_float_tensors(out)))
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            for i, batch in enumerate(self.batches):
                captured.clear()
                call_model(self.model, batch, self.forward_fn)
                consume(i, list(captured))
        finally:
            handle.remove()
            for m, training in modes.items():
                m.train(training)
        self.passes += 1

    def __call__(self) -> float:
        sums = torch.zeros(2, dtype=torch.float64)

        def consume(i: int, outs: list[Tensor]) -> None:
            ref = self.reference[i]
            if len(outs) != len(ref) or any(a.shape != b.shape for a, b in zip(outs, ref)):
                raise ValueError(f"{self.who}: the model's outputs on batch {i} of the {self.what} changed structure "
                                 "between passes; a size target needs the same outputs every pass")
            for y, y0 in zip(outs, ref):
                y, y0 = y.double(), y0.to(y.device).double()
                if self.metric == "kl":
                    logp0, logp = torch.log_softmax(y0, -1), torch.log_softmax(y, -1)
                    sums[0] += float((logp0.exp() * (logp0 - logp)).sum())
                    sums[1] += y0.numel() // max(y0.shape[-1], 1) if y0.dim() else 1
                else:
                    sums[0] += float((y - y0).square().sum())
                    sums[1] += float(y0.square().sum())

        self._run(consume)
        if self.reduce_fn is not None:
            dev = next(self.model.parameters()).device
            s = sums.to(dev)
            out = self.reduce_fn(s)
            sums = (s if out is None else out).cpu()
        num, den = float(sums[0]), float(sums[1])
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


@dataclass
class HeldOutBatches:
    """Batches the search judges assignments on, none of them in the Hessians: the model's output error
    on them (:class:`OutputError`, ``allocation_metric``). ``description`` names them in the report."""

    batches: list
    description: str


@dataclass
class HeldOutMetric:
    """A metric the search judges assignments on instead of an output error: ``evaluate()`` measures the
    model as it is (its weights are the assignment's), ``mode`` "min" (a loss) or "max" (an accuracy).
    The callback's is the user's ``monitor`` metric on its validation replay."""

    name: str
    evaluate: Callable[[], float]
    mode: str = "min"
    description: str = ""
    passes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"HeldOutMetric: mode must be 'min' or 'max', got {self.mode!r}")
        self.description = self.description or self.name

    def __call__(self) -> float:
        self.passes += 1
        return float(self.evaluate())


# -------------------------------------------------------------------------------- the database
@dataclass
class Unit:
    """One weight to allocate: a module, or a weight shared by several (solved once). ``losses[k]`` and
    ``costs[k]`` of candidate k; ``solution(k)`` gives the caller's solution of candidate k (its
    ``weight`` attribute: the new weight), solved once."""

    name: str
    module: nn.Module
    numel: int
    signal: float  # trace(W H W^T): the relative-error weighting of the search's second start
    costs: list[int]
    losses: list[float]
    solve: Callable[[int], tuple]
    solved: dict[int, tuple] = field(default_factory=dict)

    def solution(self, k: int) -> tuple:
        if k not in self.solved:
            self.solved[k] = self.solve(k)
        return self.solved[k]


@dataclass
class Choice:
    """What :meth:`Allocator.choose` decided (the report's ``allocation``, see
    :class:`~obc_lightning.reporting.AllocationSummary`)."""

    assignment: dict[str, int]
    summary: AllocationSummary


class Allocator:
    """The database of ``compress_model``'s target run and its allocation; ``compress_model`` calls
    :meth:`add` for each weight it would solve and :meth:`choose` once all are in."""

    def __init__(self, q, who: str = "compress_model") -> None:
        self.q, self.who = q, who
        self.target, self.value = q.target
        self.prune = q.bits is None
        self.unit_kind = _unit(self.target, self.prune)
        self.options = _options(q)
        self.units: list[Unit] = []
        self.database_seconds = 0.0

    def label(self, k: int) -> str:
        o = self.options[k]
        return f"{o}-bit" if not self.prune else f"{o:.0%} sparse"

    def option_cost(self, m: nn.Module, option) -> int:
        """The predicted cost of ``m`` at candidate ``option`` (a width or a sparsity level)."""
        return _cost(self.q, m, option, self.unit_kind)

    def add(self, name: str, m: nn.Module, signal: float, costs: Sequence[int], losses: Sequence[float],
            solve: Callable[[int], object], seconds: float = 0.0) -> None:
        """Database entries of one weight: candidate k's cost, loss and ``solve(k)`` (its solution, asked
        for once, when an assignment needs it); ``seconds``: the time its entries took."""
        self.units.append(Unit(name, m, m.weight.numel(), signal, list(costs), [float(x) for x in losses], solve))
        self.database_seconds += seconds

    def budget(self, fixed: int) -> int:
        n = sum(u.numel for u in self.units)
        if self.target == "target_bits":
            return _budget(self.value * n)
        if self.target == "target_size_mb":
            return _budget(self.value * 2**20) - fixed
        return sparsity_budget(self.value, [u.module for u in self.units])

    def achieved(self, assignment: Sequence[int], fixed: int) -> float:
        total = sum(u.costs[k] for u, k in zip(self.units, assignment))
        n = sum(u.numel for u in self.units)
        if self.target == "target_bits":
            return total / n
        if self.target == "target_size_mb":
            return (fixed + total) / 2**20
        return 1 - total / n

    def choose(self, model: nn.Module, batches: Iterable, set_weight: Callable[[str, Tensor], None], *,
               fixed: int = 0, forward_fn=None, reduce_fn=None, progress=None,
               heldout: HeldOutBatches | HeldOutMetric | None = None) -> Choice:
        """Allocate: the budget from the target (``fixed``: the bytes no choice changes), the DP for each
        weighting, the search and the greedy fill, judged on ``heldout`` (``None``: on ``batches``, the
        calibration batches); every evaluated assignment's weights are written with ``set_weight``."""
        t0 = time.perf_counter()
        units = self.units
        if not units:
            raise ValueError(f"{self.who}: no module got a Hessian: nothing to allocate {self.target} over")
        budget = self.budget(fixed)
        low = sum(min(u.costs) for u in units)
        if budget < low:
            lo = self.achieved([u.costs.index(min(u.costs)) for u in units], fixed)
            hi = self.achieved([u.costs.index(max(u.costs)) for u in units], fixed)
            if self.target == "target_sparsity":
                lo, hi = hi, lo
            raise _range_error(self.who, self.target, self.value, lo, hi, tuple(self.options))
        if reduce_fn is not None:  # one decision on every rank: the losses averaged over ranks (the same
            # Hessians give the same losses up to device arithmetic; averaging removes the difference)
            flat = torch.tensor([x for u in units for x in u.losses] + [1.0], dtype=torch.float64)
            dev = next(model.parameters()).device
            s = flat.to(dev)
            out = reduce_fn(s)
            s = (s if out is None else out).cpu()
            vals = (s[:-1] / s[-1]).tolist()
            for u in units:
                u.losses, vals = vals[: len(u.losses)], vals[len(u.losses):]
        summary = AllocationSummary(
            target=self.target, value=self.value, achieved=0.0, metric=self.q.allocation_metric,
            candidates=tuple(self.options), database_seconds=self.database_seconds,
        )
        # per layer the least-loss candidate fits: no weighting changes the answer, nothing to search
        best_each = tuple(min(range(len(u.losses)), key=lambda k, u=u: (u.losses[k], u.costs[k])) for u in units)
        if sum(u.costs[k] for u, k in zip(units, best_each)) <= budget:
            best = best_each
            summary.fill = "every module at its least-loss candidate fits the budget: nothing to search"
        else:
            if progress is not None:
                progress.start("allocation", 2 * self.q.allocation_steps)
            calibration = OutputError(model, batches, self.q.allocation_metric, forward_fn, reduce_fn, self.who)
            judge: OutputError | HeldOutMetric = calibration
            if isinstance(heldout, HeldOutBatches):
                judge = OutputError(model, heldout.batches, self.q.allocation_metric, forward_fn, reduce_fn,
                                    self.who, what="held-out batches")
            elif heldout is not None:
                judge = heldout
            search = _Search(self, budget, set_weight, judge, progress)
            uniform = search.uniform_within_budget()
            search.weighting_search()
            best = search.greedy_fill(search.best())
            summary.heldout = None if heldout is None else heldout.description
            summary.measure = judge.name
            summary.mode = judge.mode
            summary.error = search.value(best)
            summary.uniform = {self.label(k): search.value(a) for k, a in uniform.items()}
            summary.evaluations, summary.dp_calls, summary.exact = len(search.evaluated), search.dp_calls, search.exact
            summary.fill, summary.fill_upgrades = search.fill_note, search.fill_upgrades
            summary.history = [search.value(a) for a in search.evaluated]
            if heldout is not None:  # the same assignments on the batches the Hessians came from
                search.write(best)
                summary.calibration_error = calibration()
                for k, a in uniform.items():
                    search.write(a)
                    summary.uniform_calibration[self.label(k)] = calibration()
            else:
                summary.calibration_error, summary.uniform_calibration = summary.error, dict(summary.uniform)
            summary.forward_passes = calibration.passes + (judge.passes if judge is not calibration else 0)
            if progress is not None:
                progress.close()
        summary.achieved = self.achieved(best, fixed)
        summary.budget_left = self.achieved_amount(budget - sum(u.costs[k] for u, k in zip(units, best)))
        summary.search_seconds = time.perf_counter() - t0
        return Choice({u.name: k for u, k in zip(units, best)}, summary)

    def achieved_amount(self, cost: int) -> float:
        """A cost in the target's own unit (code bits per weight, MB, or fraction of the weights)."""
        n = sum(u.numel for u in self.units)
        return cost / 2**20 if self.target == "target_size_mb" else cost / n


class _Search:
    """The search of :meth:`Allocator.choose` over assignments (a candidate index per unit), each measured
    once by ``judge`` (lower is better after ``sign``): the uniform assignments within the budget, the
    exact allocations for the weightings the random search proposes, then the greedy fill."""

    def __init__(self, allocator: Allocator, budget: int, set_weight, judge, progress) -> None:
        self.allocator, self.units, self.budget = allocator, allocator.units, budget
        self.set_weight, self.judge, self.progress = set_weight, judge, progress
        self.sign = 1.0 if judge.mode == "min" else -1.0
        self.costs = [u.costs for u in self.units]
        self.evaluated: dict[tuple[int, ...], float] = {}  # assignment -> sign * measured value
        self.current: dict[str, int] = {}  # the candidate each unit's weight holds now
        self.logc: dict[tuple[int, ...], Tensor] = {}  # the weighting that proposed an assignment
        self.dp_calls, self.exact = 0, True
        self.fill_note, self.fill_upgrades = "", 0

    def cost(self, a: tuple[int, ...]) -> int:
        return sum(u.costs[k] for u, k in zip(self.units, a))

    def value(self, a: tuple[int, ...]) -> float:
        """The judge's own value of a measured assignment (an accuracy stays an accuracy)."""
        return self.sign * self.evaluated[a]

    def best(self) -> tuple[int, ...]:
        return min(self.evaluated, key=lambda a: (self.evaluated[a], self.cost(a)))

    def write(self, a: tuple[int, ...]) -> None:
        for u, k in zip(self.units, a):
            if self.current.get(u.name) != k:
                self.set_weight(u.name, u.solution(k).weight)
                self.current[u.name] = k

    def measure(self, a: tuple[int, ...]) -> float:
        if a not in self.evaluated:
            self.write(a)
            self.evaluated[a] = self.sign * self.judge()
            if self.progress is not None:
                self.progress.step(f"evaluation {len(self.evaluated)}: {self.value(a):.4g}")
        return self.evaluated[a]

    def dp(self, logc: Tensor) -> tuple[int, ...]:
        self.dp_calls += 1
        w = logc.exp().tolist()
        choice, _, exact = pareto_allocate(
            self.costs, [[w[i] * x for x in u.losses] for i, u in enumerate(self.units)], self.budget)
        self.exact = self.exact and exact
        a = tuple(choice)
        self.logc.setdefault(a, logc)
        return a

    def uniform_within_budget(self) -> dict[int, tuple[int, ...]]:
        """Every uniform assignment within the budget, measured: the chosen one is never worse than the best
        of them on the judge's measure (each is a candidate of the final minimum)."""
        n_options = len(self.allocator.options)
        uniform = {k: (k,) * len(self.units) for k in range(n_options)}
        uniform = {k: a for k, a in uniform.items() if self.cost(a) <= self.budget}
        for a in uniform.values():
            self.measure(a)
        return uniform

    def weighting_search(self) -> None:
        """SPDY's search over per-layer loss weights c_l (see the module docstring), ``allocation_steps``
        evaluations in all (the uniform ones included)."""
        units, steps = self.units, self.allocator.q.allocation_steps
        n = len(units)
        starts = [torch.zeros(n, dtype=torch.float64),
                  -torch.tensor([math.log(max(u.signal, 1e-300)) for u in units], dtype=torch.float64)]
        start_err = []
        for logc in starts:
            a = self.dp(logc)
            start_err.append(self.evaluated[a] if a in self.evaluated else (
                self.measure(a) if len(self.evaluated) < steps else math.inf))
        i0 = min(range(len(starts)), key=lambda i: start_err[i])
        logc, cur = starts[i0].clone(), start_err[i0]
        gen = torch.Generator().manual_seed(self.allocator.q.seed)
        stale, base = 0, len(self.evaluated)
        while len(self.evaluated) < steps and stale < MAX_STALE_TRIES:  # (few layers: few assignments exist)
            stale += 1
            done = (len(self.evaluated) - base) / max(steps - base, 1)  # 0 -> 1 over the search
            sigma = 1.0 - 0.9 * done  # step in log c, and the share of layers moved, shrink
            m = max(1, round(n * (0.3 - 0.25 * done)))
            trial = logc.clone()
            sel = torch.randperm(n, generator=gen)[:m]
            trial[sel] += sigma * torch.randn(m, generator=gen, dtype=torch.float64)
            a = self.dp(trial)
            if a in self.evaluated:
                if self.evaluated[a] <= cur:
                    logc = trial  # an equally good weighting: move on from it
                continue
            stale = 0
            err = self.measure(a)
            if err < cur:
                logc, cur = trial, err

    def greedy_fill(self, best: tuple[int, ...]) -> tuple[int, ...]:
        """Spend what the budget has left: one unit at a time moved to a dearer candidate that still fits,
        the moves tried in order of weighted loss saved per unit of cost (the weighting that proposed
        ``best``; raw losses for a uniform one), the first that lowers the measured error kept; until no
        move fits, none of those tried lowers the error, or ``allocation_steps`` more evaluations are spent.
        ``fill_note`` says which."""
        units, limit = self.units, len(self.evaluated) + self.allocator.q.allocation_steps
        w = self.logc.get(best, torch.zeros(len(units), dtype=torch.float64)).exp().tolist()
        while True:
            left = self.budget - self.cost(best)
            moves = []
            for i, (u, k) in enumerate(zip(units, best)):
                for k2 in range(len(u.costs)):
                    extra = u.costs[k2] - u.costs[k]
                    if 0 < extra <= left and u.losses[k2] < u.losses[k]:
                        moves.append((w[i] * (u.losses[k] - u.losses[k2]) / extra, i, k2))
            if not moves:
                cheapest = min((u.costs[k2] - u.costs[k] for u, k in zip(units, best) for k2 in range(len(u.costs))
                                if u.costs[k2] > u.costs[k]), default=None)
                self.fill_note = ("every module at its dearest candidate" if cheapest is None else
                                  f"{self.allocator.achieved_amount(left):.4g} left, the cheapest move needs "
                                  f"{self.allocator.achieved_amount(cheapest):.4g}")
                return best
            improved = False
            for _, i, k2 in sorted(moves, reverse=True):
                a = best[:i] + (k2,) + best[i + 1:]
                if a not in self.evaluated and len(self.evaluated) >= limit:
                    self.fill_note = f"{self.allocator.achieved_amount(left):.4g} left after the fill's evaluations"
                    return best
                if self.measure(a) < self.evaluated[best]:
                    best, improved = a, True
                    self.fill_upgrades += 1
                    break
            if not improved:
                self.fill_note = (f"{self.allocator.achieved_amount(left):.4g} left: none of the {len(moves)} moves "
                                  "that fit lowers the measured error")
                return best
