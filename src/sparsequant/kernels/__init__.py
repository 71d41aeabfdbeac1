"""GPU kernels for packed sparse + quantized weights.

``prepare(packed, device, dtype)`` returns a kernel state for a PackedWeight when some kernel
supports its format on ``device`` (or None: the caller then uses the reference path in
``kernels.reference``), and ``linear(x, state)`` computes ``x @ W^T`` with it.

What runs where (see docs/kernels.md):
- 'nm24' symmetric int4/int8 codes, group 32/64/a multiple of 128/per channel, on a Hopper GPU
  (sm_90): the sparse-tensor-core CUDA kernels (``mma_sp.py``, compiled with nvcc on first use; if
  that fails, a warning and the Triton paths below): the tiled kernel from 2 to 32 tokens, and
  from 33 to 128 tokens on weights of at least 32M entries (``MMA_SP_*`` below).
- 'nm24' int4/int8 codes, group size a multiple of 32 or per channel, float16/bfloat16
  activations on CUDA: the Triton decode kernel up to ``DECODE_MAX_TOKENS`` tokens (its fp16 path
  is inline PTX); above that either the Triton prefill kernel (tiles expanded in registers +
  tl.dot) or a Triton kernel that expands the weight into a transient dense buffer followed by
  cuBLAS, whichever measured faster on an H100 for the size (``PREFILL_PATH``; BENCHMARKS.md,
  '## GPU kernels').
- W8A8 (``act_quant='int8'|'fp8'``, opt-in because it changes the activations' precision):
  cuSPARSELt 2:4 int8/fp8 with a per-token activation quantization kernel.
- Everything else (CPU, dense, bitmap or hybrid storage, structured outliers, other bit widths or
  group sizes): None.
"""
from __future__ import annotations

import torch

from . import reference  # noqa: F401  (part of the public kernel API)

#: Largest token count sent to the decode kernel (measured crossover on an H100: 8 to 16).
DECODE_MAX_TOKENS = 8
#: Token counts sent to the tiled sparse-tensor-core CUDA kernel (mma_sp.py) when it is available.
#: Measured on an H100 (BENCHMARKS.md, '## GPU kernels', run 15): 1 token: the Triton decode kernel
#: is faster (2.71x cuBLAS fp16 vs 2.32x); 2-32 tokens the tiled kernel beats every other path
#: (8 tokens 1.85x fp16 vs 1.60x for the direct mma.sp kernel; 32 tokens 0.99x vs 0.51x Triton);
#: above 128 tokens expand + cuBLAS is faster (512 tokens 0.67x vs 0.39x).
MMA_SP_TOKENS = (2, 128)
#: From this token count on, the tiled kernel only for weights of at least MMA_SP_LARGE_MIN_WEIGHTS
#: entries: at 128 tokens it beat expand + cuBLAS on the 11008/14336-wide LLaMA shapes (66-97 vs
#: 77-106 us) but not on 4096x4096 (43.5 vs 24.5 us).
MMA_SP_LARGE_TOKENS = 33
MMA_SP_LARGE_MIN_WEIGHTS = 32 * 2**20
#: Many-token path: "auto", "expand" (dense buffer + cuBLAS) or "triton" (tl.dot prefill kernel).
#: "auto" takes the Triton kernel up to 32 tokens on wide outputs (N >= 8192), where it measured
#: faster than expanding (83 vs 100-131 us at 16 tokens), and expand + cuBLAS everywhere else.
PREFILL_PATH = "auto"


class Nm24State:
    """Prepared W4A16 / W8A16 2:4 weight: the kernel layout plus split-K workspace."""

    def __init__(self, packed, device: torch.device, dtype: torch.dtype, layout=None):
        from .layout import build_layout
        from .triton_decode import DecodeWorkspace

        self.layout = layout if layout is not None else build_layout(packed, device)
        self.dtype = dtype
        self.device = torch.device(device)
        self.workspace = DecodeWorkspace(self.layout.n, self.device)
        self.kind = f"nm24-w{self.layout.bits}a16"
        self.mma = _mma_sp_state(packed, self.device, dtype) if packed is not None else None

    @classmethod
    def from_layout(cls, layout, dtype: torch.dtype) -> "Nm24State":
        return cls(None, layout.meta.device, dtype, layout=layout)

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        from .triton_decode import decode_linear
        from .triton_prefill import expand_linear, prefill_linear

        m = x2d.shape[0]
        if self.mma is not None and MMA_SP_TOKENS[0] <= m <= MMA_SP_TOKENS[1]:
            if m < MMA_SP_LARGE_TOKENS or self.layout.n * self.layout.k >= MMA_SP_LARGE_MIN_WEIGHTS:
                return self.mma(x2d)
        if m <= DECODE_MAX_TOKENS:
            return decode_linear(x2d, self.layout, self.workspace)
        if PREFILL_PATH == "triton" or (PREFILL_PATH == "auto" and m <= 32 and self.layout.n >= 8192):
            return prefill_linear(x2d, self.layout)
        return expand_linear(x2d.contiguous(), self.layout)


class W8A8State:
    """2:4 weight as int8/fp8 for cuSPARSELt with dynamic per-token activation quantization."""

    def __init__(self, packed, device: torch.device, dtype: torch.dtype, act_quant: str):
        from .cslt import CsltW8A8, weight_from_dense

        q = packed.quant
        if q.bits == 8 and q.symmetric and q.group_size is None and act_quant == "int8":
            # The stored codes already are per-channel int8: use them as they are.
            w = reference.dequantize_nm24(packed)
            scale = packed.tensors["scales"][:, 0].float()
            wq = torch.round(w / scale[:, None]).clamp_(-128, 127).to(torch.int8)
        else:
            wq, scale = weight_from_dense(reference.dequantize_nm24(packed), act_quant)
        self.op = CsltW8A8(wq.to(device), scale.to(device), act_quant, dtype)
        self.dtype = dtype
        self.kind = f"nm24-w8a8-{act_quant}"

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        return self.op(x2d)


_MMA_SP_WARNED = False


def _mma_sp_state(packed, device, dtype):
    """The mma.sp kernel's state when it supports this weight here, else None (warns once if its build fails)."""
    global _MMA_SP_WARNED
    from . import mma_sp

    if not mma_sp.supported(packed, device, dtype):
        return None
    try:
        return mma_sp.MmaSpState(packed, device, dtype)
    except Exception as exc:  # noqa: BLE001 - nvcc missing or failing: the Triton kernels still work
        if not _MMA_SP_WARNED:
            import warnings

            warnings.warn(f"mma.sp CUDA kernel unavailable, using the Triton kernels: {exc}", RuntimeWarning, stacklevel=3)
            _MMA_SP_WARNED = True
        return None


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def prepare(packed, device, dtype: torch.dtype, act_quant: str | None = None):
    """A kernel state for ``packed`` on ``device`` with activations of ``dtype``, or None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if packed.storage != "nm24" or packed.quant is None or packed.quant.bits not in (4, 8):
        return None
    if packed.sparsity.outliers:  # no kernel adds structured outliers yet: the reference path does
        return None
    from .layout import kernel_group

    if act_quant is not None:
        if act_quant not in ("int8", "fp8"):
            raise ValueError(f"act_quant must be None, 'int8' or 'fp8', got {act_quant!r}")
        n, k = packed.shape
        if n % 16 or k % 16:
            return None
        return W8A8State(packed, device, dtype, act_quant)
    if kernel_group(packed) is None or not _triton_ok():
        return None
    return Nm24State(packed, device, dtype)


def linear(x: torch.Tensor, state) -> torch.Tensor:
    """``x @ W^T`` through a prepared kernel state; x is ``[..., K]``."""
    if state is None:
        raise ValueError("kernels.linear needs a state from kernels.prepare (None means: use the reference path)")
    if x.dtype != state.dtype:
        raise TypeError(f"kernel state was prepared for {state.dtype} activations, got {x.dtype}")
    lead = x.shape[:-1]
    y = state(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])
