"""BatchNorm statistics for the compressed weights.

A BatchNorm layer normalises with running statistics gathered while the weights before it were the
fp32 (or, during fine-tuning, the noisy or latent) ones. Once the weights are on a coarse grid, the
activations they produce have other means and variances, and the stale statistics shift every channel:
at 2 bits this costs ResNet-20 several accuracy points that one pass over training batches gives back
(measured in the README). The batches must come from the training distribution, augmentation included:
statistics of un-augmented images differ from those the network was trained with, and re-estimating
with them loses accuracy even at 4 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from obc_lightning.calibration import call_model, reduced


class _Calls(nn.Module):
    """``batch -> call_model(model, batch, forward_fn)`` as a module, so that ``update_bn`` (which calls
    ``model(batch[0])``) can run any batch type through the model's own calling convention."""

    def __init__(self, model: nn.Module, forward_fn: Callable | None):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch):
        return call_model(self.model, batch, self.forward_fn)


def reestimate_batchnorm(
    model: nn.Module,
    batches: Iterable,
    *,
    forward_fn: Callable | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
) -> int:
    """Replace the running mean and variance of every tracking BatchNorm of ``model`` by their averages
    over ``batches`` with the current weights; returns how many layers were re-estimated.

    ``torch.optim.swa_utils.update_bn`` does the pass (statistics reset, momentum None: a cumulative
    average, train mode); batches go in as in :func:`obc_lightning.calibration.call_model` (or through
    ``forward_fn(model, batch)``), and every submodule gets back the train / eval mode it had.
    ``reduce_fn`` (a sum over ranks, as in ``collect_hessians``) averages the statistics of all ranks, so
    that they agree (the variance is the mean of the ranks' variances).

    Raises ``ValueError`` for an empty ``batches`` (the statistics would be left reset).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    batches = list(batches)
    if not batches:
        raise ValueError("reestimate_batchnorm: no batches (the running statistics would be left reset)")
    modes = {m: m.training for m in model.modules()}
    try:
        update_bn(((b,) for b in batches), _Calls(model, forward_fn))
    finally:
        for m, training in modes.items():
            m.train(training)
    if reduce_fn is not None:
        ranks = torch.ones((), device=norms[0].running_mean.device)
        ranks = reduced(reduce_fn, ranks)
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                stat.copy_(reduced(reduce_fn, stat) / ranks)
    return len(norms)

