"""Check and time the hybrid-tile kernels (tiles dense or 2:4) against baselines of the same run.

    PYTHONPATH=src python benchmarks/bench_hybrid.py [--quick] [--sweep] [--budget-s 200] [--out DIR]

1. Correctness: LLaMA-2-7B shapes (4096x4096, 11008x4096, 4096x11008) at 0/25/35/50% sparsity,
   int4 g128 (plus int8 g64 asym and bf16 cases): HybridState at 1, 5, 16, 128 tokens against the
   float64 product with the checkpoint's dequantized weight (PackedWeight.to_compressed()),
   outputs poisoned with NaN. Weights: random Gaussian, random tiles 2:4 at exactly the budget,
   magnitude 2:4 inside them, RTN (kernels/testing_hybrid.py), built on the GPU; no calibration.
   0% is stored 'dense' (a hybrid weight at 0% is); the same kernels run it as all-dense tiles.
2. Timing (fp16 activations, int4 g128): median over replays of a CUDA graph of calls rotating
   over several weight copies (bench_kernels.time_graph), at 1, 16, 128, 2048 tokens:
   cuBLAS fp16 F.linear; our nm24 path at 50% (Triton decode / prefill / expand + cuBLAS, the
   mma.sp CUDA kernel left out: it needs a multi-minute nvcc build); the hybrid decode kernel,
   plain and software-pipelined (<= 16 tokens), and hybrid expand + cuBLAS; "hybrid" = the
   fastest of them (what dispatch should pick). Eager call time of the 1-token hybrid call.
3. --sweep: decode variant / BLOCK_N / SPLIT at 1 token, 35% sparsity.
Prints a short table last and writes JSON to $OUT (or --out).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import copies_for, geomean, time_eager, time_graph  # noqa: E402

from sparsequant import kernels  # noqa: E402
from sparsequant.kernels.hybrid import HybridState  # noqa: E402
from sparsequant.kernels.layout import build_layout  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402
from sparsequant.kernels.testing_hybrid import random_packed_hybrid  # noqa: E402
from sparsequant.kernels.triton_hybrid import (  # noqa: E402
    DecodeWorkspace, hybrid_decode_linear, hybrid_expand_linear, pick_hybrid_decode_config)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # out x in
SPARSITIES = [0.0, 0.25, 0.35, 0.5]
TOKENS = [1, 16, 128, 2048]
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel64(y, x, w64):
    if not torch.isfinite(y).all():
        return float("inf")
    ref = x.double() @ w64.t()
    return ((y.double() - ref).norm() / ref.norm()).item()


def clone_hybrid_layout(lay):
    c = copy.copy(lay)
    for name in ("flags", "offsets", "vals", "meta", "scales"):
        setattr(c, name, getattr(lay, name).clone())
    c.zeros = None if lay.zeros is None else lay.zeros.clone()
    return c


def clone_nm24_layout(lay):
    c = copy.copy(lay)
    c.meta, c.vals, c.scales = lay.meta.clone(), lay.vals.clone(), lay.scales.clone()
    c.zeros = None if lay.zeros is None else lay.zeros.clone()
    return c


def build(n, k, s, dev, bits=4, group=128, sym=True, seed=0):
    t = time.time()
    pk = random_packed_hybrid(n, k, s, (128, 128), bits, group, sym, device=dev, seed=seed)
    t_pack = time.time() - t
    t = time.time()
    state = HybridState(pk, dev, torch.float16)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return pk, state, t_pack, time.time() - t


def check(pk, st, dtype, results, tag) -> dict:
    """Errors of the decode kernel (1, 5, 16 tokens) and of expand + cuBLAS (1, 16, 128) vs float64.
    A path that raises is reported and marked failed; the other paths still run."""
    n, k = pk.shape
    w64 = pk.to_compressed().weight.to(st.device).double()
    errs, status = {}, {"decode": True, "decode_pf": True, "expand": True}
    for path, tokens in (("decode", (1, 5, 16)), ("decode_pf", (1, 5, 16)), ("expand", (1, 16, 128))):
        for m in tokens:
            x = torch.randn(m, k, device=st.device).to(dtype)
            try:
                if path.startswith("decode"):
                    y = torch.full((m, n), float("nan"), dtype=dtype, device=st.device)
                    cfg = dict(pick_hybrid_decode_config(st.layout, m), PREFETCH=path == "decode_pf")
                    hybrid_decode_linear(x, st.layout, st.workspace, config=cfg, out=y)
                else:
                    y = hybrid_expand_linear(x, st.layout)
                errs[f"{path}{m}"] = rel64(y, x, w64)
            except Exception as exc:  # noqa: BLE001 - report, keep the other paths
                log(f"  {path} {m} tokens raised {type(exc).__name__}: {str(exc)[:300]}")
                errs[f"{path}{m}"] = math.inf
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for path in status:
        status[path] = all(e < tol for key, e in errs.items() if key.rstrip("0123456789") == path)
    status["decode"] &= int(st.workspace.counters.abs().sum()) == 0
    status["decode_pf"] &= int(st.workspace.counters.abs().sum()) == 0
    q = pk.quant
    log(f"  {tag} {n}x{k} int{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'} {str(dtype)[6:]}: "
        f"2:4 tiles {st.layout.flags.float().mean().item():.2f}, max rel err {max(errs.values()):.2e}, "
        + "".join(f"{p} {'PASS' if v else 'FAIL'}, " for p, v in status.items())
        + f"{8 * st.layout.nbytes() / (n * k):.2f} bits/weight")
    results["correctness"].append(dict(tag=tag, n=n, k=k, bits=q.bits, group=q.group_size, sym=q.symmetric,
                                       dtype=str(dtype), errors=errs, **status,
                                       bits_per_weight=8 * st.layout.nbytes() / (n * k)))
    return status


def extra_checks(dev, results):
    """Other formats and bf16 (correctness only)."""
    (n0, k0), (n1, k1) = SHAPES[0], SHAPES[-1]
    ok = True
    for i, (n, k, s, bits, group, sym, dtype) in enumerate([
            (n0, k0, 0.35, 8, 64, False, torch.bfloat16), (n1, k1, 0.25, 4, None, False, torch.bfloat16),
            (n0, k0, 0.35, 8, 128, True, torch.float16), (n0, k0, 0.25, 4, 32, False, torch.float16)]):
        pk, st, _, _ = build(n, k, s, dev, bits, group, sym, seed=100 + i)
        status = check(pk, st, dtype, results, f"{s:.0%}")
        ok &= all(status.values())
        if i == 0:
            ok &= graph_check(pk, dtype, results)
    return ok


def graph_check(pk, dtype, results) -> bool:
    """kernels.prepare gives a HybridState; 1 and 3 tokens replayed in a CUDA graph with new inputs
    equal the eager calls (split-K counters reset between replays)."""
    state = kernels.prepare(pk, "cuda", dtype)
    ok = isinstance(state, HybridState)
    for m in (1, 3):
        x = torch.randn(m, pk.shape[1], device="cuda").to(dtype)
        kernels.linear(x, state)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = kernels.linear(x, state)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            g.replay()
            torch.cuda.synchronize()
            ok &= torch.equal(y, kernels.linear(x, state))
    log(f"  prepare -> {type(state).__name__}, CUDA-graph replays equal eager calls: {'PASS' if ok else 'FAIL'}")
    results["graph_check"] = ok
    return ok


def sweep(st, x, results, key):
    """Decode BLOCK_N / SPLIT at 1 token."""
    lay0 = st.layout
    lays = [lay0] + [clone_hybrid_layout(lay0) for _ in range(copies_for(lay0.nbytes()) - 1)]
    wss = [DecodeWorkspace(lay0.n, lay0.vals.device) for _ in lays]
    row = {}
    for pf in (False, True):
        for bn in (64, 128):
            for sp in (8, 32):
                if sp > lay0.n_tile_cols:
                    continue
                cfg = dict(BLOCK_N=bn, SPLIT=sp, num_warps=4, PREFETCH=pf)
                row[f"{'pf' if pf else 'pl'}_bn{bn}_s{sp}"] = time_graph(
                    [lambda l=l, w=w, c=cfg: hybrid_decode_linear(x, l, w, config=c) for l, w in zip(lays, wss)])
    if not row:
        return
    best = min(row, key=row.get)
    log(f"  sweep {key} 35% 1 token: best {best} {row[best]:.1f} us; auto {pick_hybrid_decode_config(lay0, 1)}; "
        + " ".join(f"{c}={v:.1f}" for c, v in row.items()))
    results["sweep"][key] = row


def bench(dev, results, budget_s, do_sweep, quick):
    """Per shape: baselines, then per sparsity: build, check, time (fp16 activations, int4 g128)."""
    ok_all = True
    for (n, k) in SHAPES[: 1 if quick else None]:
        key = f"{n}x{k}"
        res = results["timing"].setdefault(key, {})
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in TOKENS}
        over = time.time() - T0 > budget_s
        if not over:
            w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.05
            ws16 = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2) - 1)]
            res["fp16"] = {m: time_graph([lambda w=w, m=m: F.linear(xs[m], w) for w in ws16]) for m in TOKENS}
            del ws16, w16
            try:  # our nm24 path at 50% through the Triton kernels (no mma.sp: see the docstring)
                lay24 = build_layout(random_packed24(n, k, 4, 128, True, device=dev, seed=7), dev)
                lays = [lay24] + [clone_nm24_layout(lay24) for _ in range(copies_for(lay24.nbytes()) - 1)]
                sts = [kernels.Nm24State.from_layout(l, torch.float16) for l in lays]  # layout only: Triton path
                res["nm24"] = {m: time_graph([lambda s=s, m=m: s(xs[m]) for s in sts]) for m in TOKENS}
                del lay24, lays, sts
            except Exception as exc:  # noqa: BLE001
                log(f"  nm24 baseline raised {type(exc).__name__}: {str(exc)[:300]}")
        for s in SPARSITIES:
            if time.time() - T0 > budget_s + 30:
                log(f"  budget reached: {key} {s:.0%} not built")
                continue
            pk, st, t_pack, t_lay = build(n, k, s, dev, seed=11 + int(100 * s))
            log(f"  built {key} {s:.0%}: pack {t_pack:.1f}s, layout {t_lay:.1f}s")
            status = check(pk, st, torch.float16, results, f"{s:.0%}")
            ok_all &= all(status.values())
            if time.time() - T0 > budget_s:
                log(f"  budget reached: no timing for {key} {s:.0%}")
                continue
            lays = [st.layout] + [clone_hybrid_layout(st.layout) for _ in range(copies_for(st.layout.nbytes()) - 1)]
            wss = [DecodeWorkspace(n, dev) for _ in lays]
            r = {"decode": {}, "decode_pf": {}, "expand": {}}
            for m in TOKENS:
                for path in ("decode", "decode_pf"):
                    if m <= 16 and status[path]:
                        cfg = dict(pick_hybrid_decode_config(st.layout, m), PREFETCH=path == "decode_pf")
                        r[path][m] = time_graph([lambda l=l, w=w, m=m, c=cfg: hybrid_decode_linear(xs[m], l, w, config=c)
                                                 for l, w in zip(lays, wss)])
                if status["expand"]:
                    r["expand"][m] = time_graph([lambda l=l, m=m: hybrid_expand_linear(xs[m], l) for l in lays])
            r["best"] = {m: min(r[p].get(m, math.inf) for p in ("decode", "decode_pf", "expand")) for m in TOKENS}
            if status["decode"]:
                r["eager_1tok_us"] = time_eager([lambda l=l, w=w: hybrid_decode_linear(xs[1], l, w)
                                                 for l, w in zip(lays, wss)])
            r["bits_per_weight"] = 8 * st.layout.nbytes() / (n * k)
            res[f"hybrid{int(round(100 * s))}"] = r
            log(f"  {key} {s:.0%}: decode " + " ".join(f"{m}t {v:.1f}" for m, v in r["decode"].items())
                + " | decode_pf " + " ".join(f"{m}t {v:.1f}" for m, v in r["decode_pf"].items())
                + " | expand " + " ".join(f"{m}t {v:.1f}" for m, v in r["expand"].items())
                + " | fp16 " + " ".join(f"{res['fp16'][m]:.1f}" for m in TOKENS if 'fp16' in res))
            if do_sweep and s == 0.35 and status["decode"] and time.time() - T0 < budget_s:
                try:
                    sweep(st, xs[1], results, key)
                except Exception as exc:  # noqa: BLE001 - the sweep is extra information
                    log(f"  sweep raised {type(exc).__name__}: {str(exc)[:300]}")
            del pk, st, lays, wss
    return ok_all


def summary(results):
    lines = ["", "== summary: us per call (ratio = cuBLAS fp16 time / this time) =="]
    hdr = f"{'shape':>11} {'tok':>5} {'fp16':>8} {'nm24':>14}" + "".join(f" {('hyb' + str(int(100 * s)) + '%'):>14}" for s in SPARSITIES)
    lines.append(hdr + "   (hybrid: fastest path; d=decode p=pipelined decode e=expand)")
    for key, res in results["timing"].items():
        for m in TOKENS:
            if "fp16" not in res:
                continue
            f = res["fp16"][m]
            row = f"{key:>11} {m:>5} {f:>8.1f}"
            if "nm24" in res:
                row += f" {res['nm24'][m]:>7.1f} {f / res['nm24'][m]:>5.2f}x"
            for s in SPARSITIES:
                r = res.get(f"hybrid{int(round(100 * s))}")
                if r is None:
                    continue
                which = min(("d", "decode"), ("p", "decode_pf"), ("e", "expand"),
                            key=lambda c: r[c[1]].get(m, math.inf))[0]
                row += f" {r['best'][m]:>6.1f}{which} {f / r['best'][m]:>4.2f}x"
            lines.append(row)
    for m in TOKENS:
        for s in SPARSITIES:
            v = [res["fp16"][m] / res[f"hybrid{int(round(100 * s))}"]["best"][m] for res in results["timing"].values()
                 if f"hybrid{int(round(100 * s))}" in res and "fp16" in res]
            v = [x for x in v if 0 < x < math.inf]
            if v:
                lines.append(f"geomean vs fp16, {m} tokens, {s:.0%}: {geomean(v):.2f}x over {len(v)} shapes")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new timing shapes after this")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_hybrid.py needs a CUDA GPU")
    dev = torch.device("cuda")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=datetime.date.today().isoformat(), argv=sys.argv, correctness=[], sweep={}, timing={})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_hybrid.json")

    def save():
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1, default=str)

    try:
        log("== correctness vs float64 reference (outputs poisoned with NaN), then timing per weight ==")
        ok = extra_checks(dev, results)
        save()
        ok &= bench(dev, results, args.budget_s, args.sweep, args.quick)
        results["correct"] = ok
    finally:
        save()
        print(summary(results), flush=True)
    if not results.get("correct"):
        sys.exit("correctness FAILED")


if __name__ == "__main__":
    main()
