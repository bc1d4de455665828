"""The summary says what was done: pruned, quantized, or pruned and quantized (issue 32, item 7)."""

import pytest
import torch
from torch import nn

from obc_lightning import compress_model

pytestmark = pytest.mark.filterwarnings("ignore::obc_lightning.calibration.CalibrationWarning")


@pytest.mark.parametrize("options, done", [
    (dict(bits=None, sparsity=0.5), "2 pruned, 0 skipped"),
    (dict(bits=None, n_m=(2, 4)), "2 pruned, 0 skipped"),
    (dict(bits=4), "2 quantized, 0 skipped"),
    (dict(bits=4, n_m=(2, 4)), "2 pruned and quantized, 0 skipped"),
])
def test_the_totals_line_names_the_method(options, done):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = compress_model(model, [torch.randn(32, 8)], **options)
    assert report.table().splitlines()[-1].startswith(done + " | size")
