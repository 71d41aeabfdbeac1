import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.errors import PatternError
from sparsequant.patterns import SparsitySpec, is_nm, mask_from_scores, nm_mask, unstructured_mask, validate_mask, validate_nm
from sparsequant.patterns.bits import pack_bits, pack_mask, unpack_bits, unpack_mask
from sparsequant.patterns.pack24 import pack_24, unpack_24


def naive_nm(scores, n, m):
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            order = sorted(range(m), key=lambda i: -float(scores[r, g + i]))
            for i in order[:n]:
                mask[r, g + i] = True
    return mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (1, 4), (3, 8)])
def test_nm_mask_matches_naive_and_is_valid(n, m):
    scores = torch.rand(7, 4 * m)
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, naive_nm(scores, n, m))
    validate_nm(mask, n, m)
    assert is_nm(mask, n, m)


def test_validate_nm_rejects_bad_mask():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True  # three kept in one group of four
    mask[0, 4:6] = True
    mask[1, [0, 1, 4, 5]] = True
    with pytest.raises(PatternError, match="not 2:4"):
        validate_nm(mask, 2, 4)
    assert not is_nm(mask, 2, 4)


def test_shape_not_divisible_is_clear_error():
    with pytest.raises(PatternError, match="not divisible by M=4"):
        nm_mask(torch.rand(3, 10), 2, 4)


@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_counts(per_row):
    scores = torch.rand(16, 40)
    mask = unstructured_mask(scores, 0.5, per_row=per_row)
    spec = SparsitySpec(kind="unstructured", sparsity=0.5, per_row=per_row)
    validate_mask(mask, spec, (16, 40))
    if per_row:
        assert (mask.sum(1) == 20).all()
        # the kept ones are the largest of each row
        for r in range(16):
            assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()
    else:
        assert int(mask.sum()) == 320
        assert scores[mask].min() >= scores[~mask].max()


def test_spec_parse():
    assert SparsitySpec.parse("2:4") == SparsitySpec(kind="nm", n=2, m=4)
    assert SparsitySpec.parse("50%").sparsity == 0.5
    assert not SparsitySpec.parse("50%-matrix").per_row
    assert SparsitySpec.parse("dense").is_dense
    for bad in ["4:2", "abc", "150%", "2:x"]:
        with pytest.raises(PatternError):
            SparsitySpec.parse(bad)


def test_nan_scores_rejected():
    s = torch.rand(4, 8)
    s[1, 2] = float("nan")
    with pytest.raises(PatternError, match="NaN"):
        mask_from_scores(s, SparsitySpec.parse("2:4"))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_bits_round_trip(bits, count, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (count,), generator=g)
    packed = pack_bits(values, bits)
    assert packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.uint8))


def test_int4_is_two_per_byte_low_nibble_first():
    packed = pack_bits(torch.tensor([1, 2, 3, 4]), 4)
    assert packed.tolist() == [0x21, 0x43]


def test_pack_bits_rejects_out_of_range():
    with pytest.raises(PatternError):
        pack_bits(torch.tensor([16]), 4)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), groups8=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack24_round_trip(rows, groups8, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 8 * groups8, generator=g)
    mask = nm_mask(torch.rand(w.shape, generator=g), 2, 4)
    values, meta = pack_24(w * mask, mask)
    assert values.shape == (rows, 4 * groups8) and meta.shape == (rows, groups8) and meta.dtype == torch.uint8
    dense, mask2 = unpack_24(values, meta)
    assert torch.equal(mask2, mask)
    assert torch.equal(dense, w * mask)
    # values are the kept entries in position order
    assert torch.equal(values, (w * mask)[mask].reshape(rows, -1))


def test_pack24_metadata_layout():
    # group 0 keeps positions 1,3 -> nibble 1 | 3<<2 = 13; group 1 keeps 0,2 -> 0 | 2<<2 = 8
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    _, meta = pack_24(torch.arange(8.0).unsqueeze(0) * mask, mask)
    assert meta.tolist() == [[13 | (8 << 4)]]


def test_pack24_rejects_non_24_mask():
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(PatternError):
        pack_24(torch.ones(1, 8), mask)


def test_corrupt_24_metadata_detected():
    mask = nm_mask(torch.rand(2, 16), 2, 4)
    values, meta = pack_24(torch.randn(2, 16) * mask, mask)
    meta[0, 0] = 0  # idx0 == idx1 == 0: impossible for 2:4
    with pytest.raises(PatternError, match="corrupt"):
        unpack_24(values, meta)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 50), seed=st.integers(0, 999))
def test_mask_bitmap_round_trip(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), (rows, cols)), mask)
