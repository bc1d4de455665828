"""Solvers: (W, H) -> weights on a grid. They use the grids and nothing else of the package."""

from obc_lightning.solvers.common import HessianDampingWarning, QuantResult, layer_objective
from obc_lightning.solvers.obc import exact_obc

__all__ = ["HessianDampingWarning", "QuantResult", "exact_obc", "layer_objective"]
