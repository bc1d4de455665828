"""The callback's flow as library functions, without Lightning: compress → (BatchNorm) → evaluate →
(fine-tune) → export, and the model put back as it was when any stage fails.

A plain PyTorch script does what :class:`~obc_lightning.callback.OBCQuantize` does::

    config = CompressionConfig.from_flat("my_script", bits=2, finetune="ste", monitor="acc", max_drop=0.01)
    snapshot = ModelSnapshot(model)                      # the fp32 weights, on the CPU
    with restored_on_failure(snapshot):
        stage = compress_stage(model, batches, config, evaluate=lambda: {"acc": accuracy(model)})
        if stage.needs_finetuning:
            session = start_finetuning(model, config, stage, optimizer=opt)
            for x, y in loader:                          # your loop
                loss = criterion(model(x), y)
                loss.backward()
                session.after_backward()
                session.before_optimizer_step()
                opt.step(); opt.zero_grad()
            metrics, lines = finish_finetuning(model, config, session, stage.metrics, epochs=1,
                                               evaluate=lambda: {"acc": accuracy(model)})
        else:                                            # within budget: ternary / DiffQ formats recorded
            settle_without_finetuning(stage)
        export_stage(model, config)                      # with config.export set

The compressed model carries its quantization state (:mod:`obc_lightning.formats.record`): no stage hands
solver results to the next. Every stage is also usable alone: :func:`~obc_lightning.compress.compress_model`,
:func:`~obc_lightning.batchnorm.reestimate_batchnorm`, :class:`~obc_lightning.finetune.FinetuneSession`,
:func:`~obc_lightning.export.save_quantized`. The callback runs the same functions at the epochs it chooses
(:func:`compression_epoch`), with what a Trainer provides (:class:`~obc_lightning.trainer_glue.TrainerStages`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from obc_lightning import export
from obc_lightning.batchnorm import reestimate_batchnorm
from obc_lightning.calibration import CalibrationWarning
from obc_lightning.compress import compress_model, full_precision_message
from obc_lightning.config import CompressionConfig
from obc_lightning.export.onnx import export_onnx
from obc_lightning.finetune import FinetuneSession, keep_masks
from obc_lightning.formats.record import model_formats, restore_formats
from obc_lightning.reporting import CompressionReport, Progress
from obc_lightning.selection import select_modules, unquantized_projections


class ModelSnapshot:
    """The model's parameters and buffers (its ``state_dict``), copied to the CPU, and the formats its
    modules carry (:mod:`obc_lightning.formats.record`; references, not copies): what :meth:`restore` puts
    back, in place (the same ``Parameter`` objects; tied weights stay tied).

    Costs one copy of the model in CPU memory (``nbytes``) for as long as it is held, and one
    device-to-host copy to take it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.formats = model_formats(model)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.state.values() if isinstance(t, Tensor))

    def restore(self) -> None:
        """Every parameter and buffer as it was, and the formats the modules carried then (the model must
        have the same structure: remove fine-tuning parametrizations first, :meth:`FinetuneSession.abort`)."""
        with torch.no_grad():
            self.model.load_state_dict(self.state, strict=True)
        restore_formats(self.model, self.formats)


class WeightSeal:
    """An exact checksum of the weight of each named module, to tell later whether any of them changed (a
    compressed model that something else rewrote no longer is what its report describes).

    Per weight, sum_k (k mod 65521 + 1) * b_k over its bytes b_k, summed in int64 on the weight's device:
    exact, so equal on any device and in any summation order, and changed by any change of one byte.
    Costs one pass over the weights, no copy of them."""

    CHUNK = 1 << 22  # bytes per step (the int64 products: 8x that, transient)

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.sums = {name: self.checksum(model, name) for name in names}

    @classmethod
    def checksum(cls, model: nn.Module, name: str) -> tuple | None:
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:  # the module is gone (or holds no weight any more)
            return None
        b = weight.detach().contiguous().reshape(-1).view(torch.uint8)
        total = 0
        for start in range(0, b.numel(), cls.CHUNK):
            chunk = b[start : start + cls.CHUNK]
            k = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64)
            total += int((chunk.to(torch.int64) * (k % 65521 + 1)).sum())
        return tuple(weight.shape), weight.dtype, total

    def changed(self, model: nn.Module) -> list[str]:
        """The modules whose weight is not bit for bit what it was (or is gone)."""
        return [name for name, value in self.sums.items() if value is None or self.checksum(model, name) != value]


@contextmanager
def restored_on_failure(snapshot: ModelSnapshot, *, session: Callable[[], FinetuneSession | None] = lambda: None):
    """Within the block, any exception (KeyboardInterrupt included) first aborts the fine-tuning session
    (if ``session()`` returns one, :func:`aborted_on_failure`) and restores the snapshot, then propagates."""
    try:
        with aborted_on_failure(session):
            yield
    except BaseException:
        snapshot.restore()
        raise


@contextmanager
def aborted_on_failure(session: Callable[[], FinetuneSession | None]):
    """Within the block, any exception first takes off the parametrizations of the fine-tuning session
    ``session()`` returns (if any), so that whoever restores the weights finds the model as defined, then
    propagates. For a session not yet handed to the one who holds the snapshot."""
    try:
        yield
    except BaseException:
        running = session()
        if running is not None:
            running.abort()
        raise


@dataclass
class Stage:
    """What :func:`compress_stage` did: the report (``None`` for ternary / DiffQ, which quantize by
    training), the metrics before / after, and whether fine-tuning is needed. The compressed modules
    carry their formats (what export and fine-tuning need), the report only its numbers."""

    report: CompressionReport | None
    before: dict[str, float]
    after: dict[str, float]
    metrics: dict[str, float]
    lines: list[str]
    session: FinetuneSession | None = None  # ternary / DiffQ: the quantizers are attached already
    needs_finetuning: bool = False
    drop: float | None = None


def budget_check(config: CompressionConfig, before: Mapping[str, float], after: Mapping[str, float],
                 who: str) -> tuple[bool, float | None, str | None]:
    """(within budget, drop, summary line) of ``max_drop`` on the monitored metric; without a budget the
    model always fine-tunes (when fine-tuning is configured)."""
    ft = config.finetune
    if ft is None or ft.max_drop is None:
        return False, None, None
    if ft.monitor not in before or ft.monitor not in after:
        raise ValueError(
            f"{who}: monitor={ft.monitor!r} is not among the validation metrics {sorted(before)} (logged with "
            "self.log in validation_step or on_validation_epoch_end)"
        )
    drop = before[ft.monitor] - after[ft.monitor]
    drop = drop if ft.monitor_mode == "max" else -drop
    within = drop <= ft.max_drop
    line = f"{ft.monitor} worsened by {drop:.5g} ({'within' if within else 'over'} max_drop={ft.max_drop:g})"
    return within, drop, line


def ternary_targets(config: CompressionConfig, targets: Mapping[str, nn.Module]) -> list[str]:
    names = list(targets)
    return names[1:-1] if config.finetune.ternary_skip_first_last else names


def compress_stage(
    model: nn.Module,
    batches: Iterable,
    config: CompressionConfig,
    *,
    who: str = "compress_stage",
    evaluate: Callable[[], dict[str, float]] | None = None,
    bn_batches: Iterable | None = None,
    forward_fn: Callable | None = None,
    reduce_fn: Callable[[Tensor], None] | None = None,
    progress: Progress | bool | None = None,
    distributed: bool = False,
    eval_batches=None,
) -> Stage:
    """Compress ``model`` in place as ``config`` says and measure it: ``evaluate()`` before and after (when
    given), BatchNorm statistics re-estimated over ``bn_batches`` in between (``config.recalibrate_bn``),
    the ``max_drop`` budget checked. With ``finetune`` ``"ternary"`` / ``"noise"`` nothing is solved: the
    quantizers are attached (the model evaluates quantized) and kept in ``stage.session``. ``distributed``:
    the ranks of ``torch.distributed`` share the solving, ``eval_batches`` what a size target judges its
    assignments on (see :func:`~obc_lightning.compress.compress_model`)."""
    q, ft = config.quantization, config.finetune
    before = evaluate() if evaluate is not None else {}
    report, session = None, None
    with aborted_on_failure(lambda: session):  # ternary / DiffQ: the quantizers attached below come off
        if ft is None or ft.mode in ("ste", "masked", "pq"):
            report = compress_model(model, batches, config=config, forward_fn=forward_fn, reduce_fn=reduce_fn,
                                    progress=progress, distributed=distributed, eval_batches=eval_batches)
            metrics = report.metrics()
            n_batches = len(batches) if hasattr(batches, "__len__") else "?"
            lines = [f"{who}: {q.describe()}, {n_batches} calibration batches", report.table()]
        else:
            targets = {n: m for n, m in select_modules(model, q.include, q.exclude, who=who).items()
                       if isinstance(m.weight, nn.Parameter)}
            names = ternary_targets(config, targets) if ft.mode == "ternary" else list(targets)
            session = FinetuneSession.begin(
                model, ft.mode, names=names, ternary_threshold=ft.ternary_threshold,
                noise_group_size=ft.noise_group_size, noise_min_bits=ft.noise_min_bits,
                noise_max_bits=ft.noise_max_bits, noise_init_bits=q.bits or 4, noise_penalty=ft.noise_penalty,
                bits_lr=ft.noise_bits_lr,
            )
            left = unquantized_projections(model, q.include, q.exclude)
            fp32 = sum(size for _, size in left.values())
            metrics = session.size_metrics(targets, fp32)
            lines = [f"{who}: {ft.mode} quantization of {len(session.quantizers)} modules"]
            if left:
                warnings.warn(full_precision_message(who, {n: r for n, (r, _) in left.items()}),
                              CalibrationWarning, stacklevel=2)
        if config.recalibrate_bn and bn_batches is not None:
            n = reestimate_batchnorm(model, bn_batches, forward_fn=forward_fn, reduce_fn=reduce_fn)
            metrics["obc/bn_recalibrated"] = float(n)
            lines.append(f"BatchNorm statistics of {n} layer(s) re-estimated over the training batches")
        after = evaluate() if evaluate is not None else {}
        for name, value in before.items():
            metrics[f"obc/{name}_before"] = value
        for name, value in after.items():
            metrics[f"obc/{name}_after"] = value
        lines += [f"{n}: {before[n]:.5g} -> {after.get(n, float('nan')):.5g}" for n in before]
        within, drop, line = budget_check(config, before, after, who)
        if line:
            lines.append(line)
    return Stage(report, before, after, metrics, lines, session,
                 needs_finetuning=ft is not None and not within, drop=drop)


def start_finetuning(
    model: nn.Module,
    config: CompressionConfig,
    stage: Stage,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    schedulers=(),
    latent: Mapping[str, Tensor] | None = None,
) -> FinetuneSession:
    """The fine-tuning session after :func:`compress_stage`: ``"ste"`` / ``"pq"`` / ``"masked"`` attach
    their quantizers on the compressed weights and the grids / codebooks they carry (a pruned model keeps
    its mask), ternary / DiffQ continue the session the stage attached; the quantizers' parameters join
    ``optimizer``."""
    ft = config.finetune
    if stage.session is not None:
        stage.session.train_with(optimizer, schedulers)
        return stage.session
    report = stage.report
    masks = keep_masks(model, report.quantized) if config.quantization.pruning else None
    return FinetuneSession.begin(
        model, ft.mode, names=[] if ft.mode == "masked" else report.quantized, masks=masks, latent=latent,
        optimizer=optimizer, schedulers=schedulers, pq_noise_rate=ft.pq_noise_rate,
    )


# ---------------------------------------------------- compressed before the last epochs, fine-tuned through them
def compression_epoch(config: CompressionConfig, max_epochs: int) -> int:
    """K, the epoch at whose end a model that fine-tunes is compressed: the last ``finetune_epochs`` of
    ``max_epochs`` are left to fine-tune in (-1: before the first epoch, for a model that arrives trained)."""
    return max_epochs - config.finetune.epochs - 1


def latent_weights(model: nn.Module, config: CompressionConfig) -> dict[str, Tensor] | None:
    """The float weights noisy iPQ (``finetune="pq"``, ``pq_noise_rate < 1``) trains behind its codebook:
    copies of the trained ones, taken before compression puts every weight on a centroid."""
    ft, q = config.finetune, config.quantization
    if ft.mode != "pq" or ft.pq_noise_rate >= 1:
        return None
    return {n: m.weight.detach().clone() for n, m in select_modules(model, q.include, q.exclude).items()}


def compressed_modules(stage: Stage, config: CompressionConfig) -> tuple[list[str], dict[str, str]]:
    """The modules ``stage`` compressed, and the targets it left in full precision with the reason. Ternary /
    DiffQ quantize by training, so their report is the session's: its quantizers, and the projections no
    quantizer can hold."""
    if stage.report is not None:
        return stage.report.quantized, dict(stage.report.skipped)
    q = config.quantization
    left = unquantized_projections(stage.session.model, q.include, q.exclude)
    return list(stage.session.quantizers), {n: reason for n, (reason, _) in left.items()}


def settle_without_finetuning(stage: Stage) -> dict[str, nn.Module]:
    """The stage is the result (within budget, or no epochs left to train in): the quantizers a ternary /
    DiffQ stage attached record their formats on the modules and come off. Returns them (the callback keeps
    them for inspection)."""
    if stage.session is None:
        return {}
    stage.session.finish(export=False)
    return dict(stage.session.quantizers)


def finish_finetuning(
    model: nn.Module,
    config: CompressionConfig,
    session: FinetuneSession,
    metrics: Mapping[str, float],
    *,
    epochs: int,
    who: str = "finish_finetuning",
    evaluate: Callable[[], dict[str, float]] | None = None,
    bn_batches: list | None = None,
    forward_fn: Callable | None = None,
    reduce_fn: Callable[[Tensor], None] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """The counterpart of :func:`compress_stage` after ``epochs`` epochs of fine-tuning: the session ends
    (weights truly quantized, formats recorded; DiffQ's sizes first, from the bit widths it trained),
    BatchNorm statistics are re-estimated over ``bn_batches`` (``config.recalibrate_bn``), ``evaluate()``
    measures the result. Returns the stage's ``metrics`` with ``obc/<name>_finetuned`` and
    ``obc/finetune_epochs`` added, and the summary lines."""
    ft, metrics = config.finetune, dict(metrics)
    if ft.mode == "noise":  # the bit widths were trained
        q = config.quantization
        targets = select_modules(model, q.include, q.exclude)
        fp32 = sum(size for _, size in unquantized_projections(model, q.include, q.exclude).values())
        metrics.update(session.size_metrics(targets, fp32))
    session.finish(export=False)  # the fine-tuned formats recorded on the modules
    lines = [f"{who}: fine-tuned ({ft.mode}) for {epochs} epoch(s)"]
    if config.recalibrate_bn and bn_batches:
        n = reestimate_batchnorm(model, bn_batches, forward_fn=forward_fn, reduce_fn=reduce_fn)
        metrics["obc/bn_recalibrated"] = float(n)
        lines.append(f"BatchNorm statistics of {n} layer(s) re-estimated over {len(bn_batches)} training batches")
    finetuned = evaluate() if evaluate is not None else {}
    for name, value in finetuned.items():
        metrics[f"obc/{name}_finetuned"] = value
    metrics["obc/finetune_epochs"] = float(epochs)
    lines += [
        f"{n}: {metrics.get(f'obc/{n}_before', float('nan')):.5g} -> "
        f"{metrics.get(f'obc/{n}_after', float('nan')):.5g} -> {v:.5g}"
        for n, v in finetuned.items()
    ]
    return metrics, lines


def export_stage(model: nn.Module, config: CompressionConfig, results: Mapping[str, list] | None = None,
                 example_input=None) -> dict[str, float]:
    """Write the compressed model to ``config.export.path`` (its directory created) and return the size
    metrics of the file: ``obc/file_mb``, ``obc/size_mb_after`` (the file), ``obc/size_mb_before`` (the
    model's full state dict at its precision), ``obc/compression_ratio``. The suffix chooses the format:
    ``.onnx``: :func:`~obc_lightning.export.onnx.export_onnx` (needs ``example_input``, the forward
    arguments to trace), anything else: the packed safetensors file of
    :func:`~obc_lightning.export.save_quantized`. Every compressed module is written in the format it
    carries; ``results`` (solver results per module) only for the older form."""
    path = config.export.path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".onnx"):
        if example_input is None:
            raise ValueError(
                f"export_stage: export_path={path!r} is an ONNX file, which is traced from an example input: pass "
                "example_input (OBCQuantize takes the LightningModule's example_input_array, else the first "
                "calibration batch)"
            )
        file_mb = export_onnx(model, path, example_input).nbytes / 2**20
    else:
        file_mb = export.save_quantized(model, path, dict(results) if results else None,
                                        n_m=config.quantization.n_m) / 2**20
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))
    return {
        "obc/file_mb": file_mb,
        "obc/size_mb_after": file_mb,
        "obc/size_mb_before": dense / 2**20,
        "obc/compression_ratio": dense / 2**20 / file_mb,
    }
