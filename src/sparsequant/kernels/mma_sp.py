"""The sparse-tensor-core kernels (``cuda/mma_sp_tiled.cu``, ``cuda/mma_sp.cu``) behind ``kernels.linear``.

``MmaSpState(packed, device, dtype)`` builds the layout of ``mma_sp_layout.py`` once; calling it
with ``x [M, K]`` launches one kernel:

- the tiled kernel (default): activations and weights staged in shared memory through cp.async,
  B fragments by ldmatrix, a block = 128 output rows x ``bm`` tokens of a K range. ``tile_for(m)``
  picks the tile configuration (index into the table in mma_sp_tiled.cu, read back with
  ``tile_info``), ``MmaSpState.plan`` the split-K factor (enough blocks to fill the GPU);
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
#: Row tiles (16 rows) per block of the tiled kernel, every configuration (kRowTiles in the .cu).
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
def tile_info(tile: int) -> tuple[int, int]:
    """(tokens per block, threads per block) of tiled configuration ``tile``, from the library."""
    bm, th = ctypes.c_int(), ctypes.c_int()
    if cuda_build.library().sq_mma_sp_tile_info(tile, ctypes.byref(bm), ctypes.byref(th)) != 0:
        raise ValueError(f"unknown mma.sp tile configuration {tile}")
    return bm.value, th.value


def n_tiles() -> int:
    n = 0
    while cuda_build.library().sq_mma_sp_tile_info(n, ctypes.byref(ctypes.c_int()), ctypes.byref(ctypes.c_int())) == 0:
        n += 1
    return n


def tile_for(m: int) -> int:
    """The tiled configuration for ``m`` tokens (measured on an H100, benchmarks/KERNEL_NOTES.md).

    Up to 16 tokens 8 tokens per block (16 tokens as two token blocks measured as fast as one
    block of 16), up to 32 16 per block, beyond that 64; all with 4 stages (tiles 3-5, the same
    with 6-8 stages, measured slower in run 15 and are kept only for the benchmark sweep).
    """
    return 0 if m <= 16 else 1 if m <= 32 else 2


@lru_cache(maxsize=None)
def _occupancy(bits: int, bf16: bool, gps: int, tile: int, device_index: int) -> tuple[int, int]:
    bps, sms = ctypes.c_int(), ctypes.c_int()
    with torch.cuda.device(device_index):
        cuda_build.check(cuda_build.library().sq_mma_sp_tiled_occupancy(bits, int(bf16), gps, tile, ctypes.byref(bps),
                                                                         ctypes.byref(sms)))
    return bps.value, sms.value


def choose_splits(tiles: int, target: int, max_splits: int) -> int:
    """Split-K factor for ``tiles`` output tiles when ``target`` blocks fill the GPU (all SMs at
    full occupancy): as many splits as keep the blocks within one such wave. Run 1 measured the
    best split near this for every shape and token count (e.g. 64 tiles, 528 slots: 8-10 splits;
    172 tiles: 3), and more splits than that slower (a second partial wave plus the fix-up).
    """
    return max(1, min(max_splits, target // max(tiles, 1)))


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
        """(tile configuration, split-K factor) for ``m`` tokens."""
        tile = tile_for(m) if tile is None else tile
        key = (m, tile)
        if key not in self._plans:
            lay = self.layout
            bm, _ = tile_info(tile)
            tiles = -(-lay.rt // TILE_ROW_TILES) * -(-m // bm)
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            bps, sms = _occupancy(lay.bits, self.dtype == torch.bfloat16, lay.gps, tile, idx)
            cap = min(MAX_SPLITS, lay.s) if tiles <= self.cnt.numel() else 1
            # A configuration that fits one block per SM did best with two waves (run 15: 64 tiles
            # at 128 tokens, 4 splits 75.8 us vs 2 splits 84 us), the others with one.
            self._plans[key] = choose_splits(tiles, sms * max(bps, 2), cap)
        return tile, self._plans[key]

    def __call__(self, x2d: torch.Tensor, out: torch.Tensor | None = None, tile: int | None = None,
                 splits: int | None = None) -> torch.Tensor:
        """``x2d @ W^T`` through the tiled kernel (``tile``/``splits`` override the plan)."""
        x2d, y = self._check(x2d, out)
        m = x2d.shape[0]
        if m == 0:
            return y
        lay = self.layout
        tile, auto_splits = self.plan(m, tile)
        bm, _ = tile_info(tile)
        splits = auto_splits if splits is None else splits
        tiles = -(-lay.rt // TILE_ROW_TILES) * -(-m // bm)
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
