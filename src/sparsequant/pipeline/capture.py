"""Capture what every decoder layer receives, without running the layers.

Each layer's forward is swapped for a recorder that stores its keyword arguments (attention
mask, rotary embeddings, position ids, ...) and returns the hidden states unchanged, so one
cheap pass through the embeddings yields the first layer's inputs and every layer's kwargs.
Recording per layer matters: Gemma and Qwen give sliding-window layers a different mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.families import decoder_layers


class _Recorded(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration batches for the layer in flight: hidden states plus each layer's kwargs."""

    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: list[list[dict]]  # kwargs[layer][batch]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def move_kwargs(kwargs: dict, device) -> dict:
    return {k: _to(v, device) for k, v in kwargs.items()}


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         store_device: torch.device | str = "cpu") -> LayerInputs:
    """Run the model's embedding stage on ``input_ids`` in batches and record every layer's inputs."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    n_layers = len(layers)
    kwargs: list[list[dict]] = [[] for _ in range(n_layers)]
    hidden: list[torch.Tensor] = []
    originals = [layer.forward for layer in layers]

    def recorder(index):
        def forward(hidden_states, *args, **kw):
            if args:
                raise RuntimeError("decoder layers are expected to receive everything but hidden states by keyword")
            kw = dict(kw)
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw["use_cache"] = False
            kwargs[index].append(move_kwargs(kw, store_device))
            if index == 0:
                hidden.append(hidden_states.detach().to(store_device))
            if index == n_layers - 1:
                raise _Recorded()  # nothing after the last layer is needed
            return hidden_states

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Recorded:
                pass
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd
            if "forward" in layer.__dict__:
                del layer.__dict__["forward"]
    return LayerInputs(hidden=hidden, kwargs=kwargs)


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
