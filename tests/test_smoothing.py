"""SmoothQuant scales and folding them into the preceding norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsequant.errors import NonFiniteWeightError, QuantizationError
from sparsequant.solvers import LayerStats, fold_smoothing, smoothing_scales


def outlier_inputs(seed: int, tokens: int = 64, k: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    x[:, [3, 11]] *= 40.0  # the outlier channels smoothing exists for
    return x + 0.5


def weights(seed: int, k: int = 32, outs=(32, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(o, k, generator=g, dtype=torch.float64) * 0.1 for o in outs]


def test_scales_follow_the_formula_over_all_weights():
    x, ws = outlier_inputs(0), weights(0)
    a = x.abs().amax(0)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_scales(a, ws, alpha)
        wmax = torch.cat(ws).abs().amax(0)
        torch.testing.assert_close(s, a**alpha / wmax ** (1 - alpha))
    # alpha = 0.5 equalizes: the largest |x/s| and |w*s| of each channel meet at sqrt(a * w)
    s = smoothing_scales(a, ws, 0.5)
    wmax = torch.cat(ws).abs().amax(0)
    torch.testing.assert_close((x / s).abs().amax(0), (torch.cat(ws) * s).abs().amax(0))
    torch.testing.assert_close((x / s).abs().amax(0), (a * wmax).sqrt())
    # and it flattens the outliers the linear layer's input sees
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())
    assert ratio(x / s) < ratio(x) / 4


def test_scales_from_layer_stats_abs_max():
    x = outlier_inputs(1).float()
    st = LayerStats.from_inputs(x)
    s = smoothing_scales(st.abs_max, [w.float() for w in weights(1)])
    assert s.dtype == torch.float32 and s.shape == (32,)


def test_zero_channels_get_scale_one():
    x, ws = outlier_inputs(2), weights(2)
    a = x.abs().amax(0)
    a[5] = 0.0  # input never active
    for w in ws:
        w[:, 9] = 0.0  # no weight reads input 9
    s = smoothing_scales(a, ws)
    assert s[5] == 1.0 and s[9] == 1.0
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())


def test_bad_arguments():
    a, ws = outlier_inputs(3).abs().amax(0), weights(3)
    with pytest.raises(QuantizationError, match="alpha"):
        smoothing_scales(a, ws, 1.5)
    with pytest.raises(ValueError, match="expected"):
        smoothing_scales(a[:-1], ws)
    with pytest.raises(ValueError, match="at least one"):
        smoothing_scales(a, [])
    bad = a.clone()
    bad[0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        smoothing_scales(bad, ws)
    with pytest.raises(ValueError, match="never negative"):
        smoothing_scales(-a, ws)
    s = smoothing_scales(a, ws)
    with pytest.raises(ValueError, match="norm kind"):
        fold_smoothing(torch.ones(32), None, ws, s, "batchnorm")
    with pytest.raises(ValueError, match="positive"):
        fold_smoothing(torch.ones(32), None, ws, -s, "rms")
    with pytest.raises(ValueError, match=r"must all be \[in\]"):
        fold_smoothing(torch.ones(31), None, ws, s, "rms")


def norm(x, g, b, kind):
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), g, b, eps=1e-6)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = y * (1.0 + g if kind == "rms_plus_one" else g)
    return y if b is None else y + b


@pytest.mark.parametrize("kind", ["rms", "layernorm", "rms_plus_one"])
def test_folding_keeps_the_layer_function(kind):
    x, ws = outlier_inputs(4), weights(4)
    g = torch.Generator().manual_seed(9)
    nw = torch.randn(32, generator=g, dtype=torch.float64) * 0.2 + (0.0 if kind == "rms_plus_one" else 1.0)
    nb = torch.randn(32, generator=g, dtype=torch.float64) * 0.1 if kind == "layernorm" else None
    before = [norm(x, nw, nb, kind) @ w.T for w in ws]
    s = smoothing_scales(norm(x, nw, nb, kind).abs().amax(0), ws, 0.5)
    snapshot = [t.clone() for t in (nw, *ws)]
    nw2, nb2, ws2 = fold_smoothing(nw, nb, ws, s, kind)
    for t, t0 in zip((nw, *ws), snapshot):
        assert torch.equal(t, t0)  # pure: inputs untouched
    after = [norm(x, nw2, nb2, kind) @ w.T for w in ws2]
    for y0, y1 in zip(before, after):
        torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    # the folded linears now see smoothed activations
    torch.testing.assert_close(norm(x, nw2, nb2, kind), norm(x, nw, nb, kind) / s)


def test_folding_keeps_dtypes():
    ws = [w.to(torch.bfloat16) for w in weights(5)]
    nw = torch.ones(32, dtype=torch.bfloat16)
    s = torch.rand(32, generator=torch.Generator().manual_seed(0)) + 0.5
    nw2, nb2, ws2 = fold_smoothing(nw, None, ws, s, "rms_plus_one")
    assert nw2.dtype == torch.bfloat16 and nb2 is None and all(w.dtype == torch.bfloat16 for w in ws2)
    torch.testing.assert_close(nw2.float(), (2.0 / s - 1.0), rtol=1e-2, atol=1e-2)
