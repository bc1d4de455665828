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
is Lightning-specific (the user's validation replayed, calibration batches, DDP, progress, loggers, the
checks against the Trainer) and runs the steps in a fit (``TrainerStages``); the callback keeps the state
that lasts across hooks (the phase, the fine-tuning session, the weights to put back) and records what
the steps return.
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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from obc_lightning import trainer_glue as glue
from obc_lightning.attention import split_attention_projections
from obc_lightning.compress import check_against_model, config_of
from obc_lightning.config import DEFAULT_BITS, CompressionConfig, explicit_options, flat_signature, options_doc
from obc_lightning.finetune import FinetuneSession
from obc_lightning.formats.record import CHECKPOINT_KEY, formats_state, load_formats_state, model_formats
from obc_lightning.pipeline import ModelSnapshot, Stage, WeightSeal, compressed_modules, compression_epoch
from obc_lightning.reporting import CompressionReport
from obc_lightning.selection import select_modules


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
    (default 2, 3, 4, 8) for the least error within that size on data the Hessians did not come from: the
    ``monitor`` metric of the validation replay when one is set, else the output error on the validation
    batches, else (no validation data) on a held-out share of the calibration batches, the chosen widths
    then solved again on all of them (:mod:`obc_lightning.allocation`). The chosen widths are in the
    summary table, in the metrics (``obc/<module>/bits``) and in a chart of bits per module in network
    order (``obc/bits``); ``"ste"`` fine-tuning trains on each module's own grid, and the export stores
    each module's width.

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
        glue.check_calibration_source(who, calibration_dataloader, calibration_step)
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
                glue.check_finetuning(trainer, self.config, targets, self.who)
            if not trainer.enable_validation:
                glue.say_no_validation_data(self.config, self.who)
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
        if ft is not None and self.phase == "idle" and trainer.current_epoch > self._compression_epoch(trainer):
            may_finetune = trainer.current_epoch < trainer.max_epochs
            self._guarded(trainer, pl_module, self._compress_for_finetuning, may_finetune=may_finetune)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # in Lightning 2.x the epoch's validation has already run (training_epoch_loop.on_advance_end)
        ft = self.config.finetune
        if ft is not None and self.phase == "idle" and trainer.current_epoch == self._compression_epoch(trainer):
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
                f"{self.who}: fit ended before the end of epoch {self._compression_epoch(trainer)}, where compression "
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
            glue.say_where_the_model_is(trainer, self.config, written, self.who)

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

    # ================================================================== the flow (pipeline stages, in a fit)
    def _post_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Without fine-tuning: compressed, measured and exported as training leaves the model."""
        stage = self._stages(trainer, pl_module).post_training()
        if stage is not None:
            self._record(stage)
            self._publish(trainer, stage.metrics, stage.lines, stage.report)

    def _compress_for_finetuning(self, trainer: Trainer, pl_module: LightningModule, may_finetune: bool) -> None:
        """Compressed and measured before the last epochs: done within budget, else a session fine-tunes."""
        done = self._stages(trainer, pl_module).compress_for_finetuning(may_finetune)
        if done is None:  # nothing to calibrate on: nothing compressed, nothing to fine-tune
            self.phase = "done"
            return
        self._record(done.stage)
        self.start_epoch, self.session, self.quantizers = done.start_epoch, done.session, done.quantizers
        self.phase = "done" if done.session is None else "finetuning"
        self._publish(trainer, done.stage.metrics, done.stage.lines, done.stage.report)

    def _finish_finetuning(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The session ends (the weights truly quantized), then BatchNorm, evaluation, export."""
        epochs = trainer.current_epoch - self.start_epoch - 1
        metrics, lines = self._stages(trainer, pl_module).finish_finetuning(self.session, self.metrics, epochs)
        self.session, self.phase = None, "done"
        self._publish(trainer, metrics, lines, None)

    def _resume_finetuning(self, trainer: Trainer, pl_module: LightningModule, state: dict) -> None:
        """The session of a checkpoint written during fine-tuning, back on the model and its optimizer."""
        self._snapshot = ModelSnapshot(pl_module)  # the model as this fit received it
        try:
            self.session = glue.resume_finetuning(trainer, pl_module, state)
        except BaseException as e:
            self._recover(e)
            raise
        self.quantizers = dict(self.session.quantizers)
        rank_zero_info(f"{self.who}: resumed fine-tuning ({self.session.mode}) of {len(self.quantizers)} modules")

    # ================================================================== failures
    def _guarded(self, trainer: Trainer, pl_module: LightningModule, work: Callable, **kwargs) -> None:
        """Run a stage of the callback's work; on any failure put the model back and re-raise. The snapshot
        of the trained weights is held until the work is over (through fine-tuning, while there is a session)."""
        if self._snapshot is None:
            self._snapshot = ModelSnapshot(pl_module)
        try:
            work(trainer, pl_module, **kwargs)
        except BaseException as e:
            self._recover(e)
            raise
        if self.session is None:
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
    def _stages(self, trainer: Trainer, pl_module: LightningModule) -> glue.TrainerStages:
        return glue.TrainerStages(trainer, pl_module, self.config, self.who, say=self._say_once,
                                  calibration_dataloader=self.calibration_dataloader,
                                  calibration_step=self.calibration_step)

    def _say_once(self, line: str) -> None:
        """Which of the user's code paths runs the batches: said once, not at every stage."""
        if line != self._code_path_said:
            self._code_path_said = line
            rank_zero_info(line)

    def _record(self, stage: Stage) -> None:
        self.report = stage.report
        self.quantized_modules, self.skipped_modules = compressed_modules(stage, self.config)

    def _publish(self, trainer: Trainer, metrics: dict, lines: list[str], report: CompressionReport | None) -> None:
        """The metrics kept and reported; compressed weights that are final sealed (``WeightSeal``)."""
        self.metrics = dict(metrics)
        if self.session is None and self.quantized_modules:  # the compressed weights, final
            self._seal = WeightSeal(trainer.lightning_module, self.quantized_modules)
        glue.publish(trainer, self.config, metrics, lines, report)

    def _compression_epoch(self, trainer: Trainer) -> int:
        return compression_epoch(self.config, trainer.max_epochs)


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
