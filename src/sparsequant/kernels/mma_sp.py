"""The sparse-tensor-core kernels (``cuda/mma_sp_tiled.cu``, ``cuda/mma_sp.cu``) behind ``kernels.linear``.

``MmaSpState(packed, device, dtype)`` builds the layout of ``mma_sp_layout.py`` once; calling it
with ``x [M, K]`` launches one kernel:

- the tiled kernel (default): activations and weights staged in shared memory through cp.async,
  B fragments by ldmatrix, a block = 128 or 256 output rows x ``bm`` tokens of a K range.
  ``plan_for`` picks the tile configuration (index into the table in mma_sp_tiled.cu, mirrored in
  ``TILES``) and the split-K factor from the token count and the weight's shape (fitted to
  measurements, benchmarks/KERNEL_NOTES.md);
- ``MmaSpState.skinny`` (1-8 tokens): one warp per 16-row tile and K slice, each warp streaming
  its slice through its own ring of shared-memory slots (cp.async), the K slices of a row tile
  added in shared memory at the end: no global split-K workspace, atomics or fix-up. ``skinny_plan``
  picks the K slices per row tile and the (warps, ring depth) configuration (``SKINNY_CONFIGS``,
  the table in mma_sp_skinny.cu);
- ``MmaSpState.direct``: the first kernel, B fragments straight from global memory (``config_for``
  picks NT n-tiles of 8 tokens per warp and WR row tiles per block); no longer dispatched (slower
  than the tiled one from 2 tokens on, BENCHMARKS.md), kept for comparison in the benchmark.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from . import cuda_build
from .mma_sp_layout import MmaSpLayout, build_mma_sp_layout, groups_per_supertile

#: Token counts above which the kernels are not used (dispatch in kernels/__init__.py).
MAX_TOKENS = 512
#: Fewest row tiles (16 rows) per block of any tiled configuration (8 or 16, ``tile_info``): sizes
#: the split-K counters.
TILE_ROW_TILES = 8
#: Largest split-K factor the planner picks.
MAX_SPLITS = 16


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
    """(NT, WR) of the direct kernel for ``m`` tokens and ``rt`` 16-row tiles (measured on an H100)."""
    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    # Few tokens: the weight stream dominates, so split K over all 8 warps to have many loads in
    # flight; more tokens: more row tiles per block share the activations through L1.
    wr = 1 if m <= 16 else 2 if m <= 64 else 4
    while wr > 1 and -(-rt // wr) * -(-m // (8 * nt)) < 132:
        wr //= 2  # keep at least one block per SM
    return nt, wr


@lru_cache(maxsize=None)
def tile_info(tile: int) -> tuple[int, int, int]:
    """(tokens per block, threads per block, row tiles per block) of tiled configuration ``tile``."""
    lib = cuda_build.library()
    bm, th = ctypes.c_int(), ctypes.c_int()
    if lib.sq_mma_sp_tile_info(tile, ctypes.byref(bm), ctypes.byref(th)) != 0:
        raise ValueError(f"unknown mma.sp tile configuration {tile}")
    return bm.value, th.value, lib.sq_mma_sp_tile_rows(tile)


def n_tiles() -> int:
    n = 0
    while cuda_build.library().sq_mma_sp_tile_info(n, ctypes.byref(ctypes.c_int()), ctypes.byref(ctypes.c_int())) == 0:
        n += 1
    return n


#: (tokens per block, row tiles per block) of the tiled configurations by index: the table in
#: mma_sp_tiled.cu, mirrored so the planner is plain Python (tests/test_kernels_cuda.py checks it
#: against the library). 0-2: 128 rows x 8/16/32 tokens, 8 warps splitting each step's k-tiles in
#: two; 3: 128 x 8, 4 warps (the first version's warp layout); 4: 256 rows x 32 tokens, 8 warps.
TILES = ((8, 8), (16, 8), (32, 8), (8, 8), (32, 16))
#: Weights with at least this many 128-row blocks count as tall (N >= 8192 at 64): their row tiles
#: alone give every SM a block, so the larger tiles run unsplit.
TALL_ROW_BLOCKS = 64


def tile_for(m: int, rt: int, s: int) -> int:
    """The tiled configuration for ``m`` tokens on a weight of ``rt`` row tiles and ``s`` super-tiles.

    Fitted to run 18's sweep (H100, five LLaMA shapes x 1-128 tokens x every tile and split in
    1/2/4/8/16; benchmarks/KERNEL_NOTES.md): the 4-warp 8-token tile up to 4 tokens and for tall
    weights up to 8; 8 tokens per block (two token blocks) at 9-16 tokens only for 4096x4096-like
    weights (K <= 4096, not tall); 16 per block for the rest up to 16 tokens and for wide weights up
    to 32; 32 per block beyond; 256-row blocks from 33 tokens where K > 4096 or (tall) from 65.
    """
    tall = -(-rt // 8) >= TALL_ROW_BLOCKS
    if m <= 4 or (m <= 8 and tall):
        return 3
    if m <= 8:
        return 0
    if m <= 16:
        return 0 if (s <= 32 and not tall) else 1
    if m <= 32:
        return 2 if tall else 1
    if tall:
        return 2 if m <= 64 else 4
    return 2 if s <= 32 else 4


def splits_for(tile: int, tiles: int, s: int, max_splits: int = 16) -> int:
    """Split-K factor for ``tiles`` output tiles of configuration ``tile`` over ``s`` K steps.

    Run 18's sweep: the small 4-warp tile did best at ~512 blocks (about 4 per SM), the 8-warp
    tiles at ~256, rounded down to a power of two, except that a larger tile that already has ~80+
    tiles ran fastest unsplit (a second block on an SM added no speed, only the split-K fix-up).
    """
    if tile != 3 and tiles >= 80:
        return 1
    target = 512 if tile == 3 else 256
    sp = 1
    while sp * 2 * tiles <= target:
        sp *= 2
    return max(1, min(sp, max_splits, s))


def plan_for(m: int, rt: int, s: int, max_splits: int = 16) -> tuple[int, int]:
    """(tile, splits) for ``m`` tokens on a weight of ``rt`` row tiles and ``s`` super-tiles."""
    tile = tile_for(m, rt, s)
    bm, rtb = TILES[tile]
    return tile, splits_for(tile, -(-rt // rtb) * -(-m // bm), s, max_splits)


#: Most tokens the skinny kernel takes (one 8-token n-tile of mma.sp).
SKINNY_MAX_TOKENS = 8
#: (warps per block, ring depth) of the skinny configurations by index: the table in
#: mma_sp_skinny.cu, mirrored so the planner is plain Python (a GPU test checks it).
SKINNY_CONFIGS = ((8, 8), (8, 4), (16, 8), (16, 4), (4, 4), (8, 2), (8, 3), (16, 2))
#: Shared memory a block may opt in to on an H100 (227 KB); the planner keeps a block at half of it
#: so that two blocks share an SM.
SMEM_OPTIN = 227 * 1024
#: The configuration the planner uses: 8 warps, a ring of 4 slots per warp (H100 run 1 of
#: bench_skinny.py: best or within a few % of the best of the 4 configurations x K slices on 25 of
#: the 28 (shape, tokens) points).
SKINNY_CFG = 1
#: At 1 token, weights with at least this many row tiles (N >= 8192) ran fastest with 4 K slices (2
#: row tiles per block), with at least SKINNY_TALLER_ROW_TILES (N >= 14336) with 2 (4 row tiles per
#: block), the others with 8 (H100 runs 1-2 of bench_skinny.py; e.g. 22016x4096: 16.8 / 19.4 / 18.5
#: us with 2 / 4 / 8 slices, 11008x4096: 12.1 / 10.3 / 11.5).
SKINNY_TALL_ROW_TILES = 512
SKINNY_TALLER_ROW_TILES = 896


def skinny_smem_bytes(bits: int, m: int, cfg: int) -> int:
    """Dynamic shared memory of skinny configuration ``cfg`` for ``m`` tokens (mirrors SlotShape)."""
    warps, depth = SKINNY_CONFIGS[cfg]
    x_off = 32 * (4 if bits == 4 else 8) * 4 + 256 + 128
    slot = -(-(x_off + m * 272) // 128) * 128
    return 256 + max(warps * depth * slot, warps * 32 * 16)


def skinny_plan(m: int, rt: int, s: int, bits: int = 4) -> tuple[int, int]:
    """(configuration, K slices per row tile) of the skinny kernel for ``m`` tokens on a weight of
    ``rt`` row tiles and ``s`` super-tiles (fitted to the H100 sweep, benchmarks/KERNEL_NOTES.md,
    "Skinny mma.sp kernel": within 1% of the sweep's best geomean at 1-8 tokens).

    8 K slices (one row tile per 8-warp block), at 1 token 4 or 2 on tall weights; never more slices
    than super-tiles.
    """
    if not 1 <= m <= SKINNY_MAX_TOKENS:
        raise ValueError(f"the skinny kernel takes 1..{SKINNY_MAX_TOKENS} tokens, got {m}")
    kw = 8
    if m == 1 and rt >= SKINNY_TALL_ROW_TILES:
        kw = 2 if rt >= SKINNY_TALLER_ROW_TILES else 4
    while kw > 1 and kw > s:
        kw //= 2
    return SKINNY_CFG, kw


class MmaSpState:
    """A 2:4 int4/int8 weight prepared for the mma.sp kernels."""

    def __init__(self, packed, device, dtype: torch.dtype, layout: MmaSpLayout | None = None):
        # The library is loaded (built) on the first launch; kernels.prepare loads it before it
        # builds this state, so a build failure there falls back to the Triton layout instead.
        self.layout = layout if layout is not None else build_mma_sp_layout(packed, device)
        self.dtype = dtype
        self.device = torch.device(device)
        self.kind = f"nm24-w{self.layout.bits}a16-mma.sp"
        # Split-K arrival counters, one per (row block, token block) up to 64 token blocks; zero
        # between launches (the last block of a tile resets its counter).
        self.cnt = torch.zeros(-(-self.layout.rt // TILE_ROW_TILES) * 64, dtype=torch.int32, device=self.device)
        self._plans: dict[tuple[int, int], int] = {}

    @property
    def lib(self):
        return cuda_build.library()

    def _check(self, x2d: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        if x2d.dim() != 2 or x2d.shape[1] != lay.k:
            raise ValueError(f"input must be [M, {lay.k}], got {tuple(x2d.shape)}")
        if x2d.dtype != self.dtype:
            raise TypeError(f"prepared for {self.dtype} activations, got {x2d.dtype}")
        if x2d.device != self.device and not (x2d.device.type == "cuda" and self.device.index is None):
            raise ValueError(f"input on {x2d.device}, weight on {self.device}")
        x2d = x2d.contiguous()
        if x2d.data_ptr() % 16:
            x2d = x2d.clone()  # cp.async reads 16-byte chunks: a fresh allocation is aligned
        m = x2d.shape[0]
        y = torch.empty(m, lay.n, dtype=self.dtype, device=x2d.device) if out is None else out
        if y.shape != (m, lay.n) or y.dtype != self.dtype or not y.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {(m, lay.n)}")
        return x2d, y

    def plan(self, m: int, tile: int | None = None) -> tuple[int, int]:
        """(tile configuration, split-K factor) for ``m`` tokens (``plan_for``; ``tile`` forces one)."""
        key = (m, tile)
        if key not in self._plans:
            lay = self.layout
            if tile is None:
                tile = tile_for(m, lay.rt, lay.s)
            bm, _, rtb = tile_info(tile)
            tiles = -(-lay.rt // rtb) * -(-m // bm)
            cap = MAX_SPLITS if tiles <= self.cnt.numel() else 1
            self._plans[key] = (tile, splits_for(tile, tiles, lay.s, cap))
        return self._plans[key]

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None, tile: int | None = None,
                 splits: int | None = None) -> torch.Tensor:
        """``x2d @ W^T`` through the tiled kernel (``tile``/``splits`` override the plan)."""
        x2d, y = self._check(x2d, out)
        m = x2d.shape[0]
        if m == 0:
            return y
        lay = self.layout
        tile, auto_splits = self.plan(m, tile)
        bm, _, rtb = tile_info(tile)
        splits = auto_splits if splits is None else splits
        tiles = -(-lay.rt // rtb) * -(-m // bm)
        if not 1 <= splits <= lay.s or (splits > 1 and tiles > self.cnt.numel()):
            raise ValueError(f"splits must be 1..{lay.s} (and 1 beyond {self.cnt.numel()} tiles), got {splits}")
        ws = torch.empty(splits * m * lay.n if splits > 1 else 0, dtype=torch.float32, device=x2d.device)
        stream = torch.cuda.current_stream(x2d.device).cuda_stream
        rc = self.lib.sq_mma_sp_tiled(
            lay.qw.data_ptr(), lay.meta.data_ptr(), lay.sc.data_ptr(), x2d.data_ptr(), y.data_ptr(),
            ws.data_ptr() if splits > 1 else None, self.cnt.data_ptr() if splits > 1 else None,
            m, lay.n, lay.k, lay.rt, lay.s, lay.bits, int(self.dtype == torch.bfloat16), lay.gps, tile, splits, stream)
        cuda_build.check(rc)
        return y

    def skinny(self, x2d: torch.Tensor, out: torch.Tensor | None = None, cfg: int | None = None,
               kw: int | None = None) -> torch.Tensor:
        """``x2d @ W^T`` for 1..8 tokens through the skinny kernel (``cfg``/``kw`` override the plan)."""
        x2d, y = self._check(x2d, out)
        m = x2d.shape[0]
        if m == 0:
            return y
        lay = self.layout
        if m > SKINNY_MAX_TOKENS:
            raise ValueError(f"the skinny kernel takes at most {SKINNY_MAX_TOKENS} tokens, got {m}")
        pcfg, pkw = skinny_plan(m, lay.rt, lay.s, lay.bits)
        cfg = pcfg if cfg is None else cfg
        kw = pkw if kw is None else kw
        if not 0 <= cfg < len(SKINNY_CONFIGS):
            raise ValueError(f"unknown skinny configuration {cfg}")
        warps = SKINNY_CONFIGS[cfg][0]
        if kw < 1 or warps % kw:
            raise ValueError(f"K slices must divide the block's {warps} warps, got {kw}")
        stream = torch.cuda.current_stream(x2d.device).cuda_stream
        rc = self.lib.sq_mma_sp_skinny(
            lay.qw.data_ptr(), lay.meta.data_ptr(), lay.sc.data_ptr(), x2d.data_ptr(), y.data_ptr(),
            m, lay.n, lay.k, lay.rt, lay.s, lay.bits, int(self.dtype == torch.bfloat16), lay.gps, cfg, kw, stream)
        cuda_build.check(rc)
        return y

    def direct(self, x2d: torch.Tensor, nt: int | None = None, wr: int | None = None,
               out: torch.Tensor | None = None, max_blocks: int = 0) -> torch.Tensor:
        """``x2d @ W^T`` through the first kernel (B fragments straight from global memory)."""
        x2d, y = self._check(x2d, out)
        m = x2d.shape[0]
        if m == 0:
            return y
        lay = self.layout
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
