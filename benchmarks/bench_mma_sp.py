"""Time the mma.sp CUDA kernels against cuBLAS fp16, torch._weight_int4pack_mm and our Triton path.

    PYTHONPATH=src python benchmarks/bench_mma_sp.py [--tokens 1,8,16,32,128,512] [--quick] [--out DIR]
    PYTHONPATH=src python benchmarks/bench_mma_sp.py --one-layout [--tokens 1,2,8,16,32,128,2048]

Same method as bench_kernels.py (whose helpers it uses): CUDA-graph replays rotating over enough
weight copies to exceed 3x L2, median per call; eager call time from a host loop. For every
(shape, tokens) it times the tiled kernel as planned (``MmaSpState.plan``) and a sweep of its tile
configurations and split-K factors (the best is reported beside the planned one), the direct
kernel at ``config_for``, the Triton path, and ``kernels.linear`` as dispatched. Also: the hardware
probe of the operand placement and (unless skipped) the GPU pack time for LLaMA-2-7B's linears.
Prints a table last, JSON to $OUT.

``--one-layout`` checks and times what ``kernels.prepare`` now builds: one layout per weight
(the mma.sp one on a Hopper GPU). First correctness of every path on the five LLaMA shapes
(``kernels.linear`` at each token count, fp16 and bf16, int4 g128 and int8 per channel, the
mma.sp expansion bit-exact, the Triton-only fallback state), then ``kernels.linear`` timed
against cuBLAS fp16 and against the paths the two-layout state used (Triton decode at 1 token,
Triton-layout PTX expansion + cuBLAS above 128), and the bytes each state holds.
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

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import SHAPES, clone_layout, copies_for, int4pack_baseline, log, time_eager, time_graph  # noqa: E402
from bench_kernels import reference  # noqa: E402

from sparsequant import kernels  # noqa: E402
from sparsequant.kernels import cuda_build  # noqa: E402
from sparsequant.kernels.mma_sp import MmaSpState, expected_probe, n_tiles, probe  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402

LLAMA2_7B_LINEARS = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def clone_mma(st):
    c = copy.copy(st)
    c.layout = copy.copy(st.layout)
    c.layout.qw, c.layout.meta, c.layout.sc = st.layout.qw.clone(), st.layout.meta.clone(), st.layout.sc.clone()
    return c


def _state_bytes(state) -> int:
    from sparsequant.runtime.synthetic import _state_tensors  # what weight_bytes_on counts

    return sum(t.numel() * t.element_size() for t in {id(t): t for t in _state_tensors(state)}.values())


def _rel(y, ref) -> float:
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def one_layout(args) -> None:
    """Correctness, then timing and bytes of the one-layout state (see the module docstring)."""
    from sparsequant.kernels.layout import build_layout
    from sparsequant.kernels.triton_expand import expand_mma_linear, expand_mma_sp
    from sparsequant.kernels.triton_prefill import expand_linear
    from sparsequant.kernels.triton_decode import DecodeWorkspace, decode_linear

    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "checks": [], "timing": [], "bytes": {}}
    cuda_build.library()
    meta, b = probe()
    res["probe_ok"] = (meta, b) == expected_probe()
    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = SHAPES[:2] if args.quick else SHAPES
    failed = []

    def check(name, y, ref, tol):
        e = _rel(y, ref)
        res["checks"].append({"case": name, "rel": e, "ok": e < tol})
        if not e < tol:
            failed.append(name)
            log(f"FAIL {name}: rel {e:.3g} (tol {tol})")

    def dump():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "one_layout.json"), "w") as f:
            json.dump(res, f, indent=1)

    log("== correctness (fresh random inputs, float64 reference) ==")
    for (n, k) in shapes:
        for bits, group, dtype in ((4, 128, torch.float16), (4, 128, torch.bfloat16), (8, None, torch.float16)):
            pk = random_packed24(n, k, bits, group, device=dev, seed=int(torch.randint(0, 10**6, (1,))))
            w = reference.dequantize_nm24(pk)
            state = kernels.prepare(pk, dev, dtype)
            if state.mma is None or state.layout is not None:
                failed.append(f"{n}x{k} int{bits}: state holds {state.kind} (want the mma.sp layout alone)")
                log("FAIL", failed[-1])
                continue
            if not torch.equal(expand_mma_sp(state.mma.layout, dtype), w.to(dtype)):
                failed.append(f"{n}x{k} int{bits} {dtype}: mma.sp expansion not exact")
                log("FAIL", failed[-1])
            tol = 2e-3 if dtype == torch.float16 else 1e-2
            wd = w.to(dtype).double().t()
            ms = tokens if (bits == 4 and dtype == torch.float16) else (1, 16, 129)
            for m in ms:
                x = torch.randn(m, k, device=dev).to(dtype)
                check(f"{n}x{k} int{bits} {str(dtype)[6:]} m={m} dispatch", kernels.linear(x, state), x.double() @ wd, tol)
            if bits == 4 and dtype == torch.float16:
                tri = kernels.Nm24State.from_layout(build_layout(pk, dev), dtype)  # the no-nvcc fallback
                for m in (1, 16, 300):
                    x = torch.randn(m, k, device=dev).to(dtype)
                    check(f"{n}x{k} triton-only m={m}", kernels.linear(x, tri), x.double() @ wd, tol)
            del state, w, wd
    res["correct"] = not failed
    log(f"correctness: {len(res['checks'])} checks, {'all passed' if not failed else f'{len(failed)} FAILED'}")
    dump()

    log("== timing (CUDA graphs, rotated weight copies, median us per call) ==")
    for (n, k) in shapes:
        pk = random_packed24(n, k, 4, 128, device=dev, seed=n + k)
        state = kernels.prepare(pk, dev, torch.float16)
        fp16_bytes = 2 * n * k
        packed_bytes = sum(pk.tensors[t].numel() * pk.tensors[t].element_size() for t in ("qweight", "meta", "scales"))
        tri_lay = build_layout(pk, dev)
        res["bytes"][f"{n}x{k}"] = {"state": _state_bytes(state), "packed": packed_bytes, "fp16": fp16_bytes,
                                    "two_layouts_before": state.nbytes() + tri_lay.nbytes()}
        nc = copies_for(state.nbytes())
        states = [state] + [kernels.Nm24State.from_mma(clone_mma(state.mma)) for _ in range(nc - 1)]
        tris = [tri_lay] + [clone_layout(tri_lay) for _ in range(nc - 1)]
        wss = [DecodeWorkspace(n, dev) for _ in tris]
        wd = torch.randn(n, k, device=dev, dtype=torch.float16)
        wds = [wd] + [wd.clone() for _ in range(copies_for(fp16_bytes) - 1)]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"shape": [n, k], "tokens": m}
            row["dispatch"] = time_graph([lambda s=s: kernels.linear(x, s) for s in states])
            row["fp16"] = time_graph([lambda w=w: F.linear(x, w) for w in wds])
            if m == 1:
                row["before"] = time_graph([lambda l=l, ws=ws: decode_linear(x, l, ws) for l, ws in zip(tris, wss)])
                row["before_path"] = "triton decode"
            elif m > kernels.MMA_SP_TOKENS[1] or (m >= kernels.MMA_SP_LARGE_TOKENS
                                                   and n * k < kernels.MMA_SP_LARGE_MIN_WEIGHTS):
                row["before"] = time_graph([lambda l=l: expand_linear(x, l) for l in tris[:4]])
                row["before_path"] = "triton-layout PTX expand + cuBLAS"
                row["expand_mma_cublas"] = time_graph([lambda s=s: expand_mma_linear(x, s.mma.layout) for s in states[:4]])
            res["timing"].append(row)
            log(f"{n}x{k} m={m}: one-layout {row['dispatch']:.1f} us, fp16 {row['fp16']:.1f} us "
                f"({row['fp16'] / row['dispatch']:.2f}x)" + (f", before ({row['before_path']}) {row['before']:.1f} us"
                                                              if "before" in row else ""))
        del states, tris, wds
        torch.cuda.empty_cache()
        dump()  # after every shape: a run cut short keeps what it measured

    log("\n| shape | state MB | vs fp16 | two layouts MB |")
    log("|---|---|---|---|")
    for sh, bts in res["bytes"].items():
        log(f"| {sh} | {bts['state'] / 1e6:.2f} | {bts['state'] / bts['fp16']:.4f}x | {bts['two_layouts_before'] / 1e6:.2f} |")
    log("\n| shape | tokens | one-layout us | cuBLAS fp16 us | vs fp16 | before us (path) |")
    log("|---|---|---|---|---|---|")
    for r in res["timing"]:
        before = f"{r['before']:.1f} ({r['before_path']})" if "before" in r else "same kernel"
        log(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['dispatch']:.1f} | {r['fp16']:.1f} "
            f"| {r['fp16'] / r['dispatch']:.2f}x | {before} |")
    for m in tokens:
        rows = [r for r in res["timing"] if r["tokens"] == m]
        g = math.exp(sum(math.log(r["fp16"] / r["dispatch"]) for r in rows) / len(rows))
        gb = [r for r in rows if "before" in r]
        extra = (f"; before {math.exp(sum(math.log(r['fp16'] / r['before']) for r in gb) / len(gb)):.2f}x" if gb else "")
        log(f"tokens {m}: geomean one-layout vs cuBLAS fp16 {g:.2f}x{extra}")
    log(f"correctness: {'PASS' if res['correct'] else 'FAIL: ' + '; '.join(failed)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default=None, help="default 1,8,16,32,128,512 (--one-layout: 1,2,8,16,32,128,2048)")
    ap.add_argument("--one-layout", action="store_true", help="check and time the one-layout state kernels.prepare builds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--skip", default="", help="comma list of: pack, baselines, sweep, direct")
    args = ap.parse_args()
    if args.one_layout:
        args.tokens = args.tokens or "1,2,8,16,32,128,2048"
        return one_layout(args)
    args.tokens = args.tokens or "1,8,16,32,128,512"
    skip = set(filter(None, args.skip.split(",")))
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "timing": [], "pack": {}}

    t = time.perf_counter()
    cuda_build.library()
    res["build_s"] = time.perf_counter() - t
    log(f"build/load: {res['build_s']:.1f} s")

    meta, b = probe()
    exp_meta, exp_b = expected_probe()
    res["probe_b_ok"], res["probe_meta_ok"] = b == exp_b, meta == exp_meta
    log(f"probe: B placement as assumed: {b == exp_b}; metadata placement as assumed: {meta == exp_meta}")
    if b != exp_b or meta != exp_meta:
        res["probe"] = {"meta": meta, "b": b}
        for sel in range(2):
            for lane in range(8):
                log(f"  sel {sel} lane {lane}: {meta[sel][lane]}")
        log(f"  b lane 0..5: {b[:6]}")

    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = SHAPES[:2] if args.quick else SHAPES
    for (n, k) in shapes:
        pk = random_packed24(n, k, 4, 128, device=dev, seed=n + k)
        base = MmaSpState(pk, dev, torch.float16)
        nc = copies_for(base.layout.nbytes())
        states = [base] + [clone_mma(base) for _ in range(nc - 1)]
        from sparsequant.kernels.layout import build_layout

        tri_lay = build_layout(pk, dev)
        disp = [kernels.Nm24State.from_mma(st_) for st_ in states]  # kernels.linear as dispatched
        tris = [kernels.Nm24State.from_layout(tri_lay if i == 0 else clone_layout(tri_lay), torch.float16)
                for i in range(nc)]  # the Triton paths alone (the fallback without nvcc)
        if "baselines" not in skip:
            wd = torch.randn(n, k, device=dev, dtype=torch.float16)
            wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * 2) - 1)]
            i4 = int4pack_baseline(n, k, dev)
            i4s = None if i4 is None else [i4] + [(i4[0].clone(), i4[1].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"shape": [n, k], "tokens": m}
            tile0, split0 = base.plan(m)
            cfgs = {f"t{tile0}s{split0}": time_graph([lambda s=s: s(x) for s in states])}
            if "sweep" not in skip:
                # Tiles by index (mma_sp_tiled.cu): 0/3 = 8 tokens per block (4/8 stages), 1/4 = 16, 2/5 = 64.
                cand = {0, 3} if m < 16 else {0, 3, 1, 4} if m <= 32 else {2, 5}
                for tile in sorted(cand & set(range(n_tiles()))):
                    t_, sp_auto = base.plan(m, tile)
                    for sp in sorted({sp_auto, min(2 * sp_auto, base.layout.s), max(1, sp_auto // 2)}):
                        key = f"t{tile}s{sp}"
                        if key not in cfgs:
                            cfgs[key] = time_graph([lambda s=s, tile=tile, sp=sp: s(x, tile=tile, splits=sp) for s in states])
            row["tiled_cfgs"] = cfgs
            row["tiled_auto"] = cfgs[f"t{tile0}s{split0}"]
            row["tiled_auto_cfg"] = f"t{tile0}s{split0}"
            row["tiled_best"] = min(cfgs.values())
            row["tiled_best_cfg"] = min(cfgs, key=cfgs.get)
            if "direct" not in skip and m <= 64:
                row["direct"] = time_graph([lambda s=s: s.direct(x) for s in states])
            row["triton"] = time_graph([lambda s=s: s(x) for s in tris])
            row["dispatch"] = time_graph([lambda s=s: s(x) for s in disp])
            if m in (1, 16):
                row["tiled_eager"] = time_eager([lambda s=s: s(x) for s in states])
            if "baselines" not in skip:
                row["fp16"] = time_graph([lambda w=w: F.linear(x, w) for w in wds])
                if i4s is not None:
                    xb = x.to(torch.bfloat16)
                    row["int4pack"] = time_graph([lambda p=p: torch._weight_int4pack_mm(xb, p[0], 128, p[1]) for p in i4s])
            res["timing"].append(row)
            log(f"{n}x{k} m={m}: tiled auto {row['tiled_auto']:.1f} ({row['tiled_auto_cfg']}) best {row['tiled_best']:.1f} "
                f"({row['tiled_best_cfg']}) direct {row.get('direct', float('nan')):.1f} triton {row['triton']:.1f} "
                f"dispatch {row['dispatch']:.1f} fp16 {row.get('fp16', float('nan')):.1f} "
                f"int4pack {row.get('int4pack', float('nan')):.1f}  cfgs {json.dumps({c: round(v, 1) for c, v in cfgs.items()})}")
        del states, tris
        torch.cuda.empty_cache()

    if "pack" not in skip:
        from sparsequant.kernels.gpu_pack import pack_nm24_rtn

        per_shape = {}
        for (n, k) in sorted(set(LLAMA2_7B_LINEARS)):
            w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
            pack_nm24_rtn(w)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                pack_nm24_rtn(w)
            torch.cuda.synchronize()
            per_shape[f"{n}x{k}"] = (time.perf_counter() - t) / 3
        total = 32 * sum(per_shape[f"{n}x{k}"] for (n, k) in LLAMA2_7B_LINEARS)
        res["pack"] = {"per_shape_s": per_shape, "llama2_7b_total_s": total}
        log(f"GPU pack: {json.dumps({s: round(v * 1e3, 2) for s, v in per_shape.items()})} ms; LLaMA-2-7B 224 linears: {total:.2f} s")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mma_sp.json"), "w") as f:
        json.dump(res, f, indent=1)

    log("\n| shape | tokens | tiled auto (cfg) | tiled best (cfg) | direct | triton | dispatch | cuBLAS fp16 | int4pack | dispatch vs fp16 |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["timing"]:
        log(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['tiled_auto']:.1f} ({r['tiled_auto_cfg']}) "
            f"| {r['tiled_best']:.1f} ({r['tiled_best_cfg']}) | {r.get('direct', float('nan')):.1f} | {r['triton']:.1f} "
            f"| {r['dispatch']:.1f} | {r.get('fp16', float('nan')):.1f} | {r.get('int4pack', float('nan')):.1f} "
            f"| {r.get('fp16', float('nan')) / r['dispatch']:.2f}x |")

    def gmean(rows, num, den):
        rows = [r for r in rows if num in r and den in r]
        return math.exp(sum(math.log(r[num] / r[den]) for r in rows) / len(rows)) if rows else float("nan")

    for m in tokens:
        rows = [r for r in res["timing"] if r["tokens"] == m]
        log(f"tokens {m}: geomean vs fp16: dispatch {gmean(rows, 'fp16', 'dispatch'):.2f}x, tiled auto "
            f"{gmean(rows, 'fp16', 'tiled_auto'):.2f}x, tiled best {gmean(rows, 'fp16', 'tiled_best'):.2f}x, direct "
            f"{gmean(rows, 'fp16', 'direct'):.2f}x, triton {gmean(rows, 'fp16', 'triton'):.2f}x; dispatch vs int4pack "
            f"{gmean(rows, 'int4pack', 'dispatch'):.2f}x")


if __name__ == "__main__":
    main()
