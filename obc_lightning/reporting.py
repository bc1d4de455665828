"""What a compression run reports: per-module objective and relative error, sizes, time.

Plain dataclasses and text; no Lightning. The callback turns :meth:`CompressionReport.metrics` into
logger calls and prints :meth:`CompressionReport.table`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from obc_lightning.formats.schemes import ScalarScheme


def packed_weight_bytes(numel: int, rows: int, n_groups: int, bits: int) -> int:
    """Bytes of one dense scalar-quantized weight as ``save_quantized`` stores it by default (codes at
    ``bits`` bits, an fp16 scale and a uint8 zero point per row and group): the scheme's size formula
    (:meth:`~obc_lightning.formats.schemes.ScalarScheme.payload_nbytes`)."""
    cols = numel // rows
    config = {"shape": [rows, cols], "bits": bits, "group_size": -(-cols // n_groups), "scale_dtype": "float16"}
    return ScalarScheme.payload_nbytes(config)


@dataclass
class ModuleReport:
    """One quantized module.

    ``loss`` is the layer objective 1/2 * sum_rows (w - q) H (w - q)^T = 1/N ||(W - Q) X||^2;
    ``rel_error`` = trace((W - Q) H (W - Q)^T) / trace(W H W^T) = ||(W - Q) X||^2 / ||W X||^2 on the
    calibration inputs. ``obc_rows`` / ``gptq_rows``: rows whose best solution came from each solver.
    ``sparsity``: fraction of the weights pruned (OBS, before quantization); ``bits`` None: prune only
    (``method`` "scalar") or product quantization (``method`` "pq" / "pq-kmeans", with ``block_size``
    inputs per sub-vector and ``n_centroids`` codebook entries). ``bytes_after`` / ``weight_bits``: the
    weight as ``save_quantized`` stores the module by default (its storage scheme's size formula,
    :mod:`obc_lightning.formats.schemes`: the file's payload bytes, and the same in bits before byte
    padding), plus the fp32 bias. ``tied``: the other names of this module's weight:
    other modules sharing the Parameter (each has its own entry: the weight was solved once on the sum of
    their Hessians, and each entry's ``loss`` is that module's share), and other names of this very module
    (registered twice: one entry, found under each name).

    With output matching (``compress_model(..., match_outputs=True)``) ``loss`` is measured against the
    full-precision model's outputs, 1/2 * 2/N ||X W^T - X̃ Q^T||^2 (X̃: the module's inputs in the
    compressed model), ``rel_error`` = ||X W^T - X̃ Q^T||^2 / ||X W^T||^2, and ``drift_loss`` is that
    objective at the least-squares target W* itself: the part of the drift of the inputs that no
    weights correct on the calibration data.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    bits: int | None
    groups: int
    group_size: int | None
    n_samples: int
    loss: float
    rel_error: float
    seconds: float
    obc_rows: int = 0
    gptq_rows: int = 0
    damp: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    sparsity: float = 0.0
    method: str = "scalar"
    block_size: int | None = None
    n_centroids: int | None = None
    weight_bits: int = 0
    tied: tuple[str, ...] = ()
    drift_loss: float | None = None

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales or codebook included."""
        return self.weight_bits / math.prod(self.shape)


@dataclass
class AllocationSummary:
    """What a size target (``target_bits`` / ``target_size_mb`` / ``target_sparsity``) decided.

    ``achieved``: the target's quantity for the chosen assignment, as the report counts it (code bits per
    weight, MB, or sparsity); ``code_bits``, ``stored_bits`` (scales and zero points included) and
    ``size_mb`` give all three sizes; ``budget_left``: what the chosen assignment leaves of the budget, in
    the target's unit. The search judges assignments on ``measure`` (``mode`` "min" or "max") over
    ``heldout`` (held-out batches, ``eval_batches`` or the callback's validation; ``None``: on the
    calibration batches themselves): ``error`` is the chosen assignment's value there, ``uniform`` that of
    every uniform assignment within the budget ({"3-bit": value}), and ``calibration_error`` /
    ``uniform_calibration`` the same assignments' output error (``metric``) on the calibration batches;
    all ``None`` / empty when no search was needed (every module's least-loss candidate fits).
    ``fill``: why the greedy fill stopped, after ``fill_upgrades`` moves to dearer candidates.
    ``evaluations``: assignments measured; ``forward_passes``: passes over the batches (the evaluations,
    the full-precision references); ``dp_calls``: allocations solved; ``exact``: the allocation was exact
    (see :func:`~obc_lightning.allocation.pareto_allocate`); ``database_seconds``: the candidate solves;
    ``search_seconds``: the references, the evaluations and the allocations; ``history``: the measured
    values in evaluation order (the uniform assignments first, then the two starting weightings).
    ``refit``: how the returned weights were solved when they are not the solutions the search measured
    (``allocation_refit``: the chosen widths solved again on every calibration batch), else ``None``.
    """

    target: str
    value: float
    achieved: float
    metric: str
    candidates: tuple
    error: float | None = None
    uniform: dict[str, float] = field(default_factory=dict)
    calibration_error: float | None = None
    uniform_calibration: dict[str, float] = field(default_factory=dict)
    heldout: str | None = None
    measure: str = ""
    mode: str = "min"
    fill: str = ""
    fill_upgrades: int = 0
    budget_left: float = 0.0
    code_bits: float | None = None
    stored_bits: float | None = None
    size_mb: float | None = None
    evaluations: int = 0
    forward_passes: int = 0
    dp_calls: int = 0
    exact: bool = True
    database_seconds: float = 0.0
    search_seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # measured values in evaluation order
    refit: str | None = None

    def sizes_from(self, report: CompressionReport) -> None:
        """``achieved`` and the three sizes from the report's own totals."""
        self.code_bits = report.avg_code_bits if report.quantized_code_bits else None
        self.stored_bits, self.size_mb = report.avg_bits, report.bytes_after / 2**20
        self.achieved = {"target_bits": self.code_bits, "target_size_mb": self.size_mb,
                         "target_sparsity": report.sparsity}[self.target]

    def line(self) -> str:
        sizes = [f"{self.code_bits:.4f} code bits/weight"] if self.code_bits is not None else []
        if self.stored_bits is not None:
            sizes += [f"{self.stored_bits:.4f} stored bits/weight", f"{self.size_mb:.4f} MB"]
        if self.target == "target_sparsity":
            sizes.insert(0, f"{self.achieved:.2%} sparsity")
        out = f"allocation: {self.target}={self.value:g} -> {', '.join(sizes) or self.achieved}"
        if self.error is not None:
            where = f"on {self.heldout}" if self.heldout else "on the calibration batches"
            measure = self.measure or self.metric
            out += f"; {measure} {where} {self.error:.4g}"
            if self.uniform:
                out += " (uniform " + ", ".join(f"{k} {v:.4g}" for k, v in self.uniform.items()) + ")"
            if self.heldout and self.calibration_error is not None:
                out += f"; {self.metric} on the calibration batches {self.calibration_error:.4g}"
                if self.uniform_calibration:
                    out += " (uniform " + ", ".join(f"{k} {v:.4g}" for k, v in self.uniform_calibration.items()) + ")"
        if self.fill:
            out += f"; fill: {self.fill_upgrades} move(s), {self.fill}"
        if self.refit:
            out += f"; {self.refit}"
        out += (f"; {self.evaluations} evaluations, {self.dp_calls} allocations; database "
                f"{self.database_seconds:.2f} s, search {self.search_seconds:.2f} s")
        return out + ("" if self.exact else "; allocation bucketed (not exact)")


@dataclass
class CompressionReport:
    """Result of :func:`obc_lightning.compress_model`.

    Sizes cover every target module (weights and biases); skipped targets count at fp32 on both sides,
    so ``compression_ratio`` is what the targets really shrink by. ``avg_bits`` is the stored bits per
    compressed weight (scales, zero points, codebooks, positions and masks included), e.g.
    (bits * numel + 24 * rows * n_groups) / numel for a dense scalar grid with fp16 scales.
    ``bits``: the width of every module, or ``{module: bits}`` when they differ (per-module ``bits`` or a
    size target: ``compress_model(..., bits=report.bits)`` repeats the assignment); ``allocation``: what a
    size target decided (:class:`AllocationSummary`).

    What stays in full precision: ``skipped`` names the targets (and attention projections) left as they
    were, with the reason; ``full_precision`` every other module holding parameters of its own
    (embeddings, recurrent layers, norms, excluded layers: ``{name: (type, reason, fp32 bytes)}``), and
    ``model_bytes`` all the model's parameters at fp32, so that ``full_precision_share`` is their share
    of the model (an embedding can be most of a small transformer).
    """

    modules: list[ModuleReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bits: int | dict[str, int] | None = 4
    solver: str = "auto"
    sequential: bool = False
    method: str = "scalar"
    match_outputs: bool = False
    bytes_before: int = 0
    bytes_after: int = 0
    quantized_weights: int = 0
    quantized_weight_bits: int = 0
    quantized_code_bits: int = 0  # scalar grids: bits x weights, scales and zero points left out
    pruned_weights: int = 0
    calibration_seconds: float = 0.0
    calibration_passes: int = 0  # passes over the calibration batches (sequential: one per group)
    seconds: float = 0.0
    allocation: AllocationSummary | None = None
    full_precision: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (type, reason, bytes)
    model_bytes: int = 0  # all the model's parameters at fp32
    results: dict | None = field(default=None, repr=False, compare=False)

    @property
    def quantized(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def sparsity(self) -> float:
        """Fraction of the compressed modules' weights that were pruned."""
        return self.pruned_weights / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def share_of_model(self, nbytes: int) -> float:
        return nbytes / self.model_bytes if self.model_bytes else float("nan")

    @property
    def full_precision_share(self) -> float:
        """Share of the model's parameters (fp32 bytes) in :attr:`full_precision` modules."""
        return self.share_of_model(sum(size for _, _, size in self.full_precision.values()))

    @property
    def avg_bits(self) -> float:
        return self.quantized_weight_bits / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def avg_code_bits(self) -> float:
        """Integer code bits per compressed weight (scalar grids), scales and zero points left out: what
        ``target_bits`` counts; uniform b-bit gives exactly b."""
        return self.quantized_code_bits / self.quantized_weights if self.quantized_weights else float("nan")

    def __getitem__(self, name: str) -> ModuleReport:
        """The module's entry; a module registered under several names is found under each of them."""
        for m in self.modules:
            if m.name == name:
                return m
        for m in self.modules:
            if name in m.tied:
                return m
        raise KeyError(name)

    def metrics(self, prefix: str = "obc/") -> dict[str, float]:
        """Flat scalar metrics: ``<prefix><module>/loss|rel_error|obc_rows|gptq_rows`` (``/drift_loss`` with
        output matching) and the totals."""
        out: dict[str, float] = {}
        for m in self.modules:
            out[f"{prefix}{m.name}/loss"] = m.loss
            out[f"{prefix}{m.name}/rel_error"] = m.rel_error
            out[f"{prefix}{m.name}/obc_rows"] = float(m.obc_rows)
            out[f"{prefix}{m.name}/gptq_rows"] = float(m.gptq_rows)
            out[f"{prefix}{m.name}/bits_per_weight"] = m.bits_per_weight
            if m.bits is not None:
                out[f"{prefix}{m.name}/bits"] = float(m.bits)
            if self.pruned_weights:
                out[f"{prefix}{m.name}/sparsity"] = m.sparsity
            if m.drift_loss is not None:
                out[f"{prefix}{m.name}/drift_loss"] = m.drift_loss
        if self.pruned_weights:
            out[f"{prefix}sparsity"] = self.sparsity
        out[f"{prefix}size_mb_before"] = self.bytes_before / 2**20
        out[f"{prefix}size_mb_after"] = self.bytes_after / 2**20
        out[f"{prefix}compression_ratio"] = self.compression_ratio
        out[f"{prefix}avg_bits"] = self.avg_bits
        out[f"{prefix}seconds"] = self.seconds
        out[f"{prefix}modules_quantized"] = float(len(self.modules))
        out[f"{prefix}modules_skipped"] = float(len(self.skipped))
        if self.full_precision:
            out[f"{prefix}full_precision_mb"] = sum(size for _, _, size in self.full_precision.values()) / 2**20
            out[f"{prefix}full_precision_share"] = self.full_precision_share
        a = self.allocation
        if a is not None:
            if a.error is not None:
                out[f"{prefix}allocation_error"] = a.error
            for label, err in a.uniform.items():
                out[f"{prefix}allocation_error_uniform_{label}"] = err
            if a.heldout and a.calibration_error is not None:
                out[f"{prefix}allocation_error_calibration"] = a.calibration_error
                for label, err in a.uniform_calibration.items():
                    out[f"{prefix}allocation_error_calibration_uniform_{label}"] = err
            out[f"{prefix}allocation_evaluations"] = float(a.evaluations)
            out[f"{prefix}allocation_seconds"] = a.database_seconds + a.search_seconds
        return out

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(replace(self, results=None)).items() if k != "results"}
        d["compression_ratio"] = self.compression_ratio
        d["avg_bits"] = self.avg_bits
        d["sparsity"] = self.sparsity
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressionReport:
        """The report of a :meth:`to_dict` (``results`` are not in it)."""
        d = {k: v for k, v in d.items() if k not in ("compression_ratio", "avg_bits", "sparsity", "results")}
        d["modules"] = [ModuleReport(**{**m, "shape": tuple(m["shape"]), "tied": tuple(m.get("tied", ()))})
                        for m in d.get("modules", [])]
        if d.get("allocation") is not None:
            d["allocation"] = AllocationSummary(**d["allocation"])
        d["full_precision"] = {n: tuple(v) for n, v in d.get("full_precision", {}).items()}
        return cls(**d)

    def table(self) -> str:
        """A fixed-width text table: one line per module, then skipped modules and the totals."""
        head = ("module", "type", "shape", "bits", "loss", "rel_err", "obc/gptq", "sec")
        rows = [
            (
                m.name,
                m.kind + (f"[g={m.groups}]" if m.groups > 1 else ""),
                "x".join(map(str, m.shape)),
                (f"pq{m.block_size}x{m.n_centroids}" if m.method != "scalar" else
                 ("fp" if m.bits is None else str(m.bits)) + (f"/g{m.group_size}" if m.group_size else ""))
                + (f" {m.sparsity:.0%} sp" if m.sparsity else ""),
                f"{m.loss:.4g}",
                f"{m.rel_error:.3%}" if math.isfinite(m.rel_error) else "nan",
                f"{m.obc_rows}/{m.gptq_rows}",
                f"{m.seconds:.2f}",
            )
            for m in self.modules
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r) for r in rows]
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        lines += self._full_precision_lines()
        pruned = any(m.sparsity for m in self.modules)
        quantized = any(m.bits is not None or m.method != "scalar" for m in self.modules) or not pruned
        done = "pruned and quantized" if pruned and quantized else "pruned" if pruned else "quantized"
        lines.append(
            f"{len(self.modules)} {done}, {len(self.skipped)} skipped | size "
            f"{self.bytes_before / 2**20:.3f} MB -> {self.bytes_after / 2**20:.3f} MB "
            f"(x{self.compression_ratio:.2f}, {self.avg_bits:.2f} bits/weight"
            + (f", {self.sparsity:.1%} pruned" if self.pruned_weights else "") + ") | "
            f"{self.seconds:.2f} s ({self.calibration_seconds:.2f} s calibration"
            + (f", {self.calibration_passes} passes" if self.calibration_passes > 1 else "") + ")"
            + (" | losses against the full-precision outputs (match_outputs)" if self.match_outputs else "")
        )
        if self.allocation is not None:
            lines.append(self.allocation.line())
        return "\n".join(lines)

    def _full_precision_lines(self, min_share: float = 0.005) -> list[str]:
        """One line per module left in full precision holding at least ``min_share`` of the model; the
        smaller ones (norms, mostly) counted together by type."""
        lines, small = [], {}
        for name, (kind, reason, size) in self.full_precision.items():
            share = self.share_of_model(size)
            if share >= min_share:
                lines.append(f"full precision {name}: {share:.1%} of the model's parameters; {reason}")
            else:
                small.setdefault(kind, []).append(size)
        if small:
            n = sum(len(v) for v in small.values())
            kinds = ", ".join(f"{k} x{len(v)}" for k, v in small.items())
            lines.append(f"full precision: {n} smaller module(s) ({kinds}), together "
                         f"{self.share_of_model(sum(map(sum, small.values()))):.1%} of the model's parameters")
        if self.full_precision:
            total = sum(size for _, _, size in self.full_precision.values())
            lines.append(f"full precision outside the targets: {total / 2**20:.3f} MB at fp32, "
                         f"{self.full_precision_share:.1%} of the model's parameters")
        return lines

    def __str__(self) -> str:
        return self.table()


def error_figure(report: CompressionReport):
    """Bar chart (a ``matplotlib.figure.Figure``) of the per-module relative error; ``None`` without
    matplotlib. Built on a ``Figure`` object with its own Agg canvas: pyplot and the process's backend
    are left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = [m.name for m in report.modules]
    fig = Figure(figsize=(max(4.0, 0.35 * len(names) + 2), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [m.rel_error for m in report.modules])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("||(W-Q)X||^2 / ||WX||^2")
    what = (report.method if report.method != "scalar" else "mixed widths" if isinstance(report.bits, dict)
            else f"{report.bits}-bit")
    ax.set_title(f"{what}: relative output error per module")
    fig.tight_layout()
    return fig


def is_mixed(report: CompressionReport) -> bool:
    """Modules of different widths or sparsity levels (per-module ``bits`` or a size target)."""
    return report.allocation is not None or isinstance(report.bits, dict)


def allocation_figure(report: CompressionReport):
    """Bar chart of each module's width (or, prune-only, its sparsity) in network order, the stored bits
    per weight (scales included) as dots; ``None`` without matplotlib. A ``Figure`` of its own, as
    :func:`error_figure`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    mods = report.modules
    names = [m.name for m in mods]
    fig = Figure(figsize=(max(4.0, 0.35 * len(names) + 2), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(names))
    if all(m.bits is None for m in mods):
        ax.bar(x, [m.sparsity for m in mods])
        ax.set_ylabel("sparsity")
        title = f"sparsity per module ({report.sparsity:.1%} overall)"
    else:
        ax.bar(x, [m.bits or 0 for m in mods], label="width")
        ax.plot(x, [m.bits_per_weight for m in mods], "o", color="k", markersize=3, label="stored bits / weight")
        ax.set_ylabel("bits")
        ax.legend(fontsize=7)
        title = f"bits per module ({report.avg_bits:.3f} bits / weight overall)"
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_errors(report: CompressionReport, path) -> str | None:
    """The chart of :func:`error_figure` saved to ``path``; ``None`` if matplotlib is absent."""
    fig = error_figure(report)
    if fig is None:
        return None
    fig.savefig(path)
    return str(path)


class Progress:
    """What :func:`~obc_lightning.compress.compress_model` reports while it works: a stage starts
    (``"calibration"`` over batches, ``"solving"`` over modules, ``"sequential"`` over groups of
    modules), then ``step(item)`` before each unit (the module about to be solved), ``close()`` at the
    end. This base class is silent; :class:`TqdmProgress` draws a bar, the callback follows the
    Trainer's progress bar."""

    def start(self, stage: str, total: int | None) -> None:
        pass

    def step(self, item: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress(Progress):
    """A tqdm bar per stage (``bar_factory(desc=..., total=...)``, tqdm's own by default), the unit being
    worked on as its postfix."""

    def __init__(self, bar_factory=None, prefix: str = "") -> None:
        if bar_factory is None:
            from tqdm.auto import tqdm as bar_factory
        self.bar_factory, self.prefix = bar_factory, prefix
        self.bar = None
        self.steps = 0

    def start(self, stage: str, total: int | None) -> None:
        self.close()
        self.bar = self.bar_factory(desc=f"{self.prefix}{stage}", total=total, leave=False)
        self.steps = 0

    def step(self, item: str = "") -> None:
        if self.bar is None:
            return
        if self.steps:
            self.bar.update(1)
        self.steps += 1
        if item:
            self.bar.set_postfix_str(item, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            if self.steps:
                self.bar.update(1)
            self.bar.close()
            self.bar = None


def progress_of(value) -> Progress:
    """``compress_model``'s ``progress`` argument as a :class:`Progress`."""
    if value is None or value is False:
        return Progress()
    if value is True:
        return TqdmProgress()
    if all(callable(getattr(value, k, None)) for k in ("start", "step", "close")):
        return value
    raise ValueError(
        f"compress_model: progress must be None, a bool or an object with start(stage, total), step(item) and "
        f"close(), got {value!r}"
    )
