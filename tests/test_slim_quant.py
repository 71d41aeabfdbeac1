"""SLiM-Quant: the objective against a float64 brute force, the search, the quantizer entry."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import NonFiniteWeightError, QuantizationError, RecipeError
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec, fit_params
from sparsequant.quant.slim import expected_error, quantize_slim, slim_clip, slim_params
from sparsequant.recipe import QuantConfig, Recipe
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight

PER_TENSOR = QuantSpec(4, None, True)


def _brute_error(values, alpha, bits):
    a = values.abs().double().reshape(-1)
    qmax = 2 ** (bits - 1) - 1
    inside = int((a <= alpha).sum())
    clip = float(((a - alpha).clamp_min(0) ** 2).sum())
    return (inside * (alpha / qmax) ** 2 / 12 + clip) / a.numel()


def _sample(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    # Student t with 3 degrees of freedom: heavy tails, like real weight matrices' outliers
    z = torch.randn(n, generator=g)
    chi = torch.randn(n, 3, generator=g).square().sum(1)
    return z / (chi / 3).sqrt()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), bits=st.integers(2, 8), frac=st.floats(0.0, 1.5), seed=st.integers(0, 9999))
def test_expected_error_matches_brute_force(n, bits, frac, seed):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    alpha = float(v.abs().max()) * frac
    got = float(expected_error(v, alpha, bits)[0])
    assert got == pytest.approx(_brute_error(v, alpha, bits), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "t3"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_search_finds_the_minimum_of_a_fine_grid(kind, bits):
    v = _sample(kind, 20000, 1)
    alpha = slim_clip(v, bits)
    top = float(v.abs().max())
    grid = torch.linspace(top / 4000, top, 4000, dtype=torch.float64)
    best = float(expected_error(v, grid, bits).min())
    assert float(expected_error(v, alpha, bits)[0]) <= best * (1 + 1e-6)
    assert 0 < alpha <= top


@pytest.mark.parametrize("kind", ["gauss", "laplace", "t3"])
def test_clipping_beats_absmax_in_real_quantization_error(kind):
    w = _sample(kind, 64 * 512, 2).reshape(64, 512)
    codes, params = quantize_slim(w, PER_TENSOR)
    err_slim = float((params.dequantize(codes) - w).square().mean())
    absmax = float(w.abs().max()) / 7
    s = torch.full((64, 1), absmax).half().float()
    p = type(params)(s, torch.full_like(s, 8.0), PER_TENSOR, 512)
    err_absmax = float((p.dequantize(p.quantize(w)) - w).square().mean())
    assert err_slim < err_absmax
    assert float(params.scale[0, 0]) < absmax  # it clipped


def test_one_scale_per_tensor_kept_weights_only():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    stats = LayerStats.from_inputs(torch.randn(32, 64, generator=g))
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quantizer="slim", quant=PER_TENSOR)
    cw = compress_weight(w, stats, plan)
    assert cw.qparams.scale.shape == (16, 1)
    assert torch.all(cw.qparams.scale == cw.qparams.scale[0, 0])
    # the scale comes from the kept weights' distribution
    kept = w[cw.mask]
    assert float(cw.qparams.scale[0, 0]) == float(torch.tensor(slim_clip(kept, 4) / 7).half().float())
    back = PackedWeight.from_compressed(cw).to_compressed()
    assert torch.equal(back.weight, cw.weight)
    # counted honestly: one float16 scale per output row is stored
    assert PackedWeight.from_compressed(cw).tensors["scales"].numel() == 16


def test_zero_weight_gets_unit_scale():
    params = slim_params(torch.zeros(4, 8), PER_TENSOR)
    assert torch.all(params.scale == 1.0)
    codes, _ = quantize_slim(torch.zeros(4, 8), PER_TENSOR)
    assert torch.all(codes == 8)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128, True), QuantSpec(4, None, False)])
def test_per_group_or_asymmetric_spec_is_refused(spec):
    with pytest.raises(QuantizationError, match="one symmetric scale per tensor"):
        slim_params(torch.randn(4, 256), spec)


def test_bad_inputs():
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        slim_params(w, PER_TENSOR)
    with pytest.raises(QuantizationError, match="2-D"):
        slim_params(torch.randn(8), PER_TENSOR)
    plan = LinearPlan(sparsity=SparsitySpec(), quantizer="slim", quant=PER_TENSOR, options=(("clip_search", True),))
    with pytest.raises(RecipeError, match="clip_search"):
        compress_weight(torch.randn(4, 8), None, plan)


def test_recipe_names_slim():
    r = Recipe(method="magnitude", pattern="2:4", quant=QuantConfig(method="slim", bits=4, group_size=None))
    assert Recipe.from_yaml(r.to_yaml()).plan().quantizer == "slim"
    w = torch.randn(8, 32)
    cw = compress_weight(w, None, r.plan())
    assert cw.quant == PER_TENSOR
    # the same error as fitting one absmax-style scale would give is not better
    rt = compress_weight(w, None, r.with_(quant=QuantConfig(bits=4, group_size=None)).plan())
    assert fit_params(w, PER_TENSOR).scale.shape == rt.qparams.scale.shape
