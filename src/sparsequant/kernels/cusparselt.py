"""A direct ctypes binding of cuSPARSELt (the libcusparseLt.so.0 that torch ships with).

Why not ``torch._cslt_sparse_mm``: it builds the matrix descriptors, the algorithm selection and
the plan, and allocates a workspace, on every call (0.7-1.2 ms on an H100), and it exposes no
epilogue for fp8. Here all of that is done once per (weight, padded token count) and kept; a call
is one ``cusparseLtMatmul`` on the current stream, so it is graph-safe and costs a few
microseconds of ctypes.

Struct sizes and enum values follow cusparseLt.h of cuSPARSELt 0.8 (opaque 512-byte, 16-byte
aligned structs; the enums are unchanged in 0.10). Only what the W8A8 op needs is bound.

Two orientations of ``y[M, N] = x[M, K] @ w[N, K]^T``:
- ``"weight_a"``: the 2:4 weight is the structured A (N x K, row-major), the activations are B
  (described as M x K row-major, transposed), D is N x M column-major, i.e. ``y`` row-major.
  An alpha vector then scales the rows of D: the output channels.
- ``"weight_b"``: the activations are A (M x K row-major), the weight is the structured B (N x K
  row-major, transposed), D is M x N row-major. An alpha vector scales the tokens.
"""
from __future__ import annotations

import atexit
import ctypes
import glob
import os
import threading
import warnings

import torch

from ..errors import SparseQuantError

# cudaDataType (library_types.h)
CUDA_R_32F, CUDA_R_16F, CUDA_R_8I, CUDA_R_32I, CUDA_R_16BF, CUDA_R_8F_E4M3 = 0, 2, 3, 10, 14, 28
# cusparse.h
ORDER_COL, ORDER_ROW = 1, 2
OP_N, OP_T = 0, 1
STATUS_NOT_SUPPORTED = 10
# cusparseLt.h
SPARSITY_50 = 0
COMPUTE_32I, COMPUTE_32F = 0, 2
ATTR_ALPHA_VECTOR_SCALING = 5
ALG_DEFAULT = 0
ALG_CONFIG_ID, ALG_CONFIG_MAX_ID, ALG_SEARCH_ITERATIONS, ALG_SPLIT_K, ALG_SPLIT_K_MODE, ALG_SPLIT_K_BUFFERS = range(6)
OPAQUE_BYTES = 512

_DTYPES = {torch.int8: CUDA_R_8I, torch.float16: CUDA_R_16F, torch.bfloat16: CUDA_R_16BF,
           torch.float32: CUDA_R_32F, torch.int32: CUDA_R_32I, torch.float8_e4m3fn: CUDA_R_8F_E4M3}
MIN_VERSION = (0, 6)  # fp8 (e4m3) kernels and SpMMACompress2 on Hopper


class CusparseLtError(SparseQuantError, RuntimeError):
    """A cuSPARSELt call failed; ``status`` is its cusparseStatus_t."""

    def __init__(self, fn: str, status: int, text: str = ""):
        super().__init__(f"{fn} failed with cuSPARSELt status {status}{': ' + text if text else ''}")
        self.fn, self.status = fn, status

    @property
    def unsupported(self) -> bool:
        return self.status == STATUS_NOT_SUPPORTED


class _Opaque:
    """One of cuSPARSELt's opaque structs: 512 bytes at a 16-byte aligned address that never moves."""

    __slots__ = ("_buf", "ptr")

    def __init__(self):
        self._buf = (ctypes.c_uint8 * (OPAQUE_BYTES + 16))()
        addr = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p((addr + 15) // 16 * 16)


def _candidate_paths() -> list[str]:
    """libcusparseLt.so.0 locations, the copy already mapped into this process first."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            out += sorted({line.split()[-1] for line in f if "libcusparseLt" in line})
    except OSError:
        pass
    if os.environ.get("SPARSEQUANT_CUSPARSELT"):
        out.insert(0, os.environ["SPARSEQUANT_CUSPARSELT"])
    roots = []
    try:
        import nvidia  # namespace package of the CUDA wheels

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    roots.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
    for root in roots:
        out += sorted(glob.glob(os.path.join(root, "**", "libcusparseLt.so*"), recursive=True))
    out.append("libcusparseLt.so.0")  # the loader's search path
    return out


_SIGS = {
    "cusparseLtInit": [ctypes.c_void_p],
    "cusparseLtGetProperty": [ctypes.c_int, ctypes.POINTER(ctypes.c_int)],
    "cusparseLtDenseDescriptorInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_int],
    "cusparseLtStructuredDescriptorInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_int, ctypes.c_int],
    "cusparseLtMatDescriptorDestroy": [ctypes.c_void_p],
    "cusparseLtMatmulDescriptorInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    "cusparseLtMatmulDescSetAttribute": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t],
    "cusparseLtMatmulAlgSelectionInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    "cusparseLtMatmulAlgSetAttribute": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t],
    "cusparseLtMatmulAlgGetAttribute": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t],
    "cusparseLtMatmulGetWorkspace": [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)],
    "cusparseLtMatmulPlanInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    "cusparseLtMatmulPlanDestroy": [ctypes.c_void_p],
    "cusparseLtMatmul": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int32],
    "cusparseLtMatmulSearch": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int32],
    "cusparseLtSpMMACompressedSize2": [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.POINTER(ctypes.c_size_t)],
    "cusparseLtSpMMACompress2": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
}
# Present since 0.8 only: bound when found.
_OPTIONAL = {"cusparseLtMatmulAlgSelectionDestroy": [ctypes.c_void_p]}


class Library:
    """The loaded libcusparseLt with typed entry points and one handle per device."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        for name, args in {**_SIGS, **_OPTIONAL}.items():
            fn = getattr(self.lib, name, None)
            if fn is None:
                if name in _SIGS:
                    raise OSError(f"{path} has no {name}")
                continue
            fn.argtypes, fn.restype = args, ctypes.c_int
        err = getattr(self.lib, "cusparseLtGetErrorString", None)
        if err is not None:
            err.argtypes, err.restype = [ctypes.c_int], ctypes.c_char_p
        self._err = err
        v = [ctypes.c_int() for _ in range(3)]
        for i in range(3):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
            self.check("cusparseLtGetProperty", i, ctypes.byref(v[i]))
        self.version = tuple(x.value for x in v)
        self._handles: dict[int, _Opaque] = {}
        self._lock = threading.Lock()

    def check(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            text = self._err(status).decode(errors="replace") if self._err is not None else ""
            raise CusparseLtError(name, status, text)

    def has(self, name: str) -> bool:
        return getattr(self.lib, name, None) is not None

    def handle(self, device: torch.device) -> ctypes.c_void_p:
        idx = torch.device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
        h = self._handles.get(idx)
        if h is None:
            with self._lock, torch.cuda.device(idx):
                h = self._handles.get(idx)
                if h is None:
                    h = _Opaque()
                    self.check("cusparseLtInit", h.ptr)
                    self._handles[idx] = h  # kept for the process: destroying at exit races CUDA teardown
        return h.ptr


_EXITING = False


@atexit.register
def _at_exit() -> None:
    # The process is ending: cuSPARSELt objects die with it, and destroying them after CUDA's
    # teardown is not safe.
    global _EXITING
    _EXITING = True


_LIB: Library | None = None
_LIB_ERROR: str | None = None
_LIB_TRIED = False
_WARNED = False


def library(warn: bool = True) -> Library | None:
    """The cuSPARSELt library, or None (with one warning) when it cannot be loaded or is too old."""
    global _LIB, _LIB_ERROR, _LIB_TRIED, _WARNED
    if not _LIB_TRIED:
        _LIB_TRIED = True
        if os.environ.get("SPARSEQUANT_NO_CUSPARSELT", "0") not in ("", "0"):
            _LIB_ERROR = "disabled by SPARSEQUANT_NO_CUSPARSELT"
        else:
            errors = []
            for path in _candidate_paths():
                try:
                    lib = Library(path)
                except OSError as exc:
                    errors.append(f"{path}: {exc}")
                    continue
                except CusparseLtError as exc:
                    errors.append(f"{path}: {exc}")
                    continue
                if lib.version[:2] < MIN_VERSION:
                    errors.append(f"{path}: version {lib.version} < {MIN_VERSION}")
                    continue
                _LIB = lib
                break
            if _LIB is None:
                _LIB_ERROR = "; ".join(errors[-3:]) or "libcusparseLt.so.0 not found"
    if _LIB is None and warn and not _WARNED:
        _WARNED = True
        warnings.warn(f"cuSPARSELt could not be loaded directly ({_LIB_ERROR}); W8A8 uses torch._cslt_sparse_mm "
                      "(a plan per call: slower eager calls)", RuntimeWarning, stacklevel=3)
    return _LIB


def load_error() -> str | None:
    return _LIB_ERROR


def _reset_for_tests() -> None:
    global _LIB, _LIB_ERROR, _LIB_TRIED, _WARNED
    _LIB, _LIB_ERROR, _LIB_TRIED, _WARNED = None, None, False, False


def current_stream_ptr(device: torch.device) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())
    except AttributeError:  # older torch: the public (slower) way
        return torch.cuda.current_stream(device).cuda_stream


class SparseMatmul:
    """``y[M, N] = alpha * (x[M, K] @ w[N, K]^T)`` with w 2:4 along K, compressed once for cuSPARSELt.

    ``plan(mp)`` builds (once, then cached: at most MAX_PLANS, never dropping one a CUDA graph
    captured) everything cuSPARSELt needs for ``mp`` tokens; ``run`` is then one ``cusparseLtMatmul``. ``alpha_vector``: alpha is a float32 device vector over
    the output channels ("weight_a") or the tokens ("weight_b") instead of the scalar 1.
    """

    MAX_PLANS = 16

    def __init__(self, lib: Library, w: torch.Tensor, out_dtype: torch.dtype, orientation: str,
                 alpha_vector: bool):
        if orientation not in ("weight_a", "weight_b"):
            raise ValueError(f"orientation must be 'weight_a' or 'weight_b', got {orientation!r}")
        if w.dtype not in (torch.int8, torch.float8_e4m3fn) or w.dim() != 2 or not w.is_cuda:
            raise TypeError(f"cuSPARSELt W8A8 needs a 2-D CUDA int8/fp8 weight, got {w.dtype} {tuple(w.shape)}")
        n, k = w.shape
        if n % 32 or k % 32:  # what the 8-bit structured descriptor accepts (0.8.0, H100)
            raise ValueError(f"cuSPARSELt needs both 8-bit weight dimensions divisible by 32, got {n} x {k}")
        self.lib, self.n, self.k, self.device = lib, n, k, w.device
        self.in_dtype, self.out_dtype = w.dtype, out_dtype
        self.orientation, self.alpha_vector = orientation, alpha_vector
        self.compute = COMPUTE_32I if w.dtype == torch.int8 else COMPUTE_32F
        self.h = lib.handle(w.device)
        self._plans: dict[int, _Plan] = {}
        self._lock = threading.Lock()
        # The structured descriptor must be the same for compression and every plan.
        self._wdesc = _Opaque()
        lib.check("cusparseLtStructuredDescriptorInit", self.h, self._wdesc.ptr, n, k, k, 16, _DTYPES[w.dtype],
                  ORDER_ROW, SPARSITY_50)
        size, buf = ctypes.c_size_t(), ctypes.c_size_t()
        lib.check("cusparseLtSpMMACompressedSize2", self.h, self._wdesc.ptr, ctypes.byref(size), ctypes.byref(buf))
        self.compressed = torch.empty(size.value, dtype=torch.uint8, device=w.device)
        scratch = torch.empty(max(buf.value, 1), dtype=torch.uint8, device=w.device)
        wc = w.contiguous()
        is_a = orientation == "weight_a"
        lib.check("cusparseLtSpMMACompress2", self.h, self._wdesc.ptr, int(is_a), OP_N if is_a else OP_T,
                  wc.data_ptr(), self.compressed.data_ptr(), scratch.data_ptr(), current_stream_ptr(w.device))
        torch.cuda.current_stream(w.device).synchronize()  # scratch and wc are freed next

    def plan(self, mp: int, config: dict | None = None) -> "_Plan":
        p = self._plans.get(mp)
        if p is None:
            with self._lock:
                p = self._plans.get(mp)
                if p is None:
                    if len(self._plans) >= self.MAX_PLANS:
                        # a plan a CUDA graph captured keeps its workspace: the graph writes into it
                        old = next((key for key, q in self._plans.items() if not q.captured), None)
                        if old is not None:
                            self._plans.pop(old)
                    p = _Plan(self, mp, config)
                    self._plans[mp] = p
        return p

    def drop_plan(self, mp: int) -> None:
        self._plans.pop(mp, None)

    def nbytes(self) -> int:
        return self.compressed.numel()

    def __del__(self):
        if _EXITING:
            return
        try:
            self._plans.clear()
            self.lib.lib.cusparseLtMatDescriptorDestroy(self._wdesc.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown or a failed __init__
            pass


class _Plan:
    """Descriptors, algorithm selection, plan and workspace for one token count; never rebuilt."""

    def __init__(self, sm: SparseMatmul, mp: int, config: dict | None):
        if mp <= 0 or mp % 16:
            raise ValueError(f"cuSPARSELt plans need a token count that is a positive multiple of 16, got {mp}")
        lib, h = sm.lib, sm.h
        self.sm, self.mp = sm, mp
        self._live = []  # what __del__ must destroy: only what was initialised
        n, k = sm.n, sm.k
        self.xdesc, self.ddesc, self.mm, self.alg, self.plan = (_Opaque() for _ in range(5))
        in_t, out_t = _DTYPES[sm.in_dtype], _DTYPES[sm.out_dtype]
        lib.check("cusparseLtDenseDescriptorInit", h, self.xdesc.ptr, mp, k, k, 16, in_t, ORDER_ROW)
        self._live.append(("cusparseLtMatDescriptorDestroy", self.xdesc))
        if sm.orientation == "weight_a":
            lib.check("cusparseLtDenseDescriptorInit", h, self.ddesc.ptr, n, mp, n, 16, out_t, ORDER_COL)
            lib.check("cusparseLtMatmulDescriptorInit", h, self.mm.ptr, OP_N, OP_T, sm._wdesc.ptr, self.xdesc.ptr,
                      self.ddesc.ptr, self.ddesc.ptr, sm.compute)
        else:
            lib.check("cusparseLtDenseDescriptorInit", h, self.ddesc.ptr, mp, n, n, 16, out_t, ORDER_ROW)
            lib.check("cusparseLtMatmulDescriptorInit", h, self.mm.ptr, OP_N, OP_T, self.xdesc.ptr, sm._wdesc.ptr,
                      self.ddesc.ptr, self.ddesc.ptr, sm.compute)
        self._live.append(("cusparseLtMatDescriptorDestroy", self.ddesc))
        if sm.alpha_vector:
            one = ctypes.c_int(1)
            lib.check("cusparseLtMatmulDescSetAttribute", h, self.mm.ptr, ATTR_ALPHA_VECTOR_SCALING,
                      ctypes.byref(one), ctypes.sizeof(one))
        lib.check("cusparseLtMatmulAlgSelectionInit", h, self.alg.ptr, self.mm.ptr, ALG_DEFAULT)
        if lib.has("cusparseLtMatmulAlgSelectionDestroy"):
            self._live.append(("cusparseLtMatmulAlgSelectionDestroy", self.alg))
        self.config = {"id": 0}
        if config:
            self._set_config(config)
        self._init_plan()
        self.captured = False
        self._alpha1 = ctypes.c_float(1.0)
        self._beta = ctypes.c_float(0.0)
        self._stream = ctypes.c_void_p(0)

    def _set_config(self, config: dict) -> None:
        # Only the algorithm id, as torch does: the split-K settings a search reports are kept in
        # the cache for the record, not replayed (setting them is where crashes would come from).
        lib, h = self.sm.lib, self.sm.h
        v = ctypes.c_int(int(config.get("id", 0)))
        lib.check("cusparseLtMatmulAlgSetAttribute", h, self.alg.ptr, ALG_CONFIG_ID, ctypes.byref(v), ctypes.sizeof(v))
        self.config = {"id": v.value}

    def _init_plan(self) -> None:
        lib, h = self.sm.lib, self.sm.h
        lib.check("cusparseLtMatmulPlanInit", h, self.plan.ptr, self.mm.ptr, self.alg.ptr)
        self._plan_live = True
        ws = ctypes.c_size_t()
        lib.check("cusparseLtMatmulGetWorkspace", h, self.plan.ptr, ctypes.byref(ws))
        self.workspace = torch.empty(max(ws.value, 1), dtype=torch.uint8, device=self.sm.device)

    def _get_config(self) -> dict:
        lib, h = self.sm.lib, self.sm.h
        out = {}
        for name, attr in (("id", ALG_CONFIG_ID), ("split_k", ALG_SPLIT_K), ("split_k_mode", ALG_SPLIT_K_MODE),
                           ("split_k_buffers", ALG_SPLIT_K_BUFFERS)):
            v = ctypes.c_int()
            try:
                lib.check("cusparseLtMatmulAlgGetAttribute", h, self.alg.ptr, attr, ctypes.byref(v), ctypes.sizeof(v))
            except CusparseLtError:
                continue
            out[name] = v.value
        return out

    def _args(self, xq: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None):
        sm = self.sm
        if xq.shape != (self.mp, sm.k) or xq.dtype != sm.in_dtype or xq.stride(-1) != 1 or xq.stride(0) != sm.k:
            raise ValueError(f"activations must be a contiguous [{self.mp}, {sm.k}] {sm.in_dtype} tensor, "
                             f"got {xq.dtype} {tuple(xq.shape)}")
        if out.shape != (self.mp, sm.n) or out.dtype != sm.out_dtype or not out.is_contiguous():
            raise ValueError(f"output must be a contiguous [{self.mp}, {sm.n}] {sm.out_dtype} tensor")
        if sm.alpha_vector:
            want = sm.n if sm.orientation == "weight_a" else self.mp
            if alpha is None or alpha.dtype != torch.float32 or alpha.numel() < want or not alpha.is_contiguous():
                raise ValueError(f"this plan scales by an alpha vector: pass {want} float32 values")
            a = ctypes.c_void_p(alpha.data_ptr())
        else:
            a = ctypes.byref(self._alpha1)
        if sm.orientation == "weight_a":
            da, db = sm.compressed.data_ptr(), xq.data_ptr()
        else:
            da, db = xq.data_ptr(), sm.compressed.data_ptr()
        self._stream.value = current_stream_ptr(sm.device)
        return (sm.h, self.plan.ptr, a, da, db, ctypes.byref(self._beta), out.data_ptr(), out.data_ptr(),
                self.workspace.data_ptr(), ctypes.byref(self._stream), 1)

    def run(self, xq: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """``out = alpha * (xq @ w^T)`` on the current stream (safe inside a CUDA graph capture)."""
        if not self.captured and torch.cuda.is_current_stream_capturing():
            self.captured = True
        self.sm.lib.check("cusparseLtMatmul", *self._args(xq, out, alpha))
        return out

    def search(self, xq: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None = None) -> dict:
        """Let cuSPARSELt time its algorithms on these operands; keep the fastest. Not while capturing."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("cuSPARSELt algorithm search cannot run inside a CUDA graph capture")
        self.sm.lib.check("cusparseLtMatmulSearch", *self._args(xq, out, alpha))
        torch.cuda.current_stream(self.sm.device).synchronize()
        # The search leaves this plan set to the fastest configuration; it is kept as it is
        # (rebuilding a plan in place after a search crashed cuSPARSELt 0.8.0 on the H100).
        self.config = self._get_config()
        return dict(self.config)

    def __del__(self):
        lib = getattr(getattr(self, "sm", None), "lib", None)
        if lib is None or _EXITING:
            return
        try:
            if getattr(self, "_plan_live", False):
                lib.lib.cusparseLtMatmulPlanDestroy(self.plan.ptr)
            for fn, obj in reversed(getattr(self, "_live", [])):
                getattr(lib.lib, fn)(obj.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
            pass
