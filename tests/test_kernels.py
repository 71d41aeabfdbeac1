"""Kernels against the float32 reference ops, on fresh random inputs.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before the kernel modules are imported, or re-imported if something imported them earlier);
``test_cpu_runs_the_interpreter`` proves that the kernels really are interpreted, not skipped.
The inline-PTX decode path only runs on a GPU (tests marked ``gpu``); W8A8 (cuSPARSELt) is in
test_kernels_w8a8.py.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from sparsequant.errors import PatternError  # noqa: E402
from sparsequant import kernels  # noqa: E402
from sparsequant.kernels import reference  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402


def _kernel_modules():
    mods = []
    for name in _KERNEL_OF:
        mod = importlib.import_module(name)
        if not HAS_CUDA and not isinstance(getattr(mod, _KERNEL_OF[name]), triton.runtime.interpreter.InterpretedFunction):
            mod = importlib.reload(mod)  # imported earlier without TRITON_INTERPRET
        mods.append(mod)
    return mods


_KERNEL_OF = {
    "sparsequant.kernels.triton_decode": "_decode24_kernel",
    "sparsequant.kernels.triton_prefill": "_prefill24_kernel",
    "sparsequant.kernels.cslt": "_quant_rows_kernel",
    "sparsequant.kernels.triton_expand": "_stack16",
}
td, tp, cslt, te = _kernel_modules()
from sparsequant.kernels.layout import build_layout  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure
from conftest import kernel_rel_error, kernel_tol  # noqa: E402


def _rel(y, ref):
    return kernel_rel_error(y, ref, SEED)


def _gen(tag: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + tag)


def _x(m, k, dtype, tag):
    return (torch.randn(m, k, generator=_gen(tag)) * 2).to(dtype).to(DEV)






def test_cpu_runs_the_interpreter():
    if HAS_CUDA:
        pytest.skip("GPU present: kernels are compiled")
    for mod, name in zip((td, tp, cslt, te), _KERNEL_OF.values()):
        assert isinstance(getattr(mod, name), triton.runtime.interpreter.InterpretedFunction)


def test_reference_equals_checkpoint_weight():
    pk = random_packed24(24, 96, 4, 32, False, seed=SEED % 1000)
    assert torch.equal(reference.dequantize_nm24(pk), pk.to_compressed().weight)


# (out, in, bits, group, symmetric, tokens, dtype, split-K) - sizes not multiples of the tiles
DECODE_CASES = [
    (40, 96, 4, 32, True, 1, torch.float16, 1),
    (40, 200, 8, 64, False, 3, torch.bfloat16, 2),
    (48, 136, 4, None, False, 2, torch.float16, 3),
    (24, 168, 8, None, True, 3, torch.float16, 4),
    (56, 168, 4, 128, True, 1, torch.bfloat16, 2),
]


@pytest.mark.parametrize("n,k,bits,group,sym,m,dtype,split", DECODE_CASES)
def test_decode_matches_reference(n, k, bits, group, sym, m, dtype, split):
    pk = random_packed24(n, k, bits, group, sym, device=DEV, seed=SEED % 997 + n)
    lay = build_layout(pk, DEV)
    x = _x(m, k, dtype, n)
    ref = x.float() @ reference.dequantize_nm24(pk).t()
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    ws = td.DecodeWorkspace(n, DEV)
    td.decode_linear(x, lay, ws, config=dict(BLOCK_N=16 if n < 64 else 32, BLOCK_U=2, SPLIT=split), out=y)
    assert _rel(y, ref) < kernel_tol(dtype), f"seed {SEED}"
    assert int(ws.counters.abs().sum()) == 0, "split-K counters must be reset for the next call"
    # a second call with the same workspace must give the same answer (counters were reset)
    y2 = td.decode_linear(x, lay, ws, config=dict(BLOCK_N=16 if n < 64 else 32, BLOCK_U=2, SPLIT=split))
    assert torch.equal(y, y2)


PREFILL_CASES = [
    (40, 96, 4, 32, True, 17, torch.float16),
    (72, 200, 8, 64, False, 5, torch.bfloat16),
    (48, 136, 4, None, False, 33, torch.bfloat16),
    (24, 256, 8, 128, True, 1, torch.float16),
]


@pytest.mark.parametrize("n,k,bits,group,sym,m,dtype", PREFILL_CASES)
def test_prefill_matches_reference(n, k, bits, group, sym, m, dtype):
    pk = random_packed24(n, k, bits, group, sym, device=DEV, seed=SEED % 991 + n)
    lay = build_layout(pk, DEV)
    x = _x(m, k, dtype, n + 1)
    ref = x.float() @ reference.dequantize_nm24(pk).t()
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_U=2, GROUP_M=2, num_warps=4, num_stages=1)
    tp.prefill_linear(x, lay, config=cfg, out=y)
    assert _rel(y, ref) < kernel_tol(dtype), f"seed {SEED}"


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (8, 32, True)])
def test_expand_is_exact(bits, group, sym):
    pk = random_packed24(40, 168, bits, group, sym, device=DEV, seed=SEED % 983)
    lay = build_layout(pk, DEV)
    wt = torch.full((168, 40), float("nan"), dtype=torch.float32, device=DEV)
    tp.expand_dense_t(lay, torch.float32, wt)
    assert torch.equal(wt.t().cpu(), reference.dequantize_nm24(pk).cpu()), f"seed {SEED}"


# (out, in, bits, group) for the mma.sp layout: odd row counts, K not a multiple of 128, every
# scale-slot count (g32: 4 per super-tile, g64: 2, g128/g256/per channel: 1)
MMA_LAYOUT_CASES = [(20, 136, 4, 32), (40, 264, 8, 64), (33, 520, 4, None), (17, 384, 8, 256), (50, 1000, 4, 128)]


@pytest.mark.parametrize("n,k,bits,group", MMA_LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expand_mma_sp_is_exact(n, k, bits, group, dtype):
    """The expansion of the mma.sp layout equals the reference weight rounded once to ``dtype``."""
    from sparsequant.kernels.mma_sp_layout import build_mma_sp_layout

    pk = random_packed24(n, k, bits, group, device=DEV, seed=SEED % 971 + n)
    lay = build_mma_sp_layout(pk, DEV)
    w = torch.full((n, k), float("nan"), dtype=dtype, device=DEV)
    te.expand_mma_sp(lay, dtype, out=w)
    assert torch.equal(w.cpu(), reference.dequantize_nm24(pk).cpu().to(dtype)), f"seed {SEED}"


def _state_bytes(state) -> int:
    # the count that runtime.synthetic.weight_bytes_on (issue 7's memory figure) uses
    from sparsequant.runtime.synthetic import _state_tensors

    return sum(t.numel() * t.element_size() for t in {id(t): t for t in _state_tensors(state)}.values())


@pytest.mark.parametrize("n,k,bits,group", [(64, 512, 4, 128), (48, 256, 8, 64), (32, 384, 4, 32), (48, 512, 4, None)])
def test_prepared_state_holds_one_copy(n, k, bits, group):
    """A prepared 2:4 state holds the weight's bits once (either layout), plus small counters.

    Shapes without padding: codes and metadata are exactly the checkpoint's bytes; scales equal
    them too except per channel in the mma.sp layout, which repeats a row's scale per 128-column
    super-tile (N * K / 128 * 2 bytes: 1/32 of the int4 codes' bytes).
    """
    from sparsequant.kernels.mma_sp import MmaSpState

    pk = random_packed24(n, k, bits, group, device=DEV, seed=SEED % 967 + n)
    packed_bytes = sum(pk.tensors[t].numel() * pk.tensors[t].element_size() for t in ("qweight", "meta", "scales"))
    counters = 4 * (-(-n // 16) + -(-n // 128) * 64)  # split-K counters of either state, an upper bound
    tri = kernels.Nm24State(pk, "cpu", torch.float16)  # no mma.sp kernel on a CPU: the Triton layout
    assert tri.mma is None and tri.layout is not None
    assert tri.nbytes() == packed_bytes
    assert packed_bytes <= _state_bytes(tri) <= packed_bytes + counters
    mma = kernels.Nm24State.from_mma(MmaSpState(pk, "cpu", torch.float16))
    assert mma.layout is None and mma.workspace is None
    extra = n * (k // 128 - 1) * 2 if group is None else 0  # per-channel scale per super-tile
    assert mma.nbytes() == packed_bytes + extra
    assert packed_bytes <= _state_bytes(mma) <= packed_bytes + extra + counters
    with pytest.raises(ValueError):
        kernels.Nm24State(pk, "cpu", torch.float16, layout=tri.layout, mma=mma.mma)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_state_expands_beyond_the_kernel_tokens(dtype):
    """An mma.sp-only state above MMA_SP_TOKENS runs expansion + matmul from that layout alone."""
    from sparsequant.kernels.mma_sp import MmaSpState

    n, k = 40, 264
    pk = random_packed24(n, k, 4, 64, device=DEV, seed=SEED % 953)
    state = kernels.Nm24State.from_mma(MmaSpState(pk, DEV, dtype))
    m = kernels.MMA_SP_TOKENS[1] + 3
    x = _x(m, k, dtype, 11)
    y = kernels.linear(x.view(1, m, k), state)
    assert y.shape == (1, m, n)
    ref = x.double() @ reference.dequantize_nm24(pk).to(dtype).double().t()
    assert _rel(y[0], ref) < kernel_tol(dtype), f"seed {SEED}"


def test_bad_inputs_raise():
    pk = random_packed24(24, 96, 4, 32, True, device=DEV)
    lay = build_layout(pk, DEV)
    with pytest.raises(ValueError):
        td.decode_linear(_x(1, 64, torch.float16, 1), lay)
    with pytest.raises(ValueError):
        td.decode_linear(_x(17, 96, torch.float16, 1), lay)
    with pytest.raises(TypeError):
        td.decode_linear(_x(1, 96, torch.float32, 1), lay)
    with pytest.raises(ValueError):
        tp.prefill_linear(_x(3, 95, torch.float16, 1), lay)
    with pytest.raises(ValueError):
        td.decode_linear(_x(1, 96, torch.float16, 1), lay, out=torch.empty(1, 23, dtype=torch.float16, device=DEV))
    with pytest.raises(PatternError):
        build_layout(random_packed24(24, 96, 4, 48, True), "cpu")  # group not a multiple of 32
    with pytest.raises(PatternError):
        build_layout(random_packed24(24, 96, 3, 32, True), "cpu")
    with pytest.raises(ValueError):
        kernels.linear(_x(1, 96, torch.float16, 1), None)


def test_prepare_falls_back_to_reference():
    pk = random_packed24(24, 96, 4, 32, True)
    assert kernels.prepare(pk, "cpu", torch.float16) is None
    if HAS_CUDA:
        assert kernels.prepare(pk, "cuda", torch.float32) is None
        assert kernels.prepare(random_packed24(24, 96, 4, 48, True), "cuda", torch.float16) is None
        assert kernels.prepare(random_packed24(24, 96, 3, 32, True), "cuda", torch.float16) is None


# -- GPU only ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,bits,group,sym", [(264, 520, 4, 128, True), (200, 1032, 8, 64, False),
                                                  (4104, 4136, 4, None, False), (4104, 4136, 8, None, True)])
def test_gpu_dispatch_all_token_counts(dtype, n, k, bits, group, sym):
    pk = random_packed24(n, k, bits, group, sym, device=DEV, seed=SEED % 977)
    state = kernels.prepare(pk, DEV, dtype)
    assert state is not None
    # one layout per weight: the mma.sp one where that kernel runs (Hopper, symmetric), else Triton's
    assert (state.mma is None) != (state.layout is None)
    w = reference.dequantize_nm24(pk)
    for m in (1, 2, 3, 8, 9, 16, 17, 33, 127, 129, 300):
        x = _x(m, k, dtype, m)
        y = kernels.linear(x.reshape(1, m, k), state)
        assert y.shape == (1, m, n) and y.dtype == dtype
        assert _rel(y[0], x.float() @ w.t()) < kernel_tol(dtype), f"m={m} seed {SEED}"
    if dtype == torch.float16:
        x = _x(4, k, dtype, 99)
        lay = build_layout(pk, DEV)
        for use_asm in (True, False):
            y = torch.full((4, n), float("nan"), dtype=dtype, device=DEV)
            td.decode_linear(x, lay, use_asm=use_asm, out=y)
            assert _rel(y, x.float() @ w.t()) < kernel_tol(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k,bits,group", MMA_LAYOUT_CASES + [(4096, 4096, 4, 128), (11008, 4096, 8, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_expand_mma_sp_is_exact(n, k, bits, group, dtype):
    from sparsequant.kernels.mma_sp_layout import build_mma_sp_layout

    pk = random_packed24(n, k, bits, group, device=DEV, seed=SEED % 961 + n)
    w = torch.full((n, k), float("nan"), dtype=dtype, device=DEV)
    te.expand_mma_sp(build_mma_sp_layout(pk, DEV), dtype, out=w)
    assert torch.equal(w, reference.dequantize_nm24(pk).to(dtype)), f"seed {SEED}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_prepared_state_is_one_copy():
    """On the GPU a prepared weight's state is one copy of its bits (issue 7's memory figure)."""
    pk = random_packed24(4096, 4096, 4, 128, True, device=DEV, seed=SEED % 13)
    packed_bytes = sum(pk.tensors[t].numel() * pk.tensors[t].element_size() for t in ("qweight", "meta", "scales"))
    state = kernels.prepare(pk, DEV, torch.float16)
    assert packed_bytes <= _state_bytes(state) <= packed_bytes * 1.01


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (8, 64, False), (4, None, False)])
def test_gpu_ptx_expand_is_exact(bits, group, sym):
    pk = random_packed24(200, 1064, bits, group, sym, device=DEV, seed=SEED % 967)
    lay = build_layout(pk, DEV)
    w = torch.full((200, 1064), float("nan"), dtype=torch.float16, device=DEV)
    te.expand_dense_ptx(lay, w)
    # (code - zero) and the scale are exact in fp16, so one rounding of their product: exact
    assert torch.equal(w, reference.dequantize_nm24(pk).half()), f"seed {SEED}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_decode_in_cuda_graph():
    pk = random_packed24(1024, 2048, 4, 128, True, device=DEV)
    state = kernels.prepare(pk, DEV, torch.float16)
    x = _x(1, 2048, torch.float16, 5)
    ref = kernels.linear(x, state).clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = kernels.linear(x, state)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)


# -- the inline PTX, checked on the CPU by emulating its instructions ----------------------------

def _emulate_ptx(asm: str, regs: dict) -> dict:
    """Run the straight-line PTX subset our kernels use on Python ints (fp16 math via numpy)."""
    import numpy as np

    def halves(w):
        return np.array([w & 0xFFFF, (w >> 16) & 0xFFFF], dtype=np.uint16).view(np.float16)

    def word(h):
        u = np.asarray(h, dtype=np.float16).view(np.uint16)
        return int(u[0]) | (int(u[1]) << 16)

    def prmt(a, b, sel):
        src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
        return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))

    r = dict(regs)
    val = lambda x: r[x] if x in r else int(x, 0)  # noqa: E731
    for line in asm.split("\n"):
        line = line.strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        a = [x.strip() for x in rest.rstrip(";").split(",")]
        if op == "mov.b64":
            lo, hi = (x.strip() for x in rest[rest.index("{") + 1: rest.index("}")].split(","))
            v = val(a[-1])
            r[lo], r[hi] = v & 0xFFFFFFFF, v >> 32
            continue
        f = {
            "mov.b32": lambda: val(a[1]),
            "shr.b32": lambda: val(a[1]) >> val(a[2]),
            "shl.b32": lambda: (val(a[1]) << val(a[2])) & 0xFFFFFFFF,
            "and.b32": lambda: val(a[1]) & val(a[2]),
            "lop3.b32": lambda: (val(a[1]) & val(a[2])) | val(a[3]),  # only LUT 0xEA is used
            "prmt.b32": lambda: prmt(val(a[1]), val(a[2]), val(a[3])),
            "sub.f16x2": lambda: word((halves(val(a[1])).astype(np.float32) - halves(val(a[2]))).astype(np.float16)),
            "mul.f16x2": lambda: word((halves(val(a[1])).astype(np.float32) * halves(val(a[2]))).astype(np.float16)),
            "cvt.u64.u32": lambda: val(a[1]),
            "shl.b64": lambda: (val(a[1]) << val(a[2])) & (2**64 - 1),
            "or.b64": lambda: val(a[1]) | val(a[2]),
        }[op]
        assert op != "lop3.b32" or a[4] == "0xEA"
        r[a[0]] = f()
    return r


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (8, 64, False), (4, None, False)])
def test_expand_ptx_emulated_is_exact(bits, group, sym):
    import numpy as np

    from sparsequant.kernels.triton_expand import _asm_expand_unit

    n, k = 6, 200
    pk = random_packed24(n, k, bits, group, sym, seed=SEED % 953)
    lay = build_layout(pk, "cpu")
    asm, _ = _asm_expand_unit(bits)
    nv = bits // 2
    dense = np.zeros((n, lay.units * 32), dtype=np.float16)
    for row in range(n):
        for u in range(lay.units):
            g = u * 32 // lay.group
            regs = {"$16": int(lay.meta[u, row]) & 0xFFFFFFFF}
            for i in range(nv):
                regs[f"${17 + i}"] = int(lay.vals[u * nv + i, row]) & 0xFFFFFFFF
            z = int(lay.zeros[g, row]) if lay.zeros is not None else lay.sym_zero
            regs[f"${17 + nv}"] = (int(lay.scales[g, row].view(torch.int16)) & 0xFFFF) * 0x10001
            regs[f"${18 + nv}"] = (z + 0x6400) * 0x10001
            out = _emulate_ptx(asm, regs)
            words = np.array([out[f"${t}"] for t in range(16)], dtype=np.uint32)
            dense[row, u * 32:(u + 1) * 32] = words.view(np.float16)
    assert np.array_equal(dense[:, :k], reference.dequantize_nm24(pk).half().numpy()), f"seed {SEED}"


@triton.jit
def _stack16_probe(out_ptr):
    r = tl.arange(0, 4)
    z = r * 0
    w = te._stack16(z, z + 1, z + 2, z + 3, z + 4, z + 5, z + 6, z + 7,
                    z + 8, z + 9, z + 10, z + 11, z + 12, z + 13, z + 14, z + 15 + r * 16)
    tl.store(out_ptr + r[:, None] * 16 + tl.arange(0, 16)[None, :], w)


def test_stack16_keeps_column_order():
    # The PTX expansion's 16 output words go through _stack16; run it alone (interpreter on CPU).
    out = torch.zeros(4, 16, dtype=torch.int32, device=DEV)
    _stack16_probe[(1,)](out)
    expect = torch.arange(16, dtype=torch.int32).repeat(4, 1)
    expect[:, 15] += torch.arange(4, dtype=torch.int32) * 16
    assert torch.equal(out.cpu(), expect)
