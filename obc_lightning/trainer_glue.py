"""What the callback needs from a running Trainer: the user's validation replayed, calibration batches
through the user's code path, DDP sums, progress bars, loggers and checkpoints, the checks of a
configuration against the Trainer, and the pipeline's stages run with all of these (:class:`TrainerStages`).

Lightning glue only: the library functions (``compress_model``, ``FinetuneSession``, ``save_quantized``)
know nothing of a Trainer; :mod:`obc_lightning.callback` maps Lightning's hooks onto them with these.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning, StochasticWeightAveraging, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from obc_lightning.allocation import HeldOutBatches, HeldOutMetric
from obc_lightning.calibration import call_model
from obc_lightning.compress import tied_weights
from obc_lightning.config import CompressionConfig
from obc_lightning.finetune import FinetuneSession
from obc_lightning.pipeline import (
    Stage,
    aborted_on_failure,
    compress_stage,
    compression_epoch,
    export_stage,
    finish_finetuning,
    latent_weights,
    settle_without_finetuning,
    start_finetuning,
    ternary_targets,
)
from obc_lightning.reporting import CompressionReport, Progress, TqdmProgress, allocation_figure, error_figure, is_mixed

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover
    WeightAveraging = StochasticWeightAveraging

CALIBRATION_SAMPLES = 1024  # default calibration set: about this many samples over all ranks
UNKNOWN_BATCH_SIZE_BATCHES = 64  # batches taken when the batch size cannot be read from a batch


# ---------------------------------------------------------------------------------- the user's code
@contextmanager
def logs_captured(module: LightningModule, sink: Callable[[str, Any, dict], None] | None = None):
    """Replace ``module.log`` / ``module.log_dict`` by a sink (or a no-op) for the duration.

    ``self.log`` is not allowed in ``on_train_end``, and calibration / evaluation steps must not leak
    into the user's logged metrics.
    """

    def log(name, value, *args, **kwargs):
        if sink is not None:
            sink(name, value, kwargs)

    def log_dict(dictionary, *args, **kwargs):
        for k, v in dictionary.items():
            log(k, v, **kwargs)

    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.log, module.log_dict = log, log_dict
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                module.__dict__[k] = saved[k]
            else:
                module.__dict__.pop(k, None)


@contextmanager
def eval_mode(module: torch.nn.Module):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def batch_size_of(batch) -> int | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:  # custom batch objects: no tensor to read a size from
        return None


def first_loader(loaders):
    """One iterable from what ``trainer.*_dataloader(s)`` returns (a loader, or a list / dict of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def loop_batch(trainer: Trainer, batch, dataloader_idx: int = 0):
    """``batch`` as Lightning's loops hand it to a step: converted to the Trainer's precision
    (``precision_plugin.convert_input``: float inputs to bfloat16 / float16 / float64 under the "-true"
    precisions), through ``on_before_batch_transfer``, then moved by the strategy (``transfer_batch_to_device``,
    ``on_after_batch_transfer``), as ``evaluation_loop`` and ``training_epoch_loop`` do."""
    batch = trainer.precision_plugin.convert_input(batch)
    module = trainer.lightning_module
    if module is not None:
        batch = module.on_before_batch_transfer(batch, dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


def calibration_batches(trainer: Trainer, loader: Iterable | None, n: int | None, who: str) -> list:
    """The calibration batches as the training loop prepares them (:func:`loop_batch`), a list: every pass
    sees the same batches; ``n`` ``None``: about 1024 samples over all ranks."""
    if loader is None:
        loader = first_loader(trainer.train_dataloader)
    if loader is None:
        return []
    wanted = n
    batches = []
    for batch in loader:
        if wanted is None:
            bs = batch_size_of(batch)
            wanted = math.ceil(CALIBRATION_SAMPLES / (bs * trainer.world_size)) if bs else UNKNOWN_BATCH_SIZE_BATCHES
        batches.append(loop_batch(trainer, batch))
        if len(batches) >= wanted:
            break
    if isinstance(loader, Sized) and n and len(batches) < n:
        rank_zero_info(f"{who}: the calibration data has only {len(batches)} batches")
    return batches


def size_target_judge(trainer: Trainer, config, evaluate: Callable[[], dict[str, float]], who: str
                      ) -> HeldOutMetric | HeldOutBatches | None:
    """What a size target judges its assignments on in the callback (``compress_model``'s
    ``eval_batches``): the user's ``monitor`` metric on the validation replay ``evaluate`` when one is
    set, else the output error on the validation batches; ``None`` without a target or validation data
    (then ``compress_model`` holds out part of the calibration batches)."""
    if config.quantization.target is None or trainer.val_dataloaders is None:
        return None
    ft = config.finetune
    if ft is not None and ft.monitor is not None:
        return HeldOutMetric(ft.monitor, lambda: evaluate()[ft.monitor], ft.monitor_mode,
                             description=f"the validation data ({ft.monitor})")
    batches = calibration_batches(trainer, first_loader(trainer.val_dataloaders), config.calibration.batches, who)
    return HeldOutBatches(batches, f"the validation batches ({len(batches)})") if batches else None


def _forward_binds(module: LightningModule, batch) -> str | None:
    """Why ``forward`` cannot take ``batch`` by the calling convention of
    :func:`~obc_lightning.calibration.call_model` (``None``: it can). Decided from the signature, so that a
    TypeError raised *inside* a forward that takes the batch is the user's error, not a reason to switch."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to read (builtins): assume it takes the batch
        return None
    if isinstance(batch, Mapping):
        args, kwargs, how = (), dict(batch), "module(**batch)"
    elif isinstance(batch, (tuple, list)):
        args, kwargs, how = tuple(batch), {}, "module(*batch)"
    else:
        args, kwargs, how = (batch,), {}, "module(batch)"
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        return f"forward{sig} cannot be called as {how} with this {type(batch).__name__} batch: {e}"
    return None


def user_code_path(
    trainer: Trainer, pl_module: LightningModule, probe, calibration_step: Callable | None, who: str,
    say: Callable[[str], None] = rank_zero_info,
) -> Callable:
    """``fn(module, batch)`` that runs a batch through the user's own code: ``calibration_step`` if given,
    else ``forward`` when its signature takes the batch, else ``validation_step`` / ``training_step``
    with ``self.log`` muted. Which one (and why) goes to ``say``, at info level: ``forward(x)`` with
    ``(x, y)`` batches, calibrated through ``validation_step``, is the ordinary case, not a problem.
    Always in the precision context."""
    precision = trainer.precision_plugin

    def wrapped(run: Callable) -> Callable:
        def forward_fn(module, batch):
            with precision.val_step_context(), logs_captured(pl_module):
                run(module, batch)

        return forward_fn

    if calibration_step is not None:
        say(f"{who}: calibrating through calibration_step")
        return wrapped(calibration_step)
    why = "it defines no forward"
    if is_overridden("forward", pl_module, parent=LightningModule):
        why = _forward_binds(pl_module, probe)
        if why is None:
            say(f"{who}: calibrating through forward")
            return wrapped(call_model)
    name = "validation_step" if is_overridden("validation_step", pl_module) else "training_step"
    if not is_overridden(name, pl_module):
        raise ValueError(
            f"{who}: cannot run the calibration batches: the module has no usable forward ({why}) and no "
            "validation_step / training_step; pass calibration_step=fn(module, batch)"
        )
    say(f"{who}: calibrating through {name} ({why}; pass calibration_step=fn(module, batch) to choose)")
    step = getattr(pl_module, name)
    counter = iter(range(1 << 62))
    return wrapped(lambda module, batch: step(batch, next(counter)))


# ------------------------------------------------------------------------------------ validation
_REDUCTIONS = ("mean", "sum", "max", "min")


def replay_validation(trainer: Trainer, pl_module: LightningModule, who: str) -> dict[str, float]:
    """The validation metrics of the current weights, as Lightning's validation would compute them.

    ``trainer.validate`` cannot run inside ``fit``, and the fit's own validation loop would also call the
    other callbacks (checkpoints, early stopping) and the loggers; so the user's module hooks are replayed
    in Lightning's order (``on_validation_epoch_start``; per batch ``on_validation_batch_start``,
    ``validation_step``, ``on_validation_batch_end``; ``on_validation_epoch_end``) on the validation
    dataloaders (``limit_val_batches`` honoured), in eval mode, without gradients, in the precision context,
    with ``self.log`` / ``self.log_dict`` captured wherever they are called. Values logged in a step are
    reduced over the epoch by their ``reduce_fx`` ("mean": weighted by ``batch_size``, as Lightning does)
    and summed over ranks; values logged at epoch end are averaged over ranks; torchmetrics objects are
    ``compute()``-d (they sync over ranks themselves) and every metric object is reset before and after.
    With several dataloaders, step values get Lightning's ``/dataloader_idx_<i>`` suffix.
    """
    loaders = trainer.val_dataloaders
    if loaders is None or not is_overridden("validation_step", pl_module):
        return {}
    loaders = (
        list(loaders.values())
        if isinstance(loaders, Mapping)
        else (list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
    )
    limits = list(getattr(trainer, "num_val_batches", [])) or [float("inf")] * len(loaders)
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    for m in metrics:  # leftovers of the last validation epoch
        m.reset()
    steps: dict[str, list] = {}  # name -> [reduce_fx, accumulated, weight]
    epoch_values: dict[str, float] = {}
    metric_objs: dict[str, Metric] = {}
    current = {"bs": 1, "dl": 0, "phase": "step"}

    def sink(name, value, kwargs):
        if isinstance(value, Mapping):  # self.log accepts only scalars; be lenient
            return
        if current["phase"] == "step" and len(loaders) > 1 and kwargs.get("add_dataloader_idx", True):
            name = f"{name}/dataloader_idx_{current['dl']}"
        if isinstance(value, Metric):
            metric_objs[name] = value
            return
        v = float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)
        if current["phase"] == "epoch":
            epoch_values[name] = v
            steps.pop(name, None)
            return
        fx = kwargs.get("reduce_fx", "mean")
        fx = fx if fx in _REDUCTIONS else getattr(fx, "__name__", "mean")
        fx = fx if fx in _REDUCTIONS else "mean"
        bs = kwargs.get("batch_size") or current["bs"]
        entry = steps.setdefault(name, [fx, None, 0.0])
        if fx == "mean":
            entry[1] = (entry[1] or 0.0) + v * bs
            entry[2] += bs
        elif fx == "sum":
            entry[1] = (entry[1] or 0.0) + v
        else:
            entry[1] = v if entry[1] is None else (max if fx == "max" else min)(entry[1], v)

    def hook(name: str, *args) -> None:
        if is_overridden(name, pl_module):
            getattr(pl_module, name)(*args)

    with (
        torch.no_grad(),
        eval_mode(pl_module),
        trainer.precision_plugin.val_step_context(),
        logs_captured(pl_module, sink),
    ):
        current["phase"] = "epoch"
        hook("on_validation_epoch_start")
        for dl_idx, loader in enumerate(loaders):
            limit = limits[dl_idx] if dl_idx < len(limits) else float("inf")
            current["dl"] = dl_idx
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = loop_batch(trainer, batch, dl_idx)
                current.update(bs=batch_size_of(batch) or 1, phase="step")
                extra = (dl_idx,) if len(loaders) > 1 else ()
                hook("on_validation_batch_start", batch, i, *extra)
                out = pl_module.validation_step(batch, i, *extra)
                hook("on_validation_batch_end", out, batch, i, *extra)
        current["phase"] = "epoch"
        hook("on_validation_epoch_end")

    reduce = all_reduce_fn(trainer)
    out: dict[str, float] = {}
    device = trainer.strategy.root_device
    for name in sorted(steps):
        fx, value, weight = steps[name]
        if fx == "mean":
            t = torch.tensor([value, weight], dtype=torch.float64, device=device)
            if reduce is not None:
                reduce(t)
            out[name] = float(t[0] / t[1])
        elif reduce is None:
            out[name] = float(value)
        elif fx == "sum":
            t = torch.tensor([value], dtype=torch.float64, device=device)
            reduce(t)
            out[name] = float(t[0])
        else:  # max / min over ranks: the sum of one-hot extremes is not available; gather instead
            out[name] = _extreme_over_ranks(value, fx, device)
    for name in sorted(epoch_values):
        t = torch.tensor([epoch_values[name], 1.0], dtype=torch.float64, device=device)
        if reduce is not None:
            reduce(t)
        out[name] = float(t[0] / t[1])
    for name in sorted(metric_objs):
        out[name] = float(metric_objs[name].compute())  # syncs over ranks itself
    for m in metrics:
        m.reset()
    return out


def _extreme_over_ranks(value: float, fx: str, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    op = torch.distributed.ReduceOp.MAX if fx == "max" else torch.distributed.ReduceOp.MIN
    torch.distributed.all_reduce(t, op=op)
    return float(t[0])


def check_monitor(trainer: Trainer, monitor: str, who: str) -> None:
    """``monitor`` among the metrics of the validation that just ended (as EarlyStopping checks it)."""
    if monitor not in trainer.callback_metrics:
        available = ", ".join(sorted(trainer.callback_metrics)) or "none"
        raise ValueError(
            f"{who}: monitor={monitor!r} is not among the metrics logged in the first validation (available: "
            f"{available}); log it with self.log in validation_step or on_validation_epoch_end, or fix the name"
        )


# ------------------------------------------------------------------------ checks before training
def check_calibration_source(who: str, loader: Iterable | None, step: Callable | None) -> None:
    """``calibration_dataloader`` / ``calibration_step`` of the callback's constructor: batches it can iterate
    and a callable, rejected at construction rather than at the end of training."""
    if loader is not None and (isinstance(loader, (Tensor, str)) or not isinstance(loader, Iterable)):
        raise ValueError(
            f"{who}: calibration_dataloader must be an iterable of batches (a DataLoader), got {type(loader).__name__}"
        )
    if loader is not None and _is_empty(loader):
        raise ValueError(
            f"{who}: calibration_dataloader is empty ({type(loader).__name__} of length 0); give it calibration "
            "batches, or leave it out to calibrate on the train dataloader"
        )
    if step is not None and not callable(step):
        raise ValueError(f"{who}: calibration_step must be callable(module, batch), got {step!r}")


def _is_empty(loader: Iterable) -> bool:
    """Whether ``loader`` has a length and it is 0 (a DataLoader over an iterable dataset has none)."""
    try:
        return len(loader) == 0
    except TypeError:
        return False


def check_finetuning(trainer: Trainer, config: CompressionConfig, targets: Mapping[str, torch.nn.Module],
                     who: str) -> None:
    """In ``setup``: a fine-tuning configuration this fit can carry out (epochs to compress before and to
    train in, a strategy that leaves each module its own weight, untied weights, no other callback averaging
    or pruning the same weights), else an error before
    training rather than after it."""
    ft = config.finetune
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
    if ft.max_drop is not None and (trainer.min_epochs or 0) > compression_epoch(config, max_epochs) + 1:
        raise ValueError(
            f"{who}: min_epochs={trainer.min_epochs} would keep training a model that met its budget after epoch "
            f"{compression_epoch(config, max_epochs)}; lower min_epochs"
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
    for cb in trainer.callbacks:
        if isinstance(cb, (StochasticWeightAveraging, WeightAveraging, ModelPruning)):
            name = type(cb).__name__
            pruning = isinstance(cb, ModelPruning)
            how = ("reparametrizes the same weights (torch.nn.utils.prune)" if pruning else
                   "pairs the model's parameters with its averaged copy's by position")
            alternative = ("OBCPrune(finetune='masked') prunes and fine-tunes with the mask held" if pruning else
                           "finetune=None compresses what it leaves at the end of fit")
            raise ValueError(
                f"{who}: finetune={ft.mode!r} reparametrizes the target weights (torch.nn.utils.parametrize) for the "
                f"last {ft.epochs} epoch(s), and {name} {how}: the two cannot train one model (the fit would fail once "
                f"fine-tuning starts). Run {name} in a fit of its own first, then fine-tune the result "
                f"(OBCQuantize(finetune=..., finetune_epochs=max_epochs)); or {alternative}"
            )
    if ft.mode == "ternary" and not ternary_targets(config, targets):
        raise ValueError(
            f"{who}: finetune='ternary' with ternary_skip_first_last=True leaves none of the {len(targets)} "
            "target modules to ternarize; pass ternary_skip_first_last=False"
        )


def say_no_validation_data(config: CompressionConfig, who: str) -> None:
    """Without validation data nothing measures the drop: an error before training if ``monitor`` needs
    it, else one line."""
    ft = config.finetune
    where = "no val_dataloaders, no val_dataloader / validation_step in the module, or limit_val_batches=0"
    if ft is not None and ft.monitor is not None:
        raise ValueError(
            f"{who}: monitor={ft.monitor!r} needs validation data ({where}): pass val_dataloaders to "
            "fit, or set monitor=None (fine-tuning then runs without a budget)"
        )
    if config.reporting.evaluate:
        rank_zero_info(f"{who}: no validation data ({where}): nothing to compare before and after "
                       "compression; the report gives the per-module errors only")


# ------------------------------------------------------------------------------------------ DDP
def all_reduce_fn(trainer: Trainer) -> Callable[[Tensor], None] | None:
    """Sum over ranks (``torch.distributed.all_reduce``) when more than one process is running."""
    dist = torch.distributed
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    device = trainer.strategy.root_device
    nccl = dist.get_backend() == "nccl"

    def reduce_sum(t: Tensor) -> None:
        if nccl and t.device.type == "cpu":  # NCCL reduces device tensors only (offloaded sums)
            on_device = t.to(device)
            dist.all_reduce(on_device)
            t.copy_(on_device)
        else:
            dist.all_reduce(t)

    return reduce_sum


def rewrap_ddp(trainer: Trainer, pl_module: LightningModule) -> None:
    """Wrap the (un)parametrized module in a new ``DistributedDataParallel`` (Lightning's
    ``configure_ddp``: the user's DDP arguments and communication hooks). Needed because
    ``register_parametrization`` calls ``original.set_(original)``, which gives each weight a new gradient
    accumulator: the old wrapper's hooks sit on the old ones, never fire, and its next forward fails. The
    new wrapper also holds the quantizers' own parameters and averages their gradients over ranks."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()


def optimizer_and_schedulers(trainer: Trainer) -> tuple[torch.optim.Optimizer | None, list]:
    """The first optimizer and the schedulers that step it."""
    if not trainer.optimizers:
        return None, []
    opt = trainer.optimizers[0]
    return opt, [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]


def amp_scale(trainer: Trainer) -> float:
    """The AMP gradient scaler's current scale (1 without one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


# ------------------------------------------------------------------------- spawned processes
# Under ddp_spawn / ddp_fork / ddp_notebook, fit runs in processes started for it, each with a copy of the
# callback; Lightning sends back to the main process only the weights, the trainer state and
# trainer.callback_metrics. The callback's own state goes by a file that rank zero writes, whose name only
# the callback object and its copies know (a random token), and that the main process's object reads
# (and removes) the first time its results are asked for.
def state_file(token: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"obc_lightning-{token}.pt")


def send_to_main_process(token: str, state: dict) -> None:
    """Written atomically (a private temporary file renamed), so a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".obc_lightning-{token}-", dir=tempfile.gettempdir())
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, state_file(token))
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise


def receive_from_worker(token: str) -> dict | None:
    """The state a worker sent (removing the file), or ``None``."""
    path = state_file(token)
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    with suppress(OSError):
        os.remove(path)
    return state


def remove_unread(token: str) -> None:
    with suppress(OSError):
        os.remove(state_file(token))


# ------------------------------------------------------------------------------------- progress
class LinesProgress(Progress):
    """No bar (the Trainer's is off, or not rank zero): one line per stage, through ``rank_zero_info``."""

    def __init__(self, who: str, verbose: bool) -> None:
        self.who, self.verbose = who, verbose

    def start(self, stage: str, total: int | None) -> None:
        if self.verbose:
            unit = {"calibration": "batches", "solving": "modules"}.get(stage, "groups of modules")
            rank_zero_info(f"{self.who}: {stage} ({total if total is not None else '?'} {unit})")


class RichProgress(Progress):
    """A task in a rich ``Progress`` (the RichProgressBar's own while it runs, else a new one)."""

    def __init__(self, progress, prefix: str) -> None:
        self.owned = progress is None
        if self.owned:
            from rich.progress import Progress as RichBar

            progress = RichBar(transient=True)
            progress.start()
        self.progress, self.prefix, self.task, self.steps = progress, prefix, None, 0

    def start(self, stage: str, total: int | None) -> None:
        self._finish_task()
        self.task = self.progress.add_task(f"{self.prefix}{stage}", total=total)
        self.steps = 0

    def step(self, item: str = "") -> None:
        if self.task is None:
            return
        self.progress.update(self.task, advance=1 if self.steps else 0, description=f"{self.prefix}{item}")
        self.steps += 1

    def _finish_task(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def close(self) -> None:
        self._finish_task()
        if self.owned:
            self.progress.stop()


def trainer_progress(trainer: Trainer, who: str, verbose: bool) -> Progress:
    """A progress indicator that follows the Trainer's progress bar: a tqdm bar under Lightning's
    TQDMProgressBar, a rich task under its RichProgressBar, stage lines when the bar is off."""
    bar = trainer.progress_bar_callback
    if bar is None or not trainer.is_global_zero or not bar.is_enabled:
        return LinesProgress(who, verbose)
    if isinstance(bar, TQDMProgressBar):
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        def factory(desc, total, leave):
            return Tqdm(desc=desc, total=total, leave=leave, position=2 * bar.process_position + 1,
                        dynamic_ncols=True, file=sys.stdout)

        return TqdmProgress(factory, prefix=f"{who} ")
    if type(bar).__name__ == "RichProgressBar":
        progress = getattr(bar, "progress", None)
        live = progress is not None and not getattr(bar, "_progress_stopped", False)
        return RichProgress(progress if live else None, prefix=f"{who} ")
    return LinesProgress(who, verbose)


# ------------------------------------------------------------------------------ loggers, charts
def log_metrics(trainer: Trainer, metrics: Mapping[str, float]) -> None:
    """Metrics to every logger (``self.log`` is not allowed in ``on_train_end``)."""
    for lg in trainer.loggers:
        lg.log_metrics(dict(metrics), step=trainer.global_step)
        lg.save()


def send_figure(trainer: Trainer, fig, key: str, filename: str) -> list[str]:
    """The figure to every logger that takes images (TensorBoard, MLflow, Comet, W&B and any logger with a
    ``log_image(key, images, step)`` method) and as a PNG in the log directory; returns where it went.
    Call on every rank (``log_dir`` must be); only rank zero writes."""
    log_dir = trainer.log_dir if trainer.loggers else None
    if not trainer.is_global_zero:
        return []
    sent = []
    path = os.path.join(log_dir or trainer.default_root_dir, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    sent.append(path)
    step = trainer.global_step
    for lg in trainer.loggers:
        name = type(lg).__name__
        try:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_figure(key, fig, global_step=step, close=False)
            elif isinstance(lg, MLFlowLogger):
                lg.experiment.log_figure(lg.run_id, fig, filename)
            elif name == "CometLogger":
                lg.experiment.log_figure(figure_name=key, figure=fig, step=step)
            elif callable(getattr(lg, "log_image", None)):  # WandbLogger and custom loggers
                lg.log_image(key=key, images=[fig], step=step)
            else:
                continue
            sent.append(name)
        except Exception as e:  # a logger that fails on an image must not fail the run: say so
            rank_zero_warn(f"could not send the chart {key!r} to {name}: {type(e).__name__}: {e}")
    return sent


# ----------------------------------------------------------------------------------- checkpoints
def rewrite_last_checkpoints(trainer: Trainer) -> list[str]:
    """Write the model as it is now to the ``last`` checkpoint of every ``ModelCheckpoint(save_last=...)``
    that has one (``ModelCheckpoint`` wrote it during training, before compression). A ``last`` that is a
    link (``save_last="link"``) is replaced by a file, not written through. Call on every rank."""
    written = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or not cb.save_last or not cb.last_model_path:
            continue
        path = cb.last_model_path
        if trainer.is_global_zero and os.path.islink(path):
            os.remove(path)
        trainer.save_checkpoint(path, weights_only=cb.save_weights_only)
        written.append(path)
    return written


# ------------------------------------------------------------------------------- the stages in a fit
@dataclass
class CompressedBeforeFinetuning:
    """What compression before the last epochs left: the stage (its metrics and summary lines complete), the
    epoch it counts from, and the session that fine-tunes through the remaining epochs (``None``: the stage
    is the result) with its quantizers (those of a ternary / DiffQ stage, finished, when there is none)."""

    stage: Stage
    start_epoch: int
    session: FinetuneSession | None
    quantizers: dict[str, torch.nn.Module]


class TrainerStages:
    """The stages of :mod:`obc_lightning.pipeline` fed by a running fit: calibration batches as the training
    loop prepares them, run through the user's code path; the user's validation replayed; sums over DDP
    ranks; the Trainer's progress bar; the optimizer that fine-tunes; the export written by rank zero for
    all. Made for one hook's work: what lasts across hooks (the phase, the session, the snapshot) is the
    callback's, which records what these methods return."""

    def __init__(self, trainer: Trainer, pl_module: LightningModule, config: CompressionConfig, who: str, *,
                 calibration_dataloader: Iterable | None = None, calibration_step: Callable | None = None,
                 say: Callable[[str], None] = rank_zero_info) -> None:
        self.trainer, self.module, self.config, self.who = trainer, pl_module, config, who
        self.calibration_dataloader, self.calibration_step, self.say = calibration_dataloader, calibration_step, say

    # ------------------------------------------------------------------ what the stages run on
    def calibration_batches(self) -> list:
        """:func:`calibration_batches`; none from a ``calibration_dataloader`` the user gave is an error (a fit
        without a train dataloader only has nothing to calibrate on)."""
        batches = calibration_batches(self.trainer, self.calibration_dataloader, self.config.calibration.batches,
                                      self.who)
        if not batches and self.calibration_dataloader is not None:
            raise ValueError(
                f"{self.who}: calibration_dataloader ({type(self.calibration_dataloader).__name__}) gave no batch; "
                "the model was not compressed"
            )
        return batches

    def bn_batches(self) -> list:
        """The first ``recalibrate_bn`` training batches (the distribution BatchNorm's statistics describe)."""
        n = self.config.recalibrate_bn
        batches = calibration_batches(self.trainer, None, n, self.who) if n else []
        if n and not batches:
            rank_zero_warn(f"{self.who}: recalibrate_bn: no training batches; BatchNorm statistics left as they were")
        return batches

    def code_path(self, probe) -> Callable:
        """:func:`user_code_path` for batches like ``probe``; which path it is goes to ``say``."""
        return user_code_path(self.trainer, self.module, probe, self.calibration_step, self.who, say=self.say)

    def evaluate(self) -> dict[str, float]:
        return replay_validation(self.trainer, self.module, self.who)

    # ------------------------------------------------------------------ the stages
    def compress(self, batches: list) -> Stage:
        """:func:`~obc_lightning.pipeline.compress_stage` on ``batches`` (none: ternary / DiffQ, which solve
        nothing), the code path chosen on the first batch there is (calibration, else BatchNorm)."""
        reduce_fn = all_reduce_fn(self.trainer)  # under DDP: Hessians summed, the solving shared out
        bn_batches = self.bn_batches() if self.config.recalibrate_bn else []
        probe = (batches or bn_batches or [None])[0]
        forward_fn = None if probe is None else self.code_path(probe)
        return compress_stage(
            self.module, batches, self.config, who=self.who,
            evaluate=self.evaluate if self.config.reporting.evaluate else None,
            bn_batches=bn_batches or None,
            forward_fn=forward_fn, reduce_fn=reduce_fn, distributed=reduce_fn is not None,
            progress=trainer_progress(self.trainer, self.who, self.config.reporting.verbose),
            eval_batches=size_target_judge(self.trainer, self.config, self.evaluate, self.who),
        )

    def post_training(self) -> Stage | None:
        """Compression at the end of training, measured and exported (``None``: no data to calibrate on)."""
        batches = self.calibration_batches()
        if not batches:
            rank_zero_warn(f"{self.who}: no calibration data (no calibration_dataloader and no train dataloader); "
                           "the model was not quantized")
            return None
        stage = self.compress(batches)
        if self.config.export is not None:
            stage.metrics.update(self.export())
        return stage

    def compress_for_finetuning(self, may_finetune: bool) -> CompressedBeforeFinetuning | None:
        """Compress and measure; within budget (or ``may_finetune=False``) the model is done (the remaining
        epochs skipped, the export written), else the fine-tuning session starts on the user's optimizer.
        ``None``: no data to calibrate on, nothing compressed."""
        ft, trainer = self.config.finetune, self.trainer
        batches = []
        if ft.mode in ("ste", "masked", "pq"):
            batches = self.calibration_batches()
            if not batches:
                rank_zero_warn(f"{self.who}: no calibration data; the model was not quantized")
                return None
        latent = latent_weights(self.module, self.config)
        stage = self.compress(batches)
        start_epoch = compression_epoch(self.config, trainer.max_epochs) if may_finetune else trainer.current_epoch
        if not stage.needs_finetuning or not may_finetune:
            quantizers = settle_without_finetuning(stage)
            if may_finetune:
                trainer.should_stop = True  # the model is quantized: the remaining epochs are skipped
                stage.lines.append(f"stopping fit: the remaining {ft.epochs} epoch(s) are not needed")
            stage.metrics["obc/finetune_epochs"] = 0.0
            if self.config.export is not None:
                stage.metrics.update(self.export())
            return CompressedBeforeFinetuning(stage, start_epoch, None, quantizers)
        optimizer, schedulers = optimizer_and_schedulers(trainer)
        session = start_finetuning(self.module, self.config, stage, optimizer=optimizer, schedulers=schedulers,
                                   latent=latent)
        with aborted_on_failure(lambda: session):  # the callback holds the snapshot, not yet the session
            if not session.trains_parameters:
                rank_zero_warn(f"{self.who}: no optimizer; the {ft.mode} quantizer parameters are not trained")
            rewrap_ddp(trainer, self.module)
        stage.lines.append(f"fine-tuning ({ft.mode}) for {ft.epochs} epoch(s)")
        return CompressedBeforeFinetuning(stage, start_epoch, session, dict(session.quantizers))

    def finish_finetuning(self, session: FinetuneSession, metrics: Mapping[str, float], epochs: int
                          ) -> tuple[dict[str, float], list[str]]:
        """:func:`~obc_lightning.pipeline.finish_finetuning` on the training batches and the user's
        validation, then the export."""
        bn_batches = self.bn_batches() if self.config.recalibrate_bn else []
        metrics, lines = finish_finetuning(
            self.module, self.config, session, metrics, epochs=epochs, who=self.who,
            evaluate=self.evaluate if self.config.reporting.evaluate else None,
            bn_batches=bn_batches, forward_fn=self.code_path(bn_batches[0]) if bn_batches else None,
            reduce_fn=all_reduce_fn(self.trainer),
        )
        if self.config.export is not None:
            metrics.update(self.export())
        return metrics, lines

    def export(self) -> dict[str, float]:
        """Rank zero writes the file; every rank learns whether it succeeded (a failure on rank zero raises
        on every rank instead of leaving the others waiting)."""
        trainer, path = self.trainer, self.config.export.path
        metrics, error = {}, None
        if trainer.is_global_zero:
            try:
                metrics = export_stage(self.module, self.config, example_input=self.example_input())
                rank_zero_info(f"{self.who}: compressed model written to {path} ({metrics['obc/file_mb']:.3f} MB)")
            except Exception as e:
                error = e
        reduce = all_reduce_fn(trainer)
        if reduce is not None:
            failed = torch.tensor([0.0 if error is None else 1.0], device=trainer.strategy.root_device)
            reduce(failed)
            if float(failed) and error is None:
                raise RuntimeError(f"{self.who}: writing {path} failed on rank zero")
        if error is not None:
            raise error
        return metrics

    def example_input(self):
        """What an ONNX export traces (``export_path`` ending in ``.onnx``): the LightningModule's
        ``example_input_array``, else the input of the first calibration batch (the batch itself if a
        tensor, its first element if a tuple or list starting with one), on the module's device."""
        if not self.config.export.path.lower().endswith(".onnx"):
            return None
        module = self.module
        example = getattr(module, "example_input_array", None)
        if example is None:
            batches = self.calibration_batches()
            batch = batches[0] if batches else None
            example = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(example, Tensor):
                raise ValueError(
                    f"{self.who}: export_path={self.config.export.path!r} is an ONNX file, traced from an example "
                    "input: set the LightningModule's example_input_array (the first calibration batch is "
                    f"{type(batch).__name__}, not a tensor or a tuple starting with one)"
                )
        if isinstance(example, (tuple, list)):
            return tuple(t.to(module.device) if isinstance(t, Tensor) else t for t in example)
        return example.to(module.device) if isinstance(example, Tensor) else example


def resume_finetuning(trainer: Trainer, pl_module: LightningModule, state: dict) -> FinetuneSession:
    """The session of a checkpoint written during fine-tuning, in ``on_fit_start``: the latent weights and
    the quantizers come back, and the quantizers' parameters rejoin the optimizer before its saved state
    loads (it expects their group)."""
    optimizer, schedulers = optimizer_and_schedulers(trainer)
    session = FinetuneSession.resume(pl_module, state, optimizer=optimizer, schedulers=schedulers)
    with aborted_on_failure(lambda: session):  # the callback holds the snapshot, not yet the session
        rewrap_ddp(trainer, pl_module)
    return session


def publish(trainer: Trainer, config: CompressionConfig, metrics: Mapping[str, float], lines: list[str],
            report: CompressionReport | None) -> None:
    """Metrics to every logger, the summary through ``rank_zero_info``, the error chart (and, for mixed
    widths or sparsities, the chart per module) to every logger that takes images."""
    log_metrics(trainer, metrics)
    if config.reporting.verbose:
        rank_zero_info("\n".join(lines))
    if report is not None and config.reporting.plot:
        fig = error_figure(report) if trainer.is_global_zero else None
        if fig is not None or not trainer.is_global_zero:
            send_figure(trainer, fig, "obc/rel_error", "obc_rel_error.png")
        if is_mixed(report):  # widths (or sparsity) per module, in network order
            fig = allocation_figure(report) if trainer.is_global_zero else None
            if fig is not None or not trainer.is_global_zero:
                send_figure(trainer, fig, "obc/bits", "obc_bits.png")


def say_where_the_model_is(trainer: Trainer, config: CompressionConfig, written: list[str], who: str) -> None:
    """After the ``last`` checkpoints were rewritten (``written``): where the compressed model is, when nothing
    that carries it was written to disk."""
    weights_only = {cb.last_model_path for cb in trainer.checkpoint_callbacks
                    if getattr(cb, "save_weights_only", False)}
    if config.export is not None or any(p not in weights_only for p in written):
        return
    rank_zero_info(
        f"{who}: the compressed model is in memory only (trainer.lightning_module): there is no export_path "
        "and no ModelCheckpoint(save_last=True, save_weights_only=False) whose 'last' checkpoint would carry it "
        "with its quantization formats. Keep it with "
        "obc_lightning.save_quantized(model, 'model.safetensors') (packed) or "
        "trainer.save_checkpoint('compressed.ckpt') (restored by load_from_checkpoint + load_checkpoint_formats), "
        "or pass export_path=..."
    )
