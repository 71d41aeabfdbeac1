"""MSE-searched clipping: never worse than absmax per group, and wired into rtn, GPTQ and joint SparseGPT."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.errors import RecipeError
from sparsequant.patterns import SparsitySpec, validate_nm
from sparsequant.patterns.masks import nm_mask
from sparsequant.quant import QuantSpec, fit_params
from sparsequant.quant.clip_search import DEFAULT_GRID, fit_params_searched, group_error, search_clip
from sparsequant.quant.rtn import _grouped
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight
from sparsequant.solvers.gptq import fit_columns, fit_columns_searched, gptq_quantize


def _weights(rows, cols, seed, heavy=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if heavy:  # a few outliers per row, as in real layers
        idx = torch.randint(0, cols, (rows, 2), generator=g)
        w.scatter_(1, idx, torch.randn(rows, 2, generator=g) * 6)
    return w


def _errors(w, spec, params, mask=None, col_weight=None):
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    weight = keep.float() if col_weight is None else keep.float() * col_weight
    return group_error(w, params, _grouped(weight, spec.effective_group(w.shape[1]), 0.0))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 10), cols=st.integers(1, 80), bits=st.integers(2, 8), group=st.sampled_from([None, 8, 32]),
       sym=st.booleans(), masked=st.booleans(), weighted=st.booleans(), seed=st.integers(0, 9999))
def test_searched_error_never_above_absmax(rows, cols, bits, group, sym, masked, weighted, seed):
    w = _weights(rows, cols, seed)
    spec = QuantSpec(bits, group, sym)
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(rows, cols, generator=g) < 0.6) if masked else None
    cw = torch.rand(cols, generator=g) * 3 if weighted else None
    searched = _errors(w, spec, fit_params_searched(w, spec, mask, cw), mask, cw)
    plain = _errors(w, spec, fit_params(w, spec, mask), mask, cw)
    assert torch.all(searched <= plain)


def test_search_helps_on_heavy_tails_and_picks_factors_below_one():
    w = _weights(64, 256, 0)
    spec = QuantSpec(4, 128, True)
    ratio = search_clip(w, spec)
    assert ratio.shape == (64, 2) and float(ratio.min()) >= min(DEFAULT_GRID) and float(ratio.max()) <= 1.0
    assert float((ratio < 1).float().mean()) > 0.5
    searched = _errors(w, spec, fit_params(w, spec, clip_ratio=ratio)).sum()
    plain = _errors(w, spec, fit_params(w, spec)).sum()
    assert searched < 0.9 * plain


def test_search_is_exhaustive_over_the_grid():
    """Against a plain per-group loop over the same candidates."""
    w = _weights(6, 40, 5)
    spec = QuantSpec(3, 16, False)
    ratio = search_clip(w, spec, grid=(1.0, 0.9, 0.75, 0.5))
    for r in range(6):
        for gi in range(spec.n_groups(40)):
            cols = slice(gi * 16, min(gi * 16 + 16, 40))
            errs = {}
            for c in torch.tensor([1.0, 0.9, 0.75, 0.5]):
                p = fit_params(w[r:r + 1, cols], QuantSpec(3, None, False), clip_ratio=c.reshape(1, 1))
                errs[float(c)] = float((p.dequantize(p.quantize(w[r:r + 1, cols])) - w[r:r + 1, cols]).square().sum())
            best = min(errs.values())
            chosen = float(ratio[r, gi])
            assert errs[chosen] <= best * (1 + 1e-6)
            # ties go to the larger factor
            assert all(e > errs[chosen] * (1 + 1e-6) for c, e in errs.items() if c > chosen)


def test_bad_grid_and_mode():
    with pytest.raises(RecipeError, match="factors"):
        search_clip(torch.randn(2, 8), QuantSpec(4, None, True), grid=(1.0, 1.5))
    plan = LinearPlan(sparsity=SparsitySpec(), quant=QuantSpec(4, 32, True), options=(("clip_search", "yes"),))
    with pytest.raises(RecipeError, match="clip_search"):
        compress_weight(torch.randn(4, 64), None, plan)


def _stats(cols, seed, tokens=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g).mul(3).add(0.1)
    return x, LayerStats.from_inputs(x, with_hessian=True)


@pytest.mark.parametrize("mode", [True, "mse", "act"])
def test_rtn_option(mode):
    w = _weights(32, 128, 1)
    x, stats = _stats(128, 1)
    spec = QuantSpec(4, 32, True)
    base = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quant=spec)
    plain = compress_weight(w, stats, base)
    cw = compress_weight(w, stats, LinearPlan(**{**base.__dict__, "options": (("clip_search", mode),)}))
    assert torch.equal(cw.mask, plain.mask)
    col = stats.sq_sum / stats.n_tokens if mode == "act" else None
    assert torch.all(_errors(w, spec, cw.qparams, cw.mask, col) <= _errors(w, spec, plain.qparams, cw.mask, col))


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mode", ["mse", "act"])
def test_gptq_option(static_groups, act_order, mode):
    w = _weights(24, 96, 2)
    x, stats = _stats(96, 2)
    spec = QuantSpec(2, 32, True)
    mask = nm_mask(w.abs(), 2, 4)
    opts = dict(static_groups=static_groups, act_order=act_order)
    info_plain, info_clip = {}, {}
    codes0, p0 = gptq_quantize(w, stats, spec, mask, info=info_plain, **opts)
    codes, p = gptq_quantize(w, stats, spec, mask, clip_search=mode, info=info_clip, **opts)
    q = p.dequantize(codes) * mask
    assert torch.all(q[~mask] == 0)
    assert not torch.equal(p.scale, p0.scale)  # the ranges really were searched
    # at 2 bits clipping pays off in the layer's output error, too
    err = lambda qq: float(((w - qq) @ x.T).square().sum())  # noqa: E731
    assert err(q) < err(p0.dequantize(codes0) * mask)


def test_fit_columns_searched_matches_fit_params_searched():
    w = _weights(10, 32, 3)
    keep = torch.rand(10, 32, generator=torch.Generator().manual_seed(0)) < 0.7
    cw = torch.rand(32, generator=torch.Generator().manual_seed(1))
    for sym in (True, False):
        spec = QuantSpec(3, 32, sym)
        scale, zero = fit_columns_searched(w.T.contiguous(), keep.T.contiguous(), spec, cw)
        ref = fit_params_searched(w, spec, keep, cw)
        assert torch.equal(scale, ref.scale[:, 0]) and torch.equal(zero, ref.zero[:, 0])
        # without a clip ratio fit_columns is still fit_params
        s0, z0 = fit_columns(w.T.contiguous(), keep.T.contiguous(), spec)
        assert torch.equal(s0, fit_params(w, spec, keep).scale[:, 0])


@pytest.mark.parametrize("mode", ["mse", "act"])
def test_joint_sparsegpt_option(mode):
    w = _weights(16, 64, 4)
    x, stats = _stats(64, 4)
    spec = QuantSpec(4, 32, True)
    plan = LinearPlan(prune="sparsegpt", sparsity=SparsitySpec.parse("2:4"), quant=spec, joint=True,
                      options=(("clip_search", mode),))
    cw = compress_weight(w, stats, plan)
    validate_nm(cw.mask, 2, 4)
    col = stats.sq_sum / stats.n_tokens if mode == "act" else None
    # parameters are searched on the dense weight, before the sweep
    assert torch.equal(cw.qparams.scale, fit_params_searched(w, spec, None, col).scale)
    # the separate (non-joint) path routes the option to the quantizer only
    seq = LinearPlan(**{**plan.__dict__, "joint": False})
    compress_weight(w, stats, seq).validate()
