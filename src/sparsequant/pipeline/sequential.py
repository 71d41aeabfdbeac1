"""The sequential calibration engine: one decoder layer at a time.

For each layer: hooks collect input statistics of its linears while the (still dense) layer runs
on the calibration batches; the solvers compress each linear; the compressed layer runs again
and its outputs become the next layer's inputs, so later layers calibrate on what the
compressed model really produces. With ``true_sequential`` the linears are compressed group by
group (q/k/v, then o, then gate/up, then down), each group seeing the outputs of the groups
already compressed. Memory holds one layer, its statistics and the calibration hidden states
(kept on the CPU when computing on a GPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from ..progress import progress_bar

from ..checkpoint.packed import PackedWeight
from ..models.families import decoder_layers, family_of, layer_linears, layers_prefix
from ..recipe import Recipe
from ..solvers import compress_weight
from ..solvers.base import CompressedWeight
from .capture import LayerInputs, capture_layer_inputs, layer_output, move_kwargs
from .stats import StatsHooks, input_groups
from .variance_correction import MomentHooks, correct, set_bias

ERROR_TOKENS = 2048  # inputs kept per linear to measure its exact output error


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # ||(W - W') X|| / ||W X|| on calibration inputs of this linear
    seconds: float
    bits_per_weight: float
    info: dict = field(default_factory=dict)


@dataclass
class LayerReport:
    index: int
    rel_error: float  # ||Y - Y'|| / ||Y|| of the whole decoder layer on calibration inputs
    seconds: float
    recovery: dict = field(default_factory=dict)  # blockwise fine-tuning: loss before/after, steps


@dataclass
class CompressionResult:
    model: nn.Module
    recipe: Recipe
    packed: dict[str, PackedWeight]
    linears: list[LinearReport]
    layers: list[LayerReport]
    storage_dtype: torch.dtype
    seconds: float


class _InputSampler:
    """Keeps the first ERROR_TOKENS input rows a linear sees (for its exact error)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self.count = {n: 0 for n in linears}
        self.handles = [lin.register_forward_hook(self._hook(n)) for n, lin in linears.items()]

    def _hook(self, name):
        def hook(mod, inp, out):
            if self.count[name] >= ERROR_TOKENS:
                return
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])[: ERROR_TOKENS - self.count[name]]
            self.rows[name].append(x.float())
            self.count[name] += x.shape[0]

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def sample(self, name) -> torch.Tensor:
        return torch.cat(self.rows[name])


def _rel_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor, bias_change: torch.Tensor | None = None) -> float:
    ref = x @ w.float().T
    err = x @ (w.float() - w_new.float()).T
    if bias_change is not None:  # variance correction adds or changes a bias
        err = err - bias_change.float()
    return float(err.norm() / ref.norm().clamp_min(1e-30))


def storage_dtype_for(model: nn.Module) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


@torch.no_grad()
def compress_model(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor, *, device=None,
                   progress: bool = True) -> CompressionResult:
    """Compress ``model`` in place following ``recipe``; return packed weights and reports."""
    t_start = time.perf_counter()
    model.eval()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    offload = device.type == "cuda"
    store = torch.device("cpu") if offload else device
    storage_dtype = storage_dtype_for(model)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    family = family_of(model)
    if recipe.smoothing is not None:
        from .equalize import check_smoothable

        check_smoothable(model, family)

    # The embedding stage runs where the model lives; the layers are moved one by one.
    if offload:
        _move_except(model, layers, device)
    inputs: LayerInputs = capture_layer_inputs(model, calib_ids, recipe.calibration.batch_size, store)
    if offload:
        _move_except(model, layers, home)

    packed: dict[str, PackedWeight] = {}
    linear_reports: list[LinearReport] = []
    layer_reports: list[LayerReport] = []
    hidden = inputs.hidden
    bar = progress_bar(total=len(layers), desc="compress", unit="layer", enabled=bool(progress))
    for index, layer in enumerate(layers):
        t_layer = time.perf_counter()
        layer.to(device)
        kwargs = [move_kwargs(kw, device) for kw in inputs.kwargs[index]]
        if recipe.smoothing is not None:
            from .equalize import equalize_layer

            equalize_layer(layer, family, hidden, kwargs, recipe.smoothing, device)
        linears = layer_linears(layer)
        plans = {n: recipe.plan_for(f"{prefix}.{index}.{n}") for n in linears}
        targets = {n: lin for n, lin in linears.items() if plans[n] is not None}
        if recipe.true_sequential and targets:
            groups = [[n for n in g if n in targets] for g in
                      input_groups(layer, targets, hidden[0].to(device), kwargs[0])]
            groups = [g for g in groups if g]
        else:
            groups = [list(targets)]
        dense_out: list[torch.Tensor] | None = None
        vc_mode = recipe.recovery.variance_mode
        layer_cws: dict[str, CompressedWeight] = {}  # for blockwise fine-tuning
        for gi, group in enumerate(groups):
            group_linears = {n: targets[n] for n in group}
            hessian_for = {n for n in group if plans[n].needs_hessian}
            sampler = _InputSampler(group_linears)
            moments = MomentHooks(group_linears) if vc_mode else contextlib.nullcontext()
            try:
                with StatsHooks(group_linears, hessian_for, device) as hooks, moments:
                    outs = [layer_output(layer, h.to(device), kw).to(store) for h, kw in zip(hidden, kwargs)]
            finally:
                sampler.remove()
            if gi == 0:
                dense_out = outs
            stats = hooks.results()
            for name in group:
                lin = group_linears[name]
                full = f"{prefix}.{index}.{name}"
                t0 = time.perf_counter()
                info: dict = {}
                w_old = lin.weight.detach().clone()
                cw = compress_weight(lin.weight.detach(), stats[name], plans[name], storage_dtype, info=info)
                b_old = None if lin.bias is None else lin.bias.detach().float().clone()
                if vc_mode:
                    mean_x, cov_x = moments.mean_cov(name)
                    cw, b_new, info["variance_correction"] = correct(w_old, b_old, cw, mean_x, cov_x, vc_mode,
                                                                     storage_dtype)
                    set_bias(lin, b_new)
                layer_cws[name] = cw
                lin.weight.data.copy_(cw.effective_weight().to(lin.weight.dtype))
                pw = PackedWeight.from_compressed(cw, storage_dtype)
                packed[full] = dataclasses.replace(pw, tensors={k: v.cpu() for k, v in pw.tensors.items()})
                seconds = time.perf_counter() - t0
                bias_change = None if lin.bias is None else lin.bias.detach().float() - (0 if b_old is None else b_old)
                err = _rel_error(w_old, lin.weight.detach(), sampler.sample(name).to(device), bias_change)
                linear_reports.append(LinearReport(full, cw.shape, err, seconds, pw.bits_per_weight(),
                                                   _flat_info(info)))
            del stats, hooks
        recovery: dict = {}
        if recipe.recovery.finetune_steps > 0 and layer_cws:
            recovery = _finetune_layer(layer, targets, layer_cws, hidden, dense_out, kwargs, recipe, storage_dtype,
                                       device, progress, index, packed, f"{prefix}.{index}")
        if dense_out is None:  # nothing to compress in this layer
            dense_out = [layer_output(layer, h.to(device), kw).to(store) for h, kw in zip(hidden, kwargs)]
            hidden_next = dense_out
        else:
            hidden_next = [layer_output(layer, h.to(device), kw).to(store) for h, kw in zip(hidden, kwargs)]
        num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(hidden_next, dense_out))
        den = sum(float(b.float().pow(2).sum()) for b in dense_out)
        layer_err = (num / max(den, 1e-30)) ** 0.5
        hidden = hidden_next
        if offload:
            layer.to(home)
        layer_reports.append(LayerReport(index, layer_err, time.perf_counter() - t_layer, recovery))
        bar.set_postfix_str(f"layer {index} rel.err {layer_err:.4f}")
        bar.update(1)
    bar.close()
    round_uncompressed_to_storage(model, set(packed), storage_dtype)
    return CompressionResult(model, recipe, packed, linear_reports, layer_reports, storage_dtype,
                             time.perf_counter() - t_start)


def _finetune_layer(layer, targets, layer_cws, hidden, dense_out, kwargs, recipe, storage_dtype, device, progress,
                    index, packed, layer_prefix) -> dict:
    """Blockwise fine-tuning of one compressed layer; repacks what changed; returns its report."""
    from .block_finetune import finetune_block

    rec = recipe.recovery
    ft = finetune_block(layer, {n: targets[n] for n in layer_cws}, layer_cws, hidden, dense_out, kwargs,
                        steps=rec.finetune_steps, lr=rec.finetune_lr, windows_per_step=rec.finetune_batch,
                        storage_dtype=storage_dtype, device=device, progress=progress,
                        desc=f"finetune layer {index}")
    if ft.kept:
        for name, cw in ft.weights.items():
            pw = PackedWeight.from_compressed(cw, storage_dtype)
            packed[f"{layer_prefix}.{name}"] = dataclasses.replace(pw, tensors={k: v.cpu() for k, v in pw.tensors.items()})
    return {"finetune_steps": ft.steps, "finetune_mse_before": ft.loss_before, "finetune_mse_after": ft.loss_after,
            "finetune_rel_before": ft.rel_before, "finetune_rel_after": ft.rel_after, "finetune_kept": ft.kept}


def _move_except(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every parameter and buffer outside the decoder layers (embeddings, rotary, norms)."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m._apply(lambda t: t.to(device), recurse=False)


def _flat_info(info: dict, prefix: str = "") -> dict:
    """Solver diagnostics as a flat dict of JSON-friendly values ("joint.damp": 0.01, ...)."""
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out.update(_flat_info(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[f"{prefix}{k}"] = float(v)
        elif _jsonable(v):
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def round_uncompressed_to_storage(model: nn.Module, compressed: set[str], storage_dtype: torch.dtype) -> None:
    """Round every tensor the checkpoint stores as-is to its storage dtype, in memory too, so the
    saved checkpoint reproduces this model exactly."""
    compressed_weights = {f"{n}.weight" for n in compressed}
    for name, p in model.named_parameters():
        if name not in compressed_weights and p.dtype != storage_dtype and p.is_floating_point():
            p.data.copy_(p.data.to(storage_dtype).to(p.dtype))
