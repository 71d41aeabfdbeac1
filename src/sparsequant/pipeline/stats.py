"""Forward hooks that accumulate per-linear input statistics in float32."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NonFiniteWeightError
from ..solvers.base import LayerStats


class StatsAccumulator:
    """Sum of squares, absolute maximum and (optionally) X^T X of one linear's inputs."""

    def __init__(self, in_features: int, device, with_hessian: bool):
        self.n_tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.hessian = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if with_hessian else None
        )

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sq_sum.device, torch.float32)
        if not torch.isfinite(x).all():
            raise NonFiniteWeightError("a linear layer received NaN/Inf activations during calibration")
        self.n_tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)

    def result(self) -> LayerStats:
        return LayerStats(n_tokens=self.n_tokens, sq_sum=self.sq_sum, abs_max=self.abs_max, hessian=self.hessian)


class StatsHooks:
    """Context manager: hooks on the given linears, collecting StatsAccumulators by name."""

    def __init__(self, linears: dict[str, nn.Linear], hessian_for: set[str], device):
        self.linears = linears
        self.acc = {
            name: StatsAccumulator(lin.in_features, device, name in hessian_for) for name, lin in linears.items()
        }
        self._handles = []

    def __enter__(self):
        for name, lin in self.linears.items():
            acc = self.acc[name]
            self._handles.append(lin.register_forward_hook(lambda mod, inp, out, acc=acc: acc.add(inp[0])))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def results(self) -> dict[str, LayerStats]:
        return {name: acc.result() for name, acc in self.acc.items()}


def input_groups(layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears grouped by shared input tensor, in execution order (the true-sequential order).

    Found by running the layer once and noting which input each linear saw: q/k/v share one
    input, gate/up another, and so on, for any architecture.
    """
    from .capture import layer_output

    seen: list[tuple[torch.Tensor, str]] = []  # holding the tensors keeps their ids unique
    handles = [
        lin.register_forward_hook(lambda mod, inp, out, name=name: seen.append((inp[0], name)))
        for name, lin in linears.items()
    ]
    try:
        with torch.no_grad():
            layer_output(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    key_of: dict[int, int] = {}
    for tensor, name in seen:
        key = id(tensor)
        if key not in key_of:
            key_of[key] = len(groups)
            groups.append([])
        if name not in groups[key_of[key]]:
            groups[key_of[key]].append(name)
    missing = [n for n in linears if not any(n in g for g in groups)]
    if missing:
        groups.append(missing)  # linears never called in this forward still get compressed
    return groups
