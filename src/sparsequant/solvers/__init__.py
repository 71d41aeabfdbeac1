"""Per-layer compression algorithms: pure functions of (weight, statistics, spec).

Each algorithm lives in its own module and registers itself here under a name the recipe uses.
"""
from .base import CompressedWeight, LayerStats
from .compose import LinearPlan, compress_weight
from .gptq import OPTIONS as _GPTQ_OPTIONS
from .gptq import gptq_quantize
from .magnitude import magnitude_prune
from .registry import JOINT, PRUNERS, QUANTIZERS, register
from .rtn import OPTIONS as _RTN_OPTIONS
from .rtn import rtn_quantize
from .slim_quant import slim_quantize
from .smoothing import fold_smoothing, smoothing_scales
from .sparsegpt import JOINT_OPTIONS as _SPARSEGPT_JOINT_OPTIONS
from .sparsegpt import OPTIONS as _SPARSEGPT_OPTIONS
from .sparsegpt import sparsegpt_joint, sparsegpt_prune
from .wanda import wanda_prune

register(PRUNERS, "magnitude", magnitude_prune, needs_hessian=False, needs_stats=False,
         summary="keep the largest |W|")
register(PRUNERS, "wanda", wanda_prune, needs_hessian=False, needs_stats=True,
         summary="keep the largest |W|*||X||, per output row")
register(QUANTIZERS, "rtn", rtn_quantize, needs_hessian=False, needs_stats=False,
         summary="round to nearest, scales fitted on kept weights", options=_RTN_OPTIONS)
register(QUANTIZERS, "slim", slim_quantize, needs_hessian=False, needs_stats=False,
         summary="SLiM-Quant: one symmetric scale per tensor minimizing expected rounding + clipping error")
register(PRUNERS, "sparsegpt", sparsegpt_prune, needs_hessian=True, needs_stats=True,
         summary="OBS pruning with compensation of kept weights (SparseGPT)", options=_SPARSEGPT_OPTIONS)
register(QUANTIZERS, "gptq", gptq_quantize, needs_hessian=True, needs_stats=True,
         summary="OBS quantization column by column, pruned weights fixed at zero (GPTQ)", options=_GPTQ_OPTIONS)
register(JOINT, "sparsegpt", sparsegpt_joint, needs_hessian=True, needs_stats=True,
         summary="SparseGPT pruning and quantization in one OBS pass", options=_SPARSEGPT_JOINT_OPTIONS)

__all__ = [
    "CompressedWeight",
    "JOINT",
    "LayerStats",
    "LinearPlan",
    "PRUNERS",
    "QUANTIZERS",
    "compress_weight",
    "fold_smoothing",
    "gptq_quantize",
    "smoothing_scales",
    "sparsegpt_joint",
    "sparsegpt_prune",
    "register",
]
