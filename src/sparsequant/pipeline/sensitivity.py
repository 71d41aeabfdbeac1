"""Layer sensitivity: how much perplexity one compressed decoder layer (or one linear type across
all layers) costs while everything else stays dense; and selective recipes built from it.

One pass over the layers does all the work. For layer ``i`` the dense model's hidden states are
its inputs (every layer before it is dense), so its linears are calibrated and compressed once
on exactly the inputs the engine would give them in a one-layer run; the compressed weights are
swapped in, perplexity is measured from layer ``i`` on (the held-out windows' dense hidden states
at layer ``i`` are cached as the pass goes, so the dense layers before it are not recomputed),
and the dense weights are swapped back. A linear type (q/k/v/o/gate/up/down) is then scored by
swapping in its compressed weights in every layer at once. Those were calibrated on dense inputs,
not on the outputs of earlier compressed layers as in a full run: a sensitivity ranking, not a
forecast of the full run's perplexity. Blockwise fine-tuning is not applied here; variance
correction is, when the recipe asks for it.

The selective recipe keeps the units that cost most perplexity per unit of budget uncompressed
(dense with the recipe's quantization, int8, or fp16), greedily, while a target global sparsity or
bits-per-weight still holds, and writes them as recipe overrides.
"""
from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from ..progress import progress_bar

from ..checkpoint.packed import PackedWeight
from ..errors import RecipeError
from ..eval.perplexity import perplexity
from ..models.families import decoder_layers, layer_linears, layers_prefix
from ..patterns import SparsitySpec
from ..recipe import Recipe
from ..solvers import LinearPlan, compress_weight
from ..solvers.base import CompressedWeight
from .capture import capture_layer_inputs, layer_output, move_kwargs
from .sequential import storage_dtype_for
from .stats import StatsHooks
from .variance_correction import MomentHooks, correct

KEEP_AS = ("quant", "int8", "fp16")


@dataclass
class UnitRow:
    """One unit (a decoder layer or a linear type) compressed alone."""

    kind: str  # "layer" or "type"
    unit: str  # "3" for layer 3, "mlp.down_proj" for a type
    match: str  # the glob of linear names the unit covers, as recipe overrides use it
    ppl: float
    delta_ppl: float  # ppl - dense ppl
    params: int  # weights of the unit's compressed linears
    zeros: int  # of which pruned
    nbytes: int  # stored bytes of the unit's compressed linears under the recipe
    seconds: float
    shapes: list = field(default_factory=list)  # (out, in) of each linear, for the size of other formats


@dataclass
class SensitivityResult:
    dense_ppl: float
    rows: list[UnitRow]
    recipe: dict
    settings: dict

    def to_dict(self) -> dict:
        return {"dense_ppl": self.dense_ppl, "recipe": self.recipe, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityResult":
        try:
            rows = [UnitRow(**r) for r in d["rows"]]
            return cls(float(d["dense_ppl"]), rows, d["recipe"], d.get("settings", {}))
        except (KeyError, TypeError) as exc:
            raise RecipeError(f"not a sensitivity table: {exc}") from None

    def table(self) -> tuple[list[str], list[list]]:
        header = ["kind", "unit", "ppl", "delta ppl", "ppl / dense", "params", "sparsity", "bits/weight"]
        rows = [[r.kind, r.unit, r.ppl, r.delta_ppl, r.ppl / self.dense_ppl, r.params,
                 r.zeros / max(r.params, 1), 8.0 * r.nbytes / max(r.params, 1)] for r in self.rows]
        return header, rows

    def csv(self) -> str:
        header, rows = self.table()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()


def _swap_in(linears: dict[str, nn.Linear], weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """Put compressed weights (and biases) into the linears; return what restores them."""
    saved = {}
    for name, (w, b) in weights.items():
        lin = linears[name]
        saved[name] = (lin.weight.data.clone(), None if lin.bias is None else lin.bias.data.clone())
        lin.weight.data.copy_(w.to(lin.weight.device, lin.weight.dtype))
        if b is not None:
            if lin.bias is None:
                lin.bias = nn.Parameter(b.to(lin.weight.device, lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.data.copy_(b.to(lin.bias.device, lin.bias.dtype))
    return saved


def _restore(linears: dict[str, nn.Linear], saved) -> None:
    for name, (w, b) in saved.items():
        lin = linears[name]
        lin.weight.data.copy_(w)
        if b is None:
            lin.bias = None
        else:
            lin.bias.data.copy_(b)


class _Replay:
    """Run the model from layer ``start`` on: the layers before it return the cached hidden
    states of each evaluation batch in turn (the embedding stage, the final norm and the head are
    the model's own, so nothing family-specific is needed)."""

    def __init__(self, layers: nn.ModuleList, start: int, cached: list[torch.Tensor]):
        self.layers, self.start, self.cached, self.calls = layers, start, cached, 0

    def __enter__(self):
        for j in range(self.start):
            self.layers[j].forward = self._forward(j)
        return self

    def _forward(self, j):
        def forward(hidden_states, *args, **kwargs):
            if j < self.start - 1:
                return hidden_states
            out = self.cached[self.calls].to(hidden_states.device, hidden_states.dtype)
            self.calls += 1
            return out

        return forward

    def __exit__(self, *exc):
        for j in range(self.start):
            self.layers[j].__dict__.pop("forward", None)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor, eval_ids: torch.Tensor, *,
                      kinds: tuple[str, ...] = ("layer", "type"), eval_batch: int = 4,
                      progress: bool = True) -> SensitivityResult:
    """Perplexity on ``eval_ids`` with one unit compressed by ``recipe`` at a time (see module doc).

    The model is left as it was (dense). ``kinds``: "layer" (each decoder layer alone) and/or
    "type" (each linear type in every layer).
    """
    bad = set(kinds) - {"layer", "type"}
    if bad or not kinds:
        raise RecipeError(f"sensitivity units are 'layer' and/or 'type', got {', '.join(map(str, kinds)) or 'none'}")
    model.eval()
    device = next(model.parameters()).device
    storage_dtype = storage_dtype_for(model)
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    vc_mode = recipe.recovery.variance_mode
    calib = capture_layer_inputs(model, calib_ids, recipe.calibration.batch_size, device)
    evals = capture_layer_inputs(model, eval_ids, eval_batch, device)
    dense_ppl = perplexity(model, eval_ids, batch_size=eval_batch, progress=False)
    h_cal, h_ev = calib.hidden, evals.hidden
    compressed: dict[str, dict[str, tuple[PackedWeight, torch.Tensor | None]]] = {}  # per layer
    rows: list[UnitRow] = []
    units = len(layers) * ("layer" in kinds)
    bar = progress_bar(total=len(layers) + units, desc="sensitivity", unit="step", enabled=bool(progress))
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        linears = layer_linears(layer)
        plans = {n: recipe.plan_for(f"{prefix}.{i}.{n}") for n in linears}
        targets = {n: lin for n, lin in linears.items() if plans[n] is not None}
        kw_cal = [move_kwargs(k, device) for k in calib.kwargs[i]]
        hessian_for = {n for n in targets if plans[n].needs_hessian}
        moments = MomentHooks(targets) if vc_mode else contextlib.nullcontext()
        with StatsHooks(targets, hessian_for, device) as hooks, moments:
            out_cal = [layer_output(layer, h, kw) for h, kw in zip(h_cal, kw_cal)]
        stats = hooks.results()
        mine: dict[str, tuple[PackedWeight, torch.Tensor | None]] = {}
        for name, lin in targets.items():
            cw = compress_weight(lin.weight.detach(), stats[name], plans[name], storage_dtype)
            bias = None
            if vc_mode:
                b_old = None if lin.bias is None else lin.bias.detach().float()
                cw, bias, _ = correct(lin.weight.detach(), b_old, cw, *moments.mean_cov(name), vc_mode, storage_dtype)
            mine[name] = (PackedWeight.from_compressed(cw, storage_dtype), bias)
        del stats, hooks, moments
        compressed[i] = mine
        bar.update(1)
        if "layer" in kinds and mine:
            saved = _swap_in(targets, _weights(mine))
            try:
                with _Replay(layers, i, h_ev):
                    ppl = perplexity(model, eval_ids, batch_size=eval_batch, progress=False)
            finally:
                _restore(targets, saved)
            rows.append(_row("layer", str(i), f"{prefix}.{i}.*", ppl, dense_ppl, mine, time.perf_counter() - t0))
            bar.set_postfix_str(f"layer {i} ppl {ppl:.2f} (dense {dense_ppl:.2f})")
        bar.update(1 if "layer" in kinds else 0)
        kw_ev = [move_kwargs(k, device) for k in evals.kwargs[i]]
        h_ev = [layer_output(layer, h, kw) for h, kw in zip(h_ev, kw_ev)]
        h_cal = out_cal
    bar.close()
    if "type" in kinds:
        names = sorted({n for mine in compressed.values() for n in mine}, key=_type_order)
        for name in progress_bar(names, desc="sensitivity by type", enabled=bool(progress)):
            t0 = time.perf_counter()
            per_layer = {i: mine[name] for i, mine in compressed.items() if name in mine}
            saved = {i: _swap_in({name: layer_linears(layers[i])[name]}, _weights({name: pb}))
                     for i, pb in per_layer.items()}
            try:
                ppl = perplexity(model, eval_ids, batch_size=eval_batch, progress=False)
            finally:
                for i, s in saved.items():
                    _restore({name: layer_linears(layers[i])[name]}, s)
            rows.append(_row("type", name, f"*.{name}", ppl, dense_ppl, {f"{i}.{name}": pb for i, pb in per_layer.items()},
                             time.perf_counter() - t0))
    settings = {"calibration_tokens": int(calib_ids.numel()), "eval_windows": int(eval_ids.shape[0]),
                "eval_seq_len": int(eval_ids.shape[1]), "kinds": list(kinds)}
    return SensitivityResult(dense_ppl, rows, recipe.to_dict(), settings)


def _weights(mine):
    return {n: (pw.to_compressed().effective_weight(), b) for n, (pw, b) in mine.items()}


def _type_order(name: str):
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    last = name.rsplit(".", 1)[-1]
    return (order.index(last) if last in order else len(order), name)


def _row(kind, unit, match, ppl, dense_ppl, packed: dict, seconds) -> UnitRow:
    params = zeros = nbytes = 0
    shapes = []
    for pw, _ in packed.values():
        n, k = pw.shape
        params += n * k
        mask = pw.mask()
        zeros += 0 if mask is None else int((~mask).sum())
        nbytes += pw.nbytes()
        shapes.append([n, k])
    return UnitRow(kind, unit, match, ppl, ppl - dense_ppl, params, zeros, nbytes, seconds, shapes)


# -- selective recipes ------------------------------------------------------------------------------

def _keep_override(recipe: Recipe, keep_as: str) -> dict:
    if keep_as not in KEEP_AS:
        raise RecipeError(f"keep_as must be one of {', '.join(KEEP_AS)}, got {keep_as!r}")
    if keep_as == "int8":
        return {"pattern": "dense", "quant": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}}
    if keep_as == "quant" and recipe.quant is not None:
        return {"pattern": "dense"}
    return {"pattern": "dense", "quant": None}


def _kept_bytes(shapes: list, recipe: Recipe, override: dict) -> int:
    """Stored bytes of these shapes under the override, measured by packing (so the size formulas
    live in one place, checkpoint/packed.py)."""
    probe = recipe.with_(overrides=(*recipe.overrides, {"match": "*", **override}), skip=())
    plan: LinearPlan | None = probe.plan_for("probe")
    total = 0
    for n, k in shapes:
        if plan is None:
            total += 2 * n * k
            continue
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
        cw: CompressedWeight = compress_weight(w, None, LinearPlan(quantizer="rtn", quant=plan.quant,
                                                                   sparsity=SparsitySpec.parse("dense")))
        total += PackedWeight.from_compressed(cw).nbytes()
    return total


def selective_recipe(result: SensitivityResult, recipe: Recipe, *, target_sparsity: float | None = None,
                     target_bits: float | None = None, keep_as: str = "quant", kind: str = "layer"):
    """Keep the most sensitive units of ``kind`` uncompressed while the target still holds.

    Exactly one target: ``target_sparsity`` (the global fraction of pruned weights over the
    linears the recipe compresses stays >= it) or ``target_bits`` (their bits per weight stay
    <= it). Units are taken in order of perplexity cost per unit of the constrained budget
    (pruned weights given up, or bytes added); one that does not fit is passed over. Returns the
    recipe with the overrides appended and a summary of the choice.
    """
    if (target_sparsity is None) == (target_bits is None):
        raise RecipeError("give exactly one target: a global sparsity or bits per weight")
    if target_sparsity is not None and not 0 <= target_sparsity < 1:
        raise RecipeError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if target_bits is not None and not target_bits > 0:
        raise RecipeError(f"target bits per weight must be positive, got {target_bits}")
    rows = [r for r in result.rows if r.kind == kind]
    if not rows:
        raise RecipeError(f"the sensitivity table has no '{kind}' rows; measure with that unit kind")
    override = _keep_override(recipe, keep_as)
    params = sum(r.params for r in rows)
    zeros = sum(r.zeros for r in rows)
    nbytes = sum(r.nbytes for r in rows)
    base = {"sparsity": zeros / params, "bits_per_weight": 8.0 * nbytes / params}
    if target_sparsity is not None and base["sparsity"] < target_sparsity:
        raise RecipeError(f"the recipe itself reaches only {base['sparsity']:.3f} sparsity, below the target "
                          f"{target_sparsity}")
    if target_bits is not None and base["bits_per_weight"] > target_bits:
        raise RecipeError(f"the recipe itself needs {base['bits_per_weight']:.3f} bits/weight, above the target "
                          f"{target_bits}")
    extra = {r.unit: _kept_bytes(r.shapes, recipe, override) - r.nbytes for r in rows}

    def cost(r):
        return r.zeros if target_sparsity is not None else max(extra[r.unit], 1)

    order = sorted((r for r in rows if r.delta_ppl > 0), key=lambda r: r.delta_ppl / max(cost(r), 1), reverse=True)
    kept = []
    for r in order:
        z, b = zeros - r.zeros, nbytes + extra[r.unit]
        fits = z / params >= target_sparsity if target_sparsity is not None else 8.0 * b / params <= target_bits
        if fits:
            kept.append(r)
            zeros, nbytes = z, b
    overrides = tuple(recipe.overrides) + tuple({"match": r.match, **override} for r in kept)
    target = f"sparsity {target_sparsity}" if target_sparsity is not None else f"{target_bits} bits per weight"
    new = recipe.with_(name=f"selective ({target}, {len(kept)} {kind}s kept as {keep_as})", overrides=overrides)
    summary = {"kept": [r.unit for r in kept], "keep_as": keep_as, "kind": kind, "base": base,
               "predicted": {"sparsity": zeros / params, "bits_per_weight": 8.0 * nbytes / params},
               "sum_delta_ppl_kept": sum(r.delta_ppl for r in kept)}
    return new, summary


def bar_chart(result: SensitivityResult, path, title: str | None = None) -> None:
    """A PNG: perplexity increase per compressed layer (and per linear type), dense ppl marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("layer", "type") if any(r.kind == k for r in result.rows)]
    widths = [max(len([r for r in result.rows if r.kind == k]), 3) for k in kinds]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 + 0.32 * sum(widths), 4.6),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in result.rows if r.kind == kind]
        vals = [r.delta_ppl for r in rows]
        labels = [r.unit if kind == "layer" else r.unit.rsplit(".", 1)[-1] for r in rows]
        colors = ["#c0392b" if v == max(vals) else "#2e86c1" for v in vals]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=0 if kind == "layer" and len(rows) <= 12 else 90, fontsize=8)
        positive = [v for v in vals if v > 0]
        if positive and max(positive) / max(min(positive), 1e-9) > 50 and all(v > 0 for v in vals):
            ax.set_yscale("log")
        ax.set_xlabel("decoder layer" if kind == "layer" else "linear type (all layers)")
        ax.set_ylabel(f"perplexity increase over dense ({result.dense_ppl:.2f})")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("one layer compressed" if kind == "layer" else "one linear type compressed", fontsize=10)
    fig.suptitle(title or "Sensitivity", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def heldout_windows(tokenizer, n: int, seq_len: int, source: str = "wikipedia") -> torch.Tensor:
    """The *last* ``n`` windows of the evaluation half: held out from calibration, and disjoint
    from the first windows ``compress`` and ``eval`` report, so choosing layers on them does not
    tune to the reported perplexity."""
    from ..data.windows import token_stream
    from ..errors import DataError

    ids = token_stream(tokenizer, source, "evaluation")
    need = n * seq_len
    if need > len(ids) // 2:
        raise DataError(f"{n} x {seq_len} held-out tokens asked for; the evaluation text's second half holds "
                        f"{len(ids) // 2}")
    return ids[len(ids) - need:].reshape(n, seq_len)

