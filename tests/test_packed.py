import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import CheckpointError
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight

PATTERNS = ["dense", "2:4", "4:8", "8:16", "50%", "50%-matrix"]


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), bits=st.sampled_from([None, 2, 3, 4, 8]),
       group=st.sampled_from([None, 16, 32]), sym=st.booleans(), rows=st.integers(1, 12),
       col_groups=st.integers(1, 4), seed=st.integers(0, 999))
def test_packed_round_trip_is_exact(pattern, bits, group, sym, rows, col_groups, seed):
    g = torch.Generator().manual_seed(seed)
    cols = 16 * col_groups
    w = torch.randn(rows, cols, generator=g)
    if pattern == "dense" and bits is None:
        bits = 4
    quant = None if bits is None else QuantSpec(bits, group, sym)
    stats = LayerStats.from_inputs(torch.randn(8, cols, generator=g))
    cw = compress_weight(w, stats, LinearPlan(prune="wanda", sparsity=SparsitySpec.parse(pattern), quant=quant))
    pw = PackedWeight.from_compressed(cw)
    back = pw.to_compressed().validate()
    assert torch.equal(back.weight, cw.weight)
    if cw.mask is not None:
        assert torch.equal(back.mask, cw.mask)


def test_bits_per_weight_of_24_int4_g128():
    w = torch.randn(256, 1024)
    cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4"),
                                             quant=QuantSpec(4, 128, True)))
    pw = PackedWeight.from_compressed(cw)
    assert pw.storage == "nm24"
    assert pw.bits_per_weight() == pytest.approx(3.125)  # 2 values + 1 metadata + 0.125 scales
    dense = PackedWeight.from_compressed(compress_weight(
        w, None, LinearPlan(sparsity=SparsitySpec(), quant=QuantSpec(4, 128, True))))
    assert dense.bits_per_weight() == pytest.approx(4.125)


def test_missing_tensor_is_checkpoint_error():
    w = torch.randn(8, 32)
    cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4"),
                                             quant=QuantSpec(4, 32, True)))
    pw = PackedWeight.from_compressed(cw)
    del pw.tensors["scales"]
    with pytest.raises(CheckpointError, match="scales"):
        pw.to_compressed()


def test_wrong_shapes_are_checkpoint_error():
    cw = compress_weight(torch.randn(8, 32), None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("50%"),
                                                              quant=QuantSpec(4, 32, True)))
    pw = PackedWeight.from_compressed(cw)
    pw.tensors["qweight"] = pw.tensors["qweight"][:3]
    with pytest.raises(CheckpointError):
        pw.to_compressed()
