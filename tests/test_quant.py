import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.errors import NonFiniteWeightError, QuantizationError
from sparsequant.patterns import nm_mask
from sparsequant.quant import QuantSpec, fit_params, quantize_rtn


def naive_rtn(w, spec, mask=None):
    """Float64, loop-per-group reference of round-to-nearest with kept-only fitting."""
    rows, cols = w.shape
    g = spec.group_size or cols
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for start in range(0, cols, g):
            sl = slice(start, min(start + g, cols))
            vals = w[r, sl].double()
            keep = torch.ones_like(vals, dtype=torch.bool) if mask is None else mask[r, sl]
            kept = vals[keep]
            if spec.symmetric:
                amax = float(kept.abs().max()) if kept.numel() else 0.0
                scale = amax / (2 ** (spec.bits - 1) - 1) if amax > 0 else 1.0
                scale = float(torch.tensor(max(scale, 2.0**-20)).half())
                zero = 2 ** (spec.bits - 1)
            else:
                lo, hi = (float(kept.min()), float(kept.max())) if kept.numel() else (0.0, 0.0)
                scale = (hi - lo) / (2**spec.bits - 1)
                scale = float(torch.tensor(max(scale, 2.0**-20) if scale > 0 else 1.0).half())
                zero = min(max(round(-lo / scale), 0), 2**spec.bits - 1)
            for j in range(sl.start, sl.stop):
                q = min(max(round(float(w[r, j]) / scale) + zero, 0), 2**spec.bits - 1)
                deq = (q - zero) * scale
                out[r, j] = deq if (mask is None or mask[r, j]) else 0.0
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_rtn_matches_naive(bits, group, sym, sparse):
    torch.manual_seed(bits * 100 + (group or 0) + sym)
    w = torch.randn(5, 80)  # 80 is not a multiple of 48 or 32*3: ragged last group
    mask = nm_mask(torch.rand(5, 80), 2, 4) if sparse else None
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    codes, params = quantize_rtn(w, spec, mask)
    deq = params.dequantize(codes)
    if mask is not None:
        deq = deq * mask
    ref = naive_rtn(w, spec, mask)
    # round() ties may differ between float32 and float64 by one code; allow one step where it happens
    step = params.expand()[0].double()
    diff = (deq.double() - ref).abs()
    assert (diff <= step * 1.0001).all()
    assert (diff > 1e-6).float().mean() < 0.01


def test_scales_fitted_on_kept_weights_only():
    w = torch.tensor([[100.0, 1.0, 0.5, -1.0, 0.2, 0.3, -0.1, 0.4]])
    mask = torch.tensor([[False, True, True, False, True, True, False, False]])
    spec = QuantSpec(bits=4, group_size=8, symmetric=True)
    params = fit_params(w, spec, mask)
    assert math.isclose(float(params.scale[0, 0]), 1.0 / 7, rel_tol=1e-3)  # absmax of kept = 1.0


def test_codes_in_range_and_pruned_are_zero():
    w = torch.randn(8, 64) * 3
    mask = nm_mask(w.abs(), 2, 4)
    for spec in [QuantSpec(4, 32, True), QuantSpec(3, None, False)]:
        codes, params = quantize_rtn(w, spec, mask)
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**spec.bits
        assert (params.dequantize(codes)[~mask] == 0).all()


def test_scales_are_float16_exact():
    _, params = quantize_rtn(torch.randn(4, 128), QuantSpec(4, 64, True))
    assert torch.equal(params.scale, params.scale.half().float())


def test_dequantized_error_bounded_by_half_step():
    w = torch.randn(16, 256)
    spec = QuantSpec(4, 128, False)
    codes, params = quantize_rtn(w, spec)
    s, _ = params.expand()
    assert ((params.dequantize(codes) - w).abs() <= s * 0.5 + 1e-6).all()


def test_bad_specs_and_weights():
    with pytest.raises(QuantizationError):
        QuantSpec(bits=9)
    with pytest.raises(QuantizationError):
        QuantSpec(bits=4, group_size=0)
    w = torch.randn(4, 8)
    w[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError):
        quantize_rtn(w, QuantSpec())


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), cols=st.integers(1, 70), sym=st.booleans(), seed=st.integers(0, 999))
def test_quantize_is_idempotent(bits, cols, sym, seed):
    w = torch.randn(3, cols, generator=torch.Generator().manual_seed(seed))
    spec = QuantSpec(bits=bits, group_size=16, symmetric=sym)
    codes, params = quantize_rtn(w, spec)
    deq = params.dequantize(codes)
    assert torch.equal(params.quantize(deq), codes)
