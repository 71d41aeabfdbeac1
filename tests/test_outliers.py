"""Structured outliers: exactly k per 256 inputs (ragged last block), selection by saliency,
W = sparse part + outliers through every solver, packed storage and the engine."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.checkpoint.io import load_checkpoint
from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import CheckpointError, PatternError
from sparsequant.patterns import SparsitySpec, nm_mask, validate_mask
from sparsequant.patterns.outliers import OutlierSet, block_counts, outlier_count, select_outliers
from sparsequant.quant import QuantSpec
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight
from sparsequant.solvers.outliers import column_curvature

from conftest import random_ids, tiny_model
from test_sparsegpt import damped, problem, stats_of


def test_block_counts_with_a_ragged_last_block():
    assert block_counts(576, 8) == [8, 8, 2]  # 576 = 2 x 256 + 64: 8 * 64 / 256 = 2
    assert block_counts(1536, 16) == [16] * 6
    assert block_counts(100, 4) == [2]  # ceil(4 * 100 / 256)
    assert block_counts(1, 16) == [1]
    assert outlier_count(576, 16) == 36
    with pytest.raises(PatternError):
        block_counts(256, 5)


def test_spec_syntax():
    spec = SparsitySpec.parse("2:4+8/256")
    assert (spec.kind, spec.n, spec.m, spec.outliers) == ("nm", 2, 4, 8)
    assert spec.base == SparsitySpec.parse("2:4")
    for text in ["8:16+16/256", "hybrid:35%@64+4/256", "50%+8/256"]:
        spec = SparsitySpec.parse(text)
        assert SparsitySpec.parse(str(spec)) == spec == SparsitySpec.from_dict(spec.to_dict())
    for bad in ["2:4+5/256", "2:4+8/128", "2:4+8", "dense+8/256", "2:4+x/256", "hybrid:0%+8/256"]:
        with pytest.raises(PatternError):
            SparsitySpec.parse(bad)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 700), k=st.sampled_from([4, 8, 16]), seed=st.integers(0, 999))
def test_selection_keeps_exactly_the_most_salient_per_block(rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    sal = torch.rand(rows, cols, generator=g)
    o = select_outliers(w, sal, k, torch.float16)
    o.validate((rows, cols))
    counts = block_counts(cols, k)
    assert o.values.shape == (rows, sum(counts))
    pos = o.columns()
    blocks = pos // 256
    start = 0
    for b, c in enumerate(counts):
        assert bool(((blocks == b).sum(1) == c).all())  # exactly c per block in every row
        lo = b * 256
        want = sal[:, lo: lo + 256].topk(c, dim=1).indices.sort(dim=1).values + lo
        assert torch.equal(pos[:, start: start + c], want)  # slot j of block b sits at sum(counts[:b]) + j
        start += c
    dense = o.dense((rows, cols))
    assert torch.equal(dense.gather(1, pos), w.gather(1, pos).half().float())
    assert int((dense != 0).sum()) <= pos.numel()
    assert dense.dtype == torch.float32


def test_validate_rejects_broken_sets():
    w = torch.randn(3, 576)
    o = select_outliers(w, w.abs(), 8, torch.bfloat16)
    cases = {
        "duplicate": lambda: o.index.clone().index_fill_(1, torch.tensor([1]), int(o.index[0, 0])),
        "past end": lambda: o.index.clone().index_fill_(1, torch.tensor([o.index.shape[1] - 1]), 200),
    }
    for name, make in cases.items():
        bad = OutlierSet(o.values, make(), 8, 576)
        with pytest.raises(PatternError):
            bad.validate()
    with pytest.raises(PatternError, match="shape"):
        OutlierSet(o.values[:, :-1], o.index[:, :-1], 8, 576).validate()
    with pytest.raises(PatternError, match="float16"):
        OutlierSet(o.values.float(), o.index, 8, 576).validate()
    with pytest.raises(PatternError, match="NaN"):
        OutlierSet(o.values.clone().fill_(float("nan")), o.index, 8, 576).validate()
    with pytest.raises(PatternError, match="uint8"):
        OutlierSet(o.values, o.index.long(), 8, 576).validate()
    with pytest.raises(PatternError):
        o.validate((3, 512))


def test_curvature_is_the_damped_inverse_diagonal():
    w, x = problem(1, k=48)
    st = stats_of(x, torch.float32)
    c = column_curvature(w.float(), st)
    ref = 1.0 / torch.linalg.inv(damped(stats_of(x).hessian_matrix())).diagonal()
    torch.testing.assert_close(c.double(), ref, rtol=2e-3, atol=0)
    no_h = LayerStats(st.n_tokens, st.sq_sum, st.abs_max)
    assert torch.equal(column_curvature(w, no_h), st.sq_sum)
    assert torch.equal(column_curvature(w, None), torch.ones(48))


@pytest.mark.parametrize("pattern", ["2:4+8/256", "8:16+16/256", "hybrid:25%@16+4/256"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparse_part_is_computed_without_the_outliers(pattern, method):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 320, generator=g)
    x = torch.randn(64, 320, generator=g)
    stats = LayerStats.from_inputs(x)
    spec = SparsitySpec.parse(pattern)
    cw = compress_weight(w, stats, LinearPlan(prune=method, sparsity=spec), torch.float16)
    assert cw.sparsity == spec and cw.outliers.k == spec.outliers
    validate_mask(cw.mask, spec.base, tuple(w.shape))
    # the outliers are the top saliencies of W itself
    sal = w.square() * (stats.sq_sum if method == "wanda" else torch.ones(320))
    ref = select_outliers(w, sal, spec.outliers, torch.float16)
    assert torch.equal(cw.outliers.index, ref.index) and torch.equal(cw.outliers.values, ref.values)
    # the sparse part is the plain pattern applied to W - outliers
    rest = w - ref.dense(tuple(w.shape))
    score = rest.abs() * (stats.col_norm if method == "wanda" else 1.0)
    from sparsequant.patterns import mask_from_scores

    assert torch.equal(cw.mask, mask_from_scores(score, spec.base))
    assert torch.equal(cw.effective_weight(), (rest * cw.mask).half().float() + ref.dense(tuple(w.shape)))


@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "8:16")])
def test_outliers_lower_the_output_error(method, pattern):
    # heavy-tailed weights, as in LLMs: a few large entries per row
    g = torch.Generator().manual_seed(5)
    w, x = problem(6, out=48, k=512, tokens=1024, dtype=torch.float32)
    w = w * torch.where(torch.rand(w.shape, generator=g) < 0.02, 8.0, 1.0)
    st = stats_of(x, torch.float32)
    x = x.float()
    q = QuantSpec(4, 128, True)
    errs = {}
    for k in (0, 8, 16):
        spec = SparsitySpec.parse(pattern + (f"+{k}/256" if k else ""))
        cw = compress_weight(w, st, LinearPlan(prune=method, sparsity=spec, quant=q, joint=True))
        errs[k] = float(((w - cw.effective_weight()) @ x.T).pow(2).sum())
    assert errs[16] < errs[8] < 0.9 * errs[0]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), cols8=st.integers(1, 80), k=st.sampled_from([4, 8, 16]),
       pattern=st.sampled_from(["2:4", "8:16", "hybrid:25%@8x16", "50%"]), bits=st.sampled_from([None, 3, 4]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 999))
def test_packed_round_trip_with_outliers(rows, cols8, k, pattern, bits, dtype, seed):
    cols = 8 * cols8
    if pattern == "8:16" and cols % 16:
        cols += 8
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    spec = SparsitySpec.parse(f"{pattern}+{k}/256")
    quant = None if bits is None else QuantSpec(bits, 32, True)
    cw = compress_weight(w, LayerStats.from_inputs(torch.randn(8, cols, generator=g)),
                         LinearPlan(prune="wanda", sparsity=spec, quant=quant), dtype)
    pw = PackedWeight.from_compressed(cw, dtype)
    assert pw.tensors["outlier_values"].dtype == dtype and pw.tensors["outlier_index"].dtype == torch.uint8
    back = PackedWeight.from_description(pw.describe(), pw.tensors).to_compressed().validate()
    assert torch.equal(back.effective_weight(), cw.effective_weight())
    assert torch.equal(back.outliers.index, cw.outliers.index)


def test_bits_per_weight_counts_outliers():
    w = torch.randn(32, 1024)
    for pattern, base in [("2:4", 3.125), ("8:16", 3.125)]:
        for k in (8, 16):
            cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse(f"{pattern}+{k}/256"),
                                                     quant=QuantSpec(4, 128, True)))
            pw = PackedWeight.from_compressed(cw)
            # 16-bit value + 8-bit index per outlier; 8:16 stores its mask as a 1-bit-per-weight bitmap
            assert pw.bits_per_weight() == pytest.approx(base + 24 * k / 256)


def test_corrupt_outliers_are_checkpoint_errors():
    cw = compress_weight(torch.randn(8, 512), None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4+4/256")))
    pw = PackedWeight.from_compressed(cw)
    idx = pw.tensors["outlier_index"].clone()
    idx[0, 1] = idx[0, 0]
    for tensors in [{**pw.tensors, "outlier_index": idx},
                    {**pw.tensors, "outlier_values": pw.tensors["outlier_values"][:, :-1]},
                    {k: v for k, v in pw.tensors.items() if k != "outlier_values"}]:
        with pytest.raises(CheckpointError):
            PackedWeight(pw.shape, pw.storage, pw.sparsity, pw.quant, tensors).to_compressed()


def test_missing_outliers_fail_validation():
    cw = compress_weight(torch.randn(8, 256), None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4+4/256")))
    cw.outliers = None
    with pytest.raises(PatternError):
        cw.validate()


def test_engine_and_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen2")
    x = random_ids(1, 16, seed=2)
    recipe = Recipe(method="sparsegpt", pattern="2:4+8/256", quant=QuantConfig(bits=4, group_size=32), joint=True,
                    calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2))
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    for pw in result.packed.values():
        assert pw.storage == "nm24" and pw.outlier_set().k == 8
    sq.save(result, tmp_path / "ck")
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded(x).logits, model(x).logits)
    # 64-wide inputs: one ragged block keeps ceil(8 * 64 / 256) = 2 outliers per row
    assert all(d["sparsity"]["outliers"] == 8 for d in meta["layers"].values())
