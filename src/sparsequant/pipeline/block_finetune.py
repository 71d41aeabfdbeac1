"""Blockwise fine-tuning: after a decoder layer is compressed, tune what its checkpoint can still
represent so the layer's outputs approach the dense layer's on the calibration inputs.

Masks and quantization codes stay fixed. What moves: the float16 group scales of quantized
weights (``scale = s0 * exp(u)``, so a scale never changes sign and the step size is relative),
the kept values of unquantized sparse weights (``w = w0 + u * rms(row)`` on the mask), and the
bias (``b = b0 + u * std(channel output)``) where the linear has one (variance correction gives
LLaMA linears one). Adapters and outliers are held fixed. The objective is the mean squared error
between the compressed layer's outputs and the dense layer's on the same inputs, minimized with
Adam for a fixed number of steps. At the end every tuned value is rounded to what the checkpoint
stores (float16 scales, storage-dtype values and biases), the CompressedWeights are rebuilt and
validated, and the loss is measured again on all calibration windows with the rounded values; when
it did not go down, the layer is left exactly as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from ..progress import progress_bar

from ..errors import NonFiniteWeightError
from ..quant import QuantParams
from ..quant.rtn import _MAX_SCALE, _MIN_SCALE
from ..solvers.base import CompressedWeight
from .capture import layer_output


@dataclass
class FinetuneResult:
    weights: dict[str, CompressedWeight]  # the tuned weights (the inputs when ``kept`` is False)
    biases: dict[str, torch.Tensor | None]
    loss_before: float  # mean squared error of the layer output vs the dense output, all windows
    loss_after: float
    rel_before: float  # ||Y' - Y|| / ||Y||
    rel_after: float
    steps: int
    kept: bool  # whether the tuned values were kept (the loss went down)
    history: list[float] = field(default_factory=list)  # per-step training loss


def _slice_kwargs(kwargs: dict, rows: slice, batch: int) -> dict:
    """A slice of the windows of one calibration batch, applied to the layer kwargs too.

    Tensors of two or more dims whose first dim is the batch (attention masks, per-window
    position ids or rotary embeddings) are sliced; shared ones (first dim 1, 1-D cache positions)
    are kept.
    """

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[rows] if v.dim() >= 2 and v.shape[0] == batch and batch > 1 else v
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return {k: cut(v) for k, v in kwargs.items()}


class _Tunable:
    """The free parameters of one compressed linear and how they rebuild its weight and bias."""

    def __init__(self, cw: CompressedWeight, bias: torch.Tensor | None, out_std: torch.Tensor, device):
        self.cw = cw
        self.device = device
        self.extra = (cw.effective_weight() - cw.weight.float()).to(device)  # fixed recovery terms
        if cw.quant is not None:
            self.s0 = cw.qparams.scale.to(device)
            self.codes_w = cw.codes.float().to(device) - cw.qparams.expand()[1].to(device)  # weight / scale
            if cw.mask is not None:
                self.codes_w = self.codes_w * cw.mask.to(device)
            self.u = torch.zeros_like(self.s0, requires_grad=True)
        else:
            self.w0 = cw.weight.float().to(device)
            keep = torch.ones_like(self.w0) if cw.mask is None else cw.mask.float().to(device)
            self.keep = keep
            n_kept = keep.sum(1, keepdim=True).clamp_min(1)
            self.rms = ((self.w0 ** 2).sum(1, keepdim=True) / n_kept).sqrt().clamp_min(1e-8)
            self.u = torch.zeros_like(self.w0, requires_grad=True)
        self.b0 = None if bias is None else bias.float().to(device)
        self.b_unit = out_std.float().to(device).clamp_min(1e-6)
        self.ub = None if bias is None else torch.zeros_like(self.b0, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.u] + ([] if self.ub is None else [self.ub])

    def _scale(self) -> torch.Tensor:
        qp = self.cw.qparams
        s = (self.s0 * torch.exp(self.u)).clamp(_MIN_SCALE, _MAX_SCALE)
        g = qp.spec.effective_group(qp.in_features)
        return s.repeat_interleave(g, dim=1)[:, : qp.in_features]

    def weight(self) -> torch.Tensor:
        if self.cw.quant is not None:
            w = self.codes_w * self._scale()
        else:
            w = self.w0 + self.u * self.keep * self.rms
        return w + self.extra

    def bias(self) -> torch.Tensor | None:
        return None if self.b0 is None else self.b0 + self.ub * self.b_unit

    def realize(self, storage_dtype: torch.dtype) -> tuple[CompressedWeight, torch.Tensor | None]:
        """The tuned weight as the checkpoint stores it (rounded), validated, and the rounded bias."""
        cw = self.cw
        with torch.no_grad():
            if cw.quant is not None:
                qp = cw.qparams
                s = (self.s0 * torch.exp(self.u)).clamp(_MIN_SCALE, _MAX_SCALE).half().float()
                new = CompressedWeight.from_quantized(
                    cw.codes, QuantParams(s.to(cw.codes.device), qp.zero, qp.spec, qp.in_features), cw.sparsity, cw.mask)
            else:
                w = (self.w0 + self.u * self.keep * self.rms).to(cw.weight.device)
                new = CompressedWeight.from_float(w, cw.sparsity, cw.mask, storage_dtype)
            new.adapter, new.outliers = cw.adapter, cw.outliers
            bias = None if self.b0 is None else self.bias().to(storage_dtype).float()
        if not torch.isfinite(new.weight).all():
            raise NonFiniteWeightError("fine-tuning produced NaN/Inf weights; lower finetune_lr")
        return new.validate(), bias


def _write(linears: dict[str, nn.Linear], weights: dict[str, CompressedWeight], biases: dict) -> None:
    for name, lin in linears.items():
        lin.weight.data.copy_(weights[name].effective_weight().to(lin.weight.device, lin.weight.dtype))
        if biases.get(name) is not None:
            lin.bias.data.copy_(biases[name].to(lin.bias.device, lin.bias.dtype))


@torch.no_grad()
def _layer_loss(layer, hidden, targets, kwargs, device) -> tuple[float, float]:
    """(mean squared error, relative error) of the layer's outputs against ``targets``."""
    num = den = 0.0
    count = 0
    for h, t, kw in zip(hidden, targets, kwargs):
        out = layer_output(layer, h.to(device), kw).float()
        t = t.to(device).float()
        num += float((out - t).pow(2).sum())
        den += float(t.pow(2).sum())
        count += t.numel()
    return num / max(count, 1), (num / max(den, 1e-30)) ** 0.5


@torch.no_grad()
def _output_std(layer, linears: dict[str, nn.Linear], h, kw) -> dict[str, torch.Tensor]:
    """Per-channel output std of each linear on one batch (the unit of its bias steps)."""
    stds: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(mod, inp, out):  # returns None: a forward hook's return value would replace the output
            stds.setdefault(name, out.detach().reshape(-1, out.shape[-1]).float().std(0))

        return record

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    try:
        layer_output(layer, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    return {n: stds.get(n, torch.ones(lin.out_features, device=h.device)) for n, lin in linears.items()}


def _train(layer, linears, tunables, optimizer, hidden, targets, kwargs, chunks, steps, device, bar, history):
    """Adam steps, each on the next chunk of calibration windows (cycling)."""
    with torch.enable_grad():
        for step in range(steps):
            b, rows = chunks[step % len(chunks)]
            h = hidden[b][rows].detach().to(device)
            t = targets[b][rows].detach().to(device).float()
            kw = _slice_kwargs(kwargs[b], rows, hidden[b].shape[0])
            params = {}
            for n, tun in tunables.items():
                params[f"{n}.weight"] = tun.weight().to(linears[n].weight.dtype)
                if tun.ub is not None:
                    params[f"{n}.bias"] = tun.bias().to(linears[n].weight.dtype)
            out = torch.func.functional_call(layer, params, (h,), kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = (out.float() - t).pow(2).mean()
            if not torch.isfinite(loss):
                raise NonFiniteWeightError("fine-tuning loss became NaN/Inf; lower finetune_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            bar.set_postfix_str(f"mse {history[-1]:.3g}")
            bar.update(1)


def finetune_block(layer: nn.Module, linears: dict[str, nn.Linear], weights: dict[str, CompressedWeight],
                   hidden: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict], *, steps: int,
                   lr: float, windows_per_step: int, storage_dtype: torch.dtype, device, progress: bool = True,
                   desc: str = "finetune") -> FinetuneResult:
    """Tune the compressed ``linears`` of ``layer`` (names relative to the layer, their compressed
    weights in ``weights``) towards ``targets`` (the dense layer's outputs on ``hidden``).

    ``kwargs`` are the layer's keyword arguments per calibration batch, already on ``device``.
    On return the layer holds the tuned (or, when tuning did not help, the original) values.
    """
    device = torch.device(device)
    biases = {n: None if lin.bias is None else lin.bias.detach().float().clone() for n, lin in linears.items()}
    loss_before, rel_before = _layer_loss(layer, hidden, targets, kwargs, device)
    chunks = [(b, slice(s, s + windows_per_step)) for b, h in enumerate(hidden)
              for s in range(0, h.shape[0], windows_per_step)]
    stds = _output_std(layer, linears, hidden[0].to(device), kwargs[0])
    tunables = {n: _Tunable(weights[n], biases[n], stds[n], device) for n in linears}
    optimizer = torch.optim.Adam([p for t in tunables.values() for p in t.params()], lr=lr)
    history: list[float] = []
    bar = progress_bar(total=steps, desc=desc, unit="step", leave=False, enabled=bool(progress))
    frozen = [(p, p.requires_grad) for p in layer.parameters()]  # only the tunables get gradients
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        _train(layer, linears, tunables, optimizer, hidden, targets, kwargs, chunks, steps, device, bar, history)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        bar.close()
    tuned_w, tuned_b = {}, {}
    for n, tun in tunables.items():
        tuned_w[n], tuned_b[n] = tun.realize(storage_dtype)
    _write(linears, tuned_w, tuned_b)
    loss_after, rel_after = _layer_loss(layer, hidden, targets, kwargs, device)
    if loss_after < loss_before:
        return FinetuneResult(tuned_w, tuned_b, loss_before, loss_after, rel_before, rel_after, steps, True, history)
    _write(linears, weights, biases)
    return FinetuneResult(dict(weights), biases, loss_before, loss_after, rel_before, rel_after, steps, False, history)
