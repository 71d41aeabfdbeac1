"""Random quantized hybrid-tile weights in the checkpoint format, for kernel tests and benchmarks."""
from __future__ import annotations

import torch

from ..checkpoint.packed import PackedWeight
from ..patterns import SparsitySpec, nm_mask
from ..patterns.hybrid import grid_for, select_tiles
from ..quant import QuantSpec, quantize_rtn
from ..solvers.base import CompressedWeight


def random_packed_hybrid(n: int, k: int, sparsity: float = 0.25, tile=(128, 128), bits: int = 4,
                         group_size: int | None = 128, symmetric: bool = True, device="cpu", seed: int = 0,
                         flags: torch.Tensor | None = None) -> PackedWeight:
    """A 'hybrid' PackedWeight of a random Gaussian weight: random tiles 2:4 (exactly the budget of
    ``sparsity``, or the given ``flags [R, C]``), magnitude 2:4 inside them, RTN-quantized."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device=device) * 0.05
    if flags is not None:
        # The sparsity the given flags prune: the spec's budget then is exactly their count.
        grid = grid_for(SparsitySpec(kind="hybrid", sparsity=0.0, tile=tuple(tile)), (n, k))
        pruned = int((grid.areas() * flags.cpu().to(torch.int64)).sum()) // 2
        sparsity = pruned / (n * k)
    spec = SparsitySpec(kind="hybrid", sparsity=sparsity, tile=tuple(tile))
    grid = grid_for(spec, (n, k))
    if flags is None:
        costs = torch.rand(grid.n_tile_rows, grid.n_tile_cols, generator=torch.Generator().manual_seed(seed))
        flags = select_tiles(costs, grid, sparsity)
    in_24 = grid.expand(flags.to(device).bool())
    mask = nm_mask(w.abs() + torch.rand(n, k, generator=gen, device=device) * 1e-3, 2, 4) | ~in_24
    q = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    codes, params = quantize_rtn(w * mask, q, mask)
    return PackedWeight.from_compressed(CompressedWeight.from_quantized(codes, params, spec, mask))
