"""Launch the tiled mma.sp kernel once per (shape, token count) for a profiler to read (ncu).

    ncu -k regex:tiled_kernel --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python benchmarks/profile_mma_sp.py --shape 11008x4096 --tokens 8,32,128 [--old-lib PATH]

Each launch uses the planned configuration (``MmaSpState.plan``); with ``--old-lib`` the earlier
build (bench_mma_sp.OldTiled, its own planner) is launched right after, on the same weight and input,
so the profiler's report pairs new and old per token count. Times are measured by bench_mma_sp.py,
not here (the profiler serialises and replays each launch).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_mma_sp import OldTiled  # noqa: E402

from sparsequant.kernels.mma_sp import MmaSpState  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="11008x4096", help="out x in")
    ap.add_argument("--tokens", default="8,32,128")
    ap.add_argument("--old-lib", default=None)
    args = ap.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    dev = torch.device("cuda")
    st = MmaSpState(random_packed24(n, k, 4, 128, device=dev, seed=1), dev, torch.float16)
    old = OldTiled(args.old_lib) if args.old_lib else None
    for m in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        print(f"m={m}: new plan t{st.plan(m)[0]}s{st.plan(m)[1]}" +
              (f", old plan t{old.plan(st, m)[0]}s{old.plan(st, m)[1]}" if old else ""), flush=True)
        st(x)
        if old is not None:
            old(st, x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
