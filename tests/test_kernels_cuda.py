"""The mma.sp CUDA kernel: its layout (CPU, by emulation) and the kernel itself (GPU, marked)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.errors import PatternError
from sparsequant.kernels import reference
from sparsequant.kernels.mma_sp_layout import build_mma_sp_layout, emulate_linear, groups_per_supertile
from sparsequant.kernels.testing import random_packed24

from conftest import kernel_tol


def rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# -- CPU: the layout, executed lane by lane as the kernel and the hardware read it ---------------

@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), k8=st.integers(1, 50), bits=st.sampled_from([4, 8]),
       group=st.sampled_from([None, 32, 64, 128, 256]), m=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_layout_emulation_equals_reference(n, k8, bits, group, m, seed):
    k = 8 * k8
    pk = random_packed24(n, k, bits, group, seed=seed)
    lay = build_mma_sp_layout(pk)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    y = emulate_linear(lay, x)
    ref = x.double() @ reference.dequantize_nm24(pk).double().t()
    assert rel(y, ref) < 1e-6, (n, k, bits, group)


def test_layout_sizes_and_padding():
    pk = random_packed24(20, 136, 4, 32, seed=1)
    lay = build_mma_sp_layout(pk)
    assert (lay.rt, lay.s, lay.gps) == (2, 2, 4)
    assert lay.qw.shape == (2, 2, 32, 4) and lay.meta.shape == (2, 2, 32, 2) and lay.sc.shape == (2, 2, 8, 4)
    assert lay.qw.dtype == lay.meta.dtype == lay.sc.dtype == torch.int32
    # Padding rows carry scale 0 (row pairs g, g + 8 of tile 1: rows 16..19 real, 20..31 padding).
    hi = (lay.sc[1].long() >> 16) & 0xFFFF  # rows 24..31
    assert bool((hi == 0).all())


def test_layout_refuses_unsupported():
    with pytest.raises(PatternError):
        build_mma_sp_layout(random_packed24(16, 128, 4, 128, symmetric=False))
    pk = random_packed24(16, 384, 4, 96)
    assert groups_per_supertile(pk) is None
    with pytest.raises(PatternError):
        build_mma_sp_layout(pk)


# -- GPU -----------------------------------------------------------------------------------------

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
def test_probe_matches_layout_assumptions():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import expected_probe, probe

    meta, b = probe()
    exp_meta, exp_b = expected_probe()
    assert b == exp_b
    assert meta == exp_meta


CASES = [  # n, k, bits, group
    (16, 128, 4, 128), (48, 256, 4, 32), (40, 264, 8, 64), (100, 1000, 4, None), (257, 520, 8, 256),
    (4096, 4096, 4, 128), (11008, 4096, 4, 128), (4096, 11008, 8, 128), (333, 4096, 4, 64), (130, 136, 8, 32),
]
TOKENS = (1, 2, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 300, 512)




def _check_call(call, ref, dtype, what):
    """``call(out)`` into a NaN-poisoned output: writes out in place, every element, within rounding."""
    out = torch.full(tuple(ref.shape), float("nan"), device="cuda", dtype=dtype)
    y = call(out)
    assert y.data_ptr() == out.data_ptr(), what
    assert bool(torch.isfinite(y).all()), what
    assert rel(y, ref) < kernel_tol(dtype), (what, rel(y, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_kernel_matches_reference(n, k, bits, group, dtype):
    """Every tile configuration, automatic and forced split-K, NaN-poisoned outputs, 1..512 tokens."""
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState, n_tiles

    seed = int(torch.randint(0, 10**6, (1,)))
    pk = random_packed24(n, k, bits, group, device="cuda", seed=seed)
    w = reference.dequantize_nm24(pk).double()
    st_ = MmaSpState(pk, "cuda", dtype)
    big = n * k > 10**7
    for m in (TOKENS[::3] + (512,)) if big else TOKENS:
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        for tile in range(n_tiles()):
            for splits in {None, 1, min(3, st_.layout.s), st_.layout.s} if not big else {None, 1}:
                _check_call(lambda out: st_(x, out=out, tile=tile, splits=splits), ref, dtype, (m, tile, splits, seed))
    torch.cuda.synchronize()
    assert int(st_.cnt.abs().sum()) == 0  # every split-K counter reset by its tile's last block


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,group", CASES[:5] + CASES[-1:])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_direct_kernel_matches_reference(n, k, bits, group, dtype):
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState, config_for

    seed = int(torch.randint(0, 10**6, (1,)))
    pk = random_packed24(n, k, bits, group, device="cuda", seed=seed)
    w = reference.dequantize_nm24(pk).double()
    st_ = MmaSpState(pk, "cuda", dtype)
    for m in (1, 2, 7, 8, 9, 16, 17, 33, 64, 127, 512):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        nt, wr = config_for(m, st_.layout.rt)
        for cfg in {(nt, wr), (nt, 1), (1, 8), (8, 2)}:
            _check_call(lambda out: st_.direct(x, nt=cfg[0], wr=cfg[1], out=out), ref, dtype, (m, cfg, seed))


@pytest.mark.gpu
def test_tiled_split_k_is_deterministic():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(1000, 2048, 4, 128, device="cuda", seed=3)
    st_ = MmaSpState(pk, "cuda", torch.float16)
    for m in (1, 24, 200):
        x = torch.randn(m, 2048, device="cuda").half()
        ys = [st_(x, splits=5) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), m  # partials summed in split order
        assert torch.equal(st_(x, splits=1), st_(x, splits=1))


@pytest.mark.gpu
def test_tiled_refuses_bad_input():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    st_ = MmaSpState(random_packed24(64, 256, 4, 128, device="cuda", seed=1), "cuda", torch.float16)
    with pytest.raises(ValueError):
        st_(torch.randn(2, 128, device="cuda").half())
    with pytest.raises(TypeError):
        st_(torch.randn(2, 256, device="cuda").bfloat16())
    with pytest.raises(ValueError):
        st_(torch.randn(2, 256, device="cuda").half(), splits=st_.layout.s + 1)
    with pytest.raises(ValueError):
        st_(torch.randn(2, 256, device="cuda").half(), tile=99)
    # Unaligned input (a view starting 2 bytes in) is copied, not misread.
    base = torch.randn(2 * 256 + 1, device="cuda").half()
    x = base[1:].view(2, 256)
    w = reference.dequantize_nm24(random_packed24(64, 256, 4, 128, device="cuda", seed=1)).double()
    assert rel(st_(x), x.double() @ w.t()) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 40, 200])
def test_kernel_in_cuda_graph_and_strided_input(m):
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(512, 1024, 4, 128, device="cuda", seed=5)
    st_ = MmaSpState(pk, "cuda", torch.float16)
    w = reference.dequantize_nm24(pk).double()
    x = torch.randn(m, 2048, device="cuda").half()[:, ::2]  # not contiguous
    y0 = st_(x)
    assert rel(y0, x.double() @ w.t()) < 2e-3
    assert st_.plan(m)[1] > 1  # 4 row blocks, 8 K steps: split-K runs inside the graph too
    g = torch.cuda.CUDAGraph()
    static_x = x.contiguous()
    st_(static_x)  # warm (plan cached outside capture)
    with torch.cuda.graph(g):
        y = st_(static_x)
        y2 = st_.direct(static_x)
    for _ in range(2):
        static_x.copy_(torch.randn(m, 1024, device="cuda").half())
        g.replay()
        torch.cuda.synchronize()
        assert rel(y, static_x.double() @ w.t()) < 2e-3
        assert rel(y2, static_x.double() @ w.t()) < 2e-3


def test_plan_follows_the_measured_best():
    """Points of run 18's sweep (benchmarks/KERNEL_NOTES.md) that the planner reproduces."""
    from sparsequant.kernels.mma_sp import plan_for

    rt = {4096: 256, 11008: 688, 14336: 896}  # 16-row tiles
    s = {4096: 32, 11008: 86, 14336: 112}  # 128-column super-tiles
    assert plan_for(1, rt[4096], s[4096]) == (3, 16)
    assert plan_for(1, rt[11008], s[4096]) == (3, 4)
    assert plan_for(8, rt[4096], s[11008]) == (0, 8)
    assert plan_for(8, rt[14336], s[4096]) == (3, 4)
    assert plan_for(16, rt[4096], s[4096]) == (0, 4)
    assert plan_for(16, rt[4096], s[14336]) == (1, 8)
    assert plan_for(16, rt[11008], s[4096]) == (1, 1)
    assert plan_for(32, rt[4096], s[11008]) == (1, 4)
    assert plan_for(32, rt[14336], s[4096]) == (2, 1)
    assert plan_for(64, rt[4096], s[14336]) == (4, 8)
    assert plan_for(128, rt[4096], s[4096]) == (2, 1)
    assert plan_for(128, rt[4096], s[11008]) == (4, 4)
    assert plan_for(128, rt[11008], s[4096]) == (4, 1)


def test_plan_is_valid_everywhere():
    from sparsequant.kernels.mma_sp import MAX_SPLITS, TILES, plan_for

    for rt in (1, 7, 8, 9, 64, 250, 511, 512, 513, 1376):
        for s in (1, 2, 3, 31, 32, 33, 86, 200):
            for m in (1, 2, 3, 5, 8, 9, 16, 17, 31, 32, 33, 64, 65, 100, 128, 129, 300, 512):
                tile, sp = plan_for(m, rt, s)
                assert 0 <= tile < len(TILES)
                assert 1 <= sp <= min(MAX_SPLITS, s), (m, rt, s, tile, sp)


@pytest.mark.gpu
def test_planner_table_matches_library():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import TILES, n_tiles, tile_info

    assert n_tiles() == len(TILES)
    assert all(tile_info(t)[0::2] == TILES[t] for t in range(len(TILES)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_uses_mma_sp(dtype):
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant import kernels

    pk = random_packed24(300, 520, 4, 64, device="cuda", seed=9)
    state = kernels.prepare(pk, "cuda", dtype)
    assert state.mma is not None and state.layout is None  # one layout: the mma.sp one
    w = reference.dequantize_nm24(pk).double()
    for m in (1, 2, 5, 16, 17, 40, 130, 600):
        x = torch.randn(2, m, 520, device="cuda").to(dtype)
        y = kernels.linear(x, state)
        assert y.shape == (2, m, 300)
        assert rel(y, x.double() @ w.t()) < (2e-3 if dtype == torch.float16 else 1e-2), m
