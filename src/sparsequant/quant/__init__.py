"""Quantization specs and round-to-nearest quantization with scales fitted on kept weights."""
from .rtn import QuantParams, dequantize_with, fake_quantize_with, fit_params, quantize_rtn, quantize_with
from .spec import QuantSpec

__all__ = [
    "QuantParams",
    "QuantSpec",
    "dequantize_with",
    "fake_quantize_with",
    "fit_params",
    "quantize_rtn",
    "quantize_with",
]
