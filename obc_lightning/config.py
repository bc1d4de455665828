"""Configuration as data: what to compress, how to calibrate, how to fine-tune, where to export.

Small frozen dataclasses, each validated once in ``__post_init__``, and :class:`CompressionConfig`, which
holds them and checks what involves several of them. Every public entry point builds its configuration
here: ``OBCQuantize(bits=4, finetune="ste")`` and ``compress_model(model, batches, bits=4)`` from flat
keywords (:meth:`CompressionConfig.from_flat`), ``OBCQuantize(config=...)`` and
``compress_model(model, batches, config=...)`` from the dataclasses themselves. A bad value is a
``ValueError`` that names the entry point the user called and the argument as the user wrote it:
``OBCQuantize: finetune_epochs must be a positive integer, got 0`` for the flat keyword,
``FinetuneConfig: epochs must be ...`` for the dataclass field.

Every field is plain data (numbers, strings, lists, mappings), so a configuration round-trips through a
checkpoint (:meth:`CompressionConfig.to_flat` / :meth:`CompressionConfig.from_flat`) and through a
LightningCLI YAML file. Checks that need the model (a pattern that matches no module, M not dividing a
module's inputs) are :func:`obc_lightning.compress.check_against_model`'s.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, asdict, dataclass, field, fields

from obc_lightning.checks import (
    check_flags,
    check_fraction,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
    is_number,
)
from obc_lightning.grids import MAX_BITS, MIN_BITS

SOLVERS = ("auto", "obc", "gptq")
# "scalar": a uniform grid per row / group; "pq": Hessian-aware product quantization; "pq-kmeans": plain
# k-means product quantization (fairseq's iPQ), for comparison
METHODS = ("scalar", "pq", "pq-kmeans")
FINETUNE_MODES = ("ste", "ternary", "noise", "masked", "pq")
PRODUCT_DTYPE_NAMES = ("float32", "bfloat16", "float64")
ALLOCATION_METRICS = ("mse", "kl")


DEFAULT_BITS = 4
# candidate widths of a size target (target_bits / target_size_mb) when bits is left at its default
DEFAULT_CANDIDATE_BITS = (2, 3, 4, 8)
# candidate sparsity levels of target_sparsity when sparsity is left out: 0, 5 %, ..., 95 %
DEFAULT_SPARSITY_LEVELS = tuple(i / 20 for i in range(20))

# (entry point, True when the user gave flat keywords) while a configuration is being built
_ENTRY: ContextVar[tuple[str, bool] | None] = ContextVar("obc_lightning_config_entry", default=None)


@contextmanager
def entry_point(who: str, flat: bool = True) -> Iterator[None]:
    """Within the block, configuration errors name ``who`` and (``flat``) the flat keyword names."""
    token = _ENTRY.set((who, flat))
    try:
        yield
    finally:
        _ENTRY.reset(token)


def _flat(f) -> str:
    return f.metadata.get("flat", f.name)


class _Section:
    """Shared by the configuration dataclasses: naming in errors, plain-data conversion."""

    def _who(self) -> str:
        entry = _ENTRY.get()
        return entry[0] if entry else type(self).__name__

    def _arg(self, name: str) -> str:
        """The argument as the user wrote it: the flat keyword, or the dataclass field."""
        entry = _ENTRY.get()
        if entry is None or not entry[1]:
            return name
        return _flat(next(f for f in fields(self) if f.name == name))

    def _fail(self, message: str) -> ValueError:
        return ValueError(f"{self._who()}: {message}")

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(value):
    """Tuples as lists, mappings as dicts: what YAML, JSON and ``torch.load(weights_only=True)`` take."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_patterns(section: _Section, name: str, value) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return list(value)
    raise section._fail(f"{section._arg(name)} must be a module name, a pattern or a list of them, got {value!r}")


def _check_per_module(section: _Section, name: str, value, minimum: int, maximum: int | None = None):
    """An int in [minimum, maximum], or a mapping {module name or pattern: such an int}."""
    values = value.values() if isinstance(value, Mapping) else [value]
    if isinstance(value, Mapping) and (not value or not all(isinstance(k, str) for k in value)):
        raise section._fail(f"{section._arg(name)} must map module names or patterns to integers, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise section._fail(
                f"{section._arg(name)} must be an integer >= {minimum}{upper} (or a mapping of module patterns to "
                f"them), got {v!r}"
            )
    return dict(value) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class QuantizationConfig(_Section):
    """What every target module becomes, and which modules are targets.

    Args:
        bits: bits per weight of the uniform grid, 2 ... 8; a mapping ``{module name or pattern: bits}``
            (first match wins, e.g. ``{"*conv1*": 8, "*": 4}``); with ``target_bits`` / ``target_size_mb``
            the candidate widths (``bits`` left at its default 4: ``[2, 3, 4, 8]``); ``None`` with
            ``sparsity`` / ``n_m``: prune only (weights stay float). Not used by product quantization.
        method: ``"scalar"`` (a ``bits``-bit grid per row or group), ``"pq"`` (Hessian-aware product
            quantization) or ``"pq-kmeans"`` (plain k-means product quantization, fairseq's iPQ).
        solver: ``"auto"`` (per row the best of ExactOBC and act-order GPTQ, both polished), ``"obc"``
            or ``"gptq"``.
        group_size: one scale and zero per this many input columns (``None``: per output channel).
        symmetric: symmetric grid (zero point in the middle) instead of asymmetric.
        mse: search each scale for the smallest rounding error instead of plain min-max.
        damp: relative damping of the Hessian (a fraction of its mean diagonal).
        sparsity: prune this fraction of every module's weights with OBS first (unstructured); with
            ``target_sparsity`` the candidate levels (default 0, 0.05, ..., 0.95).
        n_m: ``[N, M]``: prune to at most N non-zeros in every M consecutive inputs first.
        block_size: product quantization: inputs per sub-vector; an int, or a mapping
            ``{module name or pattern: int}`` (first match wins, e.g. ``{"*conv*": 9, "*": 4}``).
        n_centroids: product quantization: codebook size per module; an int or such a mapping.
        include: module names, parents or fnmatch patterns to compress (``None``: every Linear / Conv).
        exclude: module names, parents or patterns to leave in full precision.
        seed: k-means initialisation of product quantization; the random search of an allocation.
        target_bits: a size target in code bits per weight: the average width of the quantized modules'
            integer codes, weighted by their weights (``report.avg_code_bits``; scales and zero points are
            not counted: they cost the same at every width, so ``target_bits=3`` admits uniform 3-bit):
            each module gets one of the ``bits`` candidates, chosen for the least output error within that
            budget (on one calibration of the full-precision model; with ``sequential`` the model is then
            compressed sequentially at the chosen widths).
        target_size_mb: a size target in MB (2^20 bytes) of the target modules as the report counts them
            and the packed export stores them (codes, scales, zero points, biases; modules left unquantized
            at fp32; the file's header aside): widths (or, with ``bits=None``, sparsity levels) chosen per
            module as for ``target_bits``.
        target_sparsity: prune-only (``bits=None``): remove as many weights in all as uniform pruning at this
            level would, each module's level chosen from the ``sparsity`` candidates for the least output
            error.
        allocation_metric: what an allocation minimises on its held-out batches: ``"mse"`` (squared error
            of the model's outputs relative to their energy) or ``"kl"`` (KL divergence of the softmax over
            the outputs' last dimension from the full-precision one: classifiers, language models).
        allocation_holdout: the fraction of the calibration batches a size target sets aside (evenly
            spaced, at least one, never all): they give no Hessian, and the assignments are judged on them
            instead of on the batches they were fitted to. ``0``: judge on the calibration batches. Not
            used when ``compress_model`` gets ``eval_batches`` or the callback has validation data.
        allocation_refit: once the widths are chosen, solve them again on every calibration batch, the held-out
            ones included (one more calibration and one solve per module), so that the returned model's
            Hessians see all the data, as uniform's do. ``None`` (default): on for width targets, off for
            sparsity targets (whose levels are not solved again). The guarantee against uniform is the
            search's: the chosen widths beat every uniform width within the budget when both are solved on
            the same batches and judged on the held-out ones; with nothing held out (``eval_batches``, the
            callback's validation replay, ``allocation_holdout=0``) there is nothing to refit.
        allocation_steps: model evaluations (forward passes over the calibration batches) of the search
            that weighs the layer losses against the model's output error.
    """

    bits: int | dict[str, int] | list[int] | None = DEFAULT_BITS
    method: str = "scalar"
    solver: str = "auto"
    group_size: int | None = None
    symmetric: bool = False
    mse: bool = True
    damp: float = 0.01
    sparsity: float | list[float] | None = None
    n_m: tuple[int, int] | None = None
    block_size: int | dict[str, int] = 8
    n_centroids: int | dict[str, int] = 256
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    seed: int = 0
    target_bits: float | None = None
    target_size_mb: float | None = None
    target_sparsity: float | None = None
    allocation_metric: str = "mse"
    allocation_steps: int = 16
    allocation_holdout: float = 0.25
    allocation_refit: bool | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        self._check_target()
        if self.method not in METHODS:
            raise self._fail(f"{self._arg('method')} must be one of {METHODS}, got {self.method!r}")
        if self.solver not in SOLVERS:
            raise self._fail(f"{self._arg('solver')} must be one of {SOLVERS}, got {self.solver!r}")
        check_flags(self._who(), **{self._arg("symmetric"): self.symmetric, self._arg("mse"): self.mse})
        check_nonnegative(self._who(), self._arg("damp"), self.damp)
        check_positive_int(self._who(), self._arg("group_size"), self.group_size, optional=True)
        check_int(self._who(), self._arg("seed"), self.seed, 0)
        set_(self, "include", _check_patterns(self, "include", self.include))
        set_(self, "exclude", _check_patterns(self, "exclude", self.exclude))
        set_(self, "block_size", _check_per_module(self, "block_size", self.block_size, 1))
        set_(self, "n_centroids", _check_per_module(self, "n_centroids", self.n_centroids, 2, 2**16))
        if self.sparsity is not None and not isinstance(self.sparsity, (list, tuple)) and (
            not is_number(self.sparsity) or not 0 <= self.sparsity < 1
        ):
            raise self._fail(f"{self._arg('sparsity')} must be a number in [0, 1), got {self.sparsity!r}")
        if self.n_m is not None:
            n_m = self.n_m
            if not (
                isinstance(n_m, (tuple, list))
                and len(n_m) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in n_m)
            ):
                raise self._fail(f"{self._arg('n_m')} must be a pair of integers (N, M), got {n_m!r}")
            if not 0 <= n_m[0] < n_m[1]:
                raise self._fail(f"{self._arg('n_m')}=(N, M) needs 0 <= N < M, got {n_m!r}")
            set_(self, "n_m", (int(n_m[0]), int(n_m[1])))
        if self.method != "scalar":
            if self.bits not in (None, DEFAULT_BITS):
                raise self._fail(
                    f"{self._arg('bits')}={self.bits!r} does not apply to {self._arg('method')}={self.method!r}: "
                    "its size is log2(n_centroids) / block_size bits per weight plus the codebook"
                )
            set_(self, "bits", None)
            for name in ("sparsity", "n_m", "group_size"):
                if getattr(self, name) is not None:
                    raise self._fail(f"{self._arg(name)} does not apply to {self._arg('method')}={self.method!r}")
            if self.symmetric:
                raise self._fail(f"{self._arg('symmetric')} does not apply to {self._arg('method')}={self.method!r}")
            return
        if self.bits is None:
            if self.sparsity is None and self.n_m is None and self.target_sparsity is None and (
                    self.target_size_mb is None):
                raise self._fail(
                    f"{self._arg('bits')}=None (no quantization) needs {self._arg('sparsity')}=... or "
                    f"{self._arg('n_m')}=(N, M)"
                )
        elif isinstance(self.bits, Mapping):
            set_(self, "bits", _check_per_module(self, "bits", self.bits, MIN_BITS, MAX_BITS))
        elif not isinstance(self.bits, tuple) and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise self._fail(f"{self._arg('bits')} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if self.sparsity is not None and self.n_m is not None:
            raise self._fail(
                f"give at most one of {self._arg('sparsity')} and {self._arg('n_m')}, got "
                f"{self.sparsity!r} and {self.n_m!r}"
            )

    def _check_target(self) -> None:
        """The size targets and their candidates: ``bits`` (a single width, a mapping or, with a target,
        the candidate widths) and ``sparsity`` (with ``target_sparsity``, the candidate levels) are
        resolved here, so that the stored configuration says which candidates were used."""
        set_, arg = object.__setattr__, self._arg
        targets = [n for n in ("target_bits", "target_size_mb", "target_sparsity") if getattr(self, n) is not None]
        if self.allocation_metric not in ALLOCATION_METRICS:
            raise self._fail(
                f"{arg('allocation_metric')} must be one of {ALLOCATION_METRICS}, got {self.allocation_metric!r}"
            )
        check_positive_int(self._who(), arg("allocation_steps"), self.allocation_steps)
        if not is_number(self.allocation_holdout) or not 0 <= self.allocation_holdout < 1:
            raise self._fail(f"{arg('allocation_holdout')} must be a number in [0, 1), got {self.allocation_holdout!r}")
        if self.allocation_refit is not None:
            check_flags(self._who(), **{arg("allocation_refit"): self.allocation_refit})
        candidates = isinstance(self.bits, (list, tuple))
        levels = isinstance(self.sparsity, (list, tuple))
        if not targets:
            if candidates:
                raise self._fail(
                    f"{arg('bits')}={self.bits!r} lists candidate widths of a size target: give "
                    f"{arg('target_bits')}=... or {arg('target_size_mb')}=..., or a single width"
                )
            if levels:
                raise self._fail(
                    f"{arg('sparsity')}={self.sparsity!r} lists candidate levels of {arg('target_sparsity')}=...; "
                    "give that target, or a single level"
                )
            return
        if len(targets) > 1:
            raise self._fail(f"give at most one size target, got {', '.join(arg(n) for n in targets)}")
        (target,) = targets
        value = getattr(self, target)
        if target == "target_sparsity":
            if not is_number(value) or not 0 < value < 1:
                raise self._fail(f"{arg(target)} must be a number in (0, 1), got {value!r}")
        elif not is_number(value) or value <= 0:
            raise self._fail(f"{arg(target)} must be a positive number, got {value!r}")
        set_(self, target, float(value))
        if self.method != "scalar":
            raise self._fail(f"{arg(target)} chooses widths or sparsity per module: it needs "
                             f"{arg('method')}='scalar', got {self.method!r}")
        if self.n_m is not None:
            raise self._fail(f"{arg(target)} does not combine with {arg('n_m')} (allocations of N:M patterns "
                             "are not supported)")
        prune = target == "target_sparsity" or (target == "target_size_mb" and self.bits is None)
        if prune:
            if self.allocation_refit:
                raise self._fail(f"{arg('allocation_refit')} solves the chosen widths again: {arg(target)} with "
                                 f"{arg('bits')}=None allocates sparsity levels")
            if self.bits is not None:
                raise self._fail(f"{arg(target)} allocates sparsity to a pruned float model: it needs "
                                 f"{arg('bits')}=None, got {self.bits!r}")
            self._resolve_levels(target)
            return
        if self.sparsity is not None:
            raise self._fail(f"{arg(target)} allocates widths: it does not combine with {arg('sparsity')} "
                             f"(got {self.sparsity!r})")
        if not candidates and self.bits == DEFAULT_BITS and not isinstance(self.bits, (bool, Mapping)):
            set_(self, "bits", DEFAULT_CANDIDATE_BITS)  # bits at its default: the default candidates
        elif not candidates:
            raise self._fail(
                f"{arg(target)} chooses each module's width among candidates: give them as {arg('bits')}="
                f"[2, 3, 4, 8] (or leave {arg('bits')} at its default {DEFAULT_BITS} for those), got "
                f"{arg('bits')}={self.bits!r}"
            )
        widths = self.bits
        if not widths or any(isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS
                             for b in widths):
            raise self._fail(f"{arg('bits')} must list candidate widths, integers in [{MIN_BITS}, {MAX_BITS}], "
                             f"got {self.bits!r}")
        set_(self, "bits", tuple(sorted(set(int(b) for b in widths))))

    def _resolve_levels(self, target: str) -> None:
        arg = self._arg
        levels = DEFAULT_SPARSITY_LEVELS if self.sparsity is None else self.sparsity
        if not isinstance(levels, (list, tuple)):
            raise self._fail(f"{arg(target)} chooses each module's sparsity among candidate levels: give them as "
                             f"{arg('sparsity')}=[0.0, 0.25, 0.5, 0.75] (or leave it out), got {self.sparsity!r}")
        if not levels or any(not is_number(x) or not 0 <= x < 1 for x in levels):
            raise self._fail(f"{arg('sparsity')} must list candidate levels in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", tuple(sorted(set(float(x) for x in levels))))

    @property
    def target(self) -> tuple[str, float] | None:
        """(field name, value) of the size target, or None."""
        for name in ("target_bits", "target_size_mb", "target_sparsity"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return None

    @property
    def refits_widths(self) -> bool:
        """Whether a width target solves its chosen widths again on every calibration batch
        (``allocation_refit`` resolved: on unless set to ``False``; sparsity targets never)."""
        return self.target is not None and self.bits is not None and self.allocation_refit is not False

    @property
    def pruning(self) -> bool:
        return self.sparsity is not None or self.n_m is not None

    def describe(self) -> str:
        """One line: what the modules become."""
        if self.method != "scalar":
            return f"{self.method}, block_size={self.block_size}, n_centroids={self.n_centroids}"
        target = self.target
        if target is not None:
            what = (f"widths {'/'.join(map(str, self.bits))}" if self.bits is not None else
                    "sparsity " + "/".join(f"{x:g}" for x in self.sparsity))
            return f"{what} allocated to {target[0]}={target[1]:g} ({self.allocation_metric}), solver={self.solver}"
        if isinstance(self.bits, Mapping):
            return f"bits per module {self.bits}, solver={self.solver}" + (
                f" + OBS {self.sparsity:.0%} unstructured" if self.sparsity is not None else
                f" + OBS {self.n_m[0]}:{self.n_m[1]}" if self.n_m is not None else "")
        parts = [] if self.bits is None else [f"{self.bits}-bit, solver={self.solver}"]
        if self.sparsity is not None:
            parts.insert(0, f"OBS {self.sparsity:.0%} unstructured")
        if self.n_m is not None:
            parts.insert(0, f"OBS {self.n_m[0]}:{self.n_m[1]}")
        return " + ".join(parts)


@dataclass(frozen=True)
class CalibrationConfig(_Section):
    """How the Hessians H = 2/N XᵀX are collected.

    Args:
        batches: calibration batches per rank (callback; ``None``: about 1024 samples over all ranks).
        sequential: calibrate each module on the inputs of the already-compressed earlier modules (one
            pass per group of modules) instead of all Hessians from the original model in one pass.
        match_outputs: with ``sequential``, fit each module to the *full-precision* model's outputs
            (W* = W Cᵀ H̃⁻¹ compressed on H̃; two passes per group) instead of its own outputs on the
            drifted inputs. ``None`` (default): follows ``sequential``.
        sample_fraction: in (0, 1]: each batch gives each Hessian this random fraction of its samples.
        product_dtype: ``None`` (each batch's XᵀX in the activations' precision), ``"float32"``,
            ``"bfloat16"`` or ``"float64"``; the running sums are float64 either way.
        offload: keep the running sums on the CPU.
        max_memory: one memory budget for calibration and solving, in bytes, or ``{"cuda:0": bytes, ...}``
            per device (``None``: half of what is free, cached-but-unused CUDA memory counted as free); the
            Hessian sums must fit it and the solvers batch their rows to it.
    """

    batches: int | None = field(default=None, metadata={"flat": "calibration_batches"})
    sequential: bool = False
    match_outputs: bool | None = None
    sample_fraction: float = 1.0
    product_dtype: str | None = None
    offload: bool = False
    max_memory: int | dict[str, int] | None = None

    def __post_init__(self) -> None:
        who = self._who()
        if isinstance(self.max_memory, Mapping):
            for device, budget in self.max_memory.items():
                check_positive_int(who, f"{self._arg('max_memory')}[{device!r}]", budget)
            object.__setattr__(self, "max_memory", dict(self.max_memory))
        else:
            check_positive_int(who, self._arg("max_memory"), self.max_memory, optional=True)
        check_positive_int(who, self._arg("batches"), self.batches, optional=True)
        check_flags(who, **{self._arg("sequential"): self.sequential, self._arg("offload"): self.offload})
        if self.match_outputs is not None:
            check_flags(who, **{self._arg("match_outputs"): self.match_outputs})
            if self.match_outputs and not self.sequential:
                raise self._fail(
                    f"{self._arg('match_outputs')}=True needs {self._arg('sequential')}=True (it fits each module to "
                    "the full-precision outputs on the inputs that the already-compressed modules before it produce)"
                )
        check_fraction(who, self._arg("sample_fraction"), self.sample_fraction)
        object.__setattr__(self, "sample_fraction", float(self.sample_fraction))
        dtype = self.product_dtype
        if dtype is not None and not isinstance(dtype, str):  # a torch.dtype: keep its name (plain data)
            dtype = str(dtype).removeprefix("torch.")
        if dtype is not None and dtype not in PRODUCT_DTYPE_NAMES:
            raise self._fail(
                f"{self._arg('product_dtype')} must be None (the activations' precision) or one of "
                f"{', '.join(PRODUCT_DTYPE_NAMES)}, got {self.product_dtype!r}"
            )
        object.__setattr__(self, "product_dtype", dtype)

    @property
    def matches_outputs(self) -> bool:
        """Whether sequential calibration fits the full-precision outputs (``match_outputs`` resolved)."""
        return self.sequential if self.match_outputs is None else self.match_outputs


@dataclass(frozen=True)
class FinetuneConfig(_Section):
    """Quantization-aware fine-tuning when post-training compression loses too much.

    Args:
        mode: ``"ste"`` (straight-through on the OBC grid), ``"ternary"`` (trained ternary quantization),
            ``"noise"`` (DiffQ: noise and learned bit widths), ``"pq"`` (product-quantization codebooks
            train), ``"masked"`` (a pruned float model's kept weights train).
        epochs: the last N epochs of ``max_epochs`` fine-tune; compression happens at the end of epoch
            ``max_epochs - N - 1`` (N = ``max_epochs``: at the start of fit).
        monitor: the validation metric ``max_drop`` bounds (checked at the first validation).
        monitor_mode: ``"max"`` (higher is better) or ``"min"``.
        max_drop: the largest worsening of ``monitor`` after compression, in the metric's units, that
            needs no fine-tuning (``None``: always fine-tune).
        ternary_threshold: TTQ threshold t (Δ = t · max|w| per layer).
        ternary_skip_first_last: keep the first and last target module in full precision (TTQ paper).
        noise_group_size: DiffQ: consecutive weights of a row sharing one learned bit width.
        noise_min_bits: DiffQ: smallest bit width.
        noise_max_bits: DiffQ: largest bit width.
        noise_penalty: DiffQ: weight of the model-size term (MB) added to the task loss.
        noise_bits_lr: DiffQ: learning rate of the bit widths' own Adam (``None``: the user's optimizer).
        pq_noise_rate: ``"pq"``: fraction of sub-vectors replaced by their centroid per step (Fan et al.).
    """

    mode: str = field(default="ste", metadata={"flat": "finetune"})
    epochs: int = field(default=1, metadata={"flat": "finetune_epochs"})
    monitor: str | None = None
    monitor_mode: str = field(default="max", metadata={"flat": "mode"})
    max_drop: float | None = None
    ternary_threshold: float = 0.05
    ternary_skip_first_last: bool = True
    noise_group_size: int = 16
    noise_min_bits: float = 2.0
    noise_max_bits: float = 8.0
    noise_penalty: float = 1.0
    noise_bits_lr: float | None = 1e-3
    pq_noise_rate: float = 1.0

    def __post_init__(self) -> None:
        who, arg = self._who(), self._arg
        if self.mode not in FINETUNE_MODES:
            raise self._fail(f"{arg('mode')} must be one of {FINETUNE_MODES} or None, got {self.mode!r}")
        if self.monitor_mode not in ("max", "min"):
            raise self._fail(f"{arg('monitor_mode')} must be 'max' or 'min', got {self.monitor_mode!r}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise self._fail(f"{arg('monitor')} must be a metric name or None, got {self.monitor!r}")
        check_nonnegative(who, arg("max_drop"), self.max_drop, optional=True)
        if self.max_drop is not None and self.monitor is None:
            raise self._fail(f"{arg('max_drop')} needs {arg('monitor')}=<validation metric name>")
        check_positive_int(who, arg("epochs"), self.epochs)
        if not is_number(self.ternary_threshold) or not 0 <= self.ternary_threshold < 1:
            raise self._fail(f"{arg('ternary_threshold')} must be in [0, 1), got {self.ternary_threshold!r}")
        check_flags(who, **{arg("ternary_skip_first_last"): self.ternary_skip_first_last})
        check_positive_int(who, arg("noise_group_size"), self.noise_group_size)
        lo, hi = self.noise_min_bits, self.noise_max_bits
        if not (is_number(lo) and is_number(hi) and 1 <= lo < hi <= 16):
            raise self._fail(
                f"need 1 <= {arg('noise_min_bits')} < {arg('noise_max_bits')} <= 16, got {lo!r}, {hi!r}"
            )
        check_nonnegative(who, arg("noise_penalty"), self.noise_penalty)
        check_positive(who, arg("noise_bits_lr"), self.noise_bits_lr, optional=True)
        check_fraction(who, arg("pq_noise_rate"), self.pq_noise_rate)
        for name in ("ternary_threshold", "noise_min_bits", "noise_max_bits", "noise_penalty", "pq_noise_rate"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.max_drop is not None:
            object.__setattr__(self, "max_drop", float(self.max_drop))


@dataclass(frozen=True)
class ExportConfig(_Section):
    """Where the compressed model is written at the end.

    Args:
        path: a ``.safetensors`` file (packed codes, :func:`~obc_lightning.export.load_quantized` reads it)
            or a ``.onnx`` file (:func:`~obc_lightning.export.onnx.export_onnx`: low-bit initializers that
            ONNX Runtime runs); its directory is created if missing.
    """

    path: str = field(default="model.safetensors", metadata={"flat": "export_path"})

    def __post_init__(self) -> None:
        path = self.path
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path) or os.path.isdir(path):
            raise self._fail(f"{self._arg('path')} must be a file path or None, got {path!r}")
        object.__setattr__(self, "path", os.fspath(path))


@dataclass(frozen=True)
class ReportingConfig(_Section):
    """What the callback measures and shows.

    Args:
        evaluate: measure the validation metrics before and after compression.
        plot: send a per-module error chart to the loggers (and the log directory) with matplotlib.
        verbose: print the summary table.
    """

    evaluate: bool = True
    plot: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        check_flags(self._who(), **{self._arg(f.name): getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class CompressionConfig(_Section):
    """Everything the callback does, as data; ``compress_model`` uses ``quantization`` and ``calibration``.

    Args:
        quantization: what the modules become (:class:`QuantizationConfig`).
        calibration: how the Hessians are collected (:class:`CalibrationConfig`).
        finetune: quantization-aware fine-tuning (:class:`FinetuneConfig`), or ``None``.
        export: the packed file written at the end (:class:`ExportConfig`), or ``None``.
        reporting: evaluation, chart and summary (:class:`ReportingConfig`).
        recalibrate_bn: re-estimate BatchNorm statistics of the final weights over this many training
            batches (0: off).
        split_attention: make the q, k, v projections of every ``nn.MultiheadAttention`` Linears in
            ``setup``, so that they are quantized too.
    """

    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    finetune: FinetuneConfig | None = None
    export: ExportConfig | None = None
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    recalibrate_bn: int = 0
    split_attention: bool = False

    def __post_init__(self) -> None:
        who = self._who()
        for name, kind in (("quantization", QuantizationConfig), ("calibration", CalibrationConfig),
                           ("reporting", ReportingConfig)):
            if not isinstance(getattr(self, name), kind):
                raise self._fail(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        for name, kind in (("finetune", FinetuneConfig), ("export", ExportConfig)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise self._fail(f"{name} must be a {kind.__name__} or None, got {getattr(self, name)!r}")
        check_int(who, "recalibrate_bn", self.recalibrate_bn, 0)
        check_flags(who, split_attention=self.split_attention)
        q, ft = self.quantization, self.finetune
        if q.target is not None and self.calibration.sequential and q.bits is None:
            name = _names(self)
            raise self._fail(
                f"{name(q.target[0])} builds its database from one calibration of the full-precision model: with "
                f"pruning only it needs {name('sequential')}=False (widths are chosen first, then compressed "
                "sequentially; sparsity levels are not)"
            )
        if ft is None:
            return
        name = _names(self)
        if q.method != "scalar" and ft.mode != "pq":
            raise self._fail(
                f"{name('method')}={q.method!r} fine-tunes its codebooks with {name('mode')}='pq', got {ft.mode!r}"
            )
        if q.method == "scalar" and ft.mode == "pq":
            raise self._fail(f"{name('mode')}='pq' trains product-quantization codebooks: set {name('method')}='pq'")
        if ft.mode in ("ternary", "noise") and (q.target is not None or isinstance(q.bits, Mapping)):
            raise self._fail(
                f"{name('mode')}={ft.mode!r} learns its quantization in training, from the fp32 weights; widths per "
                f"module ({name('bits')} as a mapping) and size targets ({name('target_bits')}, "
                f"{name('target_size_mb')}) apply to the solved modes: {name('mode')}='ste', or no fine-tuning"
            )
        if q.pruning and ft.mode in ("ternary", "noise"):
            raise self._fail(
                f"{name('mode')}={ft.mode!r} starts from the fp32 weights and cannot keep a pruning mask; with "
                f"{name('sparsity')} / {name('n_m')} use {name('mode')}='ste' (quantized) or "
                "OBCPrune(finetune='masked')"
            )
        if q.method == "scalar" and (ft.mode == "masked") != (q.bits is None):
            raise self._fail(
                f"{name('mode')}='masked' (train the kept weights, mask fixed) is the fine-tuning of a pruned float "
                f"model ({name('bits')}=None, OBCPrune); got {name('mode')}={ft.mode!r} with {name('bits')}={q.bits!r}"
            )
        if ft.max_drop is not None and not self.reporting.evaluate:
            raise self._fail(f"{name('max_drop')} needs {name('evaluate')}=True (the drop is measured)")
        if self.export is not None and ft.mode == "noise" and round(ft.noise_max_bits) > 8:
            raise self._fail(
                f"{name('path')} packs DiffQ codes at 8 bits at most; {name('noise_max_bits')}={ft.noise_max_bits!r} "
                "rounds above 8"
            )

    # ------------------------------------------------------------------ flat keywords
    @classmethod
    def from_flat(cls, who: str, *, sections: Sequence[str] | None = None, **options) -> CompressionConfig:
        """The configuration of flat keywords (``bits=4, finetune="ste", export_path=...``), checked with
        errors that name ``who`` and the keywords. ``finetune=None`` / ``export_path=None`` (or absent):
        that section is ``None``. ``sections`` limits the keywords to those sections (``compress_model``
        takes ``quantization`` and ``calibration`` only)."""
        known = flat_fields(sections)
        unknown = [k for k in options if k not in known]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            raise TypeError(
                f"{who}() got an unexpected keyword argument {unknown[0]!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        grouped: dict[str, dict] = {}
        for key, value in options.items():
            section, name = known[key]
            grouped.setdefault(section, {})[name] = value
        top = grouped.pop("", {})
        with entry_point(who):
            built = {s: SECTIONS[s](**values) for s, values in grouped.items() if s not in ("finetune", "export")}
            finetune = grouped.get("finetune", {})
            if finetune.get("mode") is None:  # no fine-tuning: its other keywords are still checked
                if finetune.get("max_drop") is not None:
                    raise ValueError(
                        f"{who}: max_drop is a budget for fine-tuning; set finetune='ste'|'ternary'|'noise'"
                    )
                FinetuneConfig(**{k: v for k, v in finetune.items() if k != "mode"})
                built["finetune"] = None
            else:
                built["finetune"] = FinetuneConfig(**finetune)
            path = grouped.get("export", {}).get("path")
            built["export"] = None if path is None else ExportConfig(path)
            return cls(**built, **top)

    def to_flat(self) -> dict:
        """The flat keywords that rebuild this configuration (plain data: a checkpoint records it)."""
        out: dict = {}
        for section, kind in SECTIONS.items():
            value = self if section == "" else getattr(self, section)
            if section in ("finetune", "export") and value is None:
                out["finetune" if section == "finetune" else "export_path"] = None
                continue
            for f in fields(kind):
                if section == "" and f.name in SECTIONS:
                    continue
                out[_flat(f)] = _plain(getattr(value, f.name))
        return out


SECTIONS: dict[str, type] = {
    "quantization": QuantizationConfig,
    "calibration": CalibrationConfig,
    "finetune": FinetuneConfig,
    "export": ExportConfig,
    "reporting": ReportingConfig,
    "": CompressionConfig,
}


def flat_fields(sections: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
    """{flat keyword: (section, field)} of the given sections (all by default)."""
    out = {}
    for section, kind in SECTIONS.items():
        if sections is not None and section not in sections:
            continue
        for f in fields(kind):
            if section == "" and f.name in SECTIONS:
                continue
            out[_flat(f)] = (section, f.name)
    return out


def _flat_name(section: str, name: str) -> str:
    return _flat(next(f for f in fields(SECTIONS[section]) if f.name == name))


def _names(config: CompressionConfig):
    """``name(field)``: the field of any section as the user wrote it (flat keyword or dotted path)."""
    entry = _ENTRY.get()
    flat = entry is not None and entry[1]
    where = {f.name: s for s, kind in SECTIONS.items() if s for f in fields(kind)}
    where.update(evaluate="reporting", path="export")

    def name(field_name: str) -> str:
        section = where[field_name]
        if flat:
            return _flat_name(section, field_name)
        return f"{section}.{field_name}"

    return name


def field_default(kind: type, name: str):
    f = next(f for f in fields(kind) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


# ------------------------------------------------------------------------------------- the flat options
# a section that is off unless its switch is given: the switch's flat keyword defaults to None
_SWITCHES = {"finetune": "mode", "export": "path"}


@dataclass(frozen=True)
class FlatOption:
    """One flat keyword of the entry points: where it lives in the configuration, its type, default and
    documentation (all read from the dataclasses: nothing is listed twice)."""

    name: str  # the flat keyword
    section: str  # "quantization", ..., "" (CompressionConfig's own fields)
    field: str  # the dataclass field
    annotation: object  # the resolved type (signatures, LightningCLI)
    type_text: str  # the type as written in the source (documentation)
    default: object
    doc: str


def field_docs(kind: type) -> dict[str, str]:
    """{field: description} of the ``Args:`` section of a dataclass's Google-style docstring."""
    lines = (kind.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    docs: dict[str, list[str]] = {}
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        if depth == indent:
            current, _, text = line.strip().partition(":")
            docs[current] = [text.strip()]
        elif current is not None:
            docs[current].append(line.strip())
    return {name: " ".join(words).strip() for name, words in docs.items()}


def flat_options(sections: Sequence[str] | None = None) -> list[FlatOption]:
    """Every flat keyword of the given sections (all by default), in the dataclasses' order."""
    import typing

    out = []
    for section, kind in SECTIONS.items():
        if sections is not None and section not in sections:
            continue
        hints, docs = typing.get_type_hints(kind), field_docs(kind)
        for f in fields(kind):
            if section == "" and f.name in SECTIONS:
                continue
            annotation, type_text, default = hints[f.name], f.type, field_default(kind, f.name)
            if _SWITCHES.get(section) == f.name:  # off by default: the switch is None
                annotation, type_text, default = annotation | None, f"{f.type} | None", None
            out.append(FlatOption(_flat(f), section, f.name, annotation, type_text, _plain(default),
                                  docs.get(f.name, "")))  # (no docstrings under python -OO)
    return out


def flat_signature(function, sections: Sequence[str] | None = None, *, skip: Sequence[str] = (),
                   defaults: Mapping | None = None):
    """``function``'s signature with its ``**options`` replaced by one keyword-only parameter per flat
    keyword of ``sections`` (type, default), less those in ``skip`` and those it names itself: what
    ``help()``, IDEs and LightningCLI (jsonargparse) show and accept. ``defaults``: the defaults to show
    for the function's own parameters (in place of a sentinel)."""
    import inspect
    import typing

    own = inspect.signature(function)
    try:  # the function's own annotations resolved too (they are strings under postponed evaluation)
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):
        hints = {}
    defaults = dict(defaults or {})
    kept = [p.replace(annotation=hints.get(p.name, p.annotation), default=defaults.get(p.name, p.default))
            for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in kept} | set(skip)
    extra = [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
        for o in flat_options(sections) if o.name not in names
    ]
    return own.replace(parameters=kept + extra, return_annotation=hints.get("return", own.return_annotation))


def options_doc(sections: Sequence[str] | None = None, *, skip: Sequence[str] = (), indent: str = "    ") -> str:
    """The flat keywords of ``sections`` as a Google-style ``Args:`` list (type, default, meaning), for the
    generated part of an entry point's docstring."""
    import textwrap

    out = []
    for o in flat_options(sections):
        if o.name in skip:
            continue
        head = f"{o.name} ({o.type_text}, default {o.default!r}): "
        where = f" [{o.section}.{o.field}]" if o.section else ""
        out.append(textwrap.fill(head + o.doc + where, 110, initial_indent=indent,
                                 subsequent_indent=indent + "    "))
    return "\n".join(out)


def explicit_options(options: Mapping, sections: Sequence[str] | None = None) -> dict:
    """``options`` less the flat keywords left at their defaults (LightningCLI passes every parameter,
    so a ``config=...`` arrives with the flat defaults beside it)."""
    defaults = {o.name: o.default for o in flat_options(sections)}
    return {k: v for k, v in options.items() if k not in defaults or _plain(v) != defaults[k]}
