"""The results table of the papers (bitwidth, sparsity, compression, zero-shot accuracy, perplexity)
and a plot of accuracy and perplexity against bits per weight, from finished runs.

Inputs, any mix of:
- a run folder: a checkpoint (``sparsequant.json``) and/or ``run.json`` and/or ``eval.json``;
  a folder with none of these recipes is taken as the uncompressed model (fp16 reference);
- a folder whose sub-folders are run folders;
- the JSON written by ``benchmarks/accuracy_matrix.py`` (``{"rows": [{method, pattern, quant, ppl,
  bits_per_weight, model_ratio, ...}]}``).

Compression ratios are the size report stored by the run (stored bytes of the whole model over
its fp16 bytes), never recomputed from the recipe.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SparseQuantError

RUN_FILES = ("sparsequant.json", "run.json", "eval.json")
# The four tasks of the papers' table, in their column order, with the spellings we accept.
TASK_COLUMNS = (("arc_challenge", "ArcC"), ("arc_easy", "ArcE"), ("piqa", "PiQA"), ("winogrande", "Wino"))
_TASK_ALIASES = {
    "arc_c": "arc_challenge", "arcc": "arc_challenge", "arc_challenge": "arc_challenge",
    "arc_e": "arc_easy", "arce": "arc_easy", "arc_easy": "arc_easy",
    "piqa": "piqa", "wino": "winogrande", "winogrande": "winogrande",
}
HEADERS = ["Quantization", "Pruning", "Bitwidth", "Sparsity", "Compression Ratio",
           *(c for _, c in TASK_COLUMNS), "Average", "PPL"]
_PRUNER_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "maskllm": "MaskLLM"}
_QUANT_NAMES = {"rtn": "RTN", "gptq": "GPTQ"}


class ReportError(SparseQuantError, ValueError):
    """Run folders or result files that cannot be read into the results table."""


@dataclass
class ReportRow:
    run: str
    source: str
    model: str | None
    quantization: str  # "-" when not quantized
    pruning: str  # "Dense" for the uncompressed reference, "-" when only quantized
    bitwidth: int
    sparsity: str  # "-" when dense
    compression_ratio: float | None  # whole stored model / its fp16 size
    bits_per_weight: float | None  # compressed linears, metadata and scales included
    linear_ratio: float | None
    accuracy: dict[str, float] = field(default_factory=dict)  # task -> percent
    ppl: float | None = None
    ppl_setting: str | None = None
    is_dense: bool = False
    label: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        """Mean of the four table tasks; None unless all four were evaluated (a partial mean
        would not be comparable across rows)."""
        vals = [self.accuracy.get(t) for t, _ in TASK_COLUMNS]
        if any(v is None for v in vals):
            return None
        return sum(vals) / len(vals)


# -- reading --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def _quant_label(q: dict | None) -> str:
    if not q:
        return "-"
    name = _QUANT_NAMES.get(str(q.get("method", "rtn")).lower(), str(q.get("method", "?")).upper())
    gs = q.get("group_size")
    out = f"{name} g{gs}" if gs else f"{name} per-channel"
    return out if q.get("symmetric", True) else out + " asym"


def _sparsity_label(pattern: str | None) -> tuple[str, bool]:
    """(table label, is dense). Kept independent of SparsitySpec so old run files still read."""
    t = str(pattern or "dense").strip().lower()
    if t in ("", "dense", "none", "0", "0%"):
        return "-", True
    if ":" in t:
        return t, False
    per_matrix = t.endswith("-matrix")
    t = t[: -len("-matrix")] if per_matrix else t
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        return str(pattern), False
    if value == 0:
        return "-", True
    return f"Unstructured {value:.0%}" + (" (matrix)" if per_matrix else ""), False


def _overrides_keep_dense(recipe: dict) -> bool:
    return any(str(o.get("pattern", "")).strip().lower() == "dense" for o in recipe.get("overrides") or [])


def _recovery_label(recipe: dict) -> str:
    """The recovery methods a recipe used, short: 'SLiM r0.1 int4', 'VC', 'FT200' (joined by ' + ')."""
    parts = []
    adapter = recipe.get("adapter")
    if adapter:
        bits = adapter.get("bits")
        parts.append(f"SLiM r{adapter.get('rank'):g}" + (f" int{bits}" if bits else ""))
    rec = recipe.get("recovery") or {}
    vc = rec.get("variance_correction")
    if vc:
        parts.append("VC" if vc is True or vc == "std" else f"VC-{vc}")
    if rec.get("finetune_steps"):
        parts.append(f"FT{rec['finetune_steps']}")
    return " + ".join(parts)


def _row_from_recipe(recipe: dict | None, run: str, source: str) -> ReportRow:
    if not recipe:
        return ReportRow(run, source, None, "-", "Dense", 16, "-", 1.0, 16.0, 1.0, is_dense=True)
    sparsity, dense_pattern = _sparsity_label(recipe.get("pattern"))
    q = recipe.get("quant")
    method = str(recipe.get("method", "?"))
    pruning = "-" if dense_pattern else _PRUNER_NAMES.get(method.lower(), method)
    if (recipe.get("skip") or _overrides_keep_dense(recipe)) and not dense_pattern:
        sparsity += " (some layers dense)"
    recovery = _recovery_label(recipe)
    if recovery and not dense_pattern:
        pruning = f"{pruning} + {recovery}"
    is_dense = dense_pattern and not q
    qlabel = _quant_label(q)
    if q and not dense_pattern and recipe.get("joint") and method.lower() == "sparsegpt":
        # quantized inside SparseGPT's OBS pass, not by the quantizer the recipe names
        qlabel = "joint " + qlabel.split(" ", 1)[1]
    return ReportRow(run, source, None, qlabel, "Dense" if is_dense else pruning,
                     int(q["bits"]) if q else 16, sparsity, None, None, None, is_dense=is_dense)


def _accuracies(tasks: dict, metric: str) -> tuple[dict[str, float], list[str]]:
    out, notes = {}, []
    for name, res in (tasks or {}).items():
        key = _TASK_ALIASES.get(str(name).lower(), str(name).lower())
        if not isinstance(res, dict):
            continue
        value = res.get(metric)
        if value is None and metric != "acc":
            value = res.get("acc")  # WinoGrande-style tasks have one score; acc_norm is acc there
            if value is not None:
                notes.append(f"{key}: no {metric}, acc used")
        if value is None:
            continue
        out[key] = 100.0 * float(value)
    return out, notes


def _ppl_setting(ev: dict | None) -> str | None:
    if not ev:
        return None
    parts = [str(ev.get("data", "?")), f"{ev.get('windows', '?')} x {ev.get('seq_len', '?')} tokens"]
    return ", ".join(parts)


def read_run(folder, metric: str = "acc") -> tuple[ReportRow, tuple[float, str | None] | None]:
    """One results row from a run folder, plus (dense perplexity, its setting) when the log has one."""
    folder = Path(folder)
    if not is_run_folder(folder):
        raise ReportError(f"{folder} is not a run folder: it holds none of {', '.join(RUN_FILES)}")
    meta = _read_json(folder / "sparsequant.json") if (folder / "sparsequant.json").is_file() else {}
    log = _read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    ev = _read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
    recipe = meta.get("recipe", log.get("recipe"))
    row = _row_from_recipe(recipe, folder.name, str(folder))
    row.model = log.get("model") or ev.get("model") or meta.get("model")
    if not recipe:
        row.notes.append("no recipe: taken as the uncompressed fp16 model")
    size = meta.get("size") or log.get("size")
    if size:
        row.compression_ratio = size.get("model_ratio_vs_fp16")
        row.bits_per_weight = size.get("bits_per_weight")
        row.linear_ratio = size.get("linear_ratio_vs_fp16")
    elif recipe:
        row.compression_ratio = row.bits_per_weight = row.linear_ratio = None
        row.notes.append("no size report stored: compression ratio unknown")
    run = meta.get("run") or {}
    ppl_block = ev.get("ppl") if isinstance(ev.get("ppl"), dict) else None
    if ppl_block and ppl_block.get("value") is not None:
        # A separate `sparsequant eval` is the deliberate measurement; prefer it to the compress-time one.
        row.ppl, row.ppl_setting = float(ppl_block["value"]), _ppl_setting(ppl_block)
    else:
        ppl = run.get("compressed_ppl", log.get("compressed_ppl"))
        if ppl is None and not recipe:
            ppl = run.get("dense_ppl", log.get("dense_ppl"))
        if ppl is not None:
            row.ppl, row.ppl_setting = float(ppl), _ppl_setting(run.get("eval") or log.get("eval"))
    row.accuracy, notes = _accuracies(ev.get("tasks") or {}, metric)
    row.notes += notes
    dense_ppl = run.get("dense_ppl", log.get("dense_ppl")) if recipe else None
    dense_setting = _ppl_setting(run.get("eval") or log.get("eval"))
    row.label = _label(row)
    return row, (None if dense_ppl is None else (float(dense_ppl), dense_setting))


def _parse_matrix_quant(name: str) -> dict | None:
    """accuracy_matrix.py quant names ("int4", "int4-gptq", "int4g64", "int2-gptq-g64") as a QuantConfig dict."""
    if name in (None, "", "none", "-"):
        return None
    m = re.search(r"int(\d+)", name)
    if not m:
        raise ReportError(f"cannot read quantization {name!r}: expected names like int4, int4-gptq, int4g64")
    g = re.search(r"g(\d+)$", name.replace("-", ""))
    return {"method": "gptq" if "gptq" in name else "rtn", "bits": int(m.group(1)),
            "group_size": int(g.group(1)) if g else 128, "symmetric": "asym" not in name}


def read_matrix(path) -> list[ReportRow]:
    """Rows of a benchmarks/accuracy_matrix.py JSON file (perplexity only, no zero-shot tasks)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data.get("rows"), list):
        raise ReportError(f"{path} has no 'rows' list: not an accuracy_matrix.py result")
    rows = []
    for i, r in enumerate(data["rows"]):
        try:
            method, pattern, qname = r["method"], r["pattern"], r["quant"]
        except (KeyError, TypeError):
            raise ReportError(f"{path}: row {i} lacks method/pattern/quant") from None
        dense = method == "dense"
        recipe = None if dense else {"method": method, "pattern": pattern, "quant": _parse_matrix_quant(qname),
                                     "joint": bool(r.get("joint", False))}
        row = _row_from_recipe(recipe, f"{method}/{pattern}/{qname}", f"{path}#{i}")
        if not dense:
            row.compression_ratio = r.get("model_ratio")
            row.bits_per_weight = r.get("bits_per_weight")
            row.linear_ratio = r.get("linear_ratio")
        row.ppl = None if r.get("ppl") is None else float(r["ppl"])
        row.ppl_setting = data.get("evaluation")
        row.label = _label(row)
        rows.append(row)
    return rows


def _label(row: ReportRow) -> str:
    if row.is_dense:
        return "dense fp16"
    parts = []
    if row.sparsity != "-":
        sp = row.sparsity.replace("Unstructured ", "").replace(" (some layers dense)", "*")
        parts.append(f"{row.pruning.split(' + ', 1)[0].lower()} {sp}")
    if row.quantization != "-":
        q = row.quantization.split()
        parts.append(" ".join([f"{q[0].lower()} int{row.bitwidth}", *q[1:]]).replace("per-channel", "pc"))
    if " + " in row.pruning:  # recovery methods ride in the Pruning column
        parts.append(row.pruning.split(" + ", 1)[1])
    return " + ".join(parts) or row.run


def _drop_repeated_dense(rows: list[ReportRow]) -> list[ReportRow]:
    """Several result files often each carry the same dense reference: keep it once."""
    seen, out = set(), []
    for r in rows:
        key = (r.ppl, r.ppl_setting, r.model, tuple(sorted(r.accuracy.items()))) if r.is_dense else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out.append(r)
    return out


def collect(paths, metric: str = "acc", dense_reference: bool = True) -> tuple[list[ReportRow], list[str]]:
    """All rows of the given folders / files, dense reference first, and notes for the reader.

    With ``dense_reference``, when no uncompressed row was given but every run logged the same
    dense perplexity under the same evaluation setting, that value becomes a 'Dense' row.
    """
    if metric not in ("acc", "acc_norm"):
        raise ReportError(f"metric must be acc or acc_norm, got {metric!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[ReportRow] = []
    dense_logs: list[tuple[float, str | None]] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            if p.name in RUN_FILES:
                p = p.parent  # a run's own file: read the whole folder
            else:
                rows += read_matrix(p)
                continue
        if not p.exists():
            raise ReportError(f"{p} does not exist")
        folders = [p] if is_run_folder(p) else sorted(c for c in p.iterdir() if is_run_folder(c))
        if not folders:
            raise ReportError(f"{p} holds no run folder (a folder with {', '.join(RUN_FILES)}) and is not one")
        for f in folders:
            row, dense = read_run(f, metric)
            rows.append(row)
            if dense is not None:
                dense_logs.append(dense)
    if not rows:
        raise ReportError("no runs given")
    notes: list[str] = []
    if dense_reference and not any(r.is_dense for r in rows) and dense_logs:
        values = {round(v, 6) for v, _ in dense_logs}
        settings = {s for _, s in dense_logs}
        models = {r.model for r in rows if r.model}  # runs that do not name their model cannot contradict
        if len(values) == 1 and len(settings) == 1 and len(models) <= 1:
            ref = _row_from_recipe(None, "dense (from run logs)", "run logs")
            ref.ppl, ref.ppl_setting, ref.label = dense_logs[0][0], dense_logs[0][1], "dense fp16"
            ref.model = next(iter(models), None)
            ref.notes.append("perplexity of the dense model as logged by the compression runs")
            rows.append(ref)
        else:
            notes.append("dense perplexities in the run logs differ (models or evaluation settings), "
                         "so no dense row was added")
    rows = _drop_repeated_dense(rows)
    rows.sort(key=lambda r: not r.is_dense)  # stable: dense first, the rest in the given order
    settings = {r.ppl_setting for r in rows if r.ppl is not None}
    if len(settings) > 1:
        notes.append("perplexities were measured under different settings: "
                     + "; ".join(sorted(str(s) for s in settings)))
    elif settings and None not in settings:
        notes.append(f"perplexity on {settings.pop()}")
    models = {r.model for r in rows if r.model}
    if len(models) > 1:
        notes.append(f"rows come from different models: {', '.join(sorted(models))}")
    for r in rows:
        notes += [f"{r.run}: {n}" for n in r.notes]
    return rows, notes


# -- table ----------------------------------------------------------------------------------------

def _cell(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if v is None else str(v)
    if kind == "acc":
        return f"{v:.1f}"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "ppl":
        return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"
    return str(v)


def table_cells(row: ReportRow) -> list[str]:
    return [row.quantization, row.pruning, str(row.bitwidth), row.sparsity,
            _cell(row.compression_ratio, "ratio"),
            *(_cell(row.accuracy.get(t), "acc") for t, _ in TASK_COLUMNS),
            _cell(row.average, "acc"), _cell(row.ppl, "ppl")]


def markdown(rows: list[ReportRow]) -> str:
    cells = [table_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(HEADERS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_csv(rows: list[ReportRow], path) -> Path:
    """The table's columns at full precision (empty cell = missing, so spreadsheets read numbers),
    then the run, model, bits per weight, linear-only ratio and any other tasks evaluated."""
    path = Path(path)
    extra_tasks = sorted({t for r in rows for t in r.accuracy} - {t for t, _ in TASK_COLUMNS})
    header = HEADERS + ["Run", "Model", "Bits per weight", "Linear ratio", *extra_tasks, "Source"]
    num = lambda v, nd: "" if v is None else f"{v:.{nd}f}"  # noqa: E731
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r.quantization, r.pruning, r.bitwidth, r.sparsity, num(r.compression_ratio, 4),
                        *(num(r.accuracy.get(t), 2) for t, _ in TASK_COLUMNS), num(r.average, 2), num(r.ppl, 4),
                        r.run, r.model or "", num(r.bits_per_weight, 4), num(r.linear_ratio, 4),
                        *(num(r.accuracy.get(t), 2) for t in extra_tasks), r.source])
    return path


# -- Pareto front and plot ------------------------------------------------------------------------

def pareto_front(xs, ys, higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: another point dominates when it needs no more
    bits (x) and scores at least as well (y), strictly better in one. Sorted by x."""
    pts = [(float(x), float(y) if higher_is_better else -float(y)) for x, y in zip(xs, ys)]
    front = []
    for i, (x, y) in enumerate(pts):
        dominated = any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))


def _place_labels(ax, xs, ys, labels, renderer, fontsize=7.5):
    """Greedy label placement: try positions around each point and keep the first that overlaps
    no label, marker or axes edge already placed; matplotlib has no built-in for this."""
    from matplotlib.transforms import Bbox

    pix = ax.transData.transform(list(zip(xs, ys)))
    obstacles = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in pix]
    axes_box = ax.get_window_extent(renderer)
    offsets = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
               (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (10, 16, "left", "bottom"), (10, -16, "left", "top"), (-10, 16, "right", "bottom"),
               (-10, -16, "right", "top"), (0, 24, "center", "bottom"), (0, -24, "center", "top"),
               # crowded regions: further out, joined to the point by a leader line
               (24, 32, "left", "bottom"), (24, -32, "left", "top"), (-24, 32, "right", "bottom"),
               (-24, -32, "right", "top"), (0, 44, "center", "bottom"), (0, -44, "center", "top"),
               (40, 56, "left", "bottom"), (40, -56, "left", "top"), (-40, 56, "right", "bottom"),
               (-40, -56, "right", "top")]
    placed = []
    for i in sorted(range(len(labels)), key=lambda i: pix[i][0]):
        best, best_cost = None, None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va=va, fontsize=fontsize,
                              arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if abs(dy) > 9 else None)
            box = ann.get_window_extent(renderer)
            cost = sum(_overlap(box, b) for b in placed + obstacles)
            outside = box.width * box.height - _overlap(box, axes_box)
            cost += 4 * outside
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box), cost
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[1])


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _points(rows, values, log_y):
    return [(r.bits_per_weight, v, r) for r, v in zip(rows, values)
            if v is not None and r.bits_per_weight and math.isfinite(v) and (v > 0 or not log_y)]


#: A log-scale panel shows at most this many decades above its lowest point; higher points (a
#: collapsed 2-bit model at ppl 10^6) sit on the top edge as triangles with their value in the label,
#: so the 20-2000 range where recipes differ is not squeezed into a sliver.
MAX_DECADES = 2.5


def display_cap(ys, log_y: bool) -> float | None:
    if not log_y or not ys:
        return None
    cap = min(ys) * 10**MAX_DECADES
    return cap if max(ys) > cap else None


def _panel(ax, pts, higher_is_better, ylabel, log_y, xrange, cap):
    xs, real = [p[0] for p in pts], [p[1] for p in pts]
    front = pareto_front(xs, real, higher_is_better)  # on the true values, not the clipped ones
    ys = real if cap is None else [min(y, cap) for y in real]
    on = set(front)
    off = [i for i in range(len(xs)) if i not in on]
    if cap is not None:
        over = [i for i in range(len(xs)) if real[i] > cap]
        ax.scatter([xs[i] for i in over], [cap] * len(over), s=70, marker="^", facecolor="none",
                   edgecolor="0.3", lw=0.8, zorder=5, label=f"off scale (> {cap:,.0f})")
    if off:
        ax.scatter([xs[i] for i in off], [ys[i] for i in off], s=28, color="#7f9cbf", edgecolor="#3b5b82", lw=0.6,
                   zorder=3, label="dominated")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=46, color="#d9544d", edgecolor="#7a1f1a",
               lw=0.8, zorder=4, label="Pareto front")
    # Steps: the best score reachable with at most x bits per weight.
    ax.plot([xs[i] for i in front], [ys[i] for i in front], drawstyle="steps-post", color="#d9544d",
            lw=1.2, alpha=0.7, zorder=2)
    dense = [p[1] for p in pts if p[2].is_dense]
    if dense:
        ax.axhline(dense[0], color="0.45", lw=0.8, ls=":", zorder=1, label="dense fp16")
    # log2 bits: the 2-5 bit recipes that matter would otherwise be squeezed against the 16-bit reference.
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    lo_x, hi_x = xrange  # both panels share the bits axis so points line up across them
    ticks = [t for t in (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32) if lo_x / 1.25 <= t <= hi_x * 1.25]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo_x / 1.25, hi_x * 1.25)
    if log_y:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        lo, hi = min(ys), max(ys)
        ax.set_ylim(lo / 1.15, hi * (1.6 if hi / lo > 3 else 1.25))
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        ax.yaxis.set_major_formatter(fmt)
        if hi / lo < 20:  # under one or two decades there are too few major ticks to read values
            ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
            ax.yaxis.set_minor_formatter(fmt)
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        span = max(ys) - min(ys) or 1.0
        ax.set_ylim(min(ys) - 0.25 * span, max(ys) + 0.3 * span)
    ax.set_xlabel("bits per weight of the compressed linears (values + metadata + scales)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right" if higher_is_better else "upper right", fontsize=8, framealpha=0.9)
    return [pts[i][2] for i in front]


def plot(rows: list[ReportRow], path, title: str | None = None) -> dict[str, list[ReportRow]]:
    """Accuracy (4-task average) and perplexity (log scale) against bits per weight, Pareto fronts
    marked; a panel is drawn only for a metric some run has. Returns the rows on each front."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", _points(rows, [r.average for r in rows], False), True,
         "zero-shot accuracy, average of ArcC/ArcE/PiQA/Wino (%)", False,
         "Accuracy against size (higher is better)"),
        ("ppl", _points(rows, [r.ppl for r in rows], True), False,
         "perplexity (log scale, lower is better)", True, "Perplexity against size (lower is better)"),
    ]
    panels = [p for p in panels if p[1]]
    caps = {key: display_cap([pt[1] for pt in pts], log_y) for key, pts, _h, _yl, log_y, _t in panels}
    all_x = [pt[0] for p in panels for pt in p[1]]
    xrange = (min(all_x), max(all_x)) if all_x else (1.0, 16.0)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7 * max(len(panels), 1) + 0.5, 6), dpi=140,
                             squeeze=False)
    fronts: dict[str, list[ReportRow]] = {"accuracy": [], "ppl": []}
    try:
        if not panels:
            axes[0][0].text(0.5, 0.5, "nothing to plot: no run has both bits per weight and a metric",
                            transform=axes[0][0].transAxes, ha="center", va="center", color="0.4")
            axes[0][0].set_axis_off()
        for ax, (key, pts, higher, ylabel, log_y, ptitle) in zip(axes[0], panels):
            fronts[key] = _panel(ax, pts, higher, ylabel, log_y, xrange, caps[key])
            ax.set_title(ptitle)
        models = sorted({r.model for r in rows if r.model})
        fig.suptitle(title or ("sparsequant results" + (f": {', '.join(models)}" if models else "")), fontsize=12)
        if any(r.label.count("*") for r in rows):
            fig.text(0.01, 0.01, "* some layers kept dense (skip patterns or overrides)", fontsize=8, color="0.3")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        # Labels last: their placement measures text in display space, which the layout fixes.
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax, (key, pts, *_rest) in zip(axes[0], panels):
            ys = [p[1] for p in pts]
            cap = caps[key]
            labels = [p[2].label + (f" (ppl {y:,.0f})" if cap is not None and y > cap else "") for p, y in zip(pts, ys)]
            _place_labels(ax, [p[0] for p in pts], [y if cap is None else min(y, cap) for y in ys], labels, renderer)
        fig.savefig(Path(path))
    finally:
        plt.close(fig)
    return fronts


def write_report(paths, out_dir, metric: str = "acc", title: str | None = None) -> dict[str, Path]:
    """results.md, results.csv and pareto.png of the given runs in ``out_dir``."""
    rows, notes = collect(paths, metric)
    return write_outputs(rows, notes, out_dir, metric, title)


def write_outputs(rows: list[ReportRow], notes: list[str], out_dir, metric: str = "acc",
                  title: str | None = None) -> dict[str, Path]:
    """Write already collected rows as results.md, results.csv and pareto.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fronts = plot(rows, out / "pareto.png", title)
    write_csv(rows, out / "results.csv")
    lines = ["# Results", "", markdown(rows), "",
             f"Accuracy: zero-shot {metric} in %; Average only when all four tasks were evaluated. "
             "Compression Ratio: stored bytes of the whole model over its fp16 bytes (from the stored size report). "
             "'-' = not measured.", ""]
    for name, front in fronts.items():
        if front:
            lines.append(f"Pareto front ({name} against bits per weight): " + ", ".join(r.label for r in front))
    if any("*" in r.label for r in rows):
        lines.append("(* in a label: some layers kept dense by the recipe's skip patterns)")
    lines += ["", "![accuracy and perplexity against bits per weight](pareto.png)", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    (out / "results.md").write_text("\n".join(lines))
    return {"markdown": out / "results.md", "csv": out / "results.csv", "plot": out / "pareto.png"}
