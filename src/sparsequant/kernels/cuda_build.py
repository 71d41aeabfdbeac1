"""Compile the CUDA sources in ``cuda/`` on first use and load them with ctypes.

The sources need no torch headers (they export plain C functions taking device pointers and a
stream), so they are built with plain ``nvcc`` rather than ``torch.utils.cpp_extension``, and the
library works with any torch build. Each ``.cu`` is compiled to an object in its own process (in
parallel: the tiled kernel's 20 instantiations take one to two CPU minutes), then one link makes
the shared library. It is cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/sparsequant/torch_extensions``
(``SPARSEQUANT_CACHE`` overrides the root), named by a hash of the source and the flags, and
written atomically (compiled to a temporary name, then renamed), so concurrent first uses are safe.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

CUDA_DIR = Path(__file__).parent / "cuda"
SOURCES = [CUDA_DIR / "mma_sp.cu", CUDA_DIR / "mma_sp_tiled.cu", CUDA_DIR / "mma_sp_skinny.cu"]
HEADERS = [CUDA_DIR / "mma_sp_common.cuh"]
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
COMPILE_FLAGS = ["-O3", "-std=c++17", ARCH, "-Xcompiler", "-fPIC", "-c"]
LINK_FLAGS = [ARCH, "-shared", "-cudart", "static"]


class CudaBuildError(RuntimeError):
    """nvcc is missing or failed; the caller falls back to the Triton kernels."""


def cache_dir() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root = Path(os.environ.get("SPARSEQUANT_CACHE", Path.home() / ".cache" / "sparsequant"))
    return root / "torch_extensions"


def nvcc_path() -> str:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise CudaBuildError("nvcc not found (set CUDA_HOME): cannot build the mma.sp kernel")
    return found


def library_path() -> Path:
    h = hashlib.sha256(" ".join(COMPILE_FLAGS + LINK_FLAGS).encode())
    for f in SOURCES + HEADERS:
        h.update(f.name.encode() + f.read_bytes())
    digest = h.hexdigest()[:16]
    return cache_dir() / f"sq_mma_sp_{digest}.so"


def build() -> Path:
    """The compiled library's path, compiling it if this source has not been built yet."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{path.stem}.{os.getpid()}.tmp"
    objs = [path.with_name(f"{tag}.{src.stem}.o") for src in SOURCES]
    tmp = path.with_name(f"{tag}.so")
    nvcc = nvcc_path()
    try:
        try:
            procs = [(subprocess.Popen([nvcc, *COMPILE_FLAGS, "-o", str(o), str(src)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), src) for src, o in zip(SOURCES, objs)]
            errs = [(src, p.communicate()[1], p.returncode) for p, src in procs]
            for src, err, rc in errs:
                if rc != 0:
                    raise CudaBuildError(f"nvcc failed on {src.name}:\n{err[-4000:]}")
            cmd = [nvcc, *LINK_FLAGS, "-o", str(tmp), *map(str, objs)]
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise CudaBuildError(f"could not run nvcc: {exc}") from exc
        if res.returncode != 0:
            raise CudaBuildError(f"nvcc link failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for o in objs:
            o.unlink(missing_ok=True)
    os.replace(tmp, path)
    return path


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.sq_mma_sp_linear.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, i, p]
    lib.sq_mma_sp_linear.restype = i
    lib.sq_mma_sp_tiled.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, p]
    lib.sq_mma_sp_tiled.restype = i
    lib.sq_mma_sp_tiled_occupancy.argtypes = [i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.sq_mma_sp_tiled_occupancy.restype = i
    lib.sq_mma_sp_tile_info.argtypes = [i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.sq_mma_sp_tile_info.restype = i
    lib.sq_mma_sp_tile_rows.argtypes = [i]
    lib.sq_mma_sp_tile_rows.restype = i
    lib.sq_mma_sp_skinny.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, p]
    lib.sq_mma_sp_skinny.restype = i
    lib.sq_mma_sp_skinny_info.argtypes = [i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.sq_mma_sp_skinny_info.restype = i
    lib.sq_mma_sp_skinny_occupancy.argtypes = [i, i, i, i, ctypes.POINTER(i)]
    lib.sq_mma_sp_skinny_occupancy.restype = i
    lib.sq_mma_sp_probe.argtypes = [p, p, p]
    lib.sq_mma_sp_probe.restype = i
    lib.sq_cuda_error_string.argtypes = [i]
    lib.sq_cuda_error_string.restype = ctypes.c_char_p
    return lib


def check(rc: int) -> None:
    if rc != 0:
        msg = library().sq_cuda_error_string(rc).decode()
        raise RuntimeError(f"mma.sp kernel launch failed: {msg} (cudaError {rc})")
