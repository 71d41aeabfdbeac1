"""The ``sparsequant`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_EVAL_WINDOWS = 20
DEFAULT_EVAL_SEQ_LEN = 1024
EVAL_BATCH = 4


def _recipe_from_args(args):
    from .recipe import CalibrationConfig, QuantConfig, get_recipe

    recipe = get_recipe(args.recipe)
    changes = {}
    if args.method:
        changes["method"] = args.method
    if args.pattern:
        changes["pattern"] = args.pattern
    if args.no_quant:
        changes["quant"] = None
    elif any(v is not None for v in (args.bits, args.group_size, args.quantizer)) or args.asym:
        q = recipe.quant or QuantConfig()
        changes["quant"] = QuantConfig(
            method=args.quantizer or q.method,
            bits=args.bits if args.bits is not None else q.bits,
            group_size=(None if args.group_size == 0 else args.group_size) if args.group_size is not None else q.group_size,
            symmetric=not args.asym and q.symmetric,
        )
    c = recipe.calibration
    changes["calibration"] = CalibrationConfig(
        source=args.calib_data or c.source,
        samples=args.samples or c.samples,
        seq_len=args.seq_len or c.seq_len,
        seed=c.seed if args.seed is None else args.seed,
        batch_size=args.calib_batch or c.batch_size,
    )
    if args.true_sequential:
        changes["true_sequential"] = True
    if args.skip:
        changes["skip"] = tuple(recipe.skip) + tuple(args.skip)
    if args.adapter_rank is not None or args.adapter_bits is not None:
        changes["adapter"] = _adapter_from_args(recipe.adapter, args)
    if changes.get("method") or changes.get("pattern") or "quant" in changes:
        changes.setdefault("name", "custom")
    return recipe.with_(**changes)


def _adapter_from_args(current, args):
    """--adapter-rank (a ratio like 0.1, or an integer rank like 64; 0 removes adapters) and
    --adapter-bits (0 = float factors) on top of the recipe's adapter section."""
    from .errors import RecipeError
    from .recipe import AdapterConfig

    a = current or AdapterConfig()
    rank = a.rank
    if args.adapter_rank is not None:
        text = args.adapter_rank.strip()
        try:
            rank = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise RecipeError(f"--adapter-rank takes a ratio (0.1) or an integer rank (64), got {text!r}") from None
        if rank == 0:
            return None
    bits = a.bits if args.adapter_bits is None else (args.adapter_bits or None)
    return AdapterConfig(rank=rank, bits=bits, group_size=a.group_size, iterations=a.iterations, saliency=a.saliency)


def _eval_ppl(model, tokenizer, args, desc):
    from .data.windows import evaluation_windows
    from .eval.perplexity import perplexity

    if args.eval_windows == 0:
        return None
    windows = evaluation_windows(tokenizer, args.eval_seq_len, args.eval_windows, args.eval_data)
    return perplexity(model, windows, batch_size=EVAL_BATCH, desc=desc, progress=not args.quiet)


def _device(args):
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(args, device: str):
    import torch

    if getattr(args, "dtype", None):
        return getattr(torch, args.dtype)
    from .models.loading import is_checkpoint

    if getattr(args, "model", None) and is_checkpoint(args.model):
        return None  # the checkpoint's own: its compute dtype on the CPU, its storage dtype on a GPU
    return torch.float32 if device == "cpu" else torch.float16


def cmd_compress(args) -> int:
    import torch

    from . import api
    from .checkpoint.atomic import check_output_folder
    from .eval.table import markdown_table
    from .models.loading import load_model, model_summary

    out = Path(args.out)
    check_output_folder(out, args.overwrite)  # fail before hours of work, not after
    recipe = _recipe_from_args(args)
    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=_dtype(args, device),
                                  device=device, quiet=args.quiet)
    t_load = time.perf_counter() - t0
    log = {"command": " ".join(sys.argv), "model": args.model or "default", "device": device,
           "recipe": recipe.to_dict(), "model_summary": model_summary(model),
           "eval": {"data": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows}}
    dense_ppl = _eval_ppl(model, tokenizer, args, "dense perplexity")
    t1 = time.perf_counter()
    result = api.compress(model, recipe, tokenizer=tokenizer, device=device, progress=not args.quiet)
    t_compress = time.perf_counter() - t1
    comp_ppl = _eval_ppl(model, tokenizer, args, "compressed perplexity")
    log.update({
        "dense_ppl": dense_ppl, "compressed_ppl": comp_ppl, "seconds": {"load": t_load, "compress": t_compress},
        "layers": [vars(r) for r in result.layers],
        "linears": [{**vars(r), "shape": list(r.shape)} for r in result.linears],
    })
    size = api.save(result, out, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra={"run": {"dense_ppl": dense_ppl, "compressed_ppl": comp_ppl, "eval": log["eval"]}})
    log["size"] = size.to_dict()
    log["seconds"]["total"] = time.perf_counter() - t0
    from .checkpoint.atomic import atomic_write_text

    atomic_write_text(out / "run.json", json.dumps(log, indent=2))
    d = recipe.describe()
    bits = "16" if recipe.quant is None else str(recipe.quant.bits)
    print()
    print(markdown_table(
        ["method", "pattern", "quant", "bits", "bits/weight", "size MB", "ratio vs fp16", "dense ppl",
         "compressed ppl", "wall s"],
        [[d["method"], d["pattern"], d["quant"] + ("" if recipe.adapter is None else f" + {d['adapter']}"), bits, size.bits_per_weight, size.total_bytes / 1e6,
          size.model_ratio, dense_ppl, comp_ppl, log["seconds"]["total"]]],
    ))
    print(f"\ncompressed linears: {size.bits_per_weight:.3f} bits/weight, {size.linear_ratio:.3f}x their fp16 size; "
          f"whole model {size.model_ratio:.3f}x fp16 (embeddings and norms stay 16-bit)")
    if comp_ppl is not None:
        print(f"perplexity on {args.eval_windows} x {args.eval_seq_len} held-out tokens ({args.eval_data})")
    print(f"checkpoint: {out}  (run log: {out / 'run.json'})")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .checkpoint.atomic import atomic_write_text
    from .models.loading import is_checkpoint, load_model

    device = _device(args)
    torch.set_num_threads(args.threads) if args.threads else None
    model, tokenizer = load_model(args.model, dtype=_dtype(args, device),
                                  device=device, quiet=args.quiet)
    results = {"model": args.model or "default", "device": device}
    if (args.ppl or not args.tasks) and args.eval_windows:
        ppl = _eval_ppl(model, tokenizer, args, "perplexity")
        results["ppl"] = {"value": ppl, "data": args.eval_data, "seq_len": args.eval_seq_len,
                          "windows": args.eval_windows}
        print(f"perplexity: {ppl:.4f}  ({args.eval_windows} x {args.eval_seq_len} tokens of {args.eval_data})")
    if args.tasks:
        from .eval.zeroshot import evaluate

        task_results = evaluate(model, tokenizer, args.tasks, split=args.split, limit=args.limit,
                                progress=not args.quiet)
        results["tasks"] = task_results
        results["tasks_setting"] = {"split": args.split or "default (validation where present)", "limit": args.limit}
        for name, r in task_results.items():
            norm = "" if r.get("acc_norm") is None else f", acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"
            print(f"{name}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}{norm} (n={r['n']})")
    if args.model and is_checkpoint(args.model):
        target = Path(args.model) / "eval.json"
        previous = json.loads(target.read_text()) if target.is_file() else {}
        merged = {**previous, **results}  # earlier perplexity or task results stay unless re-measured
        if "tasks" in results:
            merged["tasks"] = {**previous.get("tasks", {}), **results["tasks"]}
        atomic_write_text(target, json.dumps(merged, indent=2))
        print(f"results saved to {Path(args.model) / 'eval.json'}")
    return 0


def cmd_recipes(args) -> int:
    from .eval.table import markdown_table
    from .recipe import PRESETS

    if args.show:
        from .recipe import get_recipe

        print(get_recipe(args.show).to_yaml())
        return 0
    rows = [[name, *r.describe().values()] for name, r in PRESETS.items()]
    print(markdown_table(["preset", "method", "pattern", "quant", "adapter"], rows))
    print("\nShow one as YAML (a starting point for your own recipe): sparsequant recipes --show 2:4-w4a16")
    return 0


def cmd_info(args) -> int:
    from .checkpoint.io import read_meta

    meta = read_meta(args.checkpoint)
    print(json.dumps({k: meta[k] for k in ("format_version", "recipe", "storage_dtype", "size", "run") if k in meta},
                     indent=2))
    return 0


def _add_eval_args(p):
    p.add_argument("--eval-data", default="wikipedia",
                   help="perplexity text: 'wikipedia' (offline, held-out half), a .txt file, or wikitext2 (needs a hub)")
    p.add_argument("--eval-seq-len", type=int, default=DEFAULT_EVAL_SEQ_LEN, help="context length of each window")
    p.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                   help="number of non-overlapping windows scored (0 skips perplexity)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    common.add_argument("--threads", type=int, help="CPU threads for torch")
    common.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="model dtype (default: a checkpoint's own; float32 on the CPU, float16 on a GPU otherwise)")
    parser = argparse.ArgumentParser(
        prog="sparsequant",
        description="Prune, quantize, pack and evaluate causal language models. "
        "Without a model argument the bundled SmolLM2-135M-Instruct is used.",
        epilog="example: sparsequant compress --recipe 2:4-w4a16 --out ./smollm2-24-w4",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", parents=[common], help="prune + quantize a model and write a packed checkpoint",
                       description="Compress a model one decoder layer at a time and write a packed checkpoint. "
                       "Prints dense and compressed perplexity on held-out text and a summary table.")
    p.add_argument("model", nargs="?", default=None,
                   help="hub id, local folder, .gguf file; omitted: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--recipe", default="2:4-w4a16", help="preset name (see 'sparsequant recipes') or YAML file")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--method", help="override the pruning method (magnitude, wanda, sparsegpt, ...)")
    p.add_argument("--pattern", help="override the pattern: 2:4, 4:8, 8:16, 50%%, 50%%-matrix, hybrid:35%% "
                   "(128x128 tiles dense or 2:4; hybrid:35%%@64x128), dense; append +8/256 for outliers")
    p.add_argument("--quantizer", help="override the quantizer (rtn, gptq)")
    p.add_argument("--bits", type=int, help="override quantization bits (2-8)")
    p.add_argument("--group-size", type=int, help="override the group size (0 = per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric (min-max) quantization")
    p.add_argument("--no-quant", action="store_true", help="prune only")
    p.add_argument("--samples", type=int, help="calibration windows")
    p.add_argument("--seq-len", type=int, help="calibration window length")
    p.add_argument("--seed", type=int, help="calibration sampling seed")
    p.add_argument("--calib-batch", type=int, help="calibration windows per forward pass")
    p.add_argument("--calib-data", help="calibration text: wikipedia, a .txt file, or a hub dataset name")
    p.add_argument("--true-sequential", action="store_true",
                   help="compress q/k/v, o, gate/up, down in order, each on the outputs of the ones before")
    p.add_argument("--skip", action="append", help="glob of linear names to leave untouched (repeatable)")
    p.add_argument("--adapter-rank", help="SLiM low-rank adapters: a ratio of min(out, in) such as 0.1, "
                   "or an integer rank; 0 removes the recipe's adapters")
    p.add_argument("--adapter-bits", type=int, help="quantize the adapters to this many bits (0 = float16)")
    _add_eval_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[common], help="perplexity (and zero-shot tasks) of a model or checkpoint")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, hub id, folder or .gguf; omitted: default")
    p.add_argument("--ppl", action="store_true", help="perplexity on held-out text (default when no --tasks)")
    p.add_argument("--tasks", help="comma-separated zero-shot tasks, e.g. arc_easy,arc_challenge,piqa,winogrande")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--split", help="task split (validation by default, test where the task files have it)")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recipes", parents=[common], help="list the named recipe presets")
    p.add_argument("--show", help="print one preset as YAML")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("info", parents=[common], help="summarize a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)

    from .commands import plan as plan_cmd
    from .commands import report as report_cmd

    plan_cmd.add_parser(sub, common)
    report_cmd.add_parser(sub, common)
    from .commands import bench as bench_cmd
    from .commands import export as export_cmd
    from .commands import generate as generate_cmd

    generate_cmd.add_parser(sub, common)
    bench_cmd.add_parser(sub, common)
    export_cmd.add_parser(sub, common)
    from .commands import sensitivity as sensitivity_cmd

    sensitivity_cmd.add_parser(sub, common)
    return parser


def main(argv=None) -> int:
    from .errors import SparseQuantError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparseQuantError as exc:
        print(f"sparsequant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
