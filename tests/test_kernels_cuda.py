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
    (4096, 4096, 4, 128), (11008, 4096, 4, 128), (4096, 11008, 8, 128), (333, 4096, 4, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference(n, k, bits, group, dtype):
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState, config_for

    seed = int(torch.randint(0, 10**6, (1,)))
    pk = random_packed24(n, k, bits, group, device="cuda", seed=seed)
    w = reference.dequantize_nm24(pk).double()
    st_ = MmaSpState(pk, "cuda", dtype)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for m in (1, 2, 7, 8, 9, 16, 17, 33, 64, 127, 512):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        nt, wr = config_for(m, st_.layout.rt)
        for cfg in {(nt, wr), (nt, 1), (1, 8), (8, 2)}:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = st_(x, nt=cfg[0], wr=cfg[1], out=out)
            assert bool(torch.isfinite(y).all()), (m, cfg, seed)
            # Rounding of the output to fp16/bf16 is the only error: products are exact, fp32 sums.
            assert rel(y, ref) < tol, (m, cfg, rel(y, ref), seed)


@pytest.mark.gpu
def test_kernel_in_cuda_graph_and_strided_input():
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(512, 1024, 4, 128, device="cuda", seed=5)
    st_ = MmaSpState(pk, "cuda", torch.float16)
    w = reference.dequantize_nm24(pk).double()
    x = torch.randn(3, 2048, device="cuda").half()[:, ::2]  # not contiguous
    y0 = st_(x)
    assert rel(y0, x.double() @ w.t()) < 2e-3
    g = torch.cuda.CUDAGraph()
    static_x = x.contiguous()
    with torch.cuda.graph(g):
        y = st_(static_x)
    static_x.copy_(torch.randn(3, 1024, device="cuda").half())
    g.replay()
    torch.cuda.synchronize()
    assert rel(y, static_x.double() @ w.t()) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_uses_mma_sp_for_few_tokens(dtype):
    if not _hopper():
        pytest.skip("needs sm_90")
    from sparsequant import kernels

    pk = random_packed24(300, 520, 4, 64, device="cuda", seed=9)
    state = kernels.prepare(pk, "cuda", dtype)
    assert state.mma is not None
    w = reference.dequantize_nm24(pk).double()
    for m in (1, 2, 5, 16, 17, 40):
        x = torch.randn(2, m, 520, device="cuda").to(dtype)
        y = kernels.linear(x, state)
        assert y.shape == (2, m, 300)
        assert rel(y, x.double() @ w.t()) < (2e-3 if dtype == torch.float16 else 1e-2), m
