"""``sparsequant sensitivity``: perplexity cost of compressing one decoder layer (or one linear type)
at a time, saved as JSON, CSV, Markdown and a bar chart; optionally a selective recipe that keeps
the most sensitive layers uncompressed under a target size."""
from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_WINDOWS = 4
DEFAULT_EVAL_SEQ_LEN = 512


def add_parser(subparsers, common_parent):
    p = subparsers.add_parser(
        "sensitivity", parents=[common_parent],
        help="perplexity cost of compressing each decoder layer / linear type alone; selective recipes",
        description="Compress one decoder layer at a time (and one linear type at a time across all layers) "
        "with a recipe, everything else dense, and measure the perplexity change on held-out windows (the last "
        "windows of the evaluation half, disjoint from the ones 'compress' reports). Writes sensitivity.json, "
        ".csv, .md and a bar chart. With --target-sparsity or --target-bits, also writes a selective recipe that "
        "keeps the most sensitive layers dense (or int8) while the target holds.",
        epilog="example: sparsequant sensitivity --recipe 2:4-w4a16 --out runs/sens "
        "--target-sparsity 0.45 --write-recipe selective.yaml",
    )
    p.add_argument("model", nargs="?", default=None, help="hub id, folder, .gguf; omitted: the default model")
    p.add_argument("--recipe", default="2:4-w4a16", help="preset or YAML file: how each unit is compressed")
    p.add_argument("--out", help="folder for sensitivity.json/.csv/.md/.png (new or existing)")
    p.add_argument("--units", default="layer,type", help="layer, type, or both (default layer,type)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration windows (default {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration window length")
    p.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                   help=f"held-out windows scored per unit (default {DEFAULT_EVAL_WINDOWS})")
    p.add_argument("--eval-seq-len", type=int, default=DEFAULT_EVAL_SEQ_LEN, help="held-out window length")
    p.add_argument("--eval-data", default="wikipedia", help="held-out text: wikipedia or a .txt file")
    p.add_argument("--from", dest="from_json", help="reuse a saved sensitivity.json instead of measuring")
    p.add_argument("--target-sparsity", type=float, help="selective recipe: global sparsity to keep (e.g. 0.45)")
    p.add_argument("--target-bits", type=float, help="selective recipe: bits per weight not to exceed")
    p.add_argument("--keep-as", default="quant", choices=["quant", "int8", "fp16"],
                   help="how kept layers are stored: dense with the recipe's quantization (default), int8, fp16")
    p.add_argument("--keep-unit", default="layer", choices=["layer", "type"], help="what the selective recipe keeps")
    p.add_argument("--write-recipe", help="YAML file for the selective recipe")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..checkpoint.atomic import atomic_write_text
    from ..errors import RecipeError
    from ..eval.table import markdown_table
    from ..pipeline.sensitivity import SensitivityResult, bar_chart, selective_recipe
    from ..recipe import CalibrationConfig, Recipe, get_recipe

    if (args.target_sparsity is not None or args.target_bits is not None) != bool(args.write_recipe):
        raise RecipeError("--write-recipe goes with --target-sparsity or --target-bits (and needs one of them)")
    if not args.from_json and not args.out:
        raise RecipeError("give --out (where to save the table and chart) or --from (a saved sensitivity.json)")
    if args.from_json:
        path = Path(args.from_json)
        if not path.is_file():
            raise RecipeError(f"{path} does not exist")
        result = SensitivityResult.from_dict(json.loads(path.read_text()))
        recipe = Recipe.from_dict(result.recipe)
        base = recipe.with_(calibration=CalibrationConfig())
    else:
        recipe = base = get_recipe(args.recipe)
        c = recipe.calibration
        recipe = recipe.with_(calibration=CalibrationConfig(c.source, args.samples, args.seq_len, c.seed, c.batch_size))
        result = _measure(args, recipe)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        header, rows = result.table()
        md = markdown_table(header, rows)
        atomic_write_text(out / "sensitivity.json", json.dumps(result.to_dict(), indent=2))
        atomic_write_text(out / "sensitivity.csv", result.csv())
        atomic_write_text(out / "sensitivity.md", md + "\n")
        bar_chart(result, out / "sensitivity.png", title=f"Perplexity cost of {_describe(recipe)}, one unit at a time")
        print(md)
        print(f"\ndense ppl {result.dense_ppl:.3f}; saved {out}/sensitivity.json, .csv, .md, .png")
    if args.write_recipe:
        # The scan calibrates on fewer windows to be quick; the written recipe keeps the base recipe's
        # calibration so that it compares fairly with the uniform recipe it came from.
        new, summary = selective_recipe(result, base, target_sparsity=args.target_sparsity,
                                        target_bits=args.target_bits, keep_as=args.keep_as, kind=args.keep_unit)
        atomic_write_text(Path(args.write_recipe), new.to_yaml())
        p, b = summary["predicted"], summary["base"]
        print(f"selective recipe: {len(summary['kept'])} {summary['kind']}s kept as {summary['keep_as']} "
              f"({', '.join(summary['kept']) or 'none'}); sparsity {b['sparsity']:.3f} -> {p['sparsity']:.3f}, "
              f"bits/weight {b['bits_per_weight']:.3f} -> {p['bits_per_weight']:.3f}; written to {args.write_recipe}")
    return 0


def _describe(recipe) -> str:
    d = recipe.describe()
    return f"{d['method']} {d['pattern']}" + ("" if d["quant"] == "-" else f" + {d['quant']}")


def _measure(args, recipe):
    import torch

    from ..models.loading import load_model
    from ..pipeline.sensitivity import heldout_windows, layer_sensitivity
    from ..data.windows import calibration_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=torch.float32 if device == "cpu" else torch.float16,
                                  device=device, quiet=args.quiet)
    c = recipe.calibration
    calib = calibration_windows(tokenizer, c.samples, c.seq_len, c.seed, c.source)
    ev = heldout_windows(tokenizer, args.eval_windows, args.eval_seq_len, args.eval_data)
    kinds = tuple(u.strip() for u in args.units.split(",") if u.strip())
    t0 = time.perf_counter()
    result = layer_sensitivity(model, recipe, calib, ev, kinds=kinds, progress=not args.quiet)
    result.settings.update({"model": args.model or "default", "device": device,
                            "seconds": time.perf_counter() - t0, "eval_data": args.eval_data,
                            "held_out": "last windows of the evaluation half"})
    return result
