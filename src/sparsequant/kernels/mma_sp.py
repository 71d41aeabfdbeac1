"""The sparse-tensor-core kernel (``cuda/mma_sp.cu``) behind ``kernels.linear`` on Hopper.

``MmaSpState(packed, device, dtype)`` builds the layout of ``mma_sp_layout.py`` once; calling it
with ``x [M, K]`` launches one kernel. ``config_for(m, rt)`` picks the launch shape: NT n-tiles of
8 tokens per warp, and how the 8 warps of a block split into row tiles (WR) and K-slices (8 / WR).
"""
from __future__ import annotations

import torch

from . import cuda_build
from .mma_sp_layout import MmaSpLayout, build_mma_sp_layout, groups_per_supertile

#: Token counts above which the kernel is not used (dispatch in kernels/__init__.py).
MAX_TOKENS = 512


def supported(packed, device, dtype) -> bool:
    """True when the mma.sp kernel can run this weight: a Hopper GPU, fp16/bf16, symmetric int4/int8 2:4."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available() or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(dev) != (9, 0):
        return False  # built for sm_90a only
    q = packed.quant
    return (packed.storage == "nm24" and q is not None and q.bits in (4, 8) and q.symmetric
            and groups_per_supertile(packed) is not None)


def config_for(m: int, rt: int) -> tuple[int, int]:
    """(NT, WR) for ``m`` tokens and ``rt`` 16-row tiles (measured on an H100, BENCHMARKS.md)."""
    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    # Few tokens: the weight stream dominates, so split K over all 8 warps to have many loads in
    # flight; more tokens: more row tiles per block share the activations through L1.
    wr = 1 if m <= 16 else 2 if m <= 64 else 4
    while wr > 1 and -(-rt // wr) * -(-m // (8 * nt)) < 132:
        wr //= 2  # keep at least one block per SM
    return nt, wr


class MmaSpState:
    """A 2:4 int4/int8 weight prepared for the mma.sp kernel."""

    def __init__(self, packed, device, dtype: torch.dtype, layout: MmaSpLayout | None = None):
        self.lib = cuda_build.library()  # build (or load) first: a failure leaves no half state
        self.layout = layout if layout is not None else build_mma_sp_layout(packed, device)
        self.dtype = dtype
        self.device = torch.device(device)
        self.kind = f"nm24-w{self.layout.bits}a16-mma.sp"

    def __call__(self, x2d: torch.Tensor, nt: int | None = None, wr: int | None = None,
                 out: torch.Tensor | None = None, max_blocks: int = 0) -> torch.Tensor:
        lay = self.layout
        m, k = x2d.shape
        if k != lay.k:
            raise ValueError(f"input has {k} features, the weight expects {lay.k}")
        if x2d.dtype != self.dtype:
            raise TypeError(f"prepared for {self.dtype} activations, got {x2d.dtype}")
        x2d = x2d.contiguous()
        y = torch.empty(m, lay.n, dtype=self.dtype, device=x2d.device) if out is None else out
        if y.shape != (m, lay.n) or y.dtype != self.dtype or not y.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {(m, lay.n)}")
        if m == 0:
            return y
        cnt, cwr = config_for(m, lay.rt)
        nt, wr = nt or cnt, wr or cwr
        stream = torch.cuda.current_stream(x2d.device).cuda_stream
        rc = self.lib.sq_mma_sp_linear(
            lay.qw.data_ptr(), lay.meta.data_ptr(), lay.sc.data_ptr(), x2d.data_ptr(), y.data_ptr(),
            m, lay.n, lay.k, lay.rt, lay.s, lay.bits, int(self.dtype == torch.bfloat16), lay.gps, nt, wr, max_blocks, stream)
        cuda_build.check(rc)
        return y


def probe(device="cuda") -> tuple[list, list]:
    """Read the hardware's metadata and B-fragment placement (see probe_kernel in mma_sp.cu).

    Returns ``(meta, b)``: ``meta[sel][lane][nibble]`` = (row, chunk) that nibble of that lane's
    metadata word describes under that selector, or None when the hardware ignores it;
    ``b[lane][elem]`` = (k, n) of B element ``elem`` (register elem // 2, half elem % 2).
    """
    lib = cuda_build.library()
    mo = torch.full((2, 32, 8, 16), float("nan"), device=device)
    bo = torch.full((2, 32, 8, 8), float("nan"), device=device)
    cuda_build.check(lib.sq_mma_sp_probe(mo.data_ptr(), bo.data_ptr(), torch.cuda.current_stream().cuda_stream))
    torch.cuda.synchronize()
    mo, bo = mo.cpu(), bo.cpu()
    meta = [[[None] * 8 for _ in range(32)] for _ in range(2)]
    for sel in range(2):
        for lane in range(32):
            for j in range(8):
                d = mo[sel, lane, j]
                hit = (d != 0).nonzero().flatten().tolist()
                if len(hit) == 1:
                    meta[sel][lane][j] = (hit[0], int(round(float(d[hit[0]]) / 2)) - 1)
                elif hit:
                    meta[sel][lane][j] = ("multi", d.tolist())
    b = [[None] * 8 for _ in range(32)]
    for lane in range(32):
        for i in range(8):
            for var in range(2):
                d = bo[var, lane, i]
                hit = (d != 0).nonzero().flatten().tolist()
                if len(hit) == 1:
                    val = int(round(float(d[hit[0]])))  # 2c + v + 1
                    c, v = (val - 1) // 2, (val - 1) % 2
                    b[lane][i] = (4 * c + v + 2 * var, hit[0])
    return meta, b


def expected_probe() -> tuple[list, list]:
    """What ``probe`` returns when the hardware places operands as mma_sp_layout assumes."""
    from .mma_sp_layout import META_NIBBLES

    meta = [[[None] * 8 for _ in range(32)] for _ in range(2)]
    for sel in range(2):
        for lane in range(32):
            g, tig = lane // 4, lane % 4
            if tig // 2 != sel:
                continue
            for j, (row_off, chunk) in enumerate(META_NIBBLES[tig % 2]):
                meta[sel][lane][j] = (g + row_off, chunk)
    b = [[(8 * (i // 2) + 2 * (lane % 4) + i % 2, lane // 4) for i in range(8)] for lane in range(32)]
    return meta, b
