"""Name -> solver tables. Each solver is a pure function of tensors; the pipeline looks them up here.

A pruner maps ``(weight, stats, sparsity, **options) -> (weight, mask)``; it may update kept
weights (SparseGPT does). A quantizer maps ``(weight, stats, quant_spec, mask, **options) ->
(codes, qparams)`` and must keep pruned weights pruned. A joint solver maps ``(weight, stats,
sparsity, quant_spec, **options) -> (codes, qparams, mask)`` and prunes and quantizes together.
Each entry declares the option names it takes; solvers raise RecipeError on any other name. A
solver may also take ``info=<dict>`` and fill it with diagnostics (damping used, loss, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import RecipeError


@dataclass(frozen=True)
class SolverEntry:
    fn: Callable
    needs_hessian: bool
    needs_stats: bool
    summary: str
    options: frozenset = frozenset()


PRUNERS: dict[str, SolverEntry] = {}
QUANTIZERS: dict[str, SolverEntry] = {}
JOINT: dict[str, SolverEntry] = {}


def register(
    table: dict,
    name: str,
    fn: Callable,
    *,
    needs_hessian: bool,
    needs_stats: bool,
    summary: str,
    options: tuple[str, ...] = (),
):
    table[name] = SolverEntry(fn, needs_hessian, needs_stats, summary, frozenset(options))


def lookup(table: dict, name: str, what: str) -> SolverEntry:
    try:
        return table[name]
    except KeyError:
        raise RecipeError(f"unknown {what} {name!r}; available: {', '.join(sorted(table))}") from None
