"""Compile ``cuda/mma_sp.cu`` on first use and load it with ctypes.

The source needs no torch headers (it exports plain C functions taking device pointers and a
stream), so it is built with one ``nvcc`` call in seconds rather than through
``torch.utils.cpp_extension`` (a minute for the torch headers), and the library works with any
torch build. It is cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/sparsequant/torch_extensions``
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

SOURCE = Path(__file__).parent / "cuda" / "mma_sp.cu"
FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
         "-cudart", "static"]


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
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"sq_mma_sp_{digest}.so"


def build() -> Path:
    """The compiled library's path, compiling it if this source has not been built yet."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.so")
    cmd = [nvcc_path(), *FLAGS, "-o", str(tmp), str(SOURCE)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise CudaBuildError(f"could not run nvcc: {exc}") from exc
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CudaBuildError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    os.replace(tmp, path)
    return path


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.sq_mma_sp_linear.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, i, p]
    lib.sq_mma_sp_linear.restype = i
    lib.sq_mma_sp_probe.argtypes = [p, p, p]
    lib.sq_mma_sp_probe.restype = i
    lib.sq_cuda_error_string.argtypes = [i]
    lib.sq_cuda_error_string.restype = ctypes.c_char_p
    return lib


def check(rc: int) -> None:
    if rc != 0:
        msg = library().sq_cuda_error_string(rc).decode()
        raise RuntimeError(f"mma.sp kernel launch failed: {msg} (cudaError {rc})")
