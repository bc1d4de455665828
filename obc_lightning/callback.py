"""``OBCQuantize`` / ``OBCPrune``: the model that leaves ``trainer.fit`` is compressed, measured and reported.

The callback is a map from Lightning's hooks to the library's flow (:mod:`obc_lightning.pipeline`):

====================================  ==========================================================
hook                                  what happens
====================================  ==========================================================
``__init__``                          configuration checked (:mod:`obc_lightning.config`)
``setup``                             attention split; checks against the model and the Trainer
``on_fit_start``                      a fine-tuning session resumed from a checkpoint, or a new round
``on_validation_end``                 ``monitor`` checked at the first validation
``on_train_start`` / ``_epoch_end``   compression before fine-tuning (``finetune_epochs`` before the end)
``on_after_backward``, ``on_before_   the fine-tuning session's steps (DiffQ's size penalty, bit widths)
optimizer_step``
``on_train_end``                      post-training compression, or the end of fine-tuning; export;
                                      the ``last`` checkpoints rewritten with the compressed model (run
                                      after every other callback's ``on_train_end``: SWA / EMA averages,
                                      ``ModelPruning``'s permanent pruning are in the model by then)
``teardown``                          the compressed weights checked unchanged since (else an error);
                                      under ``ddp_spawn`` the results sent to the main process
``on_save_checkpoint``                checkpoints hold plain weights (loadable into the module as defined)
``on_load_checkpoint``                a checkpoint older than the compression is announced
``on_exception``                      the model put back as it was before the callback touched it
====================================  ==========================================================

Every step is a library function usable without a Trainer; :mod:`obc_lightning.trainer_glue` holds what
is Lightning-specific (the user's validation replayed, calibration batches, DDP, progress, loggers).
"""

from __future__ import annotations

import atexit
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from obc_lightning import trainer_glue as glue
from obc_lightning.attention import split_attention_projections
from obc_lightning.batchnorm import reestimate_batchnorm
from obc_lightning.compress import check_against_model, config_of, tied_weights
from obc_lightning.config import DEFAULT_BITS, CompressionConfig, explicit_options, flat_signature, options_doc
from obc_lightning.finetune import FinetuneSession
from obc_lightning.formats.record import CHECKPOINT_KEY, formats_state, load_formats_state, model_formats
from obc_lightning.pipeline import (
    ModelSnapshot,
    Stage,
    WeightSeal,
    compress_stage,
    export_stage,
    start_finetuning,
    ternary_targets,
)
from obc_lightning.reporting import CompressionReport, allocation_figure, error_figure, is_mixed
from obc_lightning.selection import select_modules, unquantized_projections


class _SentByTheWorker:
    """A result of the callback (stored as ``_<name>``) that, read while still empty in the main process after
    a fit in processes started for it (ddp_spawn, ddp_fork), first takes what rank zero's copy sent."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        if not obj.__dict__.get(self.attr):
            obj._receive()
        return obj.__dict__.get(self.attr)

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.attr] = value


class OBCQuantize(Callback):
    r"""Quantize the model's Linear / Conv1d / Conv2d weights to ``bits`` bits at the end of ``fit``.

    ``OBCQuantize(bits=4, group_size=128, finetune="ste", ...)`` takes every field of
    :class:`~obc_lightning.config.CompressionConfig`'s sections as a flat keyword (listed with their types
    and defaults under "Options" below, generated from the dataclasses; the signature, ``help()`` and
    LightningCLI's ``--trainer.callbacks.<option>`` flags show them too); ``OBCQuantize(config=...)``
    takes them whole (the form a LightningCLI YAML uses; flat keywords left at their defaults beside it
    are ignored).

    Without fine-tuning, compression happens in ``on_train_end``, where the model is still on its
    training device: calibration batches from ``calibration_dataloader`` (default: the train dataloader)
    through the user's own code path (``calibration_step(module, batch)``, else ``forward`` when it takes
    the batch, else ``validation_step`` / ``training_step``, announced), the Hessians all-reduced under
    DDP, the validation metrics measured before and after by replaying the module's own validation hooks
    (``validation_step`` and ``on_validation_epoch_end``, torchmetrics included), metrics to every logger
    (``obc/<module>/loss``, ``obc/<module>/rel_error``, sizes, ``obc/<metric>_before`` / ``_after``, ...),
    the per-module error chart to every logger that takes images.

    Mixed precision: ``OBCQuantize(bits={"*conv1*": 8, "*": 4})`` sets widths by module pattern;
    ``OBCQuantize(target_bits=3.0)`` (or ``target_size_mb=``) chooses each module's width among ``bits``
    (default 2, 3, 4, 8) for the least output error on the calibration batches within that size
    (:mod:`obc_lightning.allocation`): the chosen widths are in the summary table, in the metrics
    (``obc/<module>/bits``) and in a chart of bits per module in network order (``obc/bits``); ``"ste"``
    fine-tuning trains on each module's own grid, and the export stores each module's width.

    With ``finetune``, the model is compressed at the end of epoch ``max_epochs - finetune_epochs - 1``
    (after its validation; at the start of fit when ``finetune_epochs == max_epochs``); within
    ``max_drop`` fit stops there, otherwise the last epochs train through the quantizer (a
    :class:`~obc_lightning.finetune.FinetuneSession`) and ``on_train_end`` removes it.

    What a user can rely on (README, "Guarantees"): checkpoints written during fine-tuning hold plain
    weights that ``load_from_checkpoint`` takes, and resuming fit from one continues the fine-tuning; the
    ``last`` checkpoint of every ``ModelCheckpoint(save_last=True)`` holds the compressed model after fit;
    a failure anywhere in the callback's work (or during fine-tuning) puts the trained weights back and
    re-raises, the callback then says nothing was compressed, and a later ``fit`` compresses again.

    Args:
        bits: 2 ... 8, or ``{module pattern: bits}``, or with ``target_bits`` / ``target_size_mb`` the
            candidate widths (default ``[2, 3, 4, 8]``); ``None``: prune only, with ``sparsity`` / ``n_m``;
            left out with ``config``.
        config: the whole configuration instead of keywords (:class:`~obc_lightning.config.CompressionConfig`).
        calibration_dataloader: any iterable of batches; ``None``: the trainer's train dataloader.
        calibration_step: ``fn(module, batch)`` running a batch through the module (for batches the
            forward cannot take); its return value is ignored.
        **options: the configuration's flat keywords ("Options" below).
    """

    def __init__(
        self,
        bits: int | dict[str, int] | list[int] | None = DEFAULT_BITS,
        *,
        config: CompressionConfig | None = None,
        calibration_dataloader: Iterable | None = None,
        calibration_step: Callable[[LightningModule, Any], Any] | None = None,
        **options,
    ) -> None:
        who = type(self).__name__
        if config is not None:  # LightningCLI passes every flat keyword, at its default, beside config
            options = explicit_options(options)
        if config is None or bits != DEFAULT_BITS:  # with config, bits keeps its default (it is config's)
            options = {"bits": bits, **options}
        self.config = config_of(who, config, options)
        if calibration_dataloader is not None and (
            isinstance(calibration_dataloader, (Tensor, str)) or not isinstance(calibration_dataloader, Iterable)
        ):
            raise ValueError(
                f"{who}: calibration_dataloader must be an iterable of batches (a DataLoader), got "
                f"{type(calibration_dataloader).__name__}"
            )
        if calibration_dataloader is not None and _is_empty(calibration_dataloader):
            raise ValueError(
                f"{who}: calibration_dataloader is empty ({type(calibration_dataloader).__name__} of length 0); give "
                "it calibration batches, or leave it out to calibrate on the train dataloader"
            )
        if calibration_step is not None and not callable(calibration_step):
            raise ValueError(f"{who}: calibration_step must be callable(module, batch), got {calibration_step!r}")
        self.calibration_dataloader, self.calibration_step = calibration_dataloader, calibration_step
        # a fit in processes started for it (ddp_spawn) sends its results back under this name
        self._home_pid, self._token = os.getpid(), uuid.uuid4().hex
        atexit.register(glue.remove_unread, self._token)
        # what the last compression did (empty: nothing compressed)
        self.report: CompressionReport | None = None
        self.quantized_modules: list[str] = []
        self.skipped_modules: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        # fine-tuning: "idle" (not compressed in this round) -> "finetuning" -> "done"
        self.phase = "idle"
        self.start_epoch: int | None = None  # the epoch at whose end compression ran (-1: start of fit)
        self.session: FinetuneSession | None = None
        self.quantizers: dict[str, torch.nn.Module] = {}  # the last session's (kept for inspection)
        self._snapshot: ModelSnapshot | None = None  # the weights to put back while the work is unfinished
        self._seal: WeightSeal | None = None  # checksums of the compressed weights, to tell if anything rewrote them
        self._rewriting_last = False
        self._keep_snapshot = False  # held beyond the current stage (fine-tuning continues)
        self._resume_state: dict | None = None
        self._restored = False  # load_state_dict ran in this fit
        self._monitor_checked = False
        self._code_path_said: str | None = None
        self.loaded_report: dict | None = None
        self.loaded_config: dict = {}

    @property
    def who(self) -> str:
        return type(self).__name__

    # ================================================================== results
    # Also in the main process after a fit in processes started for it (ddp_spawn, ddp_fork): rank zero's
    # copy of the callback sends them at the end of fit, read here the first time they are asked for.
    report = _SentByTheWorker("What the last compression did (``None``: nothing compressed).")
    quantized_modules = _SentByTheWorker("The modules the last compression changed.")
    skipped_modules = _SentByTheWorker("The target modules left in full precision, with the reason.")
    metrics = _SentByTheWorker("The numbers logged as ``obc/...`` by the last compression.")

    def _results(self) -> dict[str, Any]:
        return {
            "quantized_modules": list(self._quantized_modules),
            "skipped_modules": dict(self._skipped_modules),
            "metrics": dict(self._metrics),
            "report": None if self._report is None else self._report.to_dict(),
            "phase": self.phase,
            "start_epoch": self.start_epoch,
        }

    def _receive(self) -> None:
        """The results a copy of this callback sent from the process it ran fit in (in the main process)."""
        if os.getpid() != self.__dict__.get("_home_pid") or "_metrics" not in self.__dict__:
            return
        state = glue.receive_from_worker(self._token)
        if state is None:
            return
        self._quantized_modules, self._skipped_modules = state["quantized_modules"], state["skipped_modules"]
        self._metrics, self.phase, self.start_epoch = state["metrics"], state["phase"], state["start_epoch"]
        self._report = None if state["report"] is None else CompressionReport.from_dict(state["report"])

    def _send_to_main_process(self, trainer: Trainer) -> None:
        """In the rank-zero process a spawning strategy started: the results to the main process."""
        if os.getpid() != self._home_pid and trainer.global_rank == 0:
            glue.send_to_main_process(self._token, self._results())

    # ================================================================== Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.config.split_attention:  # before configure_optimizers and the checkpoint restore, every stage
            split = split_attention_projections(pl_module)
            if split:
                rank_zero_info(f"{self.who}: split the q, k, v projections of {len(split)} MultiheadAttention "
                               f"module(s) into Linears: {', '.join(split)}")
        if os.getpid() == self._home_pid:  # results of an earlier fit in spawned processes, never read: stale
            glue.remove_unread(self._token)
        if stage == "fit":  # a typo, a layout that does not fit a module: before training, not after it
            q = self.config.quantization
            targets = select_modules(pl_module, q.include, q.exclude, who=self.who)
            check_against_model(self.config, targets, self.who, before_fit=True)  # lazy weights: after training
            if self.config.finetune is not None:
                self._check_finetuning(trainer, targets)
            if not trainer.enable_validation:
                self._no_validation_data()
            _AfterOtherCallbacks.attach(trainer, self)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the optimizers exist, before their state is restored from a checkpoint
        resume, self._resume_state = self._resume_state, None
        restored, self._restored = self._restored, False
        if trainer.ckpt_path is None:  # state loaded by an earlier validate / test, not by this fit
            resume, restored = None, False
        self._monitor_checked = False
        self._seal = None
        if resume is not None:
            self._resume_finetuning(trainer, pl_module, resume)
        elif not restored and self.phase != "idle":
            rank_zero_info(f"{self.who}: a new fit: the model will be compressed again")
            self._forget()
        elif restored and self.phase == "done":
            self.phase = "idle"  # continuing from a compressed checkpoint: compress the result again

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ft = self.config.finetune
        if ft is None or ft.monitor is None or trainer.sanity_checking or self._monitor_checked:
            return
        self._monitor_checked = True
        glue.check_monitor(trainer, ft.monitor, self.who)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # finetune_epochs == max_epochs (the model arrives trained), or a fit resumed from the checkpoint of
        # the compression epoch (written at its validation, before compression): compress before training
        ft = self.config.finetune
        if ft is not None and self.phase == "idle" and trainer.current_epoch > self._compress_epoch(trainer):
            may_finetune = trainer.current_epoch < trainer.max_epochs
            self._guarded(trainer, pl_module, self._compress_for_finetuning, may_finetune=may_finetune)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # in Lightning 2.x the epoch's validation has already run (training_epoch_loop.on_advance_end)
        if self._compresses_now(trainer, trainer.current_epoch):
            self._guarded(trainer, pl_module, self._compress_for_finetuning, may_finetune=True)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.session is not None:  # DiffQ: the size penalty's gradient, scaled as the task loss was
            self.session.after_backward(glue.amp_scale(trainer), trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.session is not None and getattr(optimizer, "_optimizer", optimizer) is trainer.optimizers[0]:
            self.session.before_optimizer_step(glue.amp_scale(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the work is done by the hook of _AfterOtherCallbacks, after every other callback's on_train_end
        if not _AfterOtherCallbacks.attached(trainer, self):
            self._train_end(trainer, pl_module)

    def _train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Post-training compression, or the end of fine-tuning, after every other callback's ``on_train_end``
        (weight averaging copies its average into the model there, ``ModelPruning`` makes its pruning
        permanent there): what is compressed is the model those callbacks leave."""
        changed = self._seal.changed(pl_module) if self._seal is not None and self.phase == "done" else []
        if self.config.finetune is None:
            self._guarded(trainer, pl_module, self._post_training)
        elif self.phase == "finetuning":
            self._guarded(trainer, pl_module, self._finish_finetuning)
        elif self.phase == "idle":
            rank_zero_warn(
                f"{self.who}: fit ended before the end of epoch {self._compress_epoch(trainer)}, where compression "
                "for fine-tuning was planned; compressing now without fine-tuning"
            )
            self._guarded(trainer, pl_module, self._compress_for_finetuning, may_finetune=False)
        elif changed:
            rank_zero_warn(
                f"{self.who}: the compressed weights of {', '.join(changed)} were changed after compression (at the "
                f"end of epoch {self.start_epoch}) by another callback's on_train_end (weight averaging, pruning); "
                "compressing the model again as it leaves training"
            )
            self._forget()
            self._guarded(trainer, pl_module, self._compress_for_finetuning, may_finetune=False)
        if self.quantized_modules:
            self._rewriting_last = True  # see _AfterOtherCallbacks.on_save_checkpoint
            try:
                written = glue.rewrite_last_checkpoints(trainer)
            finally:
                self._rewriting_last = False
            weights_only = {cb.last_model_path for cb in trainer.checkpoint_callbacks
                            if getattr(cb, "save_weights_only", False)}
            self._say_where_the_model_is([p for p in written if p not in weights_only])

    def _check_weights_kept(self, pl_module: LightningModule) -> None:
        """At the end of fit: raise (and forget the report) if a hook that ran after the compression (the
        LightningModule's ``on_train_end`` / ``on_fit_end``, a callback's ``on_fit_end``) changed the weights."""
        seal, self._seal = self._seal, None
        changed = seal.changed(pl_module) if seal is not None and self.quantized_modules else []
        if changed:
            self._forget()
            raise RuntimeError(
                f"{self.who}: the weights of {', '.join(changed)} changed after compression, in a hook that runs after "
                "every callback's on_train_end (the LightningModule's on_train_end or on_fit_end, a callback's "
                "on_fit_end); the model leaving fit is not the compressed model: the report is withdrawn. Change the "
                "weights before on_train_end (or compress with compress_model after fit)"
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._recover(exception)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.session is not None:  # plain weights: the module as the user defined it loads them
            checkpoint["state_dict"] = self.session.plain_state_dict(checkpoint["state_dict"])
        elif model_formats(pl_module):  # beside the state dict, which stays loadable into the plain module
            checkpoint[CHECKPOINT_KEY] = formats_state(pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # the weights are the checkpoint's now: so are the formats (none: the records would be stale)
        load_formats_state(pl_module, checkpoint.get(CHECKPOINT_KEY) or {}, who=self.who)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if self.quantized_modules and not state.get("quantized_modules"):
            rank_zero_warn(
                f"{self.who}: the checkpoint {trainer.ckpt_path or ''} was saved before this run compressed the "
                "model: its full-precision weights have replaced the compressed ones (use the 'last' checkpoint, "
                "which holds the compressed model, or compress again)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_flat(),
            "quantized_modules": list(self.quantized_modules),
            "skipped_modules": dict(self.skipped_modules),
            "metrics": dict(self.metrics),
            "report": None if self.report is None else self.report.to_dict(),
            "phase": self.phase,
            "start_epoch": self.start_epoch,
            "session": None if self.session is None else self.session.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("phase") == "finetuning" and not state_dict.get("session"):
            raise RuntimeError(
                f"{self.who}: this checkpoint was saved during fine-tuning but holds no fine-tuning session to "
                "resume (written by an older version); resume from a checkpoint written before compression"
            )
        self.phase = state_dict.get("phase", "idle")
        self.start_epoch = state_dict.get("start_epoch")
        self.quantized_modules = list(state_dict.get("quantized_modules", []))
        self.skipped_modules = dict(state_dict.get("skipped_modules", {}))
        self.metrics = dict(state_dict.get("metrics", {}))
        self.loaded_report = state_dict.get("report")
        self.loaded_config = dict(state_dict.get("config", {}))
        self._resume_state = state_dict.get("session") if self.phase == "finetuning" else None
        self._restored = True
        if self.quantized_modules and self.loaded_config and self.loaded_config != self.config.to_flat():
            rank_zero_warn(
                f"{self.who}: the checkpoint was compressed with {self.loaded_config}, this callback is configured "
                f"with {self.config.to_flat()}"
            )

    # ================================================================== the flow
    def _post_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = self._calibration_batches(trainer)
        if not batches:
            rank_zero_warn(f"{self.who}: no calibration data (no calibration_dataloader and no train dataloader); "
                           "the model was not quantized")
            return
        stage = self._compress_stage(trainer, pl_module, batches)
        self._record(stage)
        metrics = stage.metrics
        if self.config.export is not None:
            metrics.update(self._export(trainer, pl_module))
        self._publish(trainer, metrics, stage.lines, stage.report)

    def _compress_for_finetuning(self, trainer: Trainer, pl_module: LightningModule, may_finetune: bool) -> None:
        """Compress and measure; within budget (or ``may_finetune=False``) the model is done, else the
        fine-tuning session starts on the user's optimizer."""
        ft = self.config.finetune
        batches = []
        if ft.mode in ("ste", "masked", "pq"):
            batches = self._calibration_batches(trainer)
            if not batches:
                rank_zero_warn(f"{self.who}: no calibration data; the model was not quantized")
                self.phase = "done"
                return
        latent = None
        if ft.mode == "pq" and ft.pq_noise_rate < 1:  # noisy iPQ trains latent float weights from the fp32 ones
            q = self.config.quantization
            latent = {n: m.weight.detach().clone() for n, m in select_modules(pl_module, q.include, q.exclude).items()}
        stage = self._compress_stage(trainer, pl_module, batches)
        self._record(stage)
        self.start_epoch = self._compress_epoch(trainer) if may_finetune else trainer.current_epoch
        metrics, lines = stage.metrics, stage.lines
        if not stage.needs_finetuning or not may_finetune:
            if stage.session is not None:
                stage.session.finish(export=False)  # the ternary / DiffQ formats recorded on the modules
            self.quantizers = dict(stage.session.quantizers) if stage.session else {}
            if may_finetune:
                trainer.should_stop = True  # the model is quantized: the remaining epochs are skipped
                lines.append(f"stopping fit: the remaining {ft.epochs} epoch(s) are not needed")
            metrics["obc/finetune_epochs"] = 0.0
            self.phase = "done"
            if self.config.export is not None:
                metrics.update(self._export(trainer, pl_module))
            self._publish(trainer, metrics, lines, stage.report)
            return
        optimizer, schedulers = glue.optimizer_and_schedulers(trainer)
        self.session = start_finetuning(pl_module, self.config, stage, optimizer=optimizer, schedulers=schedulers,
                                        latent=latent)
        if not self.session.trains_parameters:
            rank_zero_warn(f"{self.who}: no optimizer; the {ft.mode} quantizer parameters are not trained")
        self.quantizers = dict(self.session.quantizers)
        glue.rewrap_ddp(trainer, pl_module)
        self.phase = "finetuning"
        self._keep_snapshot = True
        lines.append(f"fine-tuning ({ft.mode}) for {ft.epochs} epoch(s)")
        self._publish(trainer, metrics, lines, stage.report)

    def _finish_finetuning(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the session (weights truly quantized), re-estimate BatchNorm, evaluate, export, report."""
        ft, session = self.config.finetune, self.session
        metrics = dict(self.metrics)
        if ft.mode == "noise":  # the bit widths were trained
            q = self.config.quantization
            targets = select_modules(pl_module, q.include, q.exclude)
            fp32 = sum(size for _, size in unquantized_projections(pl_module, q.include, q.exclude).values())
            metrics.update(session.size_metrics(targets, fp32))
        session.finish(export=False)  # the fine-tuned formats recorded on the modules
        self.session = None
        epochs = trainer.current_epoch - self.start_epoch - 1
        lines = [f"{self.who}: fine-tuned ({ft.mode}) for {epochs} epoch(s)"]
        if self.config.recalibrate_bn:
            metrics.update(self._recalibrate_batchnorm(trainer, pl_module, lines))
        finetuned = self._evaluate(trainer, pl_module) if self.config.reporting.evaluate else {}
        for name, value in finetuned.items():
            metrics[f"obc/{name}_finetuned"] = value
        metrics["obc/finetune_epochs"] = float(epochs)
        lines += [
            f"{n}: {metrics.get(f'obc/{n}_before', float('nan')):.5g} -> "
            f"{metrics.get(f'obc/{n}_after', float('nan')):.5g} -> {v:.5g}"
            for n, v in finetuned.items()
        ]
        if self.config.export is not None:
            metrics.update(self._export(trainer, pl_module))
        self.phase = "done"
        self._publish(trainer, metrics, lines, None)

    def _resume_finetuning(self, trainer: Trainer, pl_module: LightningModule, state: dict) -> None:
        """Continue the session of a checkpoint written during fine-tuning: the latent weights and the
        quantizers come back, the quantizers' parameters rejoin the optimizer before its state loads."""
        self._snapshot = ModelSnapshot(pl_module)  # the model as this fit received it
        try:
            optimizer, schedulers = glue.optimizer_and_schedulers(trainer)
            self.session = FinetuneSession.resume(pl_module, state, optimizer=optimizer, schedulers=schedulers)
            self.quantizers = dict(self.session.quantizers)
            glue.rewrap_ddp(trainer, pl_module)
        except BaseException as e:
            self._recover(e)
            raise
        rank_zero_info(f"{self.who}: resumed fine-tuning ({self.session.mode}) of {len(self.quantizers)} modules")

    def _say_where_the_model_is(self, written: list[str]) -> None:
        """Once per run: where the compressed model is when nothing compressed was written to disk."""
        if self.config.export is not None or written:
            return
        rank_zero_info(
            f"{self.who}: the compressed model is in memory only (trainer.lightning_module): there is no export_path "
            "and no ModelCheckpoint(save_last=True, save_weights_only=False) whose 'last' checkpoint would carry it "
            "with its quantization formats. Keep it with "
            "obc_lightning.save_quantized(model, 'model.safetensors') (packed) or "
            "trainer.save_checkpoint('compressed.ckpt') (restored by load_from_checkpoint + load_checkpoint_formats), "
            "or pass export_path=..."
        )

    # ================================================================== failures
    def _guarded(self, trainer: Trainer, pl_module: LightningModule, work: Callable, **kwargs) -> None:
        """Run a stage of the callback's work; on any failure put the model back and re-raise. The snapshot
        of the trained weights is held until the work is over (through fine-tuning)."""
        if self._snapshot is None:
            self._snapshot = ModelSnapshot(pl_module)
        self._keep_snapshot = False
        try:
            work(trainer, pl_module, **kwargs)
        except BaseException as e:
            self._recover(e)
            raise
        if not self._keep_snapshot:
            self._snapshot = None

    def _recover(self, exception: BaseException | None = None) -> None:
        """Fine-tuning parametrizations removed, the snapshot's weights and buffers back, state forgotten."""
        if self.session is None and self._snapshot is None:
            return
        if self.session is not None:
            self.session.abort()
        if self._snapshot is not None:
            self._snapshot.restore()
        what = f" ({type(exception).__name__}: {exception})" if exception is not None else ""
        rank_zero_warn(f"{self.who}: its work failed{what}; the model is back to the weights it had before the "
                       "callback touched it, and nothing counts as compressed")
        self._forget()

    def _forget(self) -> None:
        self.session, self._snapshot, self._seal = None, None, None
        self.report, self.quantized_modules, self.skipped_modules, self.metrics = None, [], {}, {}
        self.phase, self.start_epoch, self.quantizers = "idle", None, {}

    # ================================================================== pieces
    def _compress_stage(self, trainer: Trainer, pl_module: LightningModule, batches: list) -> Stage:
        reduce_fn = glue.all_reduce_fn(trainer)  # under DDP: Hessians summed, the solving shared out
        bn_batches = self._bn_batches(trainer) if self.config.recalibrate_bn else []
        probe = (batches or bn_batches or [None])[0]
        forward_fn = (
            None if probe is None else self._user_code_path(trainer, pl_module, probe)
        )
        return compress_stage(
            pl_module, batches, self.config, who=self.who,
            evaluate=(lambda: self._evaluate(trainer, pl_module)) if self.config.reporting.evaluate else None,
            bn_batches=bn_batches or None,
            forward_fn=forward_fn, reduce_fn=reduce_fn, distributed=reduce_fn is not None,
            progress=glue.trainer_progress(trainer, self.who, self.config.reporting.verbose),
            eval_batches=glue.size_target_judge(trainer, self.config, lambda: self._evaluate(trainer, pl_module),
                                                self.who),
        )

    def _user_code_path(self, trainer: Trainer, pl_module: LightningModule, probe) -> Callable:
        """The user's code that runs a batch; which one is said once (at info level), not at every stage."""

        def say_once(line: str) -> None:
            if line != self._code_path_said:
                self._code_path_said = line
                rank_zero_info(line)

        return glue.user_code_path(trainer, pl_module, probe, self.calibration_step, self.who, say=say_once)

    def _record(self, stage: Stage) -> None:
        self.report = stage.report
        if stage.report is not None:
            self.quantized_modules, self.skipped_modules = stage.report.quantized, dict(stage.report.skipped)
        else:
            self.quantized_modules = list(stage.session.quantizers)
            q = self.config.quantization
            left = unquantized_projections(stage.session.model, q.include, q.exclude)
            self.skipped_modules = {n: reason for n, (reason, _) in left.items()}

    def _calibration_batches(self, trainer: Trainer) -> list:
        batches = glue.calibration_batches(trainer, self.calibration_dataloader, self.config.calibration.batches,
                                           self.who)
        if not batches and self.calibration_dataloader is not None:
            raise ValueError(
                f"{self.who}: calibration_dataloader ({type(self.calibration_dataloader).__name__}) gave no batch; "
                "the model was not compressed"
            )
        return batches

    def _bn_batches(self, trainer: Trainer) -> list:
        """The first ``recalibrate_bn`` training batches (the distribution BatchNorm's statistics describe)."""
        n = self.config.recalibrate_bn
        batches = glue.calibration_batches(trainer, None, n, self.who) if n else []
        if n and not batches:
            rank_zero_warn(f"{self.who}: recalibrate_bn: no training batches; BatchNorm statistics left as they were")
        return batches

    def _recalibrate_batchnorm(self, trainer: Trainer, pl_module: LightningModule, lines: list) -> dict:
        batches = self._bn_batches(trainer)
        if not batches:
            return {}
        forward_fn = self._user_code_path(trainer, pl_module, batches[0])
        n = reestimate_batchnorm(pl_module, batches, forward_fn=forward_fn, reduce_fn=glue.all_reduce_fn(trainer))
        lines.append(f"BatchNorm statistics of {n} layer(s) re-estimated over {len(batches)} training batches")
        return {"obc/bn_recalibrated": float(n)}

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        return glue.replay_validation(trainer, pl_module, self.who)

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Rank zero writes the packed file; every rank learns whether it succeeded (a failure on rank zero
        raises on every rank instead of leaving the others waiting)."""
        metrics, error = {}, None
        if trainer.is_global_zero:
            try:
                metrics = export_stage(pl_module, self.config, example_input=self._example_input(trainer, pl_module))
                rank_zero_info(f"{self.who}: compressed model written to {self.config.export.path} "
                               f"({metrics['obc/file_mb']:.3f} MB)")
            except Exception as e:
                error = e
        reduce = glue.all_reduce_fn(trainer)
        if reduce is not None:
            failed = torch.tensor([0.0 if error is None else 1.0], device=trainer.strategy.root_device)
            reduce(failed)
            if float(failed) and error is None:
                raise RuntimeError(f"{self.who}: writing {self.config.export.path} failed on rank zero")
        if error is not None:
            raise error
        return metrics

    def _example_input(self, trainer: Trainer, pl_module: LightningModule):
        """What an ONNX export traces (``export_path`` ending in ``.onnx``): the LightningModule's
        ``example_input_array``, else the input of the first calibration batch (the batch itself if a
        tensor, its first element if a tuple or list starting with one), on the module's device."""
        if not self.config.export.path.lower().endswith(".onnx"):
            return None
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            batches = self._calibration_batches(trainer)
            batch = batches[0] if batches else None
            example = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(example, Tensor):
                raise ValueError(
                    f"{self.who}: export_path={self.config.export.path!r} is an ONNX file, traced from an example "
                    "input: set the LightningModule's example_input_array (the first calibration batch is "
                    f"{type(batch).__name__}, not a tensor or a tuple starting with one)"
                )
        if isinstance(example, (tuple, list)):
            return tuple(t.to(pl_module.device) if isinstance(t, Tensor) else t for t in example)
        return example.to(pl_module.device) if isinstance(example, Tensor) else example

    def _publish(self, trainer: Trainer, metrics: dict, lines: list[str], report: CompressionReport | None) -> None:
        """Metrics to every logger, the summary through rank_zero_info, the error chart to every logger
        that takes images."""
        self.metrics = dict(metrics)
        if self.session is None and self.quantized_modules:  # the compressed weights, final
            self._seal = WeightSeal(trainer.lightning_module, self.quantized_modules)
        glue.log_metrics(trainer, metrics)
        if self.config.reporting.verbose:
            rank_zero_info("\n".join(lines))
        if report is not None and self.config.reporting.plot:
            fig = error_figure(report) if trainer.is_global_zero else None
            if fig is not None or not trainer.is_global_zero:
                glue.send_figure(trainer, fig, "obc/rel_error", "obc_rel_error.png")
            if is_mixed(report):  # widths (or sparsity) per module, in network order
                fig = allocation_figure(report) if trainer.is_global_zero else None
                if fig is not None or not trainer.is_global_zero:
                    glue.send_figure(trainer, fig, "obc/bits", "obc_bits.png")

    def _check_finetuning(self, trainer: Trainer, targets: dict) -> None:
        ft, who = self.config.finetune, self.who
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                f"{who}: finetune needs Trainer(max_epochs=...) (got {max_epochs}): compression happens at the end of "
                "epoch max_epochs - finetune_epochs - 1"
            )
        if ft.epochs > max_epochs:
            raise ValueError(
                f"{who}: finetune_epochs={ft.epochs} must be <= max_epochs={max_epochs} (equal: compress at the start "
                "of fit, for a model that arrives trained)"
            )
        if ft.max_drop is not None and (trainer.min_epochs or 0) > self._compress_epoch(trainer) + 1:
            raise ValueError(
                f"{who}: min_epochs={trainer.min_epochs} would keep training a model that met its budget after epoch "
                f"{self._compress_epoch(trainer)}; lower min_epochs"
            )
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"{who}: finetune={ft.mode!r} parametrizes the weights of the module itself; it runs under "
                f"single-device and DDP strategies, not {type(trainer.strategy).__name__} (which shards or flattens "
                "them)"
            )
        tied = tied_weights(trainer.lightning_module, targets)
        if tied:
            name, users = next(iter(tied.items()))
            raise ValueError(
                f"{who}: finetune={ft.mode!r} parametrizes each module's weight, and the weight of '{name}' is shared "
                f"by {users}: fine-tuning would untie them; exclude all but one, or set finetune=None"
            )
        if ft.mode == "ternary" and not ternary_targets(self.config, targets):
            raise ValueError(
                f"{who}: finetune='ternary' with ternary_skip_first_last=True leaves none of the {len(targets)} "
                "target modules to ternarize; pass ternary_skip_first_last=False"
            )

    def _no_validation_data(self) -> None:
        """Without validation data nothing measures the drop: an error before training if ``monitor`` needs
        it, else one line."""
        ft = self.config.finetune
        where = "no val_dataloaders, no val_dataloader / validation_step in the module, or limit_val_batches=0"
        if ft is not None and ft.monitor is not None:
            raise ValueError(
                f"{self.who}: monitor={ft.monitor!r} needs validation data ({where}): pass val_dataloaders to "
                "fit, or set monitor=None (fine-tuning then runs without a budget)"
            )
        if self.config.reporting.evaluate:
            rank_zero_info(f"{self.who}: no validation data ({where}): nothing to compare before and after "
                           "compression; the report gives the per-module errors only")

    def _compress_epoch(self, trainer: Trainer) -> int:
        """K: the epoch at whose end the model is compressed when fine-tuning (-1: at the start of fit)."""
        return trainer.max_epochs - self.config.finetune.epochs - 1

    def _compresses_now(self, trainer: Trainer, epoch: int) -> bool:
        return self.config.finetune is not None and self.phase == "idle" and epoch == self._compress_epoch(trainer)


def _is_empty(loader: Iterable) -> bool:
    """Whether ``loader`` has a length and it is 0 (a DataLoader over an iterable dataset has none)."""
    try:
        return len(loader) == 0
    except TypeError:
        return False


class _AfterOtherCallbacks(Callback):
    """The end of an :class:`OBCQuantize`'s work, put last in ``trainer.callbacks`` (in ``setup``, for the
    fit): Lightning calls the callbacks in list order, so its ``on_train_end`` runs after every other
    callback's, whatever the order the user listed them in, and its ``teardown`` checks, after every
    ``on_fit_end``, that the compressed weights are still those the report describes. It takes itself out
    of the list in ``teardown``; it has no state of its own."""

    def __init__(self, owner: OBCQuantize) -> None:
        self.owner = owner

    @property
    def state_key(self) -> str:
        return f"{self.owner.state_key}:after_other_callbacks"

    @staticmethod
    def attached(trainer: Trainer, owner: OBCQuantize) -> bool:
        return any(isinstance(cb, _AfterOtherCallbacks) and cb.owner is owner for cb in trainer.callbacks)

    @classmethod
    def attach(cls, trainer: Trainer, owner: OBCQuantize) -> None:
        if not cls.attached(trainer, owner):
            trainer.callbacks.append(cls(owner))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.owner._train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # the last on_save_checkpoint: the rewritten 'last' checkpoints hold the compressed model, whatever an
        # earlier callback put in their place (WeightAveraging stores its average there)
        if self.owner._rewriting_last:
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self in trainer.callbacks:
            trainer.callbacks.remove(self)
        if stage == "fit":
            self.owner._check_weights_kept(pl_module)
            self.owner._send_to_main_process(trainer)


class OBCPrune(OBCQuantize):
    """Prune the model's Linear / Conv1d / Conv2d weights with Optimal Brain Surgeon at the end of ``fit``.

    ``Trainer(callbacks=[OBCPrune(sparsity=0.5)])`` or ``OBCPrune(n_m=(2, 4))``: the same calibration,
    evaluation, report and logging as :class:`OBCQuantize` (``obc/sparsity`` and
    ``obc/<module>/sparsity`` among the metrics), with :func:`~obc_lightning.solvers.prune.obs_prune` in
    place of the quantizer: unstructured sparsity with the layer-wise global selection, or N:M (for
    convs along the input channels at each kernel position). The weights stay in full precision; for
    pruning and quantization together use ``OBCQuantize(bits=4, n_m=(2, 4))``.

    With ``finetune="masked"`` (and ``finetune_epochs``, ``monitor``, ``max_drop`` as in
    :class:`OBCQuantize`) the model is pruned before the last ``finetune_epochs`` epochs, and if the drop
    is over budget those epochs train the kept weights with the mask held fixed (pruned weights stay 0
    and get no gradient).

    ``OBCPrune(target_sparsity=0.6)`` removes 60 % of all the targets' weights, each module's level
    chosen from the OBS loss traces (one greedy pass per module gives every level) for the least output
    error (:mod:`obc_lightning.allocation`); ``target_size_mb=`` does the same for a size in MB.

    Args:
        sparsity: fraction of each module's weights to remove (unstructured); with ``target_sparsity``
            the candidate levels (default 0, 0.05, ..., 0.95).
        n_m: (N, M): at most N non-zeros in every M consecutive inputs.
        calibration_dataloader, calibration_step: as for :class:`OBCQuantize`.
        **options: the flat keywords of :class:`OBCQuantize` but ``bits`` ("Options" below;
            ``export_path``: the pruned weights in float16 with their N:M positions or a bitmask).
    """

    def __init__(
        self,
        sparsity: float | list[float] | None = None,
        n_m: tuple[int, int] | None = None,
        *,
        calibration_dataloader: Iterable | None = None,
        calibration_step: Callable[[LightningModule, Any], Any] | None = None,
        **options,
    ) -> None:
        targets = (options.get("target_sparsity"), options.get("target_size_mb"))
        if all(t is None for t in targets) and (sparsity is None) == (n_m is None):
            raise ValueError(f"OBCPrune: give exactly one of sparsity=... or n_m=(N, M), got {sparsity=!r}, {n_m=!r}")
        if options.get("finetune") not in (None, "masked"):
            raise ValueError(
                f"OBCPrune: finetune must be 'masked' (train the kept weights with the mask fixed) or None, got "
                f"{options['finetune']!r}"
            )
        if options.get("bits") is not None:
            raise ValueError("OBCPrune: bits is not an argument of OBCPrune (use OBCQuantize for quantization)")
        options.pop("bits", None)
        super().__init__(bits=None, sparsity=sparsity, n_m=n_m, calibration_dataloader=calibration_dataloader,
                         calibration_step=calibration_step, **options)


# every flat keyword of the configuration, with its type and default, in the signature (help(), IDEs,
# LightningCLI's --trainer.callbacks.<option>) and in the docstring, generated from the dataclasses
OBCQuantize.__init__.__signature__ = flat_signature(OBCQuantize.__init__)
OBCPrune.__init__.__signature__ = flat_signature(OBCPrune.__init__, skip=("bits",))
if OBCQuantize.__doc__ and OBCPrune.__doc__:  # (python -OO strips docstrings)
    OBCQuantize.__doc__ += "\n    Options:\n" + options_doc() + "\n"
    OBCPrune.__doc__ += "\n    Options:\n" + options_doc(skip=("bits", "sparsity", "n_m")) + "\n"
