"""obc_lightning: second-order post-training compression for PyTorch Lightning."""

from obc_lightning.grids import Grid, fit_grid
from obc_lightning.solvers import HessianDampingWarning, QuantResult, exact_obc, layer_objective

__version__ = "0.1.0"

__all__ = ["Grid", "HessianDampingWarning", "QuantResult", "exact_obc", "fit_grid", "layer_objective"]
