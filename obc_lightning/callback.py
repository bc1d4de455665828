"""``OBCQuantize``: post-training quantization of the model that leaves ``trainer.fit``.

The callback is orchestration only: it picks calibration batches from the user's data, decides how to
run them through the user's own code, calls :func:`obc_lightning.compress.compress_model`, measures the
validation metrics before and after, and reports to the loggers. Everything it computes is also
available without Lightning through the library functions.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from obc_lightning.calibration import call_model
from obc_lightning.compress import SOLVERS, compress_model, select_modules
from obc_lightning.grids import check_bits
from obc_lightning.reporting import CompressionReport, error_figure

CALIBRATION_SAMPLES = 1024  # default calibration set: about this many samples over all ranks
UNKNOWN_BATCH_SIZE_BATCHES = 64  # batches taken when the batch size cannot be read from a batch


@contextmanager
def _logs_captured(module: LightningModule, sink: Callable[[str, Any, dict], None] | None = None):
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
def _eval_mode(module: torch.nn.Module):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _batch_size(batch) -> int | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:  # custom batch objects: no tensor to read a size from
        return None


def _first_loader(loaders):
    """One iterable from what ``trainer.*_dataloader(s)`` returns (a loader, or a list / dict of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _all_reduce_fn(trainer: Trainer) -> Callable[[Tensor], None] | None:
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


class OBCQuantize(Callback):
    r"""Quantize the model's Linear / Conv1d / Conv2d weights to ``bits`` bits at the end of ``fit``.

    Compression happens in ``on_train_end``, where the model is still on its training device (before
    ``on_fit_end`` the strategy has moved it to the CPU). Steps:

    1. calibration batches: ``calibration_batches`` batches (default: enough for ~1024 samples over
       all ranks) from ``calibration_dataloader`` (default: the trainer's train dataloader), moved to
       the device by the LightningModule's own batch-transfer hooks;
    2. the user's code path: ``calibration_step(module, batch)`` if given; else the module's
       ``forward`` (``module(batch)``, ``module(*batch)`` for tuples/lists, ``module(**batch)`` for
       dicts) if it has one that accepts the batch; else its ``validation_step`` (or ``training_step``)
       with ``self.log`` muted. Always in eval mode, without gradients, in the precision context;
    3. :func:`~obc_lightning.compress.compress_model` in place; under DDP the Hessian sums are
       all-reduced so every rank computes the same weights;
    4. if ``evaluate``: the validation dataloader(s) are run through ``validation_step`` before and
       after, with ``self.log`` captured (``trainer.validate`` cannot run inside ``fit``); each logged
       value is averaged weighted by batch size (torchmetrics objects: ``compute()``), summed over ranks;
    5. metrics to every logger: ``obc/<module>/loss``, ``obc/<module>/rel_error``,
       ``obc/<module>/obc_rows``, ``obc/size_mb_before``, ``obc/size_mb_after``,
       ``obc/compression_ratio``, ``obc/avg_bits``, ``obc/seconds``, ``obc/<metric>_before``,
       ``obc/<metric>_after``; the summary table through ``rank_zero_info``; with ``plot`` and matplotlib
       installed, ``obc_rel_error.png`` in the log dir.

    The weights keep their shapes, so a checkpoint saved after ``fit`` holds the quantized values and
    loads into the same architecture; this callback's state records the configuration and which
    modules were quantized.

    With ``export_path``, rank zero also writes the packed model there
    (:func:`~obc_lightning.export.save_quantized`, fp16 scales; load it with
    :func:`~obc_lightning.export.load_quantized`), and the size metrics become those of the file:
    ``obc/file_mb`` and ``obc/size_mb_after`` are its size, ``obc/size_mb_before`` the model's full
    state dict at its original precision, ``obc/compression_ratio`` their ratio.

    Args:
        bits: 2 ... 8.
        group_size, symmetric, mse, damp, solver, sequential, include, exclude, offload: see
            :func:`~obc_lightning.compress.compress_model`.
        calibration_batches: number of batches (per rank); ``None``: ~1024 samples.
        calibration_dataloader: any iterable of batches; ``None``: the trainer's train dataloader.
        calibration_step: ``fn(module, batch)`` running the batch through the module (for batches the
            forward cannot take); its return value is ignored.
        evaluate: measure the validation metrics before and after.
        plot: save a per-module error chart when matplotlib is installed.
        verbose: print the summary table.
        export_path: file (``.safetensors``) to write the packed model to at the end; its directory is
            created if missing.
    """

    def __init__(
        self,
        bits: int = 4,
        *,
        group_size: int | None = None,
        symmetric: bool = False,
        mse: bool = True,
        damp: float = 0.01,
        solver: str = "auto",
        sequential: bool = False,
        calibration_batches: int | None = None,
        calibration_dataloader: Iterable | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        calibration_step: Callable[[LightningModule, Any], Any] | None = None,
        evaluate: bool = True,
        offload: bool = False,
        plot: bool = True,
        verbose: bool = True,
        export_path: str | os.PathLike | None = None,
    ) -> None:
        check_bits(bits)
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"OBCQuantize: group_size must be a positive integer or None, got {group_size!r}"
            )
        if solver not in SOLVERS:
            raise ValueError(f"OBCQuantize: solver must be one of {SOLVERS}, got {solver!r}")
        if (
            isinstance(damp, bool)
            or not isinstance(damp, (int, float))
            or not math.isfinite(damp)
            or damp < 0
        ):
            raise ValueError(f"OBCQuantize: damp must be a finite number >= 0, got {damp!r}")
        for flag, value in (
            ("symmetric", symmetric),
            ("mse", mse),
            ("sequential", sequential),
            ("evaluate", evaluate),
            ("offload", offload),
            ("plot", plot),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"OBCQuantize: {flag} must be a bool, got {value!r}")
        if calibration_batches is not None and (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"OBCQuantize: calibration_batches must be a positive integer or None, got "
                f"{calibration_batches!r}"
            )
        if calibration_dataloader is not None and (
            isinstance(calibration_dataloader, (Tensor, str))
            or not isinstance(calibration_dataloader, Iterable)
        ):
            raise ValueError(
                f"OBCQuantize: calibration_dataloader must be an iterable of batches (a DataLoader), "
                f"got {type(calibration_dataloader).__name__}"
            )
        if calibration_step is not None and not callable(calibration_step):
            raise ValueError(
                f"OBCQuantize: calibration_step must be callable(module, batch), got {calibration_step!r}"
            )
        if export_path is not None and (
            not isinstance(export_path, (str, os.PathLike))
            or not os.fspath(export_path)
            or os.path.isdir(export_path)
        ):
            raise ValueError(f"OBCQuantize: export_path must be a file path or None, got {export_path!r}")
        for kind, pats in (("include", include), ("exclude", exclude)):
            if (
                pats is not None
                and not isinstance(pats, str)
                and not (isinstance(pats, Sequence) and all(isinstance(p, str) for p in pats))
            ):
                raise ValueError(
                    f"OBCQuantize: {kind} must be a name, a pattern or a list of them, got {pats!r}"
                )

        self.bits, self.group_size, self.symmetric, self.mse, self.damp = (
            bits,
            group_size,
            symmetric,
            mse,
            damp,
        )
        self.solver, self.sequential, self.offload = solver, sequential, offload
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.include, self.exclude = include, exclude
        self.calibration_step = calibration_step
        self.evaluate, self.plot, self.verbose = evaluate, plot, verbose
        self.export_path = None if export_path is None else os.fspath(export_path)

        self.report: CompressionReport | None = None
        self.quantized_modules: list[str] = []
        self.skipped_modules: dict[str, str] = {}
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ configuration and state
    @property
    def config(self) -> dict[str, Any]:
        """The quantization configuration, as plain values (what a checkpoint records)."""
        step = self.calibration_step
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "mse": self.mse,
            "damp": float(self.damp),
            "solver": self.solver,
            "sequential": self.sequential,
            "offload": self.offload,
            "calibration_batches": self.calibration_batches,
            "include": self.include
            if self.include is None or isinstance(self.include, str)
            else list(self.include),
            "exclude": self.exclude
            if self.exclude is None or isinstance(self.exclude, str)
            else list(self.exclude),
            "calibration_step": None if step is None else getattr(step, "__qualname__", repr(step)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "quantized_modules": list(self.quantized_modules),
            "skipped_modules": dict(self.skipped_modules),
            "metrics": dict(self.metrics),
            "report": None if self.report is None else self.report.to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.quantized_modules = list(state_dict.get("quantized_modules", []))
        self.skipped_modules = dict(state_dict.get("skipped_modules", {}))
        self.metrics = dict(state_dict.get("metrics", {}))
        self.loaded_report = state_dict.get("report")
        self.loaded_config = dict(state_dict.get("config", {}))
        if self.quantized_modules and self.loaded_config and self.loaded_config != self.config:
            rank_zero_warn(
                f"OBCQuantize: the checkpoint was quantized with {self.loaded_config}, this callback is "
                f"configured with {self.config}"
            )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            # a typo in include / exclude surfaces before training, not after it
            select_modules(pl_module, self.include, self.exclude)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = self._calibration_set(trainer, pl_module)
        if not batches:
            rank_zero_warn(
                "OBCQuantize: no calibration data (no calibration_dataloader and no train "
                "dataloader); the model was not quantized"
            )
            return
        forward_fn = self._forward_fn(trainer, pl_module, batches[0])

        before = self._evaluate(trainer, pl_module) if self.evaluate else {}
        report = compress_model(
            pl_module,
            batches,
            self.bits,
            include=self.include,
            exclude=self.exclude,
            forward_fn=forward_fn,
            sequential=self.sequential,
            solver=self.solver,
            group_size=self.group_size,
            symmetric=self.symmetric,
            mse=self.mse,
            damp=self.damp,
            offload=self.offload,
            reduce_fn=_all_reduce_fn(trainer),
            keep_results=self.export_path is not None,
        )
        after = self._evaluate(trainer, pl_module) if self.evaluate else {}

        self.report = report
        self.quantized_modules = report.quantized
        self.skipped_modules = dict(report.skipped)
        metrics = report.metrics()
        for name, value in before.items():
            metrics[f"obc/{name}_before"] = value
        for name, value in after.items():
            metrics[f"obc/{name}_after"] = value
        if self.export_path is not None and trainer.is_global_zero:
            from obc_lightning.export import save_quantized

            os.makedirs(os.path.dirname(os.path.abspath(self.export_path)), exist_ok=True)
            file_mb = save_quantized(pl_module, self.export_path, report) / 2**20
            sd = pl_module.state_dict()
            dense_bytes = sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, Tensor))
            metrics["obc/file_mb"] = metrics["obc/size_mb_after"] = file_mb
            metrics["obc/size_mb_before"] = dense_bytes / 2**20
            metrics["obc/compression_ratio"] = dense_bytes / 2**20 / file_mb
            rank_zero_info(f"OBCQuantize: packed model written to {self.export_path} ({file_mb:.3f} MB)")
        report.results = None  # exported (or not needed): do not hold a second copy of the codes
        self.metrics = metrics
        for lg in trainer.loggers:  # self.log is not allowed in on_train_end
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()

        if self.verbose:
            lines = [
                f"OBCQuantize: {self.bits}-bit, solver={self.solver}, {len(batches)} calibration batches",
                report.table(),
            ]
            for name in before:
                lines.append(f"{name}: {before[name]:.5g} -> {after.get(name, float('nan')):.5g}")
            rank_zero_info("\n".join(lines))
        log_dir = trainer.log_dir if trainer.loggers else None  # log_dir: to be called on every rank
        if self.plot and trainer.is_global_zero:
            fig = error_figure(report)
            if fig is not None:
                import matplotlib.pyplot as plt

                fig.savefig(os.path.join(log_dir or trainer.default_root_dir, "obc_rel_error.png"))
                for lg in trainer.loggers:
                    if isinstance(lg, TensorBoardLogger):
                        lg.experiment.add_figure("obc/rel_error", fig, global_step=trainer.global_step, close=False)
                plt.close(fig)

    # ------------------------------------------------------------------ calibration
    def _calibration_set(self, trainer: Trainer, pl_module: LightningModule) -> list:
        """The calibration batches on the module's device (a list: every pass sees the same batches)."""
        loader = self.calibration_dataloader
        if loader is None:
            loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            return []
        n = self.calibration_batches
        batches = []
        for batch in loader:
            if n is None:  # ~1024 samples over all ranks
                bs = _batch_size(batch)
                n = (
                    math.ceil(CALIBRATION_SAMPLES / (bs * trainer.world_size))
                    if bs
                    else UNKNOWN_BATCH_SIZE_BATCHES
                )
            batches.append(trainer.strategy.batch_to_device(batch))
            if len(batches) >= n:
                break
        if isinstance(loader, Sized) and self.calibration_batches and len(batches) < self.calibration_batches:
            rank_zero_info(f"OBCQuantize: the calibration data has only {len(batches)} batches")
        return batches

    def _forward_fn(self, trainer: Trainer, pl_module: LightningModule, probe) -> Callable:
        """``fn(module, batch)`` for compress_model: the user's own code path (see the class docstring)."""
        precision = trainer.precision_plugin

        def wrapped(run: Callable) -> Callable:
            def forward_fn(module, batch):
                with precision.val_step_context(), _logs_captured(pl_module):
                    run(module, batch)

            return forward_fn

        if self.calibration_step is not None:
            return wrapped(self.calibration_step)

        why = "it defines no forward"
        if is_overridden("forward", pl_module, parent=LightningModule):
            try:  # one probe batch, no hooks: does forward take the batch as it comes?
                with (
                    torch.no_grad(),
                    _eval_mode(pl_module),
                    precision.val_step_context(),
                    _logs_captured(pl_module),
                ):
                    call_model(pl_module, probe)
                return wrapped(call_model)
            except TypeError as e:
                why = f"forward raised TypeError on a batch: {e}"

        name = "validation_step" if is_overridden("validation_step", pl_module) else "training_step"
        if not is_overridden(name, pl_module):
            raise ValueError(
                "OBCQuantize: cannot run the calibration batches: the module has no usable forward "
                f"({why}) and no validation_step / training_step; pass calibration_step=fn(module, batch)"
            )
        rank_zero_info(f"OBCQuantize: calibrating through {name} ({why})")
        step = getattr(pl_module, name)
        counter = iter(range(1 << 62))

        return wrapped(lambda module, batch: step(batch, next(counter)))

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Validation metrics of the current weights, from ``validation_step`` with ``self.log`` captured.

        Scalars are averaged weighted by ``batch_size`` (the ``self.log`` argument, else read from the
        batch) and summed over ranks; torchmetrics objects logged as values are ``compute()``-d.
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

        for m in pl_module.modules():  # leftovers of the last validation epoch
            if isinstance(m, Metric):
                m.reset()
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        metric_objs: dict[str, Metric] = {}
        current = {"bs": 1}

        def sink(name, value, kwargs):
            if isinstance(value, Metric):
                metric_objs[name] = value
                return
            if isinstance(value, Mapping):  # self.log accepts only scalars; be lenient
                return
            bs = kwargs.get("batch_size") or current["bs"]
            v = float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)
            sums[name] = sums.get(name, 0.0) + v * bs
            weights[name] = weights.get(name, 0.0) + bs

        with (
            torch.no_grad(),
            _eval_mode(pl_module),
            trainer.precision_plugin.val_step_context(),
            _logs_captured(pl_module, sink),
        ):
            for dl_idx, loader in enumerate(loaders):
                limit = limits[dl_idx] if dl_idx < len(limits) else float("inf")
                for i, batch in enumerate(loader):
                    if i >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dl_idx)
                    current["bs"] = _batch_size(batch) or 1
                    args = (batch, i, dl_idx) if len(loaders) > 1 else (batch, i)
                    pl_module.validation_step(*args)

        reduce = _all_reduce_fn(trainer)
        out: dict[str, float] = {}
        for name in sorted(sums):
            t = torch.tensor(
                [sums[name], weights[name]], dtype=torch.float64, device=trainer.strategy.root_device
            )
            if reduce is not None:
                reduce(t)
            out[name] = float(t[0] / t[1])
        for name in sorted(metric_objs):
            out[name] = float(metric_objs[name].compute())  # syncs over ranks itself
            metric_objs[name].reset()
        return out
