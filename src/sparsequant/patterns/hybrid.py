"""Hybrid tiles: every tile of ``W[N, K]`` is either fully kept (dense) or 2:4, under a global budget.

Tiles. The grid cuts ``W`` into tiles of ``tile = (tr, tc)`` weights, row-major; the last tile row
has ``N mod tr`` rows and the last tile column ``K mod tc`` columns when those are nonzero (the
default model's 576-wide inputs hold 4 full 128-wide tiles and one 64-wide tile). ``tc`` is a
multiple of 8 and ``K`` must be too, so every tile row of a 2:4 tile holds whole metadata bytes.

Budget. A 2:4 tile prunes exactly half of its weights, so the achievable pruned counts are
``P = sum(area(t)/2 for t chosen)``. For a target sparsity ``s`` the pattern prunes exactly
``hybrid_budget(shape, tile, s)`` weights: the achievable ``P`` closest to ``s * N * K`` (``s``
read as the decimal it was written as), the smaller one on a tie. It depends only on the shape,
the tile and ``s``, so a validator can check a mask against it without the scores.

Selection. Each tile has a cost: the error of pruning it to its best 2:4 mask under a per-weight
saliency ``w^2 * c_j`` (OBS: ``c_j = 1 / [H^-1]_jj`` of the damped Hessian; without a Hessian the
diagonal approximation ``c_j = ||x_j||^2``, i.e. Wanda's score squared; magnitude: ``c_j = 1``),
summed over the two weights of every group of four with the smallest saliency. Among all tile
sets that prune exactly the budget, ``select_tiles`` returns the one of least total cost (tiles
of equal size are interchangeable, so it takes the cheapest ones of each size and enumerates how
many of each size, which is exact because edge tiles come in at most four sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import PatternError
from .masks import nm_mask
from .spec import SparsitySpec


@dataclass(frozen=True)
class TileGrid:
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @classmethod
    def of(cls, shape: tuple[int, int], tile: tuple[int, int]) -> "TileGrid":
        rows, cols = (int(v) for v in shape)
        tr, tc = (int(v) for v in tile)
        if rows < 1 or cols < 1:
            raise PatternError(f"a hybrid-tile weight needs a nonempty shape, got {tuple(shape)}")
        if tc % 8:
            raise PatternError(f"hybrid tile columns must be a multiple of 8, got tile {tile}")
        if cols % 8:
            raise PatternError(
                f"hybrid tiles need the input dimension to be a multiple of 8 (whole 2:4 metadata bytes "
                f"per tile row), got {cols}; choose another pattern or skip this layer"
            )
        return cls(rows, cols, tr, tc)

    @property
    def n_tile_rows(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def n_tile_cols(self) -> int:
        return -(-self.cols // self.tile_cols)

    @property
    def n_tiles(self) -> int:
        return self.n_tile_rows * self.n_tile_cols

    def tile_shape(self, i: int, j: int) -> tuple[int, int]:
        return (min(self.tile_rows, self.rows - i * self.tile_rows), min(self.tile_cols, self.cols - j * self.tile_cols))

    def bounds(self, i: int, j: int) -> tuple[slice, slice]:
        r0, c0 = i * self.tile_rows, j * self.tile_cols
        return slice(r0, min(r0 + self.tile_rows, self.rows)), slice(c0, min(c0 + self.tile_cols, self.cols))

    def areas(self) -> torch.Tensor:
        """int64 ``[R, C]``: the number of weights in each tile."""
        hr = torch.full((self.n_tile_rows,), self.tile_rows, dtype=torch.int64)
        hr[-1] = self.rows - (self.n_tile_rows - 1) * self.tile_rows
        wc = torch.full((self.n_tile_cols,), self.tile_cols, dtype=torch.int64)
        wc[-1] = self.cols - (self.n_tile_cols - 1) * self.tile_cols
        return hr[:, None] * wc[None, :]

    def expand(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-tile values ``[R, C]`` broadcast to every weight: ``[N, K]``."""
        if tuple(flags.shape) != (self.n_tile_rows, self.n_tile_cols):
            raise PatternError(f"tile flags {tuple(flags.shape)} do not fit a {self.n_tile_rows}x{self.n_tile_cols} grid")
        out = flags.repeat_interleave(self.tile_rows, 0)[: self.rows]
        return out.repeat_interleave(self.tile_cols, 1)[:, : self.cols]

    def sums(self, x: torch.Tensor, col_unit: int = 1) -> torch.Tensor:
        """Sum of ``x`` over each tile. ``x`` is ``[N, K / col_unit]`` (one entry per ``col_unit``
        input columns, e.g. per group of four), so tile columns span ``tile_cols / col_unit``."""
        tc = self.tile_cols // col_unit
        R, C = self.n_tile_rows, self.n_tile_cols
        pad_r = R * self.tile_rows - x.shape[0]
        pad_c = C * tc - x.shape[1]
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
        return x.reshape(R, self.tile_rows, C, tc).sum((1, 3))


def grid_for(spec: SparsitySpec, shape: tuple[int, int]) -> TileGrid:
    if spec.kind != "hybrid":
        raise PatternError(f"expected a hybrid spec, got {spec}")
    return TileGrid.of(shape, spec.tile)


def _size_classes(grid: TileGrid) -> list[tuple[int, torch.Tensor]]:
    """Tiles grouped by size: ``(pruned weights when 2:4, flat tile indices)``, largest class first."""
    areas = grid.areas().reshape(-1)
    classes = [(int(a) // 2, (areas == a).nonzero().reshape(-1)) for a in torch.unique(areas)]
    return sorted(classes, key=lambda c: -len(c[1]))


def _count_choices(classes, target: Fraction):
    """Every per-class count vector that could be closest to ``target``: all counts of the small
    classes, and for the largest class the two counts around what remains. Yields (pruned, counts)."""
    (big_half, big_idx), rest = classes[0], classes[1:]
    combos = [((), 0)]
    for half, idx in rest:
        combos = [(c + (x,), p + x * half) for c, p in combos for x in range(len(idx) + 1)]
    for counts, pruned in combos:
        ideal = (target - pruned) / big_half
        lo = min(max(int(ideal), 0), len(big_idx))  # int() truncates toward zero; clamped
        for x in {lo, min(lo + 1, len(big_idx))}:
            yield pruned + x * big_half, (x,) + counts


def hybrid_budget(shape: tuple[int, int], tile: tuple[int, int], sparsity: float) -> int:
    """The exact number of weights a hybrid pattern prunes (see the module docstring)."""
    grid = TileGrid.of(shape, tile)
    target = Fraction(str(sparsity)) * grid.rows * grid.cols
    return min((p for p, _ in _count_choices(_size_classes(grid), target)), key=lambda p: (abs(p - target), p))


def tile_costs(saliency: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """float64 ``[R, C]``: per tile, the saliency its best 2:4 mask prunes (the two smallest of
    every group of four). ``saliency`` is ``[N, K]``, nonnegative (``w^2 * c_j``)."""
    if tuple(saliency.shape) != (grid.rows, grid.cols):
        raise PatternError(f"saliency shape {tuple(saliency.shape)} differs from the grid's {(grid.rows, grid.cols)}")
    if not bool(torch.isfinite(saliency).all()) or bool((saliency < 0).any()):
        raise PatternError("tile saliency must be finite and nonnegative; check the weights and statistics")
    groups = saliency.double().reshape(grid.rows, grid.cols // 4, 4)
    pruned = groups.topk(2, dim=-1, largest=False).values.sum(-1)
    return grid.sums(pruned, col_unit=4)


def select_tiles(costs: torch.Tensor, grid: TileGrid, sparsity: float) -> torch.Tensor:
    """bool ``[R, C]``, True = 2:4: the least-cost tile set that prunes exactly the budget."""
    if tuple(costs.shape) != (grid.n_tile_rows, grid.n_tile_cols):
        raise PatternError(f"tile costs {tuple(costs.shape)} do not fit a {grid.n_tile_rows}x{grid.n_tile_cols} grid")
    if not 0.0 <= sparsity <= 0.5:
        raise PatternError(f"hybrid sparsity must be in [0, 0.5], got {sparsity}")
    classes = _size_classes(grid)
    flat = costs.reshape(-1).double().cpu()
    # Within a class the cheapest tiles go first (stable: ties by tile index).
    ordered = [idx[torch.sort(flat[idx], stable=True).indices] for _, idx in classes]
    prefix = [torch.cat([torch.zeros(1, dtype=torch.float64), flat[o].cumsum(0)]) for o in ordered]
    budget = hybrid_budget((grid.rows, grid.cols), (grid.tile_rows, grid.tile_cols), sparsity)
    best = None
    for pruned, counts in _count_choices(classes, Fraction(budget)):
        if pruned != budget:
            continue
        cost = sum(float(p[x]) for p, x in zip(prefix, counts))
        if best is None or cost < best[0]:
            best = (cost, counts)
    flags = torch.zeros(grid.n_tiles, dtype=torch.bool)
    for o, x in zip(ordered, best[1]):
        flags[o[:x]] = True
    return flags.reshape(grid.n_tile_rows, grid.n_tile_cols).to(costs.device)


def hybrid_mask(scores: torch.Tensor, spec: SparsitySpec, saliency: torch.Tensor | None = None) -> torch.Tensor:
    """The hybrid mask for ``scores`` (higher = more important): 2:4 by ``scores`` inside the tiles
    ``select_tiles`` picks, every weight elsewhere. Tile costs use ``saliency`` when given, else
    ``scores ** 2`` (for magnitude and Wanda scores that is the diagonal-Hessian OBS error)."""
    grid = grid_for(spec, tuple(scores.shape))
    sal = scores.double().square() if saliency is None else saliency
    flags = select_tiles(tile_costs(sal, grid), grid, spec.sparsity)
    return nm_mask(scores, 2, 4) | ~grid.expand(flags)


def tile_flags(mask: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Prove ``mask`` is the hybrid pattern ``spec`` (each tile fully kept or exactly 2:4, and
    exactly ``hybrid_budget`` weights pruned); return the flags ``[R, C]`` (True = 2:4)."""
    if mask.dtype != torch.bool:
        raise PatternError(f"a mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise PatternError(f"a hybrid mask must be 2-D, got shape {tuple(mask.shape)}")
    grid = grid_for(spec, tuple(mask.shape))
    counts = mask.reshape(grid.rows, grid.cols // 4, 4).sum(-1)
    per_tile = grid.areas().to(mask.device) // 4
    n24 = grid.sums((counts == 2).to(torch.int64), col_unit=4)
    nfull = grid.sums((counts == 4).to(torch.int64), col_unit=4)
    bad = (n24 != per_tile) & (nfull != per_tile)
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise PatternError(
            f"mask is not hybrid: tile ({i}, {j}) is neither fully kept nor 2:4 "
            f"({int(n24[i, j])} groups of four keep two, {int(nfull[i, j])} keep four, of {int(per_tile[i, j])}); "
            f"{int(bad.sum())} tiles break the pattern"
        )
    flags = n24 == per_tile
    pruned = int(mask.numel() - mask.sum())
    budget = hybrid_budget(tuple(mask.shape), spec.tile, spec.sparsity)
    if pruned != budget:
        raise PatternError(
            f"hybrid mask prunes {pruned} weights; {spec} on {tuple(mask.shape)} prunes exactly {budget}"
        )
    return flags


def validate_hybrid(mask: torch.Tensor, spec: SparsitySpec) -> None:
    tile_flags(mask, spec)
