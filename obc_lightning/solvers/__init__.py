"""Solvers: (W, H) -> weights on a grid. They use the grids and nothing else of the package."""

from obc_lightning.solvers.common import HessianDampingWarning, QuantResult, layer_objective
from obc_lightning.solvers.gptq import gptq
from obc_lightning.solvers.obc import exact_obc
from obc_lightning.solvers.polish import polish
from obc_lightning.solvers.pq import PQResult, product_quantize
from obc_lightning.solvers.prune import PruneResult, obs_prune
from obc_lightning.solvers.quantize import quantize_weight

__all__ = [
    "HessianDampingWarning",
    "PQResult",
    "PruneResult",
    "QuantResult",
    "exact_obc",
    "gptq",
    "layer_objective",
    "obs_prune",
    "polish",
    "product_quantize",
    "quantize_weight",
]
