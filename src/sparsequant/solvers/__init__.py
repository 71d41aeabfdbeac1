"""Per-layer compression algorithms: pure functions of (weight, statistics, spec).

Each algorithm lives in its own module and registers itself here under a name the recipe uses.
"""
from .base import CompressedWeight, LayerStats
from .compose import LinearPlan, compress_weight
from .magnitude import magnitude_prune
from .registry import JOINT, PRUNERS, QUANTIZERS, register
from .rtn import rtn_quantize
from .wanda import wanda_prune

register(PRUNERS, "magnitude", magnitude_prune, needs_hessian=False, needs_stats=False,
         summary="keep the largest |W|")
register(PRUNERS, "wanda", wanda_prune, needs_hessian=False, needs_stats=True,
         summary="keep the largest |W|*||X||, per output row")
register(QUANTIZERS, "rtn", rtn_quantize, needs_hessian=False, needs_stats=False,
         summary="round to nearest, scales fitted on kept weights")

__all__ = [
    "CompressedWeight",
    "JOINT",
    "LayerStats",
    "LinearPlan",
    "PRUNERS",
    "QUANTIZERS",
    "compress_weight",
    "register",
]
