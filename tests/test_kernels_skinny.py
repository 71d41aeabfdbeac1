"""The skinny mma.sp kernel (1-8 tokens): its planner (CPU) and the kernel itself (GPU, marked)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsequant.kernels import reference
from sparsequant.kernels.mma_sp import (SKINNY_CONFIGS, SKINNY_MAX_TOKENS, SMEM_OPTIN, skinny_plan,
                                        skinny_smem_bytes)
from sparsequant.kernels.testing import random_packed24

from conftest import kernel_tol


def rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def slices(s: int, kw: int) -> list[tuple[int, int]]:
    """The K slices [s0, s1) the kernel gives the kw warps of a row tile (same integer arithmetic)."""
    return [((s * j) // kw, (s * (j + 1)) // kw) for j in range(kw)]


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, SKINNY_MAX_TOKENS), rt=st.integers(1, 3000), s=st.integers(1, 300), bits=st.sampled_from([4, 8]))
def test_plan_is_valid(m, rt, s, bits):
    cfg, kw = skinny_plan(m, rt, s, bits)
    warps, _ = SKINNY_CONFIGS[cfg]
    assert warps % kw == 0
    assert skinny_smem_bytes(bits, m, cfg) <= SMEM_OPTIN
    cuts = slices(s, kw)
    # The slices cover every super-tile exactly once, in order.
    assert cuts[0][0] == 0 and cuts[-1][1] == s
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert kw & (kw - 1) == 0 and kw <= max(1, s)  # a power of two, no empty slice


def test_plan_examples():
    # The H100 sweep's best points (benchmarks/KERNEL_NOTES.md, "Skinny mma.sp kernel"): 8 warps with
    # a 4-slot ring; 8 K slices, 4 / 2 at 1 token on tall weights (N >= 8192 / 14336); no more slices than K has.
    assert skinny_plan(1, 256, 32) == (1, 8)
    assert skinny_plan(1, 688, 32) == (1, 4)
    assert skinny_plan(2, 688, 32) == (1, 8)
    assert skinny_plan(1, 256, 112) == (1, 8)
    assert skinny_plan(1, 896, 32) == (1, 2)
    assert skinny_plan(1, 1376, 32) == (1, 2)
    assert skinny_plan(8, 896, 32) == (1, 8)
    assert skinny_plan(1, 1, 1) == (1, 1)
    assert skinny_plan(3, 4, 5) == (1, 4)
    with pytest.raises(ValueError):
        skinny_plan(9, 256, 32)
    with pytest.raises(ValueError):
        skinny_plan(0, 256, 32)


def test_smem_mirror_matches_slot_shape():
    # int4, 1 token: slot = 512 codes + 256 metadata + 128 scales + 272 activations -> 1280 bytes.
    assert skinny_smem_bytes(4, 1, 0) == 256 + 8 * 8 * 1280
    # int8, 8 tokens, 16 warps, ring 4: slot = 1024 + 384 + 8 * 272 = 3584.
    assert skinny_smem_bytes(8, 8, 3) == 256 + 16 * 4 * 3584


# -- GPU -----------------------------------------------------------------------------------------

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


CASES = [  # n, k, bits, group
    (16, 128, 4, 128), (48, 256, 4, 32), (40, 264, 8, 64), (100, 1000, 4, None), (257, 520, 8, 256),
    (4096, 4096, 4, 128), (11008, 4096, 4, 128), (4096, 11008, 8, 128), (333, 4096, 4, 64), (130, 136, 8, 32),
    (1, 8, 4, None), (17, 2056, 4, 32),
]


def _check_call(call, ref, dtype, what):
    out = torch.full(tuple(ref.shape), float("nan"), device="cuda", dtype=dtype)
    y = call(out)
    assert y.data_ptr() == out.data_ptr(), what
    assert bool(torch.isfinite(y).all()), what  # every element written
    assert rel(y, ref) < kernel_tol(dtype), (what, rel(y, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_matches_reference(n, k, bits, group, dtype):
    """Planned and every forced (configuration, K slices), 1..8 tokens, NaN-poisoned outputs."""
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    seed = int(torch.randint(0, 10**6, (1,)))
    pk = random_packed24(n, k, bits, group, device="cuda", seed=seed)
    w = reference.dequantize_nm24(pk).double()
    st_ = MmaSpState(pk, "cuda", dtype)
    big = n * k > 10**7
    for m in (1, 3, 8) if big else range(1, SKINNY_MAX_TOKENS + 1):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        _check_call(lambda out: st_.skinny(x, out=out), ref, dtype, (m, "plan", seed))
        for cfg, (warps, _) in enumerate(SKINNY_CONFIGS):
            if skinny_smem_bytes(bits, m, cfg) > SMEM_OPTIN:
                continue
            for kw in (1, 2, warps) if not big else (warps // 2,):
                _check_call(lambda out: st_.skinny(x, out=out, cfg=cfg, kw=kw), ref, dtype, (m, cfg, kw, seed))


@pytest.mark.gpu
def test_skinny_is_deterministic_and_graph_safe():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(1000, 2048, 4, 128, device="cuda", seed=3)
    st_ = MmaSpState(pk, "cuda", torch.float16)
    w = reference.dequantize_nm24(pk).double()
    for m in (1, 6):
        x = torch.randn(m, 2048, device="cuda").half()
        ys = [st_.skinny(x, kw=8) for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:]), m  # slices added in a fixed order
    static_x = torch.randn(2, 2048, device="cuda").half()
    st_.skinny(static_x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = st_.skinny(static_x)
    for _ in range(2):
        static_x.copy_(torch.randn(2, 2048, device="cuda").half())
        g.replay()
        torch.cuda.synchronize()
        assert rel(y, static_x.double() @ w.t()) < 2e-3


@pytest.mark.gpu
def test_skinny_refuses_bad_input_and_reads_unaligned():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(64, 256, 4, 128, device="cuda", seed=1)
    st_ = MmaSpState(pk, "cuda", torch.float16)
    with pytest.raises(ValueError):
        st_.skinny(torch.randn(9, 256, device="cuda").half())  # more tokens than one n-tile
    with pytest.raises(ValueError):
        st_.skinny(torch.randn(2, 256, device="cuda").half(), kw=3)
    with pytest.raises(ValueError):
        st_.skinny(torch.randn(2, 256, device="cuda").half(), cfg=len(SKINNY_CONFIGS))
    with pytest.raises(TypeError):
        st_.skinny(torch.randn(2, 256, device="cuda").bfloat16())
    base = torch.randn(2 * 256 + 1, device="cuda").half()
    x = base[1:].view(2, 256)  # 2 bytes off 16-byte alignment: copied, not misread
    assert rel(st_.skinny(x), x.double() @ reference.dequantize_nm24(pk).double().t()) < 2e-3


@pytest.mark.gpu
def test_skinny_table_matches_library():
    if not _hopper():
        pytest.skip("needs sm_90")
    import ctypes

    from sparsequant.kernels import cuda_build

    lib = cuda_build.library()
    w, d = ctypes.c_int(), ctypes.c_int()
    for cfg, (warps, depth) in enumerate(SKINNY_CONFIGS):
        assert lib.sq_mma_sp_skinny_info(cfg, ctypes.byref(w), ctypes.byref(d)) == 0
        assert (w.value, d.value) == (warps, depth)
        b = ctypes.c_int()
        assert lib.sq_mma_sp_skinny_occupancy(4, 0, cfg, 1, ctypes.byref(b)) == 0
        assert b.value >= 1
    assert lib.sq_mma_sp_skinny_info(len(SKINNY_CONFIGS), ctypes.byref(w), ctypes.byref(d)) == -1
