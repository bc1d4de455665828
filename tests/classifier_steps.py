"""The training / validation steps the test LightningModules share: a classifier on (x, y) batches."""

from torch import nn


class ClassifierSteps:
    """Mix into a LightningModule whose ``forward(x)`` gives logits: cross-entropy training loss;
    ``val_loss`` and ``val_acc`` logged in validation."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
