"""reestimate_batchnorm: statistics equal to a hand computation, any batch type, modes and momenta kept."""

import pytest
import torch
from torch import nn

from obc_lightning.batchnorm import reestimate_batchnorm

torch.manual_seed(0)


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.bn = nn.BatchNorm1d(3, momentum=0.3)
        self.drop = nn.Dropout(0.0)

    def forward(self, x, scale=1.0):
        return self.drop(self.bn(self.lin(x) * scale))


def test_statistics_are_the_averages_over_the_batches():
    model = LinearBN().eval()
    xs = [torch.randn(8, 5) for _ in range(4)]
    assert reestimate_batchnorm(model, xs) == 1
    with torch.no_grad():
        outs = [model.lin(x) for x in xs]
    # momentum None: the cumulative average of the batch means and of the unbiased batch variances
    torch.testing.assert_close(model.bn.running_mean, torch.stack([o.mean(0) for o in outs]).mean(0))
    torch.testing.assert_close(model.bn.running_var, torch.stack([o.var(0) for o in outs]).mean(0))
    assert model.bn.momentum == 0.3 and not model.training and not model.bn.training


def test_batch_types_forward_fn_modes_and_untracked_norms():
    model = LinearBN()
    model.train()
    model.lin.eval()  # mixed modes come back as they were
    untracked = nn.BatchNorm1d(3, track_running_stats=False)
    model.extra = untracked
    x = torch.randn(16, 5)
    for batches, kw in (
        ([(x, 2.0)], {}),  # tuple: model(*batch)
        ([{"x": x, "scale": 2.0}], {}),  # dict: model(**batch)
        ([[x]], {"forward_fn": lambda m, b: m(b[0], scale=2.0)}),
    ):
        assert reestimate_batchnorm(model, batches, **kw) == 1
        with torch.no_grad():
            out = model.lin(x) * 2.0
        torch.testing.assert_close(model.bn.running_mean, out.mean(0))
        assert model.training and model.bn.training and not model.lin.training
    assert untracked.running_mean is None


def test_no_norms_empty_batches_and_reduction_over_ranks():
    assert reestimate_batchnorm(nn.Linear(2, 2), []) == 0
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(LinearBN(), [])
    model = LinearBN()
    xs = [torch.randn(8, 5) for _ in range(2)]
    reestimate_batchnorm(model, xs)
    alone = model.bn.running_mean.clone(), model.bn.running_var.clone()
    # two ranks with the same batches: the sum over ranks divided by their number changes nothing
    reestimate_batchnorm(model, xs, reduce_fn=lambda t: t.mul_(2))
    torch.testing.assert_close(model.bn.running_mean, alone[0])
    torch.testing.assert_close(model.bn.running_var, alone[1])
