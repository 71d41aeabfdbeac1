"""kernels.gpu_pack.pack_nm24_rtn must give exactly the CPU path's PackedWeight (CPU and GPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import NonFiniteWeightError, PatternError, QuantizationError
from sparsequant.kernels.gpu_pack import pack_nm24_rtn
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.solvers import LinearPlan, compress_weight


def cpu_path(w: torch.Tensor, bits: int, group_size) -> PackedWeight:
    plan = LinearPlan(prune="magnitude", sparsity=SparsitySpec(kind="nm", n=2, m=4), quantizer="rtn",
                      quant=QuantSpec(bits=bits, group_size=group_size, symmetric=True))
    return PackedWeight.from_compressed(compress_weight(w.cpu().float(), None, plan))


def assert_same(a: PackedWeight, b: PackedWeight) -> None:
    assert a.shape == b.shape and a.storage == b.storage == "nm24"
    assert a.sparsity == b.sparsity and a.quant == b.quant
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name].cpu(), b.tensors[name].cpu()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 24), k8=st.integers(1, 40), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 4, 32, 64, 128]), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), half=st.booleans())
def test_matches_cpu_path(n, k8, bits, group, seed, ties, half):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 8 * k8, generator=g) * 0.05
    if ties:  # few distinct magnitudes and signs: many groups where topk's tie order decides
        w = torch.randint(-2, 3, w.shape, generator=g).float() * 0.01
    if half:
        w = w.half()
    assert_same(pack_nm24_rtn(w, bits, group), cpu_path(w, bits, group))


def test_chunked_rows_match(monkeypatch):
    import sparsequant.kernels.gpu_pack as gp

    monkeypatch.setattr(gp, "CHUNK_ELEMENTS", 64)  # several chunks of a few rows
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(3))
    assert_same(gp.pack_nm24_rtn(w, 4, 32), cpu_path(w, 4, 32))


def test_refuses_bad_input():
    with pytest.raises(PatternError):
        pack_nm24_rtn(torch.randn(4, 12))
    with pytest.raises(PatternError):
        pack_nm24_rtn(torch.randn(4, 8, 2))
    with pytest.raises(QuantizationError):
        pack_nm24_rtn(torch.randn(4, 64), group_size=6)
    with pytest.raises(QuantizationError):
        pack_nm24_rtn(torch.randn(4, 64), bits=1)
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        pack_nm24_rtn(w)


@pytest.mark.gpu
def test_gpu_matches_cpu_path():
    gen = torch.Generator().manual_seed(11)
    for n, k, bits, group in [(300, 4096, 4, 128), (17, 1000, 8, None), (64, 512, 4, 32)]:
        w = (torch.randn(n, k, generator=gen) * 0.02).half()
        got = pack_nm24_rtn(w.cuda(), bits, group)
        assert got.tensors["meta"].is_cuda
        assert_same(got, cpu_path(w, bits, group))
