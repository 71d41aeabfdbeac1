import pytest
import torch

from sparsequant.errors import NonFiniteWeightError
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight
from sparsequant.solvers.magnitude import magnitude_prune
from sparsequant.solvers.wanda import wanda_prune


def naive_wanda_mask(w, x, spec):
    """Direct transcription of the paper: S_ij = |W_ij| * ||X_j||_2, compared per output row."""
    norms = [float(torch.linalg.vector_norm(x[:, j].double())) for j in range(w.shape[1])]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(w.shape[0]):
        score = [abs(float(w[i, j])) * norms[j] for j in range(w.shape[1])]
        if spec.kind == "nm":
            for g in range(0, w.shape[1], spec.m):
                best = sorted(range(g, g + spec.m), key=lambda j: -score[j])[: spec.n]
                mask[i, best] = True
        else:
            keep = w.shape[1] - int(w.shape[1] * spec.sparsity)
            best = sorted(range(w.shape[1]), key=lambda j: -score[j])[:keep]
            mask[i, best] = True
    return mask


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16", "50%", "30%"])
def test_wanda_matches_naive(pattern):
    torch.manual_seed(0)
    w = torch.randn(12, 32)
    x = torch.randn(50, 32) * torch.rand(32) * 4  # uneven input scales make Wanda differ from magnitude
    spec = SparsitySpec.parse(pattern)
    pruned, mask = wanda_prune(w, LayerStats.from_inputs(x), spec)
    assert torch.equal(mask, naive_wanda_mask(w, x, spec))
    assert torch.equal(pruned, w * mask)


def test_magnitude_matches_wanda_with_flat_inputs():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    stats = LayerStats(n_tokens=10, sq_sum=torch.ones(16), abs_max=torch.ones(16))
    _, m1 = magnitude_prune(w, None, SparsitySpec.parse("2:4"))
    _, m2 = wanda_prune(w, stats, SparsitySpec.parse("2:4"))
    assert torch.equal(m1, m2)


def test_wanda_beats_magnitude_on_output_error():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    x = torch.randn(512, 128) * torch.rand(128).pow(3) * 10
    stats = LayerStats.from_inputs(x)
    spec = SparsitySpec.parse("2:4")
    err = lambda wp: float((x @ (w - wp).T).norm())  # noqa: E731
    assert err(wanda_prune(w, stats, spec)[0]) < err(magnitude_prune(w, stats, spec)[0])


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_compress_weight_validates(method):
    w = torch.randn(16, 64)
    stats = LayerStats.from_inputs(torch.randn(20, 64))
    cw = compress_weight(w, stats, LinearPlan(prune=method, sparsity=SparsitySpec.parse("2:4"),
                                               quant=QuantSpec(4, 32, True)))
    cw.validate()
    assert (cw.weight[~cw.mask] == 0).all()


def test_nan_weight_rejected():
    w = torch.randn(4, 8)
    w[2, 3] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4")))
