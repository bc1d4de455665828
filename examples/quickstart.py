"""Quickstart: train a small CNN with Lightning, and let ``OBCQuantize`` make it 4-bit when ``fit`` ends.

Runs offline in under a minute on a CPU: the data is scikit-learn's bundled handwritten digits
(1,797 8x8 grey images, 10 classes; ``sklearn.datasets.load_digits`` reads it from the wheel, no
download). Install the extra first::

    pip install "obc_lightning[examples]"     # or: pip install scikit-learn
    python examples/quickstart.py             # --bits 3, --epochs 30, --solver obc, ...

The only compression-specific line is ``Trainer(callbacks=[OBCQuantize(bits=4)])``: at the end of
training the callback calibrates on ~1024 training images, quantizes every Conv2d / Linear in place,
runs ``validation_step`` before and after (so it compares the ``val_acc`` this module logs), and sends
``obc/val_acc_before`` / ``obc/val_acc_after``, the per-layer errors, the sizes and a per-layer error
chart to the Trainer's logger: TensorBoard when it is installed (``tensorboard --logdir runs/quickstart``),
else CSV files under ``runs/quickstart`` (``--log-dir none``: no logger).
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from obc_lightning.callback import OBCQuantize


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """80 / 20 split of the digits, pixel values 0..16 scaled to 0..1, images as (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit('quickstart needs scikit-learn for its bundled dataset: pip install "obc_lightning[examples]"')
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = len(x) // 5
    val, train = perm[:n_val], perm[n_val:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


class DigitsCNN(L.LightningModule):
    """conv 1->16 -> conv 16->32 -> pool -> fc 512->64 -> fc 64->10, logging ``val_acc`` / ``val_loss``.

    Small on purpose: ExactOBC costs rows * d^3 per layer (d = input width), so the 512-wide Linear
    quantizes in seconds on a CPU, where a 1024-wide one would take about 8 times as long (measured
    times: docs/results.md, "Quickstart").
    """

    def __init__(self, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )  # fmt: skip
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def make_logger(log_dir: str | None):
    """TensorBoard when it is installed (tensorboard or tensorboardX), else CSV files; ``None``: no logger."""
    if log_dir is None:
        return False
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for module in ("tensorboard", "tensorboardX"):
        try:
            __import__(module)
            return TensorBoardLogger(log_dir, name="quickstart")
        except ImportError:
            continue
    return CSVLogger(log_dir, name="quickstart")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train a digits CNN and quantize it with OBCQuantize.")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--solver", default="auto", help="auto (best of ExactOBC / GPTQ per row), obc or gptq")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-dir", default="runs",
                   help="TensorBoard (when installed) or CSV logs with the obc/ metrics; 'none': no logger")
    args = p.parse_args(argv)
    log_dir = None if args.log_dir == "none" else args.log_dir

    L.seed_everything(args.seed, verbose=False)
    train, val = digits_loaders(seed=args.seed)
    model = DigitsCNN()
    # verbose=False: the table is printed once, below; plot: the per-layer error chart goes to the logger
    quantizer = OBCQuantize(bits=args.bits, solver=args.solver, verbose=False, plot=log_dir is not None)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[quantizer],  # <- the one line that quantizes the trained model
        logger=make_logger(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=not args.quiet,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - t0

    before, after = quantizer.metrics["obc/val_acc_before"], quantizer.metrics["obc/val_acc_after"]
    print()
    print(quantizer.report.table())
    print(
        f"\nval_acc  fp32 {100 * before:.2f}%  ->  {args.bits}-bit {100 * after:.2f}%  "
        f"({100 * (after - before):+.2f} points); weights {quantizer.report.compression_ratio:.1f}x smaller; "
        f"train + quantize {seconds:.0f} s"
    )
    return {"before": before, "after": after, "report": quantizer.report, "seconds": seconds}


if __name__ == "__main__":
    main()
