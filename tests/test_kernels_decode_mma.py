"""The decode kernel over the mma.sp layout (kernels/triton_decode_mma.py).

CPU: its inline PTX executed instruction by instruction (tests/ptx_emu.py) over a whole small
layout, and the kernel's portable path in Triton's interpreter (TRITON_INTERPRET=1, set here).
GPU (marked): the PTX path at awkward shapes, both activation types, int4/int8, every group
slot count, split-K on and off, several token counts, NaN-poisoned outputs, CUDA-graph replay.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from sparsequant.errors import SparseQuantError  # noqa: E402
from sparsequant.kernels import reference  # noqa: E402
from sparsequant.kernels.mma_sp_layout import build_mma_sp_layout  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402

import ptx_emu  # noqa: E402
from conftest import kernel_rel_error, kernel_tol  # noqa: E402

dm = importlib.import_module("sparsequant.kernels.triton_decode_mma")
if not HAS_CUDA and not isinstance(dm._decode_mma_kernel, triton.runtime.interpreter.InterpretedFunction):
    dm = importlib.reload(dm)  # imported earlier without TRITON_INTERPRET

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def _x(m, k, dtype, tag):
    g = torch.Generator().manual_seed(SEED + tag)
    return (torch.randn(m, k, generator=g) * 2).to(dtype)


def _ref(pk, x):
    return x.double().cpu() @ reference.dequantize_nm24(pk).double().t()


# -- CPU: the PTX, emulated ---------------------------------------------------------------------

def _emulate_kernel(lay, x, bf16):
    """y = x @ W^T with the kernel's per-k-tile PTX run on every quad, fed as _ktile feeds it."""
    m, k = x.shape
    prog = ptx_emu.parse(dm._asm_ktile(lay.bits, bf16, m)[0])
    kp = lay.s * 128
    xp = torch.zeros(m, kp, dtype=x.dtype)
    xp[:, :k] = x
    h = xp.view(torch.int16).reshape(-1).numpy().view(np.uint16).astype(np.int64)
    base = 1 << 20
    mem = {base + 4 * i: int(w) for i, w in enumerate(h[0::2] | (h[1::2] << 16))}
    qw, meta, sc = (t.numpy().view(np.uint32) for t in (lay.qw, lay.meta, lay.sc))
    y = np.zeros((m, lay.rt * 16))
    for r in range(lay.rt):
        for g in range(8):
            acc = [0] * 8
            for s in range(lay.s):
                for kt in range(4):
                    regs = {}
                    for tig in range(4):
                        lane = 4 * g + tig
                        if lay.bits == 4:
                            regs[f"${8 + tig}"], regs[f"${12 + tig}"] = int(qw[r, s, lane, kt]), 0
                        else:
                            regs[f"${8 + 2 * tig}"] = int(qw[r, s, lane, 2 * kt])
                            regs[f"${9 + 2 * tig}"] = int(qw[r, s, lane, 2 * kt + 1])
                    for role in range(2):  # lane 4 g + role + 2 (kt % 2), word kt // 2 (mma_sp_layout.py)
                        regs[f"${16 + role}"] = int(meta[r, s, 4 * g + role + 2 * (kt % 2), kt // 2])
                    regs["$18"] = int(sc[r, s, g, kt * lay.gps // 4])
                    regs["$19"], regs["$20"] = base + 2 * (s * 128 + kt * 32), 2 * kp
                    regs.update({f"${21 + i}": acc[i] for i in range(8)})
                    out = ptx_emu.run(prog, regs, mem)
                    acc = [out[f"${i}"] for i in range(8)]
            for t in range(m):
                for hh in range(2):
                    y[t, r * 16 + g + 8 * hh] = ptx_emu._f(acc[2 * t + hh])
    return torch.from_numpy(y[:, : lay.n])


@pytest.mark.parametrize("bits,group,dtype,m", [
    (4, 128, torch.float16, 1), (4, 32, torch.float16, 4), (8, 64, torch.float16, 2),
    (4, None, torch.bfloat16, 3), (8, 32, torch.bfloat16, 1),
])
def test_ptx_emulated_matches_reference(bits, group, dtype, m):
    n, k = 24 if bits == 4 else 20, 136  # a padded row tile and a padded super-tile
    pk = random_packed24(n, k, bits, group, seed=SEED % 997)
    lay = build_mma_sp_layout(pk)
    x = _x(m, k, dtype, bits + m)
    y = _emulate_kernel(lay, x, dtype == torch.bfloat16)
    # fp32 accumulator before the output rounding: fp16 weights and fp16 partial sums (~5e-4)
    # or exact bf16 products in fp32 (~1e-7)
    tol = 1.5e-3 if dtype == torch.float16 else 1e-6
    assert kernel_rel_error(y, _ref(pk, x), SEED) < tol


def test_selector_table_covers_every_nibble():
    # The two lookups + interleave must give PRMT the bytes (2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1) for
    # all 16 nibble values, including the (0, 1) padding and orders a checkpoint never holds.
    from collections import defaultdict

    prog = ptx_emu.parse(dm._asm_ktile(4, False, 1)[0])
    for nib in range(16):
        word = nib * 0x11111111
        regs = {f"${i}": 0 for i in range(29)}
        regs.update({"$16": word, "$17": word, "$19": 1 << 20})
        out = ptx_emu.run(prog, regs, defaultdict(int))
        i0, i1 = nib & 3, nib >> 2
        for tig in range(4):
            for q in range(4):
                sel = out[f"E{tig}{q}"] & 0xFFFF
                assert [(sel >> (4 * i)) & 0xF for i in range(4)] == [2 * i0, 2 * i0 + 1, 2 * i1, 2 * i1 + 1], (nib, tig, q)


# -- CPU: the portable path in the interpreter (GPU: the same calls take the PTX path) ----------

@pytest.mark.parametrize("n,k,bits,group,dtype,m,split,pair", [
    (40, 264, 4, 128, torch.float16, 1, 1, True), (24, 136, 8, 32, torch.bfloat16, 5, 2, False),
    (17, 520, 4, 64, torch.float16, 3, 2, True), (40, 128, 8, None, torch.float16, 2, 1, False),
])
def test_kernel_matches_reference(n, k, bits, group, dtype, m, split, pair):
    pk = random_packed24(n, k, bits, group, device=DEV, seed=SEED % 991)
    lay = build_mma_sp_layout(pk, DEV)
    x = _x(m, k, dtype, n).to(DEV)
    ws = dm.DecodeMmaWorkspace(n, DEV)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y = dm.decode_mma_linear(x, lay, ws, config=dict(BLOCK_RT=2, SPLIT=split, PAIR=pair), out=out)
    assert y.data_ptr() == out.data_ptr()
    assert kernel_rel_error(y, _ref(pk, x), SEED) < kernel_tol(dtype)
    assert int(ws.counters.abs().sum()) == 0  # the last program of each row block reset its counter


def test_state_sends_few_tokens_to_the_skinny_kernel(monkeypatch):
    """A state holding the mma.sp layout runs 1..SKINNY_TOKENS tokens on the skinny CUDA kernel (faster
    than this kernel on every measured shape), more on the tiled one; this kernel stays callable."""
    from sparsequant import kernels
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(16, 256, 4, 128, device=DEV, seed=SEED % 911)
    state = kernels.Nm24State.from_mma(MmaSpState(pk, DEV, torch.float16))
    monkeypatch.setattr(MmaSpState, "skinny", lambda self, x: "skinny")
    monkeypatch.setattr(MmaSpState, "__call__", lambda self, x: "tiled")
    for m in range(1, kernels.SKINNY_TOKENS + 1):
        assert state(_x(m, 256, torch.float16, 3).to(DEV)) == "skinny", m
    assert state(_x(kernels.SKINNY_TOKENS + 1, 256, torch.float16, 3).to(DEV)) == "tiled"
    # Tall weights (N >= SKINNY_TALL_N) switch to the tiled kernel one token earlier.
    tall = kernels.Nm24State.from_mma(MmaSpState(random_packed24(kernels.SKINNY_TALL_N, 128, 4, 128, device=DEV,
                                                                 seed=SEED % 907), DEV, torch.float16))
    assert tall(_x(kernels.SKINNY_TALL_TOKENS, 128, torch.float16, 3).to(DEV)) == "skinny"
    assert tall(_x(kernels.SKINNY_TALL_TOKENS + 1, 128, torch.float16, 3).to(DEV)) == "tiled"


def test_bad_input_is_refused():
    pk = random_packed24(16, 128, 4, 128, seed=1)
    lay = build_mma_sp_layout(pk, DEV)
    with pytest.raises(SparseQuantError):
        dm.decode_mma_linear(torch.randn(1, 64, device=DEV).half(), lay)
    with pytest.raises(SparseQuantError):
        dm.decode_mma_linear(torch.randn(1, 128, device=DEV), lay)  # float32
    with pytest.raises(SparseQuantError):
        dm.decode_mma_linear(torch.randn(2, 128, device=DEV).half(), lay, out=torch.empty(2, 8, device=DEV).half())
    if not HAS_CUDA:
        with pytest.raises(SparseQuantError):
            dm.decode_mma_linear(torch.randn(1, 128).half(), lay, use_asm=True)


def test_config_is_valid():
    for m, n, k in ((1, 4096, 4096), (1, 14336, 4096), (4, 4096, 14336), (1, 16, 128), (2, 22016, 4096)):
        cfg = dm.pick_config(m, n, k)
        assert 1 <= cfg["SPLIT"] <= -(-k // 128) and cfg["BLOCK_RT"] in (1, 2, 4, 8, 16)


# -- GPU -----------------------------------------------------------------------------------------

GPU_CASES = [  # n, k, bits, group, dtype, tokens, (BLOCK_RT, SPLIT, PAIR, WEIGHTS_L1) or None for the planner
    (4096, 4096, 4, 128, torch.float16, (1, 2, 3, 4, 5, 8), None),
    (333, 1000, 4, 128, torch.float16, (1, 3), (8, 3, False, False)),
    (100, 520, 4, 32, torch.float16, (1, 2), (4, 1, True, False)),
    (257, 4096, 4, None, torch.float16, (1, 4), None),
    (4096, 11008, 4, 64, torch.bfloat16, (1, 3), None),
    (130, 136, 4, 128, torch.bfloat16, (2,), (16, 1, False, True)),
    (11008, 4096, 8, None, torch.float16, (1, 2), None),
    (40, 264, 8, 32, torch.float16, (1,), (8, 2, True, True)),
    (520, 1032, 8, 64, torch.bfloat16, (1, 4), None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,bits,group,dtype,tokens,cfg", GPU_CASES)
def test_gpu_matches_reference(n, k, bits, group, dtype, tokens, cfg):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    pk = random_packed24(n, k, bits, group, device="cuda", seed=SEED % 983)
    lay = build_mma_sp_layout(pk, "cuda")
    w = reference.dequantize_nm24(pk).double()
    ws = dm.DecodeMmaWorkspace(n, "cuda")
    config = None if cfg is None else dict(BLOCK_RT=cfg[0], SPLIT=cfg[1], PAIR=cfg[2], WEIGHTS_L1=cfg[3])
    for m in tokens:
        x = _x(m, k, dtype, m).cuda()
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = dm.decode_mma_linear(x, lay, ws, config=config, out=out)
        assert kernel_rel_error(y, x.double() @ w.t(), SEED) < kernel_tol(dtype), (m, cfg)
        assert int(ws.counters.abs().sum()) == 0
        if m == tokens[0]:  # split-K is deterministic: a second call gives the same bits
            assert torch.equal(dm.decode_mma_linear(x, lay, ws, config=config), y)


@pytest.mark.gpu
def test_gpu_unaligned_and_strided_input():
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    pk = random_packed24(256, 512, 4, 128, device="cuda", seed=SEED % 977)
    lay = build_mma_sp_layout(pk, "cuda")
    base = _x(3, 520, torch.float16, 7).cuda()
    x = base[:, 3:515]  # neither contiguous nor 16-byte aligned
    y = dm.decode_mma_linear(x, lay)
    assert kernel_rel_error(y, x.double() @ reference.dequantize_nm24(pk).double().t(), SEED) < kernel_tol(torch.float16)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    n, k = 4096, 4096
    pk = random_packed24(n, k, 4, 128, device="cuda", seed=SEED % 971)
    lay = build_mma_sp_layout(pk, "cuda")
    ws = dm.DecodeMmaWorkspace(n, "cuda")
    static_x = _x(1, k, torch.float16, 1).cuda()
    dm.decode_mma_linear(static_x, lay, ws)  # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dm.decode_mma_linear(static_x, lay, ws)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = dm.decode_mma_linear(static_x, lay, ws)
    for tag in range(3):
        static_x.copy_(_x(1, k, torch.float16, 100 + tag).cuda())
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, dm.decode_mma_linear(static_x, lay, ws))
        assert int(ws.counters.abs().sum()) == 0
