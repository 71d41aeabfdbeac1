"""Hybrid-tile kernels (tiles dense or 2:4) against the float64 dequantized reference.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 set before
the kernel modules are imported, as in test_kernels.py). The reference is the checkpoint's own
weight (PackedWeight -> to_compressed().weight, exact dequantization) in float64. Outputs are
NaN-poisoned first, so an unwritten element fails the test.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from sparsequant import kernels  # noqa: E402
from sparsequant.errors import PatternError  # noqa: E402
from sparsequant.kernels.hybrid_layout import build_hybrid_layout, layout_weight, unsupported_reason  # noqa: E402
from sparsequant.kernels.testing_hybrid import random_packed_hybrid  # noqa: E402


def _interpreted(mod, name):
    return isinstance(getattr(mod, name), triton.runtime.interpreter.InterpretedFunction)


def _kernel_module():
    td = importlib.import_module("sparsequant.kernels.triton_decode")
    th = importlib.import_module("sparsequant.kernels.triton_hybrid")
    if not HAS_CUDA and not _interpreted(td, "_decode24_kernel"):
        td = importlib.reload(td)  # imported earlier without TRITON_INTERPRET
    if not HAS_CUDA and (not _interpreted(th, "_hybrid_decode_kernel") or th._half_unit is not td._half_unit):
        th = importlib.reload(th)  # must use the interpreted helpers of triton_decode
    return th


th = _kernel_module()
from sparsequant.kernels.hybrid import HybridState  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure
from conftest import kernel_rel_error, kernel_tol  # noqa: E402


def _rel(y, ref):
    return kernel_rel_error(y, ref, SEED)


def _x(m, k, dtype, tag):
    g = torch.Generator().manual_seed(SEED + tag)
    return (torch.randn(m, k, generator=g) * 2).to(dtype).to(DEV)


def _ref(x, pk):
    """float64 ``x @ W^T`` with the checkpoint's dequantized weight."""
    return x.double().cpu() @ pk.to_compressed().weight.double().cpu().t()






def test_cpu_runs_the_interpreter():
    if HAS_CUDA:
        pytest.skip("GPU present: kernels are compiled")
    assert _interpreted(th, "_hybrid_decode_kernel") and _interpreted(th, "_hybrid_expand_kernel")


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 70), cols8=st.integers(1, 24), tr=st.sampled_from([16, 32, 48]),
    tc=st.sampled_from([32, 64, 96]), sparsity=st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.5]),
    bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, None]), sym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layout_round_trips_to_the_same_weight(rows, cols8, tr, tc, sparsity, bits, group, sym, seed):
    pk = random_packed_hybrid(rows, 8 * cols8, sparsity, (tr, tc), bits, group, sym, seed=seed)
    lay = build_hybrid_layout(pk, "cpu")
    assert torch.equal(layout_weight(lay), pk.to_compressed().weight)
    # same bits: the value words hold exactly the checkpoint's codes (plus padding to whole units)
    n_codes = 32 * lay.vals.numel() // lay.bits
    assert n_codes >= int(pk.to_compressed().mask.sum()) if pk.storage == "hybrid" else n_codes >= rows * 8 * cols8


# (out, in, sparsity, tile, bits, group, symmetric, tokens, dtype, split-K, software-pipelined
# variant): partial edge tiles in both directions, a last tile column narrower than a unit,
# mixed / all-2:4 / all-dense.
DECODE_CASES = [
    (40, 104, 0.25, (16, 32), 4, 32, True, 1, torch.float16, 1, True),
    (48, 200, 0.3, (32, 64), 8, 64, False, 3, torch.bfloat16, 3, True),
    (24, 136, 0.5, (16, 128), 4, None, False, 2, torch.float16, 2, False),
    (40, 96, 0.0, None, 8, 32, True, 1, torch.bfloat16, 2, False),  # quantized 'dense' storage: all dense
]


@pytest.mark.parametrize("n,k,sparsity,tile,bits,group,sym,m,dtype,split,prefetch", DECODE_CASES)
def test_decode_matches_reference(n, k, sparsity, tile, bits, group, sym, m, dtype, split, prefetch):
    pk = random_packed_hybrid(n, k, sparsity, tile or (128, 128), bits, group, sym, device=DEV, seed=SEED % 997 + n)
    assert pk.storage == ("dense" if sparsity == 0 else "hybrid")
    lay = build_hybrid_layout(pk, DEV)
    x = _x(m, k, dtype, n)
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    ws = th.DecodeWorkspace(n, DEV)
    cfg = dict(BLOCK_N=16, SPLIT=split, PREFETCH=prefetch)
    th.hybrid_decode_linear(x, lay, ws, config=cfg, out=y)
    assert _rel(y, _ref(x, pk)) < kernel_tol(dtype), f"seed {SEED}"
    assert int(ws.counters.abs().sum()) == 0, "split-K counters must be reset for the next call"
    assert torch.equal(th.hybrid_decode_linear(x, lay, ws, config=cfg), y)


@pytest.mark.parametrize("prefetch", [False, True])
def test_mixed_flags_given_explicitly(prefetch):
    # a checkerboard of 2:4 and dense tiles with partial tiles on both edges
    flags = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    pk = random_packed_hybrid(40, 80, tile=(16, 32), bits=4, group_size=32, device=DEV, seed=SEED % 983, flags=flags)
    lay = build_hybrid_layout(pk, DEV)
    assert torch.equal(lay.flags.cpu().bool(), flags)
    x = _x(1, 80, torch.float16, 3)
    y = torch.full((1, 40), float("nan"), dtype=torch.float16, device=DEV)
    th.hybrid_decode_linear(x, lay, config=dict(BLOCK_N=16, SPLIT=2, PREFETCH=prefetch), out=y)
    assert _rel(y, _ref(x, pk)) < kernel_tol(torch.float16), f"seed {SEED}"


@pytest.mark.parametrize("sparsity,bits,group,sym", [(0.35, 4, 64, False), (0.0, 8, 32, True)])
def test_expand_is_exact(sparsity, bits, group, sym):
    pk = random_packed_hybrid(40, 168, sparsity, (16, 64), bits, group, sym, device=DEV, seed=SEED % 983)
    lay = build_hybrid_layout(pk, DEV)
    wt = torch.full((168, 40), float("nan"), dtype=torch.float32, device=DEV)
    th.expand_hybrid_t(lay, torch.float32, wt, block_n=16)
    assert torch.equal(wt.t().cpu(), pk.to_compressed().weight.cpu()), f"seed {SEED}"


def test_state_dispatches_decode_and_expand():
    pk = random_packed_hybrid(32, 72, 0.3, (16, 32), 4, 32, True, device=DEV, seed=SEED % 971)
    state = HybridState(pk, DEV, torch.bfloat16)
    for m in (1, 9):  # decode kernel, then expansion + matmul
        x = _x(m, 72, torch.bfloat16, m)
        y = kernels.linear(x.reshape(1, m, 72), state)
        assert y.shape == (1, m, 32) and y.dtype == torch.bfloat16
        assert _rel(y[0], _ref(x, pk)) < kernel_tol(torch.bfloat16), f"m={m} seed {SEED}"


def test_unsupported_weights_and_bad_inputs():
    assert unsupported_reason(random_packed_hybrid(32, 96, 0.3, (16, 48), 4, 32, True)) is not None  # tile cols
    assert unsupported_reason(random_packed_hybrid(32, 96, 0.3, (8, 32), 4, 32, True)) is not None  # tile rows
    assert unsupported_reason(random_packed_hybrid(32, 96, 0.3, (16, 32), 3, 32, True)) is not None  # bits
    assert unsupported_reason(random_packed_hybrid(32, 96, 0.3, (16, 32), 4, 48, True)) is not None  # group
    with pytest.raises(PatternError):
        build_hybrid_layout(random_packed_hybrid(32, 96, 0.3, (16, 48), 4, 32, True), "cpu")
    pk = random_packed_hybrid(32, 96, 0.3, (16, 32), 4, 32, True)
    assert kernels.prepare(pk, "cpu", torch.float16) is None  # CPU: the reference path
    lay = build_hybrid_layout(pk, DEV)
    with pytest.raises(ValueError):
        th.hybrid_decode_linear(_x(1, 64, torch.float16, 1), lay)
    with pytest.raises(ValueError):
        th.hybrid_decode_linear(_x(17, 96, torch.float16, 1), lay)
    with pytest.raises(TypeError):
        th.hybrid_decode_linear(_x(1, 96, torch.float32, 1), lay)
    with pytest.raises(ValueError):
        th.hybrid_decode_linear(_x(1, 96, torch.float16, 1), lay, config=dict(BLOCK_N=32, SPLIT=1))  # 32 > tile rows
    with pytest.raises(ValueError):
        th.hybrid_expand_linear(_x(3, 95, torch.float16, 1), lay)


# -- GPU only ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,sparsity,bits,group,sym", [(264, 520, 0.25, 4, 128, True), (200, 1032, 0.4, 8, 64, False),
                                                          (1048, 1064, 0.5, 4, None, False), (520, 2056, 0.1, 4, 32, True)])
def test_gpu_prepare_and_every_token_count(dtype, n, k, sparsity, bits, group, sym):
    pk = random_packed_hybrid(n, k, sparsity, (128, 128), bits, group, sym, device=DEV, seed=SEED % 977)
    state = kernels.prepare(pk, DEV, dtype)
    assert isinstance(state, HybridState)
    for m in (1, 2, 3, 8, 9, 16, 17, 127, 300):
        x = _x(m, k, dtype, m)
        y = kernels.linear(x.reshape(1, m, k), state)
        assert y.shape == (1, m, n) and y.dtype == dtype
        assert _rel(y[0], _ref(x, pk)) < kernel_tol(dtype), f"m={m} seed {SEED}"
    x = _x(16, k, dtype, 99)
    for use_asm in ((True, False) if dtype == torch.float16 else (False,)):
        for prefetch in (False, True):
            cfg = dict(th.pick_hybrid_decode_config(state.layout, 16), PREFETCH=prefetch)
            y = torch.full((16, n), float("nan"), dtype=dtype, device=DEV)
            th.hybrid_decode_linear(x, state.layout, state.workspace, config=cfg, use_asm=use_asm, out=y)
            assert _rel(y, _ref(x, pk)) < kernel_tol(dtype), f"asm {use_asm} prefetch {prefetch} seed {SEED}"
            assert int(state.workspace.counters.abs().sum()) == 0
    wt = th.expand_hybrid_t(state.layout, torch.float32)
    assert torch.equal(wt.t().cpu(), pk.to_compressed().weight.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_linear_module_and_cuda_graph():
    from sparsequant.nn.linear import SparseQuantLinear

    pk = random_packed_hybrid(1024, 2048, 0.35, device=DEV, seed=SEED % 953)
    lin = SparseQuantLinear(pk, compute_dtype=torch.float16)
    assert lin.prepare_kernel(DEV, torch.float16)
    x = _x(1, 2048, torch.float16, 5)
    ref = lin(x).clone()
    assert _rel(ref, _ref(x, pk)) < kernel_tol(torch.float16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = lin(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)
