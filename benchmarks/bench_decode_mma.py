"""Check and time the decode kernel over the mma.sp layout (kernels/triton_decode_mma.py).

    PYTHONPATH=src python benchmarks/bench_decode_mma.py [--tokens 1,2,4,8] [--quick] [--no-sweep] [--out DIR]

Same method as bench_kernels.py (whose helpers it uses): CUDA-graph replays rotating over enough
weight copies to exceed 3x L2, median per call.
1. Correctness first: the new kernel (planned configuration) against the float64 reference on the
   five LLaMA shapes and the two fused ones, fp16 int4 g128 at every token count, bf16 int4 g128 and
   fp16 int8 per channel at 1 and 3 tokens; outputs poisoned with NaN.
2. Timing, int4 g128 fp16, for each shape and token count: the new kernel, the tiled mma.sp CUDA
   kernel on the same layout copies (``MmaSpState``), the old Triton decode kernel on its own
   layout (``triton_decode``), cuBLAS fp16 and ``torch._weight_int4pack_mm`` (dense int4 g128, bf16);
   bf16 activations at 4096x4096 (new kernel, tiled kernel, cuBLAS bf16). Also the fused shapes
   12288x4096 (QKV) and 22016x4096 (gate/up).
3. A sweep of (BLOCK_RT, SPLIT) at 1 token (unless --no-sweep).
Prints a table last; JSON to $OUT (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import SHAPES, clone_layout, copies_for, int4pack_baseline, log, time_eager, time_graph  # noqa: E402
from bench_mma_sp import clone_mma  # noqa: E402

from sparsequant import kernels  # noqa: E402
from sparsequant.kernels import reference  # noqa: E402
from sparsequant.kernels.layout import build_layout  # noqa: E402
from sparsequant.kernels.mma_sp import MmaSpState  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402
from sparsequant.kernels.triton_decode import DecodeWorkspace, decode_linear  # noqa: E402
from sparsequant.kernels.triton_decode_mma import DecodeMmaWorkspace, decode_mma_linear, pick_config  # noqa: E402

FUSED = [(12288, 4096), (22016, 4096)]  # QKV, gate/up of LLaMA-2-7B, rows concatenated


def _rel(y, ref) -> float:
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gmean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def profile(n: int, k: int) -> None:
    dev = torch.device("cuda")
    pk = random_packed24(n, k, 4, 128, device=dev, seed=1)
    lay = MmaSpState(pk, dev, torch.float16).layout
    tri = build_layout(pk, dev)
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    ws, wt = DecodeMmaWorkspace(n, dev), DecodeWorkspace(n, dev)
    for _ in range(3):
        decode_mma_linear(x, lay, ws)
    for _ in range(3):
        decode_linear(x, tri, wt)
    torch.cuda.synchronize()
    log(f"profiled {n}x{k}: config {pick_config(1, n, k)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-lite", action="store_true", help="sweep only the split of the default code variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--profile", default=None, metavar="N,K",
                    help="only launch the new kernel 3x, then the old decode kernel 3x, at 1 token (for ncu)")
    args = ap.parse_args()
    if args.profile:
        return profile(*(int(v) for v in args.profile.split(",")))
    dev = torch.device("cuda")
    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = (SHAPES[:2] if args.quick else SHAPES) + FUSED
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "checks": [], "timing": [], "sweep": [], "bf16": []}
    failed = []

    def dump():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_mma.json"), "w") as f:
            json.dump(res, f, indent=1)

    def check(name, y, ref, tol):
        e = _rel(y, ref)
        res["checks"].append({"case": name, "rel": e, "ok": e < tol})
        if not e < tol:
            failed.append(name)
            log(f"FAIL {name}: rel {e:.3g} (tol {tol})")

    log("== correctness (fresh random inputs, float64 reference, NaN-poisoned outputs) ==")
    for (n, k) in shapes:
        for bits, group, dtype, ms in ((4, 128, torch.float16, tokens), (4, 128, torch.bfloat16, (1, 3)),
                                       (8, None, torch.float16, (1, 3))):
            if (bits, dtype) != (4, torch.float16) and (n, k) not in SHAPES[:2]:
                continue
            pk = random_packed24(n, k, bits, group, device=dev, seed=int(torch.randint(0, 10**6, (1,))))
            lay = MmaSpState(pk, dev, dtype).layout
            wd = reference.dequantize_nm24(pk).double().t()
            for m in ms:
                x = torch.randn(m, k, device=dev).to(dtype)
                out = torch.full((m, n), float("nan"), device=dev, dtype=dtype)
                check(f"{n}x{k} int{bits} {str(dtype)[6:]} m={m}", decode_mma_linear(x, lay, out=out), x.double() @ wd,
                      2e-3 if dtype == torch.float16 else 1e-2)
            del lay, wd
    res["correct"] = not failed
    log(f"correctness: {len(res['checks'])} checks, {'all passed' if not failed else f'{len(failed)} FAILED'}")
    dump()

    log("== timing (CUDA graphs, rotated weight copies, median us per call) ==")
    for (n, k) in shapes:
        pk = random_packed24(n, k, 4, 128, device=dev, seed=n + k)
        base = MmaSpState(pk, dev, torch.float16)
        nc = copies_for(base.layout.nbytes())
        states = [base] + [clone_mma(base) for _ in range(nc - 1)]
        lays = [s.layout for s in states]
        wsm = [DecodeMmaWorkspace(n, dev) for _ in lays]
        tri = build_layout(pk, dev)
        tris = [tri] + [clone_layout(tri) for _ in range(copies_for(tri.nbytes()) - 1)]
        wst = [DecodeWorkspace(n, dev) for _ in tris]
        wd = torch.randn(n, k, device=dev, dtype=torch.float16)
        wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * 2) - 1)]
        i4 = int4pack_baseline(n, k, dev)
        i4s = None if i4 is None else [i4] + [(i4[0].clone(), i4[1].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            cfg = pick_config(m, n, k)
            row = {"shape": [n, k], "tokens": m, "config": cfg}
            row["new"] = time_graph([lambda l=l, w=w: decode_mma_linear(x, l, w) for l, w in zip(lays, wsm)])
            row["tiled"] = time_graph([lambda s=s: s(x) for s in states])
            if m <= 16:
                row["old_decode"] = time_graph([lambda l=l, w=w: decode_linear(x, l, w) for l, w in zip(tris, wst)])
            row["fp16"] = time_graph([lambda w=w: F.linear(x, w) for w in wds])
            if i4s is not None:
                xb = x.to(torch.bfloat16)
                row["int4pack"] = time_graph([lambda p=p: torch._weight_int4pack_mm(xb, p[0], 128, p[1]) for p in i4s])
            if m <= kernels.SKINNY_TOKENS:  # what kernels.linear runs for this state (the skinny kernel)
                disp = [kernels.Nm24State.from_mma(st_) for st_ in states]
                row["dispatch"] = time_graph([lambda d=d: kernels.linear(x, d) for d in disp])
                del disp
            if m == 1 and (n, k) == SHAPES[0]:
                row["eager_new"] = time_eager([lambda: decode_mma_linear(x, lays[0], wsm[0])])
                row["eager_tiled"] = time_eager([lambda: states[0](x)])
            res["timing"].append(row)
            log(f"{n}x{k} m={m} {cfg}: new {row['new']:.1f} us, tiled {row['tiled']:.1f}, old decode "
                f"{row.get('old_decode', float('nan')):.1f}, fp16 {row['fp16']:.1f}, int4pack "
                f"{row.get('int4pack', float('nan')):.1f} -> {row['fp16'] / row['new']:.2f}x fp16")
            dump()
        if not args.no_sweep and (n, k) in SHAPES:
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            ref1 = x.double() @ reference.dequantize_nm24(pk).double().t()
            s_all = -(-k // 128)
            for brt in (16,) if args.sweep_lite else (8, 16):
                for pair in (False, True):
                    for wl1 in (True,) if args.sweep_lite else (False, True):
                        for split in sorted({max(1, s_all // 8), max(1, s_all // 4), max(1, s_all // 2), s_all}):
                            c = dict(BLOCK_RT=brt, SPLIT=split, PAIR=pair, WEIGHTS_L1=wl1)
                            if split == s_all // 4:  # every code variant checked once per shape
                                check(f"{n}x{k} m=1 {c}", decode_mma_linear(x, lays[0], wsm[0], config=c), ref1, 2e-3)
                            t = time_graph([lambda l=l, w=w: decode_mma_linear(x, l, w, config=c)
                                            for l, w in zip(lays, wsm)])
                            res["sweep"].append({"shape": [n, k], **c, "us": t})
            best = min((r for r in res["sweep"] if r["shape"] == [n, k]), key=lambda r: r["us"])
            log(f"  sweep best at 1 token: {best}")
            for pair, wl1 in sorted({(r["PAIR"], r["WEIGHTS_L1"]) for r in res["sweep"]}):
                b = min((r for r in res["sweep"] if r["shape"] == [n, k] and r["PAIR"] == pair
                         and r["WEIGHTS_L1"] == wl1), key=lambda r: r["us"])
                log(f"    PAIR {pair} WEIGHTS_L1 {wl1}: best {b['us']:.1f} us (BLOCK_RT {b['BLOCK_RT']}, SPLIT {b['SPLIT']})")
            dump()
        if (n, k) == SHAPES[0]:
            pkb = random_packed24(n, k, 4, 128, device=dev, seed=7)
            bstates = [MmaSpState(pkb, dev, torch.bfloat16)]
            bstates += [clone_mma(bstates[0]) for _ in range(nc - 1)]
            wdb = [w.to(torch.bfloat16) for w in wds]
            for m in (1, 4):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                r = {"shape": [n, k], "tokens": m,
                     "new": time_graph([lambda s=s, w=w: decode_mma_linear(x, s.layout, w) for s, w in zip(bstates, wsm)]),
                     "tiled": time_graph([lambda s=s: s(x) for s in bstates]),
                     "bf16": time_graph([lambda w=w: F.linear(x, w) for w in wdb])}
                res["bf16"].append(r)
                log(f"bf16 {n}x{k} m={m}: new {r['new']:.1f} us, tiled {r['tiled']:.1f}, cuBLAS bf16 {r['bf16']:.1f}")
            del bstates, wdb
        del states, lays, tris, wds, i4s
        torch.cuda.empty_cache()
        dump()

    log("\n| shape | tokens | new us | tiled mma.sp us | old decode us | cuBLAS fp16 us | int4pack us | new vs fp16 | new vs tiled | new vs int4pack |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["timing"]:
        log(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['new']:.1f} | {r['tiled']:.1f} | "
            f"{r.get('old_decode', float('nan')):.1f} | {r['fp16']:.1f} | {r.get('int4pack', float('nan')):.1f} | "
            f"{r['fp16'] / r['new']:.2f}x | {r['tiled'] / r['new']:.2f}x | {r.get('int4pack', float('nan')) / r['new']:.2f}x |")
    res["geomean"] = {}
    for m in tokens:
        rows = [r for r in res["timing"] if r["tokens"] == m and tuple(r["shape"]) in SHAPES]
        g = {p: gmean([r["fp16"] / r[p] for r in rows if p in r]) for p in ("new", "tiled", "old_decode", "int4pack")}
        g["new_vs_int4pack"] = gmean([r["int4pack"] / r["new"] for r in rows if "int4pack" in r])
        g["new_vs_tiled"] = gmean([r["tiled"] / r["new"] for r in rows])
        if all("dispatch" in r for r in rows):
            g["dispatch"] = gmean([r["fp16"] / r["dispatch"] for r in rows])
        res["geomean"][m] = g
        log(f"tokens {m} (5 LLaMA shapes, geomean vs cuBLAS fp16): new {g['new']:.2f}x, tiled {g['tiled']:.2f}x, "
            f"old decode {g['old_decode']:.2f}x, int4pack {g['int4pack']:.2f}x; new vs int4pack "
            f"{g['new_vs_int4pack']:.2f}x, new vs tiled {g['new_vs_tiled']:.2f}x"
            + (f"; kernels.linear as dispatched {g['dispatch']:.2f}x" if "dispatch" in g else ""))
    for r in res["bf16"]:
        log(f"bf16 {r['shape'][0]}x{r['shape'][1]} m={r['tokens']}: new {r['new']:.1f} us, tiled {r['tiled']:.1f}, "
            f"cuBLAS bf16 {r['bf16']:.1f} ({r['bf16'] / r['new']:.2f}x)")
    for (n, k) in SHAPES:
        rows = [r for r in res["sweep"] if r["shape"] == [n, k]]
        if rows:
            b = min(rows, key=lambda r: r["us"])
            log(f"sweep {n}x{k} m=1: best {b['us']:.1f} us at BLOCK_RT {b['BLOCK_RT']} SPLIT {b['SPLIT']} "
                f"PAIR {b['PAIR']} WEIGHTS_L1 {b['WEIGHTS_L1']}")
    eager = [r for r in res["timing"] if "eager_new" in r]
    if eager:
        log(f"eager call 4096x4096 m=1: new {eager[0]['eager_new']:.1f} us, tiled {eager[0]['eager_tiled']:.1f} us")
    dump()
    res["correct"] = not failed
    dump()
    log(f"correctness: {'PASS' if res['correct'] else 'FAIL: ' + '; '.join(failed)}")


if __name__ == "__main__":
    main()
