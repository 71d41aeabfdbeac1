"""Time the mma.sp CUDA kernels against cuBLAS fp16, torch._weight_int4pack_mm and our Triton path.

    PYTHONPATH=src python benchmarks/bench_mma_sp.py [--tokens 1,2,4,8,16,32,64,128] [--quick] [--out DIR]
        [--old-lib PATH] [--skip pack,direct,triton,sweep,baselines,int4pack] [--shapes 5|7]
    PYTHONPATH=src python benchmarks/bench_mma_sp.py --one-layout [--tokens 1,2,8,16,32,128,2048]

Same method as bench_kernels.py (whose helpers it uses): CUDA-graph replays rotating over enough
weight copies to exceed 3x L2, median per call; eager call time from a host loop. For every
(shape, tokens) it times the tiled kernel as planned (``MmaSpState.plan``) and a sweep of its tile
configurations and split-K factors (the best is reported beside the planned one), the direct
kernel at ``config_for``, the Triton path, and ``kernels.linear`` as dispatched. Also: the hardware
probe of the operand placement and (unless skipped) the GPU pack time for LLaMA-2-7B's linears.
Shapes: the five LLaMA ones plus the fused QKV (12288x4096) and gate/up (22016x4096) ones.
``--old-lib`` names a library built from an earlier version of the .cu sources (same C interface):
its tiled kernel is then timed over the same rotated weights with that version's own planner (tile
by token count, split-K from its occupancy), so old and new are compared within one run.
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
FUSED_SHAPES = [(12288, 4096), (22016, 4096)]  # LLaMA-2-7B QKV and gate/up, as the runtime fuses them


class OldTiled:
    """The tiled kernel of an earlier library build (``--old-lib``), with that version's planner:
    8 tokens per block up to 16 tokens (tile 0), 16 up to 32 (tile 1), else 64 (tile 2); splits =
    blocks within one wave at its occupancy (two waves when one block fits per SM)."""

    def __init__(self, path):
        import ctypes

        self.ct = ctypes
        lib = ctypes.CDLL(path)
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.sq_mma_sp_tiled.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, p]
        lib.sq_mma_sp_tiled.restype = i
        lib.sq_mma_sp_tiled_occupancy.argtypes = [i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i)]
        lib.sq_mma_sp_tiled_occupancy.restype = i
        self.lib = lib
        self.plans = {}

    def plan(self, st, m):
        lay = st.layout
        key = (lay.rt, lay.s, lay.gps, m)
        if key not in self.plans:
            tile = 0 if m <= 16 else 1 if m <= 32 else 2
            bm = (8, 16, 64)[tile]
            tiles = -(-lay.rt // 8) * -(-m // bm)
            bps, sms = self.ct.c_int(), self.ct.c_int()
            rc = self.lib.sq_mma_sp_tiled_occupancy(lay.bits, 0, lay.gps, tile, self.ct.byref(bps), self.ct.byref(sms))
            assert rc == 0, rc
            cap = min(16, lay.s) if tiles <= st.cnt.numel() else 1
            target = sms.value * max(bps.value, 2)  # its rule: as many splits as keep one wave
            self.plans[key] = (tile, max(1, min(cap, target // max(tiles, 1))))
        return self.plans[key]

    def __call__(self, st, x):
        lay, m = st.layout, x.shape[0]
        tile, splits = self.plan(st, m)
        y = torch.empty(m, lay.n, dtype=x.dtype, device=x.device)
        ws = torch.empty(splits * m * lay.n if splits > 1 else 0, dtype=torch.float32, device=x.device)
        rc = self.lib.sq_mma_sp_tiled(
            lay.qw.data_ptr(), lay.meta.data_ptr(), lay.sc.data_ptr(), x.data_ptr(), y.data_ptr(),
            ws.data_ptr() if splits > 1 else None, st.cnt.data_ptr() if splits > 1 else None,
            m, lay.n, lay.k, lay.rt, lay.s, lay.bits, 0, lay.gps, tile, splits,
            torch.cuda.current_stream().cuda_stream)
        assert rc == 0, rc
        return y


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
            elif m > kernels.MMA_SP_TOKENS[1]:
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
    ap.add_argument("--tokens", default=None, help="default 1,2,4,8,16,32,64,128 (--one-layout: 1,2,8,16,32,128,2048)")
    ap.add_argument("--shapes", type=int, default=7, choices=(5, 7), help="the five LLaMA shapes, or also the fused two")
    ap.add_argument("--sweep-splits", default=None, help="split factors the sweep tries (default: plan, 2x, half)")
    ap.add_argument("--old-lib", default=None, help="library of an earlier build, timed with its own planner")
    ap.add_argument("--one-layout", action="store_true", help="check and time the one-layout state kernels.prepare builds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--skip", default="", help="comma list of: pack, baselines, sweep, direct, triton, int4pack")
    args = ap.parse_args()
    if args.one_layout:
        args.tokens = args.tokens or "1,2,8,16,32,128,2048"
        return one_layout(args)
    args.tokens = args.tokens or "1,2,4,8,16,32,64,128"
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

    old = OldTiled(args.old_lib) if args.old_lib else None
    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = SHAPES[:2] if args.quick else SHAPES + (FUSED_SHAPES if args.shapes == 7 else [])
    for (n, k) in shapes:
        pk = random_packed24(n, k, 4, 128, device=dev, seed=n + k)
        base = MmaSpState(pk, dev, torch.float16)
        # Correctness before timing: the planned configuration at every timed token count (and the old
        # build, if given) against the float64 reference on fresh inputs, into NaN-filled outputs.
        w_ref = reference.dequantize_nm24(pk).double().t()
        for m in sorted(set(tokens) | {13, 40}):
            xo = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = base(xo, out=torch.full((m, n), float("nan"), device=dev, dtype=torch.float16))
            e = _rel(y, xo.double() @ w_ref)
            res.setdefault("checks", []).append({"shape": [n, k], "tokens": m, "rel": e, "kernel": "new"})
            assert e < 2e-3, f"tiled kernel wrong at {n}x{k} m={m}: {e}"
            if old is not None:
                e = _rel(old(base, xo), xo.double() @ w_ref)
                res["checks"].append({"shape": [n, k], "tokens": m, "rel": e, "kernel": "old"})
                assert e < 2e-3, f"old library wrong at {n}x{k} m={m}: {e}"
        del w_ref
        nc = copies_for(base.layout.nbytes())
        states = [base] + [clone_mma(base) for _ in range(nc - 1)]
        from sparsequant.kernels.layout import build_layout

        disp = [kernels.Nm24State.from_mma(st_) for st_ in states]  # kernels.linear as dispatched
        tris = []
        if "triton" not in skip:
            tri_lay = build_layout(pk, dev)
            tris = [kernels.Nm24State.from_layout(tri_lay if i == 0 else clone_layout(tri_lay), torch.float16)
                    for i in range(nc)]  # the Triton paths alone (the fallback without nvcc)
        if "baselines" not in skip:
            wd = torch.randn(n, k, device=dev, dtype=torch.float16)
            wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * 2) - 1)]
            i4 = int4pack_baseline(n, k, dev) if "int4pack" not in skip else None
            i4s = None if i4 is None else [i4] + [(i4[0].clone(), i4[1].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"shape": [n, k], "tokens": m}
            tile0, split0 = base.plan(m)
            cfgs = {f"t{tile0}s{split0}": time_graph([lambda s=s: s(x) for s in states])}
            if "sweep" not in skip:
                # Tiles by index (mma_sp_tiled.cu, mma_sp.TILES): 128 rows x 8/16/32 tokens with k-tiles
                # split over two warps = 0/1/2; 128 x 8 with 4 warps = 3; 256 rows x 32 tokens = 4.
                cand = {0, 3} if m <= 8 else {0, 1} if m <= 16 else {1, 2} if m <= 32 else {2, 4}
                for tile in sorted(cand & set(range(n_tiles()))):
                    t_, sp_auto = base.plan(m, tile)
                    sps = ({sp_auto, min(2 * sp_auto, base.layout.s), max(1, sp_auto // 2)} if not args.sweep_splits
                           else {int(v) for v in args.sweep_splits.split(",") if int(v) <= base.layout.s})
                    for sp in sorted(sps):
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
            if old is not None:
                row["old_cfg"] = "t%ds%d" % old.plan(base, m)
                row["old"] = time_graph([lambda s=s: old(s, x) for s in states])
            if "triton" not in skip:
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
                f"({row['tiled_best_cfg']}) old {row.get('old', float('nan')):.1f} ({row.get('old_cfg', '-')}) "
                f"direct {row.get('direct', float('nan')):.1f} triton {row.get('triton', float('nan')):.1f} "
                f"dispatch {row['dispatch']:.1f} fp16 {row.get('fp16', float('nan')):.1f} "
                f"int4pack {row.get('int4pack', float('nan')):.1f}  cfgs {json.dumps({c: round(v, 1) for c, v in cfgs.items()})}")
        del states, tris
        torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mma_sp.json"), "w") as f:  # a run cut short keeps what it measured
            json.dump(res, f, indent=1)

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

    log("\n| shape | tokens | tiled auto (cfg) | tiled best (cfg) | old tiled (cfg) | direct | triton | dispatch | cuBLAS fp16 | int4pack | dispatch vs fp16 |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["timing"]:
        log(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['tiled_auto']:.1f} ({r['tiled_auto_cfg']}) "
            f"| {r['tiled_best']:.1f} ({r['tiled_best_cfg']}) | {r.get('old', float('nan')):.1f} ({r.get('old_cfg', '-')}) "
            f"| {r.get('direct', float('nan')):.1f} | {r.get('triton', float('nan')):.1f} "
            f"| {r['dispatch']:.1f} | {r.get('fp16', float('nan')):.1f} | {r.get('int4pack', float('nan')):.1f} "
            f"| {r.get('fp16', float('nan')) / r['dispatch']:.2f}x |")

    def gmean(rows, num, den):
        rows = [r for r in rows if num in r and den in r]
        return math.exp(sum(math.log(r[num] / r[den]) for r in rows) / len(rows)) if rows else float("nan")

    # Geomeans over the five issue-4 shapes (the fused shapes are listed in the table only).
    five = {tuple(sh) for sh in SHAPES}
    for m in tokens:
        rows = [r for r in res["timing"] if r["tokens"] == m and tuple(r["shape"]) in five]
        log(f"tokens {m}: geomean (5 shapes) vs fp16: dispatch {gmean(rows, 'fp16', 'dispatch'):.2f}x, tiled auto "
            f"{gmean(rows, 'fp16', 'tiled_auto'):.2f}x, tiled best {gmean(rows, 'fp16', 'tiled_best'):.2f}x, old tiled "
            f"{gmean(rows, 'fp16', 'old'):.2f}x, new/old speed-up {gmean(rows, 'old', 'tiled_auto'):.2f}x, direct "
            f"{gmean(rows, 'fp16', 'direct'):.2f}x, triton {gmean(rows, 'fp16', 'triton'):.2f}x; dispatch vs int4pack "
            f"{gmean(rows, 'int4pack', 'dispatch'):.2f}x")


if __name__ == "__main__":
    main()
