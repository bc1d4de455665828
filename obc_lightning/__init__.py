"""obc_lightning: second-order post-training compression for PyTorch Lightning.

Flow: configuration (``CompressionConfig``) -> calibration (``collect_hessians``) -> solvers (``exact_obc``,
``gptq``, ``quantize_weight``, ``obs_prune``, ``product_quantize``) on grids (``fit_grid``) -> ``compress_model``
-> fine-tuning (``FinetuneSession``) -> export (``save_quantized``), tied together without Lightning in
:mod:`obc_lightning.pipeline` -> the ``OBCQuantize`` callback.
"""

from obc_lightning.attention import ProjectedAttention, split_attention_projections
from obc_lightning.batchnorm import reestimate_batchnorm
from obc_lightning.calibration import CalibrationResult, CalibrationWarning, LayerHessian, collect_hessians
from obc_lightning.compress import compress_model
from obc_lightning.config import (
    CalibrationConfig,
    CompressionConfig,
    ExportConfig,
    FinetuneConfig,
    QuantizationConfig,
    ReportingConfig,
)
from obc_lightning.export import (
    load_checkpoint_formats,
    load_quantized,
    pack_model,
    prepare_for_load,
    save_quantized,
    unpack_model,
)
from obc_lightning.export.onnx import OnnxExport, export_onnx, inference_session
from obc_lightning.finetune import CentroidQuantizer, FinetuneSession, NoiseQuantizer, STEQuantizer, TernaryQuantizer
from obc_lightning.grids import Grid, fit_grid
from obc_lightning.packed import QuantizedConv1d, QuantizedConv2d, QuantizedLinear, set_kernel
from obc_lightning.pipeline import (
    ModelSnapshot,
    compress_stage,
    export_stage,
    finish_finetuning,
    restored_on_failure,
    start_finetuning,
)
from obc_lightning.reporting import CompressionReport, ModuleReport, Progress, TqdmProgress
from obc_lightning.selection import select_modules
from obc_lightning.semi_structured import to_semi_structured
from obc_lightning.solvers import (
    HessianDampingWarning,
    PQResult,
    PruneResult,
    QuantResult,
    exact_obc,
    gptq,
    layer_objective,
    obs_prune,
    polish,
    product_quantize,
    quantize_weight,
)
from obc_lightning.version import __version__  # noqa: F401  (the package's version)


def __getattr__(name):
    # the callback is the only module that imports lightning: load it on first use
    if name in ("OBCQuantize", "OBCPrune"):
        from obc_lightning import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'obc_lightning' has no attribute {name!r}")


__all__ = [
    "CalibrationConfig",
    "CompressionConfig",
    "ExportConfig",
    "FinetuneConfig",
    "QuantizationConfig",
    "ReportingConfig",
    "FinetuneSession",
    "ModelSnapshot",
    "compress_stage",
    "export_stage",
    "finish_finetuning",
    "restored_on_failure",
    "start_finetuning",
    "Progress",
    "TqdmProgress",
    "CalibrationResult",
    "CalibrationWarning",
    "CentroidQuantizer",
    "CompressionReport",
    "Grid",
    "HessianDampingWarning",
    "LayerHessian",
    "ModuleReport",
    "OnnxExport",
    "NoiseQuantizer",
    "OBCPrune",
    "OBCQuantize",
    "PQResult",
    "ProjectedAttention",
    "PruneResult",
    "QuantResult",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedLinear",
    "STEQuantizer",
    "TernaryQuantizer",
    "collect_hessians",
    "compress_model",
    "exact_obc",
    "export_onnx",
    "fit_grid",
    "gptq",
    "inference_session",
    "layer_objective",
    "load_checkpoint_formats",
    "load_quantized",
    "obs_prune",
    "pack_model",
    "polish",
    "prepare_for_load",
    "product_quantize",
    "quantize_weight",
    "reestimate_batchnorm",
    "save_quantized",
    "select_modules",
    "set_kernel",
    "split_attention_projections",
    "to_semi_structured",
    "unpack_model",
]
