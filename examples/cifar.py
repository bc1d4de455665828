"""Train a CIFAR-10 ResNet with Lightning, then quantize it after training and compare accuracies.

Two ways to quantize:

* one bit width, no ``--rtn``: the one-line Lightning way, ``Trainer(callbacks=[OBCQuantize(bits=4)])``;
  the callback calibrates on the training data at the end of ``fit``, quantizes every Conv / Linear in
  place and logs ``obc/val_acc_before`` / ``obc/val_acc_after``.
* several bit widths (``--bits 4 3 2``) or ``--rtn``: train once, keep the fp32 ``state_dict``, and for
  every bit width and method reload it and quantize with :func:`obc_lightning.compress_model`
  (``solver="obc"``: ExactOBC; ``solver="auto"``: per row the best of ExactOBC and GPTQ, polished) or
  with plain round-to-nearest on a per-channel grid; prints a table of fp32 vs quantized accuracy.

Quantization-aware fine-tuning (``--finetune ste|ternary|noise``): start from trained fp32 weights
(``--load-fp32``, or train ``--epochs`` first), then one ``trainer.fit`` of N epochs (N =
``--finetune-epochs``) with ``OBCQuantize(finetune=mode, finetune_epochs=N, monitor="val_acc",
max_drop=...)``: with ``finetune_epochs == max_epochs`` the callback compresses the weights as loaded at
the start of fit. The N fine-tuning epochs use SGD (momentum 0.9, Nesterov) with a cosine learning rate
from ``--finetune-lr`` to 0 over their steps. Prints fp32 / post-training / fine-tuned accuracy, average
bits and size.

Product quantization (``--method pq``): sub-vectors of ``--block-size`` inputs replaced by entries of
one codebook of ``--n-centroids`` per layer (the first conv and the classifier stay fp32 unless
``--exclude`` says otherwise: they have too few sub-vectors for a 256-entry codebook). Without
``--finetune`` it compares plain k-means PQ (fairseq's iPQ) with Hessian-aware PQ after training; with
``--finetune pq`` the codebooks are fine-tuned (assignments fixed) through ``OBCQuantize``.

Data:

* by default the full CIFAR-10 (50,000 / 10,000 images) through
  ``torchvision.datasets.CIFAR10(--data-dir, download=True)`` (``--data-dir`` defaults to ``data/cifar10``;
  torchvision is needed only for this path and imported only there; the download needs internet once);
* ``--subset PATH``: an npz with ``train_x`` (N, 3, 32, 32) uint8, ``train_y``, ``test_x``, ``test_y``,
  for machines without internet (the tests and CI pass the project's ``cifar10_subset.npz``).

The test split is the validation set, as is usual for CIFAR (there is no separate held-out split).

Examples::

    python examples/cifar.py --model resnet20 --epochs 30 --bits 4      # downloads CIFAR-10 (torchvision)
    python examples/cifar.py --subset cifar10_subset.npz --epochs 30     # offline, from an npz
    python examples/cifar.py --model resnet20 --epochs 30 --bits 4 3 2 --rtn --out results.json
    python examples/cifar.py --data-dir ~/data --model resnet18 --epochs 30 --accelerator gpu --bits 4 3
    python examples/cifar.py --load-fp32 fp32.pt --bits 2 --solvers obc --finetune ste --finetune-epochs 3
    python examples/cifar.py --load-fp32 fp32.pt --finetune noise --finetune-epochs 5 --noise-penalty 1e3
    python examples/cifar.py --load-fp32 fp32.pt --method pq --block-size 8 --n-centroids 256
    python examples/cifar.py --load-fp32 fp32.pt --method pq --finetune pq --finetune-epochs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from obc_lightning.models import resnet18, resnet20

DEFAULT_DATA_DIR = Path("data") / "cifar10"
# the project's offline subset (benchmarks/ read it from here; the example itself takes it with --subset)
DEFAULT_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_subset.npz"
MODELS = {"resnet20": resnet20, "resnet18": resnet18}

# Per-channel statistics of the CIFAR-10 training set (0..1 scale), the usual normalisation constants.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------- data
@dataclass
class CifarArrays:
    """Images as uint8 (N, 3, 32, 32) tensors and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def limit(self, n_train: int | None = None, n_test: int | None = None) -> CifarArrays:
        """The first ``n_train`` / ``n_test`` images (for quick runs and tests)."""
        return CifarArrays(self.train_x[:n_train], self.train_y[:n_train], self.test_x[:n_test], self.test_y[:n_test])


def load_subset(path: str | Path) -> CifarArrays:
    """Read the npz layout of ``shared/data/cifar10_subset.npz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 subset not found at {path}; pass the path of an npz with --subset PATH, or leave --subset "
            "out to download CIFAR-10 with torchvision (into --data-dir DIR)"
        )
    with np.load(path) as z:
        arrays = CifarArrays(*(torch.from_numpy(z[k]) for k in ("train_x", "train_y", "test_x", "test_y")))
    for x in (arrays.train_x, arrays.test_x):
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"{path}: expected uint8 images of shape (N, 3, 32, 32), got {x.dtype} {tuple(x.shape)}")
    return CifarArrays(arrays.train_x, arrays.train_y.long(), arrays.test_x, arrays.test_y.long())


def load_torchvision(data_dir: str | Path) -> CifarArrays:
    """The full CIFAR-10 (50k / 10k) through torchvision's downloader (needs internet once)."""
    try:
        import torchvision  # lazily: only this path needs it
    except ImportError:
        raise SystemExit("downloading CIFAR-10 needs torchvision (pip install torchvision); offline, pass "
                         "--subset PATH to an npz of CIFAR-10 images") from None
    out = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(data_dir), train=train, download=True)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), a broken archive
            raise SystemExit(f"could not download CIFAR-10 into {data_dir} ({e}); offline, pass --subset PATH "
                             "to an npz of CIFAR-10 images") from None
        # ds.data is (N, 32, 32, 3) uint8 HWC; keep uint8 and go CHW like the npz
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)]
    return CifarArrays(*out)


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The standard CIFAR augmentation on a batch: zero-pad by ``padding``, random 32x32 crop, random h-flip.

    Vectorised over the batch with gather-style indexing (one offset pair per image), so it costs a few
    tensor ops per batch instead of a Python loop per image. Works on any dtype (uint8 here).
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    idx = torch.arange(n)[:, None, None]
    # advanced indexing on dims 0, 2, 3 puts the channel dim last: (n, h, w, c) -> (n, c, h, w)
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()


def _augment_collate(samples):
    x, y = torch.utils.data.default_collate(samples)
    return random_crop_flip(x), y


class CifarDataModule(L.LightningDataModule):
    """Training images with random crop + flip, test images as they are; batches of (uint8 images, labels).

    Images stay uint8 in the batches; the model normalises them (see :class:`CifarClassifier`), so any
    batch from any of these loaders -- including the ones a compression callback calibrates on -- is a
    valid model input without extra transforms.
    """

    def __init__(self, arrays: CifarArrays, batch_size: int = 128, num_workers: int = 0, augment: bool = True):
        super().__init__()
        self.arrays = arrays
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment

    def train_dataloader(self) -> DataLoader:
        a = self.arrays
        return DataLoader(
            TensorDataset(a.train_x, a.train_y),
            batch_size=self.batch_size,
            shuffle=True,
            # drop_last keeps BatchNorm away from a final batch of a handful of images
            drop_last=len(a.train_x) > self.batch_size,
            collate_fn=_augment_collate if self.augment else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        a = self.arrays
        return DataLoader(TensorDataset(a.test_x, a.test_y), batch_size=256, num_workers=self.num_workers)

    def calibration_batches(self, n_images: int = 1024, batch_size: int = 128, seed: int = 0) -> list[Tensor]:
        """``n_images`` random training images (no augmentation), as a list of image batches."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.arrays.train_x), generator=g)[:n_images]
        return list(self.arrays.train_x[idx].split(batch_size))


# -------------------------------------------------------------------------------------------- model
class CifarClassifier(L.LightningModule):
    """A CIFAR network with input normalisation, cross-entropy training and ``val_acc`` / ``val_loss``.

    Optimiser: SGD, momentum 0.9, Nesterov, weight decay 5e-4 (not on BatchNorm and biases: decaying
    them only fights the normalisation), with a OneCycle learning rate per step.
    """

    def __init__(self, model: str = "resnet20", num_classes: int = 10, lr: float = 0.1, weight_decay: float = 5e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = MODELS[model](num_classes)
        # buffers, not parameters: they move with the module and are no Conv / Linear to quantize
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of uint8 (0..255) or float images in the same 0..255 scale."""
        return self.net((x.float() - self.mean) / self.std)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() > 1 else no_decay).append(p)
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=0.9,
            nesterov=True,
        )
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches, pct_start=0.15
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_logger(log_dir: str | None, name: str):
    """TensorBoard when it is installed (tensorboard or tensorboardX), else CSV files, under ``log_dir``
    (``None``: no logger). The compression metrics (``obc/...``) and the per-layer chart go there."""
    if log_dir is None:
        return False
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for module in ("tensorboard", "tensorboardX"):
        try:
            __import__(module)
            return TensorBoardLogger(log_dir, name=name)
        except ImportError:
            continue
    return CSVLogger(log_dir, name=name)


class EpochPrinter(L.Callback):
    """One line per validation epoch (epoch, metrics, elapsed time): a log for runs without a progress bar."""

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()))
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {shown} [{time.perf_counter() - self.t0:.0f} s]",
            flush=True,
        )


# ------------------------------------------------------------------------------------ quantization
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader`` in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / total


@torch.no_grad()
def round_to_nearest_(model: nn.Module, bits: int) -> None:
    """Baseline: every Conv / Linear weight rounded to the nearest point of its per-channel grid.

    The grid is the same one the solvers start from (``fit_grid`` with its MSE range search), so the
    difference to ExactOBC is only the Hessian-aware choice of grid points.
    """
    from obc_lightning.grids import fit_grid

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            W = m.weight.flatten(1)
            m.weight.copy_(fit_grid(W, bits).round(W).view_as(m.weight))


def _comparison_setup(lit, dm, calibration_images: int, seed: int, log):
    """(validation loader, calibration batches on the model's device, results dict with the fp32 accuracy)."""
    val = dm.val_dataloader()
    fp32 = evaluate(lit, val)
    log(f"fp32 val_acc {fp32:.2f}%")
    device = next(lit.parameters()).device
    calib = [x.to(device) for x in dm.calibration_batches(calibration_images, seed=seed)]
    return val, calib, {"fp32_acc": fp32, "calibration_images": sum(len(x) for x in calib), "runs": []}


def compare_bits(
    lit: CifarClassifier,
    dm: CifarDataModule,
    bits_list: list[int],
    methods: tuple[str, ...] = ("rtn", "obc", "auto"),
    calibration_images: int = 1024,
    seed: int = 0,
    log=print,
    sample_fraction: float = 1.0,
    recalibrate_bn: int = 0,
    product_dtype: str | None = None,
    sequential: bool = False,
) -> dict:
    """Quantize copies of the trained ``lit`` at each bit width with each method; accuracies and timings.

    ``methods``: ``"rtn"`` (round-to-nearest), or a ``compress_model`` solver name (``"obc"``, ``"auto"``,
    ``"gptq"``). Every run starts from the same fp32 weights (a fresh deep copy). ``recalibrate_bn``: then
    re-estimate the BatchNorm statistics over that many augmented training batches (the same for every run).
    ``sequential``: ``compress_model(sequential=True)`` (each layer calibrated in the already-compressed
    network and fitted to the fp32 outputs: output matching).
    """
    from obc_lightning import reestimate_batchnorm
    from obc_lightning.compress import compress_model as _compress

    val, calib, results = _comparison_setup(lit, dm, calibration_images, seed, log)
    fp32 = results["fp32_acc"]
    device = next(lit.parameters()).device
    torch.manual_seed(seed)  # the shuffle and the augmentation of the batches below
    bn_batches = [x.to(device) for _, (x, _) in zip(range(recalibrate_bn), dm.train_dataloader())]
    results["recalibrate_bn"] = len(bn_batches)
    for bits in bits_list:
        for method in methods:
            model = copy.deepcopy(lit)
            t0 = time.perf_counter()
            if method == "rtn":
                round_to_nearest_(model, bits)
                extra = {}
            else:
                report = _compress(
                    model, calib, bits, solver=method, sample_fraction=sample_fraction, product_dtype=product_dtype,
                    sequential=sequential,
                )
                extra = {"compression_ratio": report.compression_ratio, "avg_bits": report.avg_bits}
            if bn_batches:
                reestimate_batchnorm(model, bn_batches)
            seconds = time.perf_counter() - t0
            acc = evaluate(model, val)
            results["runs"].append({"bits": bits, "method": method, "acc": acc, "seconds": seconds, **extra})
            log(f"{bits}-bit {method:>5}: val_acc {acc:.2f}% ({acc - fp32:+.2f}), {seconds:.1f} s")
    return results


# left in fp32 by product quantization: the stem's 27 inputs take no block of 8, the classifier has too
# few sub-vectors for a 256-entry codebook
PQ_EXCLUDE = ("net.conv1", "net.fc")


def compare_pq(
    lit: CifarClassifier,
    dm: CifarDataModule,
    methods: tuple[str, ...] = ("pq-kmeans", "pq"),
    block_size: int = 8,
    n_centroids: int = 256,
    exclude=PQ_EXCLUDE,
    calibration_images: int = 1024,
    seed: int = 0,
    log=print,
) -> dict:
    """Product-quantize copies of the trained ``lit`` with each method (``"pq-kmeans"``: plain k-means,
    ``"pq"``: Hessian-aware); accuracies, sizes and timings."""
    from obc_lightning.compress import compress_model as _compress

    val, calib, results = _comparison_setup(lit, dm, calibration_images, seed, log)
    fp32 = results["fp32_acc"]
    for method in methods:
        model = copy.deepcopy(lit)
        t0 = time.perf_counter()
        report = _compress(
            model, calib, method=method, block_size=block_size, n_centroids=n_centroids, exclude=list(exclude),
            seed=seed,
        )
        seconds = time.perf_counter() - t0
        acc = evaluate(model, val)
        loss = sum(m.loss for m in report.modules)
        results["runs"].append({
            "bits": f"pq{block_size}x{n_centroids}", "method": method, "acc": acc, "seconds": seconds,
            "compression_ratio": report.compression_ratio, "avg_bits": report.avg_bits, "layer_loss": loss,
        })
        log(
            f"{method:>9} b={block_size} K={n_centroids}: val_acc {acc:.2f}% ({acc - fp32:+.2f}), "
            f"{report.avg_bits:.2f} bits/weight, sum of layer objectives {loss:.4g}, {seconds:.1f} s"
        )
    return results


def results_table(results: dict) -> str:
    """Rows: bit widths; columns: methods; cells: accuracy (difference to fp32)."""
    if not results["runs"]:
        return f"fp32 accuracy: {results['fp32_acc']:.2f}%"
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    names = {
        "rtn": "round-to-nearest", "obc": "ExactOBC", "auto": "auto (OBC|GPTQ)", "gptq": "GPTQ",
        "pq": "PQ (Hessian)", "pq-kmeans": "PQ (k-means)",
    }
    head = f"{'bits':>4} | " + " | ".join(f"{names.get(m, m):>18}" for m in methods)
    lines = [f"fp32 accuracy: {results['fp32_acc']:.2f}%", head, "-" * len(head)]
    for bits in dict.fromkeys(r["bits"] for r in results["runs"]):
        cells = []
        for m in methods:
            r = next(r for r in results["runs"] if r["bits"] == bits and r["method"] == m)
            cells.append(f"{r['acc']:6.2f} ({r['acc'] - results['fp32_acc']:+6.2f})".rjust(18))
        lines.append(f"{bits:>4} | " + " | ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- fine-tuning
class FinetuneClassifier(CifarClassifier):
    """:class:`CifarClassifier` with a fine-tuning schedule for ``OBCQuantize(finetune=...)``.

    SGD (momentum 0.9, Nesterov, weight decay on the
    weights only) with lr = ``lr`` · ½ (1 + cos(π t / T)), t the optimizer step, T the steps of the
    fine-tuning epochs; set per batch on every parameter group (including the one the callback adds
    for TTQ scales / DiffQ logits).
    """

    def __init__(self, model: str = "resnet20", lr: float = 0.01, weight_decay: float = 5e-4):
        super().__init__(model, lr=lr, weight_decay=weight_decay)

    def on_train_batch_start(self, batch, batch_idx):
        total = max(1, self.trainer.max_epochs * self.trainer.num_training_batches)
        lr = self.hparams.lr * 0.5 * (1 + math.cos(math.pi * min(self.trainer.global_step, total) / total))
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() > 1 else no_decay).append(p)
        return torch.optim.SGD(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            momentum=0.9,
            nesterov=True,
        )


def run_finetune(args: argparse.Namespace, lit: CifarClassifier, dm: CifarDataModule, results: dict) -> dict:
    """Fine-tune the fp32 weights of ``lit`` with ``OBCQuantize(finetune=args.finetune)``; fills ``results``."""
    from obc_lightning.callback import OBCQuantize

    model = FinetuneClassifier(args.model, lr=args.finetune_lr)
    model.load_state_dict(lit.state_dict())
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    solver = args.solvers[0] if args.solvers else "auto"
    calib = dm.calibration_batches(args.calibration_images, batch_size=args.batch_size, seed=args.seed)
    pq = {}
    if args.method != "scalar":
        pq = dict(
            method=args.method, block_size=args.block_size, n_centroids=args.n_centroids,
            exclude=args.exclude if args.exclude is not None else list(PQ_EXCLUDE), pq_noise_rate=args.pq_noise_rate,
        )
    elif args.exclude:
        pq = dict(exclude=args.exclude)
    cb = OBCQuantize(
        bits=args.bits[0],
        solver=solver,
        **pq,
        calibration_dataloader=calib,
        finetune=args.finetune,
        finetune_epochs=args.finetune_epochs,
        monitor="val_acc",
        max_drop=args.max_drop,
        noise_penalty=args.noise_penalty,
        noise_bits_lr=args.noise_bits_lr or None,
        recalibrate_bn=args.recalibrate_bn,
        sample_fraction=args.sample_fraction,
        product_dtype=args.product_dtype,
        export_path=args.export,
        plot=args.log_dir is not None,
        verbose=not args.quiet,
    )
    trainer = L.Trainer(
        max_epochs=args.finetune_epochs,  # = finetune_epochs: compress the loaded weights at fit start
        accelerator=args.accelerator,
        devices=devices,
        callbacks=([EpochPrinter()] if args.quiet else []) + [cb],
        logger=make_logger(args.log_dir, "finetune"),
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    m = cb.metrics
    pct = {k: 100 * m[f"obc/val_acc_{k}"] for k in ("before", "after", "finetuned") if f"obc/val_acc_{k}" in m}
    results.update(
        finetune=args.finetune,
        bits=args.bits[0],
        finetune_epochs=int(m.get("obc/finetune_epochs", 0)),
        finetune_lr=args.finetune_lr,
        fp32_acc=pct.get("before"),
        after_acc=pct.get("after"),
        acc=pct.get("finetuned", pct.get("after")),
        avg_bits=m.get("obc/avg_bits"),
        size_mb_before=m.get("obc/size_mb_before"),
        size_mb=m.get("obc/size_mb_after"),
        compression_ratio=m.get("obc/compression_ratio"),
        finetune_seconds=time.perf_counter() - t0,
    )
    if args.export is not None:
        results["file_bytes"] = args.export.stat().st_size
    if args.finetune == "pq":
        results["pq"] = f"{args.method} b={args.block_size} K={args.n_centroids} noise rate {args.pq_noise_rate:g}"
    if args.finetune == "noise":
        results["noise_penalty"] = args.noise_penalty
        results["noise_bits_lr"] = args.noise_bits_lr
        results["noise_bits"] = m.get("obc/noise_bits")
    per_layer = {}
    for name, q in cb.quantizers.items():
        if args.finetune == "ternary":
            per_layer[name] = {"w_p": float(q.w_p), "w_n": float(q.w_n)}
        elif args.finetune == "noise":
            per_layer[name] = {"mean_bits": float(q.rounded_bits().mean())}
    if per_layer:
        results["per_layer"] = per_layer
        for name, v in per_layer.items():
            print(f"  {name:<28} " + " ".join(f"{k} {x:.4f}" for k, x in v.items()))
    print(finetune_table(results))
    return results


def finetune_table(r: dict) -> str:
    def acc(v):
        return "-" if v is None else f"{v:.2f}%"

    head = f"{'fp32':>8} | {'post-training':>13} | {'fine-tuned':>10} | {'avg bits':>8} | {'size MB':>8} | {'ratio':>5}"
    row = (
        f"{acc(r['fp32_acc']):>8} | {acc(r['after_acc']):>13} | "
        f"{acc(r['acc']) if r['finetune_epochs'] else '-':>10} | "
        f"{r['avg_bits']:8.3f} | {r['size_mb']:8.4f} | {r['compression_ratio']:5.2f}"
    )
    start = {"ternary": "", "pq": f" ({r.get('pq')})"}.get(r["finetune"], f" ({r['bits']}-bit start)")
    label = f"{r['finetune']}{start}, {r['finetune_epochs']} epoch(s) at lr {r['finetune_lr']:g}"
    return "\n".join([label, head, "-" * len(head), row])


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--subset", type=Path, default=None,
                     help="an npz of CIFAR-10 images (offline); default: download CIFAR-10 with torchvision")
    src.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                     help=f"where torchvision downloads CIFAR-10 (default {DEFAULT_DATA_DIR})")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--bits", type=int, nargs="+", default=[4], help="one or more bit widths, e.g. --bits 4 3")
    p.add_argument("--rtn", action="store_true", help="also report round-to-nearest (uses the comparison path)")
    p.add_argument(
        "--solvers",
        nargs="*",
        default=None,
        help="solvers: the comparison runs each (default: obc auto; none given: train, evaluate fp32, "
        "save, stop); the callback uses the first (default: auto)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the OneCycle schedule")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-images", type=int, default=1024)
    p.add_argument(
        "--sample-fraction",
        type=float,
        default=1.0,
        help="fraction of the conv positions each calibration batch gives each Hessian (1: all)",
    )
    p.add_argument(
        "--product-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="precision of each calibration batch's X^T X (bfloat16: faster where the CPU/GPU has it)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate each layer inside the already-compressed network and fit it to the fp32 outputs "
        "(output matching; two calibration passes per layer)",
    )
    p.add_argument(
        "--recalibrate-bn",
        type=int,
        default=0,
        help="re-estimate BatchNorm statistics over this many augmented training batches once the weights are final",
    )
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--save-fp32", type=Path, default=None, help="write the trained fp32 state_dict here")
    p.add_argument("--load-fp32", type=Path, default=None, help="skip training: load this fp32 state_dict")
    ft = p.add_argument_group("quantization-aware fine-tuning")
    ft.add_argument("--finetune", choices=["ste", "ternary", "noise", "pq"], default=None, help="fine-tuning mode")
    ft.add_argument("--finetune-epochs", type=int, default=3, help="N: epochs of fine-tuning")
    ft.add_argument("--finetune-lr", type=float, default=0.01, help="start of the cosine learning rate")
    ft.add_argument(
        "--max-drop", type=float, default=None, help="skip fine-tuning if val_acc (a fraction) drops by at most this"
    )
    ft.add_argument("--noise-penalty", type=float, default=1.0, help="DiffQ: weight of the size term (per MB)")
    ft.add_argument("--noise-bits-lr", type=float, default=1e-3,
                    help="DiffQ: learning rate of the bit widths' own Adam (0: train them with the model's SGD)")
    ft.add_argument(
        "--pq-noise-rate", type=float, default=1.0, help="finetune pq: fraction of sub-vectors quantized per step"
    )
    pq = p.add_argument_group("product quantization")
    pq.add_argument("--method", choices=["scalar", "pq", "pq-kmeans"], default="scalar")
    pq.add_argument("--block-size", type=int, default=8, help="inputs per sub-vector (9: one 3x3 kernel)")
    pq.add_argument("--n-centroids", type=int, default=256, help="codebook entries per layer")
    p.add_argument(
        "--exclude", nargs="*", default=None, help="modules left in fp32 (default with --method pq: net.conv1 net.fc)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--export", type=Path, default=None,
        help="write the packed model here (.safetensors; the callback and --finetune paths)",
    )
    p.add_argument("--log-dir", default="runs/cifar",
                   help="TensorBoard (when installed) or CSV logs, with the obc/ metrics; 'none': no logger")
    p.add_argument("--quiet", action="store_true", help="no progress bar / model summary (for tests and logs)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Everything ``main`` does, returning the results dict (importable for tests)."""
    L.seed_everything(args.seed, workers=True)
    arrays = load_subset(args.subset) if args.subset is not None else load_torchvision(args.data_dir)
    arrays = arrays.limit(args.limit_train, args.limit_test)
    dm = CifarDataModule(arrays, args.batch_size, args.num_workers)
    lit = CifarClassifier(args.model, lr=args.lr)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    # the callback quantizes inside fit, so saving / loading fp32 weights needs the comparison path
    if args.finetune is not None and (len(args.bits) != 1 or args.rtn):
        raise SystemExit("--finetune takes one --bits value (the OBC / initial bit width) and no --rtn")
    if (args.finetune == "pq") != (args.method != "scalar" and args.finetune is not None):
        raise SystemExit("--finetune pq goes with --method pq / pq-kmeans (and they with --finetune pq or none)")
    use_callback = (
        len(args.bits) == 1
        and not args.rtn
        and args.load_fp32 is None
        and args.save_fp32 is None
        and args.finetune is None
        and args.method == "scalar"
    )
    callbacks: list[L.Callback] = [EpochPrinter()] if args.quiet else []
    if use_callback:
        from obc_lightning.callback import OBCQuantize

        n_batches = max(1, math.ceil(args.calibration_images / args.batch_size))
        solver = args.solvers[0] if args.solvers else "auto"
        quantizer = OBCQuantize(
            bits=args.bits[0], solver=solver, calibration_batches=n_batches, verbose=False,  # table printed below
            plot=args.log_dir is not None,
            recalibrate_bn=args.recalibrate_bn, export_path=args.export,
            sample_fraction=args.sample_fraction, product_dtype=args.product_dtype, sequential=args.sequential,
        )
        callbacks.append(quantizer)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=devices,
        callbacks=callbacks,
        logger=make_logger(args.log_dir, "train"),
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        num_sanity_val_steps=0 if args.quiet else 2,
    )
    results: dict = {
        "model": args.model,
        "epochs": args.epochs,
        "train_images": len(arrays.train_x),
        "test_images": len(arrays.test_x),
    }
    t0 = time.perf_counter()
    if args.load_fp32 is not None:
        lit.load_state_dict(torch.load(args.load_fp32, map_location="cpu", weights_only=True))
    else:
        trainer.fit(lit, datamodule=dm)
    results["train_seconds"] = time.perf_counter() - t0

    if use_callback:
        # the callback keeps what it logged: obc/val_acc_before, obc/val_acc_after (fractions), sizes
        before = quantizer.metrics.get("obc/val_acc_before")
        after = quantizer.metrics.get("obc/val_acc_after")
        results.update(
            bits=args.bits[0],
            method=f"callback/{solver}",
            fp32_acc=100 * before,
            acc=100 * after,
            compression_ratio=quantizer.report.compression_ratio,
            avg_bits=quantizer.report.avg_bits,
            calibration_passes=quantizer.report.calibration_passes,
        )
        if args.export is not None:
            results["file_bytes"] = args.export.stat().st_size
        print(quantizer.report.table())
        print(
            f"val_acc fp32 {100 * before:.2f}% -> {args.bits[0]}-bit {100 * after:.2f}% ({100 * (after - before):+.2f})"
        )
    elif args.finetune is not None:
        if args.save_fp32 is not None:
            torch.save(lit.state_dict(), args.save_fp32)
        run_finetune(args, lit, dm, results)
    elif args.method != "scalar":
        if args.save_fp32 is not None:
            torch.save(lit.state_dict(), args.save_fp32)
        results.update(
            compare_pq(
                lit, dm, ("pq-kmeans", "pq"), args.block_size, args.n_centroids,
                args.exclude if args.exclude is not None else PQ_EXCLUDE, args.calibration_images, args.seed,
            )
        )
        print(results_table(results))
    else:
        if args.save_fp32 is not None:
            torch.save(lit.state_dict(), args.save_fp32)
        solvers = ("obc", "auto") if args.solvers is None else tuple(args.solvers)
        methods = (("rtn",) if args.rtn else ()) + solvers
        results.update(
            compare_bits(
                lit, dm, args.bits, methods, args.calibration_images, args.seed,
                sample_fraction=args.sample_fraction, recalibrate_bn=args.recalibrate_bn,
                product_dtype=args.product_dtype, sequential=args.sequential,
            )
        )
        print(results_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=float))
    return results


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.log_dir == "none":
        args.log_dir = None
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
