"""``sparsequant export``: write a checkpoint in another runtime's format (compressed-tensors)."""
from __future__ import annotations


def add_parser(subparsers, common_parent):
    p = subparsers.add_parser(
        "export", parents=[common_parent], help="export a checkpoint as compressed-tensors (vLLM, transformers)",
        description="Write a sparsequant checkpoint as a compressed-tensors checkpoint that transformers and vLLM "
        "load. 2:4 sparsity is stored dense (compressed-tensors has no sparse format any more), so other runtimes "
        "get the quantization speedup, not the sparse one.",
        epilog="example: sparsequant export runs/smollm2-24-w4 --format compressed-tensors --out runs/smollm2-ct",
    )
    p.add_argument("checkpoint", help="sparsequant checkpoint folder")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])
    p.add_argument("--scheme", default="pack-quantized", choices=["pack-quantized", "int-quantized"],
                   help="pack-quantized: weight-only W{bits}A16 (default); int-quantized: W8A8 (8-bit per-channel "
                   "weights, dynamic per-token int8 activations)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..checkpoint.export_compressed_tensors import export_compressed_tensors

    s = export_compressed_tensors(args.checkpoint, args.out, fmt=args.scheme, overwrite=args.overwrite)
    print(f"wrote {args.out}: {s['format']}, {s['quantized_linears']} quantized linears, "
          f"{s['ignored_linears']} left in float, {s['bytes'] / 1e6:.1f} MB")
    return 0
