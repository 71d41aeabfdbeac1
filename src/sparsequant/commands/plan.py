"""``sparsequant plan``: memory and roofline-predicted speed of a model under each storage format."""
from __future__ import annotations

DEFAULT_BATCHES = "1,16,128,2048"
DEFAULT_MODEL = "smollm2-135m"  # the project's default model
GENERIC_SHAPE = (4096, 4096)


def add_parser(subparsers, common_parent):
    from ..eval.roofline import DEFAULT_FORMATS, FORMATS, GPUS, PRESETS

    p = subparsers.add_parser(
        "plan", parents=[common_parent],
        help="weight memory, KV cache and roofline speedup of each format on a GPU (no model download)",
        description="Predict, before compressing, what each storage format buys: weight memory of the model, "
        "KV-cache bytes per token, and the roofline speedup over dense fp16 of every linear-layer shape per "
        "batch size (tokens per forward). time = max(FLOPs / tensor-core rate, bytes / bandwidth); see "
        "docs/roofline.md for the assumptions.",
        epilog="example: sparsequant plan --config llama-3-8b --gpu h100 --batch 1,16,128,2048",
    )
    p.add_argument("--config", help=f"preset ({', '.join(PRESETS)}), a config.json, or a folder holding one "
                   f"(default {DEFAULT_MODEL} unless --params is given)")
    p.add_argument("--params", help="parameter count instead of a config, e.g. 7e9, 6.7B, 135M "
                   "(all counted as compressible linear weights)")
    p.add_argument("--shape", action="append", metavar="NxK",
                   help="linear shape out x in for the speedup table (repeatable); replaces the model's shapes")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    p.add_argument("--batch", default=DEFAULT_BATCHES, help=f"tokens per forward, comma-separated "
                   f"(default {DEFAULT_BATCHES})")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"comma-separated formats from: {', '.join(FORMATS)}")
    p.add_argument("--sparse-tensor-cores", action="store_true",
                   help="assume a kernel that runs 2:4 W4A16 on sparse tensor cores (default: dense tensor "
                   "cores, which is what exists on Hopper)")
    p.add_argument("--context", type=int, default=4096, help="tokens for the KV-cache total (default 4096)")
    p.set_defaults(func=run)
    return p


def _bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _shape_arg(text: str) -> tuple[int, int]:
    from ..eval.roofline import RooflineError

    try:
        n, k = (int(v) for v in text.lower().replace(" ", "").split("x"))
    except ValueError:
        raise RooflineError(f"--shape takes NxK (out x in), e.g. 4096x11008; got {text!r}") from None
    if n <= 0 or k <= 0:
        raise RooflineError(f"--shape needs positive sizes, got {text!r}")
    return n, k


def _cell(lt, base) -> str:
    return f"{base.time_s / lt.time_s:.2f}x {lt.bound[0]}"


def _gpu_line(gpu) -> str:
    parts = []
    for math in ("fp16", "fp8", "int8"):
        if gpu.supports(math):
            sparse = gpu.flops.get((math, True))
            parts.append(f"{math} {gpu.flops[(math, False)] / 1e12:.0f}" + (f"/{sparse / 1e12:.0f}" if sparse else ""))
    return f"{gpu.name}: {gpu.bandwidth / 1e12:.3g} TB/s; TFLOP/s dense/2:4: " + ", ".join(parts)


def run(args) -> int:
    from ..eval import roofline as rl
    from ..eval.table import markdown_table

    gpu = rl.get_gpu(args.gpu)
    batches = rl.parse_batches(args.batch)
    formats = [rl.get_format(f.strip()) for f in args.formats.split(",") if f.strip()]
    if not formats:
        raise rl.RooflineError(f"no formats given; known: {', '.join(rl.FORMATS)}")
    if "fp16" not in [f.name for f in formats]:
        formats.insert(0, rl.FORMATS["fp16"])  # the baseline of every ratio
    if args.config and args.params:
        raise rl.RooflineError("give --config or --params, not both")
    if args.context < 0:
        raise rl.RooflineError(f"--context must be >= 0, got {args.context}")
    base_mem = None

    # -- memory -------------------------------------------------------------------------------------
    if args.params:
        n = rl.parse_count(args.params)
        shapes = [_shape_arg(s) for s in args.shape] if args.shape else [GENERIC_SHAPE]
        print(f"# {n / 1e9:.3g}B parameters, all counted as compressible linear weights "
              "(no config: embeddings and norms not separated; per-row scales neglected)\n")
        mems = [rl.params_memory(n, f) for f in formats]
        layer_shapes = [("given", a, b) for a, b in shapes]
        shape = None
    else:
        shape = rl.load_shape(args.config or DEFAULT_MODEL)
        print(f"# {shape.name}: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
              f"{shape.heads} heads ({shape.kv_heads} KV, head dim {shape.hd}), vocab {shape.vocab}"
              f"{', tied embeddings' if shape.tied_embeddings else ''}")
        print(f"# {shape.params / 1e9:.3f}B parameters: {shape.linear_params / 1e9:.3f}B in decoder linears "
              f"(compressed), {shape.other_params / 1e6:.1f}M embeddings/head/norms (kept fp16)\n")
        mems = [rl.weight_memory(shape, f) for f in formats]
        layer_shapes = ([("given", a, b) for a, b in map(_shape_arg, args.shape)] if args.shape
                        else rl.unique_linear_shapes(shape))
    base_mem = next(m for m in mems if m.format == "fp16")
    rows = [[rl.FORMATS[m.format].label, f"{m.bits_per_weight:.3f}", _bytes(m.linear_bytes), _bytes(m.total_bytes),
             f"{m.total_bytes / base_mem.total_bytes:.3f}", f"{base_mem.total_bytes / m.total_bytes:.2f}x"]
            for m in mems]
    print("## Weight memory (1 GB = 1e9 bytes)\n")
    print(markdown_table(["format", "bits/weight (linears)", "linears", "whole model", "ratio vs fp16",
                          "smaller by"], rows))
    if shape is not None:
        kv16 = rl.kv_cache_bytes_per_token(shape, 2)
        print(f"\nKV cache per token: {_bytes(kv16)} fp16, {_bytes(kv16 / 2)} fp8 "
              f"(2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.hd} dims x bytes); "
              f"{args.context} tokens: {_bytes(kv16 * args.context)} fp16 per sequence")

    # -- speed --------------------------------------------------------------------------------------
    print(f"\n## Roofline speedup over dense fp16 per linear, {_gpu_line(gpu)}\n")
    print("2:4 W4A16 runs on " + ("sparse tensor cores (--sparse-tensor-cores)" if args.sparse_tensor_cores
                                  else "dense tensor cores (no sparse mixed-input kernel assumed)")
          + "; m = memory-bound, c = compute-bound; columns: tokens per forward (M)")
    if not args.sparse_tensor_cores and gpu.name.startswith("A100"):
        print("(Sparse Marlin runs 2:4 W4A16 on Ampere's sparse tensor cores: add --sparse-tensor-cores to model it)")
    print()
    headers = ["layer", "N x K", "format", *(f"M={m}" for m in batches)]
    table = []
    for name, n, k in layer_shapes:
        base = {m: rl.layer_time(n, k, m, "fp16", gpu) for m in batches}
        table.append([name, f"{n}x{k}", "fp16 time", *(f"{base[m].time_s * 1e6:.3g} us {base[m].bound[0]}"
                                                       for m in batches)])
        for f in formats:
            if f.name == "fp16":
                continue
            cells = []
            for m in batches:
                try:
                    cells.append(_cell(rl.layer_time(n, k, m, f, gpu, args.sparse_tensor_cores), base[m]))
                except rl.RooflineError:
                    cells.append(f"n/a (no {f.math})")
            table.append(["", "", f.name, *cells])
    if shape is not None and not args.shape:
        first = True
        for f in formats:
            if f.name == "fp16":
                continue
            try:
                cells = [f"{rl.model_speedup(shape, m, f, gpu, args.sparse_tensor_cores):.2f}x" for m in batches]
            except rl.RooflineError:
                cells = [f"n/a (no {f.math})"] * len(batches)
            table.append(["all linears" if first else "", "one layer" if first else "", f.name, *cells])
            first = False
    print(markdown_table(headers, table))
    if args.params and not args.shape:
        print(f"\n(no config: speed shown for a {GENERIC_SHAPE[0]}x{GENERIC_SHAPE[1]} linear; give --shape NxK "
              "or --config for your model's shapes)")
    print("\nIdeal numbers: no kernel overheads, dequantization or launch costs; measured kernels land below them.")
    return 0
