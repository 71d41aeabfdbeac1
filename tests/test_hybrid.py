"""Hybrid tiles: spec syntax, exact budgets (against brute force), optimal tile choice, the
validator, SparseGPT's hybrid sweep against a float64 reference, packed storage and the engine."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.checkpoint.io import load_checkpoint
from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import CheckpointError, PatternError
from sparsequant.patterns import SparsitySpec, mask_from_scores, nm_mask, validate_mask
from sparsequant.patterns.hybrid import TileGrid, hybrid_budget, hybrid_mask, select_tiles, tile_costs, tile_flags
from sparsequant.patterns.pack_hybrid import unpack_hybrid
from sparsequant.quant import QuantSpec
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe
from sparsequant.solvers import CompressedWeight, LayerStats, LinearPlan, compress_weight, sparsegpt_joint, sparsegpt_prune

from conftest import random_ids, tiny_model
from test_sparsegpt import damped, problem, ref_sparsegpt, stats_of

SPARSITIES = [0.0, 0.05, 0.1, 0.25, 0.3, 0.35, 0.45, 0.5]


# -- spec ---------------------------------------------------------------------------------------

def test_spec_syntax_round_trips():
    for text, tile, s in [("hybrid:35%", (128, 128), 0.35), ("hybrid:25%@64", (64, 64), 0.25),
                          ("hybrid:0.45@64x128", (64, 128), 0.45), ("HYBRID:50%", (128, 128), 0.5)]:
        spec = SparsitySpec.parse(text)
        assert (spec.kind, spec.tile, spec.sparsity) == ("hybrid", tile, s)
        assert SparsitySpec.parse(str(spec)) == spec
        assert SparsitySpec.from_dict(spec.to_dict()) == spec
    assert SparsitySpec.parse("hybrid:0%").is_dense
    assert "tile" not in SparsitySpec.parse("2:4").to_dict()  # older descriptions unchanged


@pytest.mark.parametrize("text", ["hybrid:60%", "hybrid:-5%", "hybrid:35%@64x12", "hybrid:35%@0", "hybrid:abc",
                                  "hybrid:35%@axb"])
def test_bad_hybrid_specs_are_pattern_errors(text):
    with pytest.raises(PatternError):
        SparsitySpec.parse(text)


def test_input_width_not_multiple_of_8_is_refused():
    with pytest.raises(PatternError, match="multiple of 8"):
        mask_from_scores(torch.rand(16, 36), SparsitySpec.parse("hybrid:25%@16"))


# -- budget and selection against brute force ------------------------------------------------------

def _brute(grid: TileGrid, sparsity: float, costs: torch.Tensor):
    """Every subset of tiles: the pruned count closest to the target (ties: fewer), and the least
    total cost among subsets that prune exactly that."""
    areas = grid.areas().reshape(-1).tolist()
    target = Fraction(str(sparsity)) * grid.rows * grid.cols
    subsets = [(sum(areas[i] // 2 for i in sub), sub) for r in range(len(areas) + 1)
               for sub in itertools.combinations(range(len(areas)), r)]
    budget = min({p for p, _ in subsets}, key=lambda p: (abs(p - target), p))
    flat = costs.reshape(-1).double()
    best = min(float(flat[list(sub)].sum()) if sub else 0.0 for p, sub in subsets if p == budget)
    return budget, best


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), col_tiles=st.integers(1, 6), tr=st.sampled_from([4, 8, 16]),
       tc=st.sampled_from([8, 16]), sparsity=st.sampled_from(SPARSITIES), seed=st.integers(0, 999))
def test_budget_and_selection_are_exact_and_optimal(rows, col_tiles, tr, tc, sparsity, seed):
    cols = 8 * col_tiles
    grid = TileGrid.of((rows, cols), (tr, tc))
    if grid.n_tiles > 12:
        tr = -(-rows // 2)  # keep the brute force small
        grid = TileGrid.of((rows, cols), (tr, tc))
    if grid.n_tiles > 12:
        return
    g = torch.Generator().manual_seed(seed)
    costs = torch.rand(grid.n_tile_rows, grid.n_tile_cols, generator=g, dtype=torch.float64)
    budget, best_cost = _brute(grid, sparsity, costs)
    assert hybrid_budget((rows, cols), (tr, tc), sparsity) == budget
    flags = select_tiles(costs, grid, sparsity)
    assert int((grid.areas()[flags] // 2).sum()) == budget
    assert float(costs[flags].sum()) == pytest.approx(best_cost, rel=1e-12, abs=1e-12)


def test_budget_on_the_default_models_shapes():
    # 576 = 4 x 128 + 64: tiles of 16384, 8192 (edges) and 4096 (corner) weights; halves are
    # multiples of 2048, so 35% of 576x576 (116121.6 weights) rounds to 57 x 2048 = 116736.
    assert hybrid_budget((576, 576), (128, 128), 0.35) == 57 * 2048
    assert hybrid_budget((576, 576), (128, 128), 0.25) == 40 * 2048  # 40.5 units: the tie goes down
    assert hybrid_budget((1536, 576), (128, 128), 0.25) == 1536 * 576 // 4
    assert hybrid_budget((576, 1536), (128, 128), 0.5) == 576 * 1536 // 2
    assert hybrid_budget((576, 1536), (128, 128), 0.0) == 0


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), cols8=st.integers(1, 12), tile=st.sampled_from([(16, 16), (8, 32), (32, 8)]),
       sparsity=st.sampled_from(SPARSITIES), seed=st.integers(0, 999))
def test_mask_is_exactly_the_pattern(rows, cols8, tile, sparsity, seed):
    cols = 8 * cols8
    spec = SparsitySpec(kind="hybrid", sparsity=sparsity, tile=tile)
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = hybrid_mask(scores, spec)
    flags = tile_flags(mask, spec)  # validates tile structure and the exact budget
    grid = TileGrid.of((rows, cols), tile)
    assert int((~mask).sum()) == hybrid_budget((rows, cols), tile, sparsity)
    inside = grid.expand(flags)
    assert torch.equal(mask[inside], nm_mask(scores, 2, 4)[inside])  # 2:4 tiles keep the best two
    assert bool(mask[~inside].all())


def test_least_sensitive_tiles_become_24():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    scale = torch.tensor([[1.0, 0.1, 3.0, 0.2], [0.3, 2.0, 0.05, 1.5], [4.0, 0.5, 1.0, 0.01], [0.7, 0.6, 2.5, 0.02]])
    w = w * scale.repeat_interleave(16, 0).repeat_interleave(16, 1)
    spec = SparsitySpec.parse("hybrid:12.5%@16")  # 4 of 16 tiles
    _, mask = sq.solvers.magnitude.magnitude_prune(w, None, spec)
    flags = tile_flags(mask, spec)
    assert flags.sum() == 4
    assert set(map(tuple, flags.nonzero().tolist())) == {(0, 1), (1, 2), (2, 3), (3, 3)}  # scales .1 .05 .01 .02


def test_validator_rejects_non_conforming_masks():
    spec = SparsitySpec.parse("hybrid:25%@16")
    mask = hybrid_mask(torch.rand(32, 32, generator=torch.Generator().manual_seed(1)), spec)
    validate_mask(mask, spec, (32, 32))
    flags = tile_flags(mask, spec)
    i, j = flags.nonzero()[0].tolist()
    di, dj = (~flags).nonzero()[0].tolist()
    bad = mask.clone()
    bad[16 * di, 16 * dj] = False  # a dense tile loses one weight
    with pytest.raises(PatternError, match="neither fully kept nor 2:4"):
        validate_mask(bad, spec, (32, 32))
    bad = mask.clone()
    bad[16 * i, 16 * j: 16 * j + 4] = True  # a group of a 2:4 tile keeps four
    with pytest.raises(PatternError, match="neither"):
        validate_mask(bad, spec, (32, 32))
    bad = mask.clone()
    bad[16 * di: 16 * di + 16, 16 * dj: 16 * dj + 16] = nm_mask(torch.rand(16, 16), 2, 4)  # one 2:4 tile too many
    with pytest.raises(PatternError, match="prunes exactly"):
        validate_mask(bad, spec, (32, 32))
    with pytest.raises(PatternError, match="bool"):
        validate_mask(mask.to(torch.uint8), spec, (32, 32))


# -- SparseGPT: the hybrid sweep against a float64 reference -------------------------------------

def ref_sparsegpt_hybrid(w, h, spec, qspec, stats):
    """test_sparsegpt's float64 reference with the 2:4 choice only in the rows of the tiles that the
    OBS tile costs select. Returns (weight, keep, codes, flags)."""
    hinv_diag = torch.linalg.inv(h).diagonal()
    grid = TileGrid.of(tuple(w.shape), spec.tile)
    flags = select_tiles(tile_costs(w.square() / hinv_diag, grid), grid, spec.sparsity)
    ref_w, keep, codes = ref_sparsegpt(w, h, SparsitySpec.parse("2:4"), 4, qspec, within=grid.expand(flags))
    return ref_w, keep, codes, flags


@pytest.mark.parametrize("pattern", ["hybrid:25%@8x16", "hybrid:40%@16x24"])
@pytest.mark.parametrize("qspec", [None, QuantSpec(4, 16, True)], ids=str)
def test_sparsegpt_hybrid_matches_float64_reference(pattern, qspec):
    w, x = problem(3 + len(pattern), out=20, k=72)  # 20 = 2 x 8 + 4 and 72 = 4 x 16 + 8: edge tiles
    st = stats_of(x)
    spec = SparsitySpec.parse(pattern)
    ref_w, ref_keep, ref_codes, ref_flags = ref_sparsegpt_hybrid(w, damped(st.hessian_matrix()), spec, qspec, st)
    info = {}
    if qspec is None:
        got_w, mask = sparsegpt_prune(w, st, spec, blocksize=24, info=info)
    else:
        codes, params, mask = sparsegpt_joint(w, st, spec, qspec, blocksize=24, info=info)
        assert torch.equal(codes, ref_codes)
        got_w = CompressedWeight.from_quantized(codes, params, spec, mask).validate().weight.double()
    assert 0 < info["tiles_24"] < info["tiles"]
    assert torch.equal(mask, ref_keep)
    assert torch.equal(tile_flags(mask, spec), ref_flags)
    tol = 1e-9 if qspec is None else 1e-6
    torch.testing.assert_close(got_w, ref_w, rtol=tol, atol=tol)


def test_sparsegpt_hybrid_error_between_dense_and_24():
    w, x = problem(9, out=64, k=128, tokens=512, dtype=torch.float32)
    st = stats_of(x, torch.float32)
    errs = []
    for pattern in ["hybrid:10%@16", "hybrid:25%@16", "hybrid:40%@16", "2:4"]:
        w2, _ = sparsegpt_prune(w, st, SparsitySpec.parse(pattern))
        errs.append(float(((w - w2) @ x.float().T).pow(2).sum()))
    assert 0 < errs[0] < errs[1] < errs[2] < errs[3]


# -- storage --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 45), cols8=st.integers(1, 10), tile=st.sampled_from([(16, 16), (8, 24), (32, 8), (5, 16)]),
       sparsity=st.sampled_from(SPARSITIES), bits=st.sampled_from([None, 2, 3, 4, 8]), sym=st.booleans(),
       method=st.sampled_from(["magnitude", "wanda"]), seed=st.integers(0, 999))
def test_packed_round_trip_at_odd_shapes(rows, cols8, tile, sparsity, bits, sym, method, seed):
    cols = 8 * cols8
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    spec = SparsitySpec(kind="hybrid", sparsity=sparsity, tile=tile)
    quant = None if bits is None else QuantSpec(bits, 16, sym)
    if spec.is_dense and quant is None:
        quant = QuantSpec(4, None, True)
    stats = LayerStats.from_inputs(torch.randn(8, cols, generator=g))
    cw = compress_weight(w, stats, LinearPlan(prune=method, sparsity=spec, quant=quant))
    pw = PackedWeight.from_compressed(cw)
    assert pw.storage == ("dense" if spec.is_dense else "hybrid")
    back = pw.to_compressed().validate()
    assert torch.equal(back.weight, cw.weight)
    if not spec.is_dense:
        assert torch.equal(back.mask, cw.mask) and torch.equal(pw.mask(), cw.mask)
        _check_tile_jump(pw, cw, tile)
    described = PackedWeight.from_description(pw.describe(), pw.tensors)
    assert torch.equal(described.to_compressed().weight, cw.weight)


def _check_tile_jump(pw, cw, tile):
    """Every tile decodes from its own flag and offsets alone, as a kernel would."""
    from sparsequant.patterns.bits import packed_nbytes, unpack_bits
    from sparsequant.patterns.pack24 import unpack_24

    grid = TileGrid.of(pw.shape, tile)
    bits = None if pw.quant is None else pw.quant.bits
    stream = pw.tensors["values" if bits is None else "qweight"]
    src = cw.weight.to(torch.float16) if bits is None else cw.codes
    for i in range(grid.n_tile_rows):
        for j in range(grid.n_tile_cols):
            h, w = grid.tile_shape(i, j)
            vo, mo = pw.tensors["tile_offsets"][i, j].tolist()
            is24 = bool(pw.tensors["tile_flags"][i, j])
            count = h * w // 2 if is24 else h * w
            chunk = stream[vo: vo + (count if bits is None else packed_nbytes(count, bits))]
            if bits is not None:
                chunk = unpack_bits(chunk, bits, count)
            rs, cs = grid.bounds(i, j)
            if is24:
                dense, m = unpack_24(chunk.reshape(h, w // 2), pw.tensors["meta"][mo: mo + h * w // 8].reshape(h, w // 8))
                assert torch.equal(m, cw.mask[rs, cs])
                assert torch.equal(dense[m], src[rs, cs][m])
            else:
                assert torch.equal(chunk.reshape(h, w), src[rs, cs])


def test_bits_per_weight_is_counted_in_full():
    w = torch.randn(128, 1024)
    for pattern, expected in [("hybrid:50%", 3.125), ("hybrid:25%", 3.625)]:
        cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse(pattern),
                                                 quant=QuantSpec(4, 128, True)))
        pw = PackedWeight.from_compressed(cw)
        # values + metadata + scales, plus 1 flag byte and 8 offset bytes per tile (8 tiles)
        assert pw.bits_per_weight() == pytest.approx(expected + 8 * 9 * 8 / (128 * 1024))


def test_corrupt_hybrid_storage_is_checkpoint_error():
    cw = compress_weight(torch.randn(40, 48), None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("hybrid:25%@16"),
                                                               quant=QuantSpec(4, 16, True)))
    pw = PackedWeight.from_compressed(cw)
    for name, change in [("tile_flags", lambda t: t ^ 1), ("tile_flags", lambda t: t * 2),
                         ("tile_offsets", lambda t: t + 1), ("qweight", lambda t: t[:-1]), ("meta", lambda t: t[1:])]:
        broken = PackedWeight(pw.shape, pw.storage, pw.sparsity, pw.quant, {**pw.tensors, name: change(pw.tensors[name])})
        with pytest.raises(CheckpointError):
            broken.to_compressed()
    broken = PackedWeight(pw.shape, pw.storage, pw.sparsity, pw.quant, {k: v for k, v in pw.tensors.items() if k != "meta"})
    with pytest.raises(CheckpointError, match="meta"):
        broken.to_compressed()
    with pytest.raises(PatternError):
        unpack_hybrid({**pw.tensors, "tile_flags": pw.tensors["tile_flags"][:1]}, TileGrid.of((40, 48), (16, 16)), 4)


# -- engine ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,quant,joint", [("sparsegpt", QuantConfig(bits=4, group_size=32), True),
                                                ("wanda", None, False)])
def test_engine_and_checkpoint_round_trip(method, quant, joint, tmp_path):
    model = tiny_model("llama")
    x = random_ids(1, 16, seed=4)
    recipe = Recipe(method=method, pattern="hybrid:30%@32", quant=quant, joint=joint,
                    calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2))
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    spec = recipe.sparsity
    for pw in result.packed.values():
        assert pw.storage == "hybrid"
        tile_flags(pw.mask(), spec)
    sq.save(result, tmp_path / "ck")
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert all(d["storage"] == "hybrid" and d["sparsity"]["tile"] == [32, 32] for d in meta["layers"].values())


@pytest.mark.parametrize("pattern", ["hybrid:30%@16", "hybrid:30%@16+4/256"])
def test_gptq_after_hybrid_pruning_keeps_the_tiles(pattern):
    w, x = problem(12, out=32, k=64, dtype=torch.float32)
    st = stats_of(x, torch.float32)
    spec = SparsitySpec.parse(pattern)
    cw = compress_weight(w, st, LinearPlan(prune="wanda", sparsity=spec, quantizer="gptq", quant=QuantSpec(4, 32, True)))
    flags = tile_flags(cw.mask, spec.base)
    assert 0 < int(flags.sum()) < flags.numel()
    back = PackedWeight.from_compressed(cw).to_compressed().validate()
    assert torch.equal(back.effective_weight(), cw.effective_weight())


def test_sparsegpt_hybrid_at_50_percent_is_plain_24():
    w, x = problem(13, out=24, k=64)
    st = stats_of(x)
    w_h, m_h = sparsegpt_prune(w, st, SparsitySpec.parse("hybrid:50%@16"), blocksize=32)
    w_24, m_24 = sparsegpt_prune(w, st, SparsitySpec.parse("2:4"), blocksize=32)
    assert torch.equal(m_h, m_24) and torch.equal(w_h, w_24)
