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
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.nn.utils import parametrize

from obc_lightning import finetune as ft
from obc_lightning.attention import split_attention_projections
from obc_lightning.batchnorm import reestimate_batchnorm
from obc_lightning.calibration import call_model, product_dtype_of
from obc_lightning.checks import (
    check_flags,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
    is_number,
)
from obc_lightning.compress import (
    SOLVERS,
    _check_pq_args,
    _check_prune_args,
    compress_model,
    full_precision_message,
    select_modules,
    unquantized_projections,
)
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


def _rewrap_ddp(trainer: Trainer, pl_module: LightningModule) -> None:
    """Wrap the parametrized module in a new ``DistributedDataParallel`` (Lightning's ``configure_ddp``:
    the user's DDP arguments and communication hooks). Needed because ``register_parametrization`` calls
    ``original.set_(original)``, which gives each weight a new gradient accumulator: the old wrapper's
    hooks sit on the old ones, never fire, and its next forward fails. The new wrapper also holds the
    quantizers' own parameters (TTQ scales, DiffQ bit logits) and averages their gradients over ranks."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()


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
            created if missing. With ``n_m`` the quantized modules are stored N:M-sparse (the codes of the
            kept weights and their positions, :func:`~obc_lightning.export.save_quantized`). A pruned
            float model (``bits=None``, :class:`OBCPrune`) is stored in the "sparse" scheme: the kept
            weights in float16 and, with ``n_m``, their positions in ceil(log2 M) bits each, else a
            bitmask. After ``finetune="ternary"`` each ternary module is stored as 2-bit codes and its
            codebook {0, +w_p, −w_n} (scheme "pq" with ``block_size=1``), after ``finetune="noise"`` as
            DiffQ's codes at each group's bit width with the row ranges (scheme "mixed",
            :mod:`obc_lightning.packed`); modules left in full precision keep their float weights.
        sparsity, n_m: prune with OBS before quantizing (the pruned weights stay exactly 0), see
            :func:`~obc_lightning.compress.compress_model`; ``bits=None`` prunes only (:class:`OBCPrune`).
        sample_fraction: in (0, 1]: each calibration batch gives each Hessian this fraction of its
            samples (tokens / conv positions), drawn at random; 1/32 cuts ResNet-20's calibration time
            6x at no measured accuracy cost (README), see :func:`~obc_lightning.calibration.collect_hessians`.
        product_dtype: ``None`` (each batch's X^T X in the activations' precision) or ``"bfloat16"``
            (2.5x faster exact calibration of ResNet-20 on a CPU with AVX512-BF16, same accuracy: README);
            the running sums are float64 either way.
        split_attention: in ``setup`` (every stage, before the optimizer is created), replace each
            ``nn.MultiheadAttention`` of the module by a :class:`~obc_lightning.attention.ProjectedAttention`
            computing the same function with Linear q / k / v projections
            (:func:`~obc_lightning.attention.split_attention_projections`), so that they are quantized
            too; otherwise their packed ``in_proj_weight`` (3/4 of the attention's weights) stays in full
            precision, named in the report. It changes the state_dict keys: a checkpoint of the split
            model loads into a model split the same way (this callback in the Trainer does it). Attention
            modules built later, in ``configure_model``, are not split.
        monitor: the validation metric (a name logged in ``validation_step``) that ``max_drop`` bounds.
        mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (e.g. a loss).
        max_drop: accuracy budget in the monitored metric's own units (0.01 = one point for an accuracy
            logged as a fraction): the largest allowed worsening after compression before fine-tuning is
            used. ``None``: with ``finetune`` set, always fine-tune.
        finetune: quantization-aware fine-tuning mode (:mod:`obc_lightning.finetune`): ``"ste"``
            (straight-through on the OBC grid, latent weights start at the OBC result; with ``sparsity`` /
            ``n_m`` the pruning mask is held fixed), ``"masked"`` (pruning only, :class:`OBCPrune`: the
            kept weights train, the mask is held fixed), ``"ternary"``
            (trained ternary quantization from the fp32 weights; ``bits`` is not used), ``"noise"``
            (DiffQ noise with a learned bit width per group, from the fp32 weights; ``bits`` is the
            initial bit width), ``"pq"`` (product quantization: the codebooks train with the assignments
            fixed, iPQ), or ``None`` (post-training only, at the end of fit).
        finetune_epochs: N, the epochs left for fine-tuning; compression then happens at the end of the
            epoch with index ``max_epochs - N - 1`` (after its validation), or, with N = ``max_epochs``
            (a model that arrives trained, e.g. loaded from a checkpoint), at the start of fit.
        ternary_threshold: TTQ threshold t (Δ = t · max|w| per layer).
        ternary_skip_first_last: keep the first and the last target module (in registration order) at
            full precision in ``"ternary"`` mode, as in the TTQ paper.
        noise_group_size, noise_min_bits, noise_max_bits: DiffQ groups (consecutive weights of a row,
            one learned bit width each; the range min / max is per row) and the bit-width range. Stored
            size: round(b) bits per weight + fp16 min and max per row + the bit width per group.
        noise_penalty: weight of the model-size term ``penalty · size_mb`` added to the task loss.
        noise_bits_lr: the bit-width logits are trained by their own ``torch.optim.Adam`` at this learning
            rate (no weight decay), stepped with the user's optimizer, as in DiffQ's CIFAR recipe (a
            separate Adam at 1e-3): a group's logit gets the gradient of only ``noise_group_size``
            weights, so SGD at the model's learning rate leaves the bit widths where they started
            (measured: rounded widths unchanged after 3 epochs at lr 0.01). ``None``: add them to the
            user's optimizer as one more parameter group (its hyper-parameters and schedule, no weight
            decay).
        method: ``"scalar"`` (default, a ``bits``-bit grid), ``"pq"`` (Hessian-aware product quantization)
            or ``"pq-kmeans"`` (plain k-means PQ, fairseq's iPQ): see
            :func:`~obc_lightning.compress.compress_model`. With product quantization ``bits`` is not used.
        block_size, n_centroids: product quantization layout: inputs per sub-vector and codebook size,
            an int or a mapping {module name or pattern: int} (e.g. ``{"*conv*": 9, "*": 4}``).
        pq_noise_rate: with ``finetune="pq"``: the fraction p of sub-vectors replaced by their centroids
            in each training step (quantization noise, Fan et al. 2020; the others use latent float weights
            that start from the weights before compression and train too); 1.0: plain centroid
            fine-tuning, every sub-vector is its centroid.
        recalibrate_bn: re-estimate every BatchNorm's running statistics over this many batches of the
            training dataloader once the weights are final (after post-training compression, after
            fine-tuning; 0: off), through the same code path as calibration (see
            :func:`~obc_lightning.batchnorm.reestimate_batchnorm`). The training batches, augmentation
            included, are the distribution the statistics were gathered on; the validation metrics
            "after" / "finetuned" are measured after it.

    Fine-tuning (``finetune`` set): at the end of epoch K = ``max_epochs - finetune_epochs - 1`` the
    model is compressed (``"ste"``: OBC, exactly as without fine-tuning; ``"ternary"`` / ``"noise"``:
    the quantizers are attached and the model evaluated with them) and the validation metrics measured
    before / after. If ``monitor`` worsened by at most ``max_drop``, the model stays as it is and
    ``trainer.should_stop`` is set: **the remaining epochs are skipped** (the model is already
    quantized). Otherwise the weights are parametrized (:func:`torch.nn.utils.parametrize`; the latent
    weights are the same ``nn.Parameter`` objects the user's optimizer holds, so its state and LR
    schedule carry on) and training continues for the remaining epochs with the user's optimizer and
    schedulers; new parameters (TTQ scales, DiffQ logits) join the first optimizer as an extra group
    with group 0's hyper-parameters and ``weight_decay=0``. In ``on_train_end`` the parametrizations are
    removed in eval semantics (weights truly quantized), the model is evaluated again and
    ``obc/<metric>_finetuned`` and ``obc/finetune_epochs`` are logged next to ``obc/<metric>_before`` /
    ``_after``. If fit ends before epoch K, the model is compressed in ``on_train_end`` without
    fine-tuning. A checkpoint saved during fine-tuning holds the parametrized model; resuming from it is
    not supported (``load_state_dict`` raises).
    """

    def __init__(
        self,
        bits: int | None = 4,
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
        split_attention: bool = False,
        plot: bool = True,
        verbose: bool = True,
        export_path: str | os.PathLike | None = None,
        sample_fraction: float = 1.0,
        product_dtype: str | torch.dtype | None = None,
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        monitor: str | None = None,
        mode: str = "max",
        max_drop: float | None = None,
        finetune: str | None = None,
        finetune_epochs: int = 1,
        ternary_threshold: float = 0.05,
        ternary_skip_first_last: bool = True,
        noise_group_size: int = 16,
        noise_min_bits: float = 2.0,
        noise_max_bits: float = 8.0,
        noise_penalty: float = 1.0,
        noise_bits_lr: float | None = 1e-3,
        method: str = "scalar",
        block_size: int | Mapping[str, int] = 8,
        n_centroids: int | Mapping[str, int] = 256,
        pq_noise_rate: float = 1.0,
        recalibrate_bn: int = 0,
    ) -> None:
        _check_pq_args(method, bits, block_size, n_centroids, sparsity, n_m, group_size, symmetric, {})
        if method != "scalar":
            bits = None
            if finetune not in (None, "pq"):
                raise ValueError(
                    f"OBCQuantize: method={method!r} fine-tunes its codebooks with finetune='pq', got {finetune!r}"
                )
        elif finetune == "pq":
            raise ValueError("OBCQuantize: finetune='pq' trains product-quantization codebooks: set method='pq'")
        check_fraction("OBCQuantize", "pq_noise_rate", pq_noise_rate)
        if method == "scalar" and (bits is not None or (sparsity is None and n_m is None)):
            check_bits(bits)
        if method == "scalar":
            _check_prune_args(bits, sparsity, n_m, {})  # values now; M against each module's inputs in setup
        pruning = sparsity is not None or n_m is not None
        if pruning and finetune in ("ternary", "noise"):
            raise ValueError(
                f"OBCQuantize: finetune={finetune!r} starts from the fp32 weights and cannot keep a pruning mask; "
                "with sparsity / n_m use finetune='ste' (quantized) or OBCPrune(finetune='masked')"
            )
        if method == "scalar" and (finetune == "masked") != (finetune is not None and bits is None):
            raise ValueError(
                "OBCQuantize: finetune='masked' (train the kept weights, mask fixed) is the fine-tuning of a pruned "
                f"float model (bits=None, OBCPrune); got finetune={finetune!r} with bits={bits!r}"
            )
        self._check_finetune_args(
            monitor, mode, max_drop, finetune, finetune_epochs, ternary_threshold, ternary_skip_first_last,
            noise_group_size, noise_min_bits, noise_max_bits, noise_penalty, evaluate, export_path,
        )
        check_positive("OBCQuantize", "noise_bits_lr", noise_bits_lr, optional=True)
        check_positive_int("OBCQuantize", "group_size", group_size, optional=True)
        if solver not in SOLVERS:
            raise ValueError(f"OBCQuantize: solver must be one of {SOLVERS}, got {solver!r}")
        check_nonnegative("OBCQuantize", "damp", damp)
        check_flags(
            "OBCQuantize", symmetric=symmetric, mse=mse, sequential=sequential, evaluate=evaluate, offload=offload,
            split_attention=split_attention, plot=plot, verbose=verbose,
        )
        check_positive_int("OBCQuantize", "calibration_batches", calibration_batches, optional=True)
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
        check_fraction("OBCQuantize", "sample_fraction", sample_fraction)
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
        self.split_attention = split_attention
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.include, self.exclude = include, exclude
        self.calibration_step = calibration_step
        self.evaluate, self.plot, self.verbose = evaluate, plot, verbose
        self.export_path = None if export_path is None else os.fspath(export_path)
        self.sample_fraction = float(sample_fraction)
        dtype = product_dtype_of(product_dtype, "OBCQuantize")
        self.product_dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        self.sparsity, self.n_m = sparsity, None if n_m is None else tuple(n_m)
        self.method, self.block_size, self.n_centroids = method, block_size, n_centroids
        self.pq_noise_rate = float(pq_noise_rate)
        if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ValueError(f"OBCQuantize: recalibrate_bn must be an integer >= 0, got {recalibrate_bn!r}")
        self.recalibrate_bn = recalibrate_bn

        self.report: CompressionReport | None = None
        self.quantized_modules: list[str] = []
        self.skipped_modules: dict[str, str] = {}
        self.metrics: dict[str, float] = {}

        self.monitor, self.mode, self.max_drop = monitor, mode, None if max_drop is None else float(max_drop)
        self.finetune, self.finetune_epochs = finetune, finetune_epochs
        self.ternary_threshold, self.ternary_skip_first_last = float(ternary_threshold), ternary_skip_first_last
        self.noise_group_size, self.noise_penalty = noise_group_size, float(noise_penalty)
        self.noise_bits_lr = None if noise_bits_lr is None else float(noise_bits_lr)
        self._bits_optimizer: torch.optim.Optimizer | None = None  # DiffQ's own Adam for the bit widths
        self.noise_min_bits, self.noise_max_bits = float(noise_min_bits), float(noise_max_bits)
        # fine-tuning state: "idle" (not compressed yet) -> "finetuning" -> "done"
        self._phase = "idle"
        self._start_epoch: int | None = None  # K, the epoch at whose end compression ran
        self._quantizers: dict[str, torch.nn.Module] = {}
        self._added_group = False
        self._latent: dict[str, Tensor] = {}  # pq noise: the weights before compression, for the latent weights

    @staticmethod
    def _check_finetune_args(
        monitor, mode, max_drop, finetune, finetune_epochs, threshold, skip, group_size, min_bits, max_bits,
        penalty, evaluate, export_path,
    ) -> None:
        if finetune is not None and finetune not in ft.MODES:
            raise ValueError(f"OBCQuantize: finetune must be one of {ft.MODES} or None, got {finetune!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"OBCQuantize: mode must be 'max' or 'min', got {mode!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"OBCQuantize: monitor must be a metric name or None, got {monitor!r}")
        if max_drop is not None:
            check_nonnegative("OBCQuantize", "max_drop", max_drop, optional=True)
            if finetune is None:
                raise ValueError(
                    "OBCQuantize: max_drop is a budget for fine-tuning; set finetune='ste'|'ternary'|'noise'"
                )
            if monitor is None:
                raise ValueError("OBCQuantize: max_drop needs monitor=<validation metric name>")
            if not evaluate:
                raise ValueError("OBCQuantize: max_drop needs evaluate=True (the drop is measured)")
        check_positive_int("OBCQuantize", "finetune_epochs", finetune_epochs)
        if not is_number(threshold) or not 0 <= threshold < 1:
            raise ValueError(f"OBCQuantize: ternary_threshold must be in [0, 1), got {threshold!r}")
        check_flags("OBCQuantize", ternary_skip_first_last=skip)
        check_positive_int("OBCQuantize", "noise_group_size", group_size)
        if not (is_number(min_bits) and is_number(max_bits) and 1 <= min_bits < max_bits <= 16):
            raise ValueError(
                f"OBCQuantize: need 1 <= noise_min_bits < noise_max_bits <= 16, got {min_bits!r}, {max_bits!r}"
            )
        check_nonnegative("OBCQuantize", "noise_penalty", penalty)
        if export_path is not None and finetune == "noise" and round(max_bits) > 8:
            raise ValueError(
                f"OBCQuantize: export_path packs DiffQ codes at 8 bits at most; noise_max_bits={max_bits!r} rounds "
                "above 8"
            )

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
            "split_attention": self.split_attention,
            "calibration_batches": self.calibration_batches,
            "sample_fraction": self.sample_fraction,
            "product_dtype": self.product_dtype,
            "sparsity": self.sparsity,
            "n_m": None if self.n_m is None else list(self.n_m),
            "method": self.method,
            "block_size": dict(self.block_size) if isinstance(self.block_size, Mapping) else self.block_size,
            "n_centroids": dict(self.n_centroids) if isinstance(self.n_centroids, Mapping) else self.n_centroids,
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
            "finetune": {
                "mode": self.finetune,
                "epochs": self.finetune_epochs,
                "monitor": self.monitor,
                "max_drop": self.max_drop,
                "phase": self._phase,
                "start_epoch": self._start_epoch,
                "modules": list(self._quantizers),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fine = state_dict.get("finetune") or {}
        if fine.get("phase") == "finetuning":
            raise RuntimeError(
                "OBCQuantize: this checkpoint was saved during quantization-aware fine-tuning (mode "
                f"{fine.get('mode')!r}, started after epoch {fine.get('start_epoch')}); resuming mid-fine-tuning "
                "is not supported. Resume from a checkpoint before epoch "
                f"{fine.get('start_epoch')} ends, or from one saved after fit"
            )
        self._phase = fine.get("phase", "idle")
        self._start_epoch = fine.get("start_epoch")
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
        if self.split_attention:  # before configure_optimizers and the checkpoint restore, in every stage
            split = split_attention_projections(pl_module)
            if split:
                rank_zero_info(f"OBCQuantize: split the q, k, v projections of {len(split)} MultiheadAttention "
                               f"module(s) into Linears: {', '.join(split)}")
        if stage == "fit":
            # a typo in include / exclude surfaces before training, not after it
            targets = select_modules(pl_module, self.include, self.exclude)
            # bad sparsity / N:M (e.g. M not dividing a module's inputs) surfaces before training
            if self.method == "scalar":
                _check_prune_args(self.bits, self.sparsity, self.n_m, targets)
            # a block size that does not divide a module's inputs, a layer too small for the codebook
            _check_pq_args(
                self.method, self.bits, self.block_size, self.n_centroids, self.sparsity, self.n_m, self.group_size,
                self.symmetric, targets,
            )
            if self.finetune is not None:
                self._check_schedule(trainer)
                if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
                    raise ValueError(
                        f"OBCQuantize: finetune={self.finetune!r} parametrizes the weights of the module itself; it "
                        f"runs under single-device and DDP strategies, not {type(trainer.strategy).__name__} (which "
                        "shards or flattens them)"
                    )
                if self.finetune == "ternary" and not self._ternary_targets(targets):
                    raise ValueError(
                        f"OBCQuantize: finetune='ternary' with ternary_skip_first_last=True leaves none of the "
                        f"{len(targets)} target modules to ternarize; pass ternary_skip_first_last=False"
                    )

    def _check_schedule(self, trainer: Trainer) -> None:
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                f"OBCQuantize: finetune needs Trainer(max_epochs=...) (got {max_epochs}): compression happens "
                f"at the end of epoch max_epochs - finetune_epochs - 1"
            )
        if self.finetune_epochs > max_epochs:
            raise ValueError(
                f"OBCQuantize: finetune_epochs={self.finetune_epochs} must be <= max_epochs={max_epochs} (equal: "
                "compress at the start of fit, for a model that arrives trained)"
            )
        if self.max_drop is not None and (trainer.min_epochs or 0) > self._compress_epoch(trainer) + 1:
            raise ValueError(
                f"OBCQuantize: min_epochs={trainer.min_epochs} would keep training a model that met its budget "
                f"after epoch {self._compress_epoch(trainer)}; lower min_epochs"
            )

    def _compress_epoch(self, trainer: Trainer) -> int:
        """K: the epoch at whose end the model is compressed when fine-tuning (-1: at the start of fit)."""
        return trainer.max_epochs - self.finetune_epochs - 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the train and val dataloaders and the optimizers exist here (fit_loop.on_run_start)
        if self.finetune is None or self._phase != "idle" or self._compress_epoch(trainer) != -1:
            return
        self._compress_for_finetune(trainer, pl_module, may_finetune=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # in Lightning 2.x the epoch's validation has already run (training_epoch_loop.on_advance_end)
        if self.finetune is None or self._phase != "idle" or trainer.current_epoch != self._compress_epoch(trainer):
            return
        self._compress_for_finetune(trainer, pl_module, may_finetune=True)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """DiffQ: add the gradient of ``noise_penalty · size_mb`` (the user's step returns the task loss only)."""
        if self._phase != "finetuning" or self.finetune != "noise" or self.noise_penalty == 0:
            return
        loss = ft.noise_penalty(self._quantizers.values(), self.noise_penalty)
        if loss is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # the task loss was scaled before its backward
            loss = loss * scaler.get_scale()
        (loss / trainer.accumulate_grad_batches).backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        """Step DiffQ's own optimizer of the bit widths, if there is one (under DDP their gradients are
        averaged by the wrapper, :func:`_rewrap_ddp`; the penalty's, added after, is the same on every rank)."""
        if self._bits_optimizer is not None and getattr(optimizer, "_optimizer", optimizer) is trainer.optimizers[0]:
            self._step_bits(trainer)

    def _step_bits(self, trainer: Trainer) -> None:
        """One Adam step of the bit-width logits (their gradients unscaled under AMP, as the precision
        plugin unscaled the user's optimizer; a step with non-finite gradients is skipped, as the
        scaler skips the model's)."""
        params = [p for g in self._bits_optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            inv = 1.0 / scaler.get_scale()
            for p in params:
                p.grad.mul_(inv)
        if all(bool(torch.isfinite(p.grad).all()) for p in params):
            self._bits_optimizer.step()
        self._bits_optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.finetune is None:
            self._post_training(trainer, pl_module)
        elif self._phase == "finetuning":
            self._finish_finetuning(trainer, pl_module)
        elif self._phase == "idle":
            rank_zero_warn(
                f"OBCQuantize: fit ended before the end of epoch {self._compress_epoch(trainer)}, where "
                f"compression for fine-tuning was planned; compressing now without fine-tuning"
            )
            self._compress_for_finetune(trainer, pl_module, may_finetune=False)

    # ------------------------------------------------------------------ post-training (finetune=None)
    def _compress(self, trainer: Trainer, pl_module: LightningModule, batches: list, keep_results: bool):
        return compress_model(
            pl_module,
            batches,
            self.bits,
            include=self.include,
            exclude=self.exclude,
            forward_fn=self._forward_fn(trainer, pl_module, batches[0]),
            sequential=self.sequential,
            solver=self.solver,
            group_size=self.group_size,
            symmetric=self.symmetric,
            mse=self.mse,
            damp=self.damp,
            offload=self.offload,
            reduce_fn=_all_reduce_fn(trainer),
            keep_results=keep_results,
            sample_fraction=self.sample_fraction,
            product_dtype=self.product_dtype,
            sparsity=self.sparsity,
            n_m=self.n_m,
            method=self.method,
            block_size=self.block_size,
            n_centroids=self.n_centroids,
        )

    def _post_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = self._calibration_set(trainer, pl_module)
        if not batches:
            rank_zero_warn(
                "OBCQuantize: no calibration data (no calibration_dataloader and no train "
                "dataloader); the model was not quantized"
            )
            return
        before = self._evaluate(trainer, pl_module) if self.evaluate else {}
        report = self._compress(trainer, pl_module, batches, keep_results=self.export_path is not None)
        bn_metrics, bn_lines = self._recalibrate_batchnorm(trainer, pl_module)
        after = self._evaluate(trainer, pl_module) if self.evaluate else {}

        self.report = report
        self.quantized_modules = report.quantized
        self.skipped_modules = dict(report.skipped)
        metrics = report.metrics() | bn_metrics
        for name, value in before.items():
            metrics[f"obc/{name}_before"] = value
        for name, value in after.items():
            metrics[f"obc/{name}_after"] = value
        self._export(trainer, pl_module, report, metrics)
        lines = [
            f"{type(self).__name__}: {self._what()}, {len(batches)} calibration batches",
            report.table(),
            *bn_lines,
        ]
        for name in before:
            lines.append(f"{name}: {before[name]:.5g} -> {after.get(name, float('nan')):.5g}")
        self._publish(trainer, metrics, lines, report)

    def _export(
        self, trainer: Trainer, pl_module: LightningModule, results: CompressionReport | Mapping, metrics: dict
    ) -> None:
        """Write the packed model (rank zero, with ``export_path``); size metrics become the file's.
        ``results``: the compression report (its codes are released afterwards) or name -> result list."""
        if self.export_path is not None and trainer.is_global_zero:
            from obc_lightning.export import save_quantized

            os.makedirs(os.path.dirname(os.path.abspath(self.export_path)), exist_ok=True)
            file_mb = save_quantized(pl_module, self.export_path, results, n_m=self.n_m) / 2**20
            sd = pl_module.state_dict()
            dense_bytes = sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, Tensor))
            metrics["obc/file_mb"] = metrics["obc/size_mb_after"] = file_mb
            metrics["obc/size_mb_before"] = dense_bytes / 2**20
            metrics["obc/compression_ratio"] = dense_bytes / 2**20 / file_mb
            rank_zero_info(f"OBCQuantize: packed model written to {self.export_path} ({file_mb:.3f} MB)")
        if isinstance(results, CompressionReport):
            results.results = None  # exported (or not needed): do not hold a second copy of the codes

    def _publish(self, trainer: Trainer, metrics: dict, lines: list[str], report: CompressionReport | None) -> None:
        """Metrics to every logger, the summary through rank_zero_info, the error chart."""
        self.metrics = dict(metrics)
        for lg in trainer.loggers:  # self.log is not allowed in on_train_end
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        if self.verbose:
            rank_zero_info("\n".join(lines))
        log_dir = trainer.log_dir if trainer.loggers else None  # log_dir: to be called on every rank
        if report is not None and self.plot and trainer.is_global_zero:
            fig = error_figure(report)
            if fig is not None:
                import matplotlib.pyplot as plt

                fig.savefig(os.path.join(log_dir or trainer.default_root_dir, "obc_rel_error.png"))
                for lg in trainer.loggers:
                    if isinstance(lg, TensorBoardLogger):
                        lg.experiment.add_figure("obc/rel_error", fig, global_step=trainer.global_step, close=False)
                plt.close(fig)

    @property
    def _pruning(self) -> bool:
        return self.sparsity is not None or self.n_m is not None

    def _what(self) -> str:
        if self.method != "scalar":
            return f"{self.method}, block_size={self.block_size}, n_centroids={self.n_centroids}"
        parts = [] if self.bits is None else [f"{self.bits}-bit, solver={self.solver}"]
        if self.sparsity is not None:
            parts.insert(0, f"OBS {self.sparsity:.0%} unstructured")
        if self.n_m is not None:
            parts.insert(0, f"OBS {self.n_m[0]}:{self.n_m[1]}")
        return " + ".join(parts)

    # ------------------------------------------------------------------ fine-tuning
    def _ternary_targets(self, targets: Mapping[str, torch.nn.Module]) -> list[str]:
        names = list(targets)
        return names[1:-1] if self.ternary_skip_first_last else names

    def _compress_for_finetune(self, trainer: Trainer, pl_module: LightningModule, may_finetune: bool) -> None:
        """Compress, measure the drop, then stop (within budget, or ``may_finetune=False``) or attach the
        fine-tuning parametrizations and extend the optimizer."""
        before = self._evaluate(trainer, pl_module) if self.evaluate else {}
        report = None
        if self.finetune in ("ste", "masked", "pq"):
            batches = self._calibration_set(trainer, pl_module)
            if not batches:
                rank_zero_warn("OBCQuantize: no calibration data; the model was not quantized")
                self._phase = "done"
                return
            noisy = self.finetune == "pq" and self.pq_noise_rate < 1
            # quantization noise trains latent float weights: they start from the weights before compression
            self._latent = (
                {n: m.weight.detach().clone() for n, m in select_modules(pl_module, self.include, self.exclude).items()}
                if noisy else {}
            )
            report = self._compress(
                trainer, pl_module, batches, keep_results=self.bits is not None or self.method != "scalar"
            )
            self.quantized_modules = report.quantized
            self.skipped_modules = dict(report.skipped)
            bn_metrics, bn_lines = self._recalibrate_batchnorm(trainer, pl_module)
            metrics = report.metrics() | bn_metrics
            header = f"{type(self).__name__}: {self._what()}, {len(batches)} calibration batches"
            header = "\n".join([header, *bn_lines])
        else:
            targets = {
                n: m
                for n, m in select_modules(pl_module, self.include, self.exclude).items()
                if isinstance(m.weight, torch.nn.Parameter)  # not already parametrized (pruning, ...)
            }
            if self.finetune == "ternary":
                self._quantizers = ft.attach_ternary(pl_module, self._ternary_targets(targets), self.ternary_threshold)
            else:
                self._quantizers = ft.attach_noise(
                    pl_module, targets, self.noise_group_size, self.noise_min_bits, self.noise_max_bits, self.bits
                )
            self.quantized_modules = list(self._quantizers)
            left = unquantized_projections(pl_module, self.include, self.exclude)
            self.skipped_modules = {n: reason for n, (reason, _) in left.items()}
            if left:
                rank_zero_warn(full_precision_message("OBCQuantize", self.skipped_modules))
            metrics = self._quantizer_metrics(pl_module)
            header = f"OBCQuantize: {self.finetune} quantization of {len(self._quantizers)} modules"
        after = self._evaluate(trainer, pl_module) if self.evaluate else {}
        self.report = report
        for name, value in before.items():
            metrics[f"obc/{name}_before"] = value
        for name, value in after.items():
            metrics[f"obc/{name}_after"] = value
        lines = [header] + ([report.table()] if report is not None else [])
        lines += [f"{n}: {before[n]:.5g} -> {after.get(n, float('nan')):.5g}" for n in before]

        within = False
        if self.max_drop is not None:
            if self.monitor not in before or self.monitor not in after:
                raise ValueError(
                    f"OBCQuantize: monitor={self.monitor!r} is not among the validation metrics "
                    f"{sorted(before)} (logged with self.log in validation_step)"
                )
            drop = before[self.monitor] - after[self.monitor]
            drop = drop if self.mode == "max" else -drop
            within = drop <= self.max_drop
            lines.append(
                f"{self.monitor} worsened by {drop:.5g} ({'within' if within else 'over'} max_drop={self.max_drop:g})"
            )
        self._start_epoch = self._compress_epoch(trainer) if may_finetune else trainer.current_epoch
        if within or not may_finetune:
            self._latent = {}
            finalized = self._finalize_quantizers(pl_module)
            if within and may_finetune:
                trainer.should_stop = True  # the model is quantized: the remaining epochs are skipped
                lines.append(f"stopping fit: the remaining {self.finetune_epochs} epoch(s) are not needed")
            metrics["obc/finetune_epochs"] = 0.0
            self._phase = "done"
            if report is not None or finalized:
                self._export(trainer, pl_module, report if report is not None else finalized, metrics)
            self._publish(trainer, metrics, lines, report)
            return

        # a pruned model keeps its mask: the weights that are 0 after compression stay 0
        masks = ft.keep_masks(pl_module, report.quantized) if self._pruning else None
        if self.finetune == "ste":
            self._quantizers = ft.attach_ste(pl_module, report.results, masks)
        elif self.finetune == "pq":
            with torch.no_grad():
                for name, w in self._latent.items():
                    if name in report.results:
                        pl_module.get_submodule(name).weight.copy_(w)
            self._latent = {}
            self._quantizers = ft.attach_centroids(pl_module, report.results, self.pq_noise_rate)
        elif self.finetune == "masked":
            self._quantizers = ft.attach_masks(pl_module, masks)
        _rewrap_ddp(trainer, pl_module)
        params = [p for q in self._quantizers.values() for p in q.parameters()]
        if params and self.finetune == "noise" and self.noise_bits_lr is not None:
            self._bits_optimizer = torch.optim.Adam(params, lr=self.noise_bits_lr, weight_decay=0.0)
        elif params:
            if trainer.optimizers:
                opt = trainer.optimizers[0]
                scheds = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
                self._added_group = ft.add_param_group(opt, params, scheds)
            else:
                rank_zero_warn(f"OBCQuantize: no optimizer; the {self.finetune} quantizer parameters are not trained")
        self._phase = "finetuning"
        lines.append(f"fine-tuning ({self.finetune}) for {self.finetune_epochs} epoch(s)")
        self._publish(trainer, metrics, lines, report)

    def _finish_finetuning(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the parametrizations (weights truly quantized), evaluate, report, export."""
        metrics = dict(self.metrics)
        if self.finetune == "noise":
            metrics.update(self._quantizer_metrics(pl_module))  # the bit widths were trained
        finalized = self._finalize_quantizers(pl_module)
        self._bits_optimizer = None
        if self._added_group and trainer.optimizers:
            opt = trainer.optimizers[0]
            scheds = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
            ft.remove_last_param_group(opt, scheds)
            self._added_group = False
        bn_metrics, bn_lines = self._recalibrate_batchnorm(trainer, pl_module)
        metrics.update(bn_metrics)
        finetuned = self._evaluate(trainer, pl_module) if self.evaluate else {}
        epochs = trainer.current_epoch - self._start_epoch - 1
        for name, value in finetuned.items():
            metrics[f"obc/{name}_finetuned"] = value
        metrics["obc/finetune_epochs"] = float(epochs)
        self._phase = "done"
        lines = [f"OBCQuantize: fine-tuned ({self.finetune}) for {epochs} epoch(s)", *bn_lines]
        lines += [
            f"{n}: {metrics.get(f'obc/{n}_before', float('nan')):.5g} -> "
            f"{metrics.get(f'obc/{n}_after', float('nan')):.5g} -> {v:.5g}"
            for n, v in finetuned.items()
        ]
        report = self.report
        if report is not None:
            if self.export_path is not None and self.finetune == "pq":  # the codebooks were trained
                report.results = {
                    n: [_retrained(r, self._quantizers[n]) for r in res] for n, res in report.results.items()
                }
                self._export(trainer, pl_module, report, metrics)
            elif self.export_path is not None:  # the codes changed during fine-tuning; the grid did not
                report.results = {n: _recode(pl_module.get_submodule(n).weight, r) for n, r in report.results.items()}
                self._export(trainer, pl_module, report, metrics)
            report.results = None
        elif finalized:
            self._export(trainer, pl_module, finalized, metrics)
        self._publish(trainer, metrics, lines, None)

    def _finalize_quantizers(self, pl_module: LightningModule) -> dict[str, list]:
        """Remove the fine-tuning parametrizations (weights truly quantized). With ``export_path``, the
        ternary / DiffQ codes of the final weights are taken first and returned (name -> [result])."""
        results = {}
        if self.export_path is not None and self.finetune in ("ternary", "noise"):
            for name, q in self._quantizers.items():
                results[name] = [q.result(pl_module.get_submodule(name).parametrizations.weight.original)]
        if self._quantizers:
            ft.finalize_all(pl_module, self._quantizers)
        return results

    def _quantizer_metrics(self, pl_module: LightningModule) -> dict[str, float]:
        """Sizes and bits of the ternary / noise-quantized model (targets not quantized and unsplit attention
        projections count at fp32)."""
        before = after = qbits = qnumel = 0
        wbits = 0.0
        for name, m in select_modules(pl_module, self.include, self.exclude).items():
            w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            bias = 0 if m.bias is None else m.bias.numel() * 4
            before += w.numel() * 4 + bias
            q = self._quantizers.get(name)
            if q is None:
                after += w.numel() * 4 + bias
                continue
            sb = q.storage_bits(w.numel())
            after += sb / 8 + bias
            qbits, qnumel = qbits + sb, qnumel + w.numel()
            if isinstance(q, ft.NoiseQuantizer):
                wbits += float((q.rounded_bits() * q.group_numel).sum())
        fp32 = sum(size for _, size in unquantized_projections(pl_module, self.include, self.exclude).values())
        before, after = before + fp32, after + fp32  # attention q, k, v weights (see compress_model)
        out = {
            "obc/size_mb_before": before / 2**20,
            "obc/size_mb_after": after / 2**20,
            "obc/compression_ratio": before / after if after else float("nan"),
            "obc/avg_bits": qbits / qnumel if qnumel else float("nan"),
            "obc/modules_quantized": float(len(self._quantizers)),
        }
        if self.finetune == "noise" and qnumel:
            out["obc/noise_bits"] = wbits / qnumel  # mean rounded bit width, without scales
        return out

    def _recalibrate_batchnorm(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict, list[str]]:
        """BatchNorm statistics of the final weights over ``recalibrate_bn`` training batches: (metrics, lines)."""
        if not self.recalibrate_bn:
            return {}, []
        loader = _first_loader(trainer.train_dataloader)
        batches = []
        for batch in loader if loader is not None else ():
            batches.append(trainer.strategy.batch_to_device(batch))
            if len(batches) >= self.recalibrate_bn:
                break
        if not batches:
            rank_zero_warn("OBCQuantize: recalibrate_bn: no training batches; BatchNorm statistics left as they were")
            return {}, []
        forward_fn = self._forward_fn(trainer, pl_module, batches[0])
        n = reestimate_batchnorm(pl_module, batches, forward_fn=forward_fn, reduce_fn=_all_reduce_fn(trainer))
        line = f"BatchNorm statistics of {n} layer(s) re-estimated over {len(batches)} training batches"
        return {"obc/bn_recalibrated": float(n)}, [line]

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


def _recode(weight: Tensor, results: list) -> list:
    """``results`` (one QuantResult per conv group) with codes and values of ``weight`` on the same grids."""
    blocks = weight.detach().cpu().reshape(weight.shape[0], -1).chunk(len(results), dim=0)
    out = []
    for r, w in zip(results, blocks):
        codes = r.grid.codes(w.to(r.grid.scales.dtype))
        out.append(replace(r, codes=codes.to(r.codes.dtype), quantized_matrix=r.grid.dequantize(codes)))
    return out


def _retrained(result, quantizer: ft.CentroidQuantizer):
    """A PQResult with the trained codebook (as stored) and the weights it gives."""
    codebook = quantizer.stored_codebook().cpu().to(result.codebook.dtype)
    q = codebook[result.codes].reshape(result.quantized_matrix.shape).to(result.quantized_matrix.dtype)
    return replace(result, codebook=codebook, quantized_matrix=q)


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
    and get no gradient). ``OBCQuantize(bits=..., n_m=..., finetune="ste")`` does the same on the grid.

    Args:
        sparsity: fraction of each module's weights to remove (unstructured).
        n_m: (N, M): at most N non-zeros in every M consecutive inputs.
        **kwargs: the calibration, evaluation, reporting and export arguments of :class:`OBCQuantize`
            (``include``, ``exclude``, ``damp``, ``calibration_batches``, ``sample_fraction``,
            ``export_path``: the pruned weights in float16 with their N:M positions or a bitmask, ...).
    """

    def __init__(self, sparsity: float | None = None, n_m: tuple[int, int] | None = None, **kwargs) -> None:
        if (sparsity is None) == (n_m is None):
            raise ValueError(f"OBCPrune: give exactly one of sparsity=... or n_m=(N, M), got {sparsity=!r}, {n_m=!r}")
        if kwargs.get("finetune") not in (None, "masked"):
            raise ValueError(
                f"OBCPrune: finetune must be 'masked' (train the kept weights with the mask fixed) or None, got "
                f"{kwargs['finetune']!r}"
            )
        if kwargs.get("bits") is not None:
            raise ValueError("OBCPrune: bits is not an argument of OBCPrune (use OBCQuantize for quantization)")
        kwargs.pop("bits", None)
        super().__init__(None, sparsity=sparsity, n_m=n_m, **kwargs)
