"""Time the Hessian solvers on the seven linears of one decoder layer.

    PYTHONPATH=src python3 benchmarks/bench_solvers.py --shapes llama7b --out runs/bench_solvers.json
    PYTHONPATH=src python3 benchmarks/bench_solvers.py --shapes small --device cpu   # quick check

Weights are random; each linear's Hessian comes from ``--tokens`` random tokens with correlated
features and uneven channel scales (like real activations), generated on the device in chunks.
Linears that read the same activations in a real model (q/k/v, gate/up) share a Hessian, but each
solver call still factors it itself, as the per-linear API does. Times cover the whole solver call
(Hessian checks, damping and factorization, the sweep, codes), after one warm-up call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.solvers import CompressedWeight, LayerStats, gptq_quantize, sparsegpt_joint, sparsegpt_prune

# name -> (out, in, which input activations it reads)
SHAPES = {
    "llama7b": [  # LLaMA-2-7B decoder layer
        ("q_proj", 4096, 4096, "attn_in"),
        ("k_proj", 4096, 4096, "attn_in"),
        ("v_proj", 4096, 4096, "attn_in"),
        ("o_proj", 4096, 4096, "attn_out"),
        ("gate_proj", 11008, 4096, "mlp_in"),
        ("up_proj", 11008, 4096, "mlp_in"),
        ("down_proj", 4096, 11008, "mlp_mid"),
    ],
    "small": [  # SmolLM2-135M decoder layer (the default model)
        ("q_proj", 576, 576, "attn_in"),
        ("k_proj", 192, 576, "attn_in"),
        ("v_proj", 192, 576, "attn_in"),
        ("o_proj", 576, 576, "attn_out"),
        ("gate_proj", 1536, 576, "mlp_in"),
        ("up_proj", 1536, 576, "mlp_in"),
        ("down_proj", 576, 1536, "mlp_mid"),
    ],
}

SPARSITY = SparsitySpec.parse("2:4")
QUANT = QuantSpec(bits=4, group_size=128, symmetric=True)


def run_algo(algo: str, w: torch.Tensor, stats: LayerStats, info: dict) -> torch.Tensor:
    """Run one solver; returns the compressed weight (for the error check, outside the timing)."""
    if algo == "sparsegpt_joint":
        codes, params, mask = sparsegpt_joint(w, stats, SPARSITY, QUANT, info=info)
        return codes, params, SPARSITY, mask
    if algo == "sparsegpt":
        wp, mask = sparsegpt_prune(w, stats, SPARSITY, info=info)
        return wp, None, SPARSITY, mask
    if algo in ("gptq", "gptq_act_order"):
        codes, params = gptq_quantize(w, stats, QUANT, None, act_order=algo == "gptq_act_order", info=info)
        return codes, params, SparsitySpec(), None
    raise SystemExit(f"unknown algorithm {algo!r}")


def to_weight(result) -> torch.Tensor:
    a, params, spec, mask = result
    if params is None:
        return a
    return CompressedWeight.from_quantized(a, params, spec, mask).validate().weight


def make_hessian(k: int, tokens: int, device, seed: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t x_t x_t^T over ``tokens`` rows x = (z B + 0.1 n) * c: a 256-dim shared structure,
    independent noise, and log-normal channel scales. Returns (hessian, sq_sum), float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = min(256, k)
    mix = torch.randn(rank, k, device=device, generator=g) / rank**0.5
    scale = torch.exp(0.7 * torch.randn(k, device=device, generator=g))
    h = torch.zeros(k, k, device=device)
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        x = torch.randn(n, rank, device=device, generator=g) @ mix
        x += 0.1 * torch.randn(n, k, device=device, generator=g)
        x *= scale
        h.addmm_(x.T, x)
        done += n
    return h, h.diagonal().clone()


def check_against_cpu(device) -> dict:
    """Same small problem on the GPU and the CPU: fractions of equal masks and codes. Float32 sums
    run in different orders on the two, so a few near-ties may flip; far from 1.0 means a bug."""
    h, sq = make_hessian(512, 8192, torch.device("cpu"), seed=7)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    out = {}
    for dev in (torch.device("cpu"), device):
        st = LayerStats(n_tokens=8192, sq_sum=sq.to(dev), abs_max=sq.sqrt().to(dev), hessian=h.to(dev))
        codes, _, mask = sparsegpt_joint(w.to(dev), st, SPARSITY, QUANT)
        gcodes, _ = gptq_quantize(w.to(dev), st, QUANT, None, act_order=True)
        out[dev.type] = (codes.cpu(), mask.cpu(), gcodes.cpu())
    (c0, m0, g0), (c1, m1, g1) = out["cpu"], out[device.type]
    return {
        "sparsegpt_mask_equal": float((m0 == m1).float().mean()),
        "sparsegpt_codes_equal": float((c0 == c1).float().mean()),
        "gptq_act_order_codes_equal": float((g0 == g1).float().mean()),
    }


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens per Hessian")
    ap.add_argument("--algos", default="sparsegpt_joint,gptq",
                    help="comma list of sparsegpt_joint, sparsegpt, gptq, gptq_act_order")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per linear (the minimum is kept)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--no-check", action="store_true", help="skip the CUDA-vs-CPU agreement check")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    # TF32 would make the lazy block updates inexact compared with the papers' float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]

    t0 = time.perf_counter()
    hessians = {}
    for i, (_, _, k, src) in enumerate(SHAPES[args.shapes]):
        if src not in hessians:
            h, sq = make_hessian(k, args.tokens, device, seed=1000 + i)
            hessians[src] = LayerStats(n_tokens=args.tokens, sq_sum=sq, abs_max=sq.sqrt(), hessian=h)
    sync(device)
    build_s = time.perf_counter() - t0

    # Warm-up: first CUDA calls load cuSOLVER/cuBLAS and pick kernels; keep that out of the table.
    wk = 256
    hw, sqw = make_hessian(wk, 4096, device, seed=1)
    warm = LayerStats(n_tokens=4096, sq_sum=sqw, abs_max=sqw.sqrt(), hessian=hw)
    for algo in algos:
        run_algo(algo, torch.randn(64, wk, device=device), warm, {})
    sync(device)

    agreement = None
    if device.type == "cuda" and not args.no_check:
        agreement = check_against_cpu(device)
        print(f"CUDA vs CPU on a 256x512 problem: {agreement}", flush=True)

    rows, totals = [], {a: 0.0 for a in algos}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, out_f, in_f, src in SHAPES[args.shapes]:
        stats = hessians[src]
        w = torch.randn(out_f, in_f, device=device, generator=gen) * 0.02
        for algo in algos:
            best, info, result = float("inf"), {}, None
            for _ in range(max(1, args.repeat)):
                info = {}
                sync(device)
                t = time.perf_counter()
                result = run_algo(algo, w, stats, info)
                sync(device)
                best = min(best, time.perf_counter() - t)
            dw = w - to_weight(result)
            h = stats.hessian
            rel = float((dw @ h * dw).sum() / (w @ h * w).sum())  # ||dW X||^2 / ||W X||^2
            totals[algo] += best
            rows.append({"linear": name, "shape": [out_f, in_f], "algo": algo, "seconds": best,
                         "rel_output_err": rel, "damp": info.get("damp"), "obs_loss": info.get("loss")})
            print(f"{name:>10} {out_f:>6}x{in_f:<6} {algo:>16} {best:8.3f} s   rel err {rel:.4f}", flush=True)
            del result, dw

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print()
    print(f"device: {dev_name}; torch {torch.__version__}; shapes {args.shapes}; "
          f"Hessians from {args.tokens} tokens built in {build_s:.1f} s")
    header = "| linear | shape | " + " | ".join(f"{a} (s)" for a in algos) + " |"
    print(header)
    print("|" + "---|" * (2 + len(algos)))
    for name, out_f, in_f, _ in SHAPES[args.shapes]:
        cells = [f"{r['seconds']:.3f}" for a in algos for r in rows if r["linear"] == name and r["algo"] == a]
        print(f"| {name} | {out_f}x{in_f} | " + " | ".join(cells) + " |")
    print("| **layer total** | | " + " | ".join(f"**{totals[a]:.2f}**" for a in algos) + " |")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": dev_name,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "shapes": args.shapes,
            "tokens": args.tokens,
            "sparsity": str(SPARSITY),
            "quant": str(QUANT),
            "hessian_build_seconds": build_s,
            "cuda_vs_cpu_agreement": agreement,
            "results": rows,
            "layer_total_seconds": totals,
        }, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
