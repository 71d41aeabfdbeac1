"""GPU kernels for packed sparse + quantized weights.

``prepare(packed, device, dtype)`` returns a kernel state for a PackedWeight when some kernel
supports its format on ``device`` (or None: the caller then uses the reference path in
``kernels.reference``), and ``linear(x, state)`` computes ``x @ W^T`` with it.

What runs where (see docs/kernels.md):
- 'nm24' symmetric int4/int8 codes, group 32/64/a multiple of 128/per channel, on a Hopper GPU
  (sm_90): such a weight holds only the mma.sp layout on the GPU (``Nm24State``), run by the
  sparse-tensor-core CUDA kernels (``mma_sp.py``, compiled with nvcc on first use; if that fails, a
  warning and the Triton paths below): the skinny kernel up to ``SKINNY_TOKENS`` tokens, the tiled
  kernel up to 128 (``MMA_SP_TOKENS``); above that a Triton expansion of the same layout into a
  transient dense buffer, then cuBLAS.
- other 'nm24' int4/int8 codes (asymmetric, other groups that are a multiple of 32), or no
  mma.sp kernel here, float16/bfloat16 activations on CUDA: the Triton decode kernel up to ``DECODE_MAX_TOKENS`` tokens (its fp16 path
  is inline PTX); above that either the Triton prefill kernel (tiles expanded in registers +
  tl.dot) or a Triton kernel that expands the weight into a transient dense buffer followed by
  cuBLAS, whichever measured faster on an H100 for the size (``PREFILL_PATH``; BENCHMARKS.md,
  '## GPU kernels').
- W8A8 (``act_quant='int8'|'fp8'``, opt-in because it changes the activations' precision):
  cuSPARSELt 2:4 int8/fp8 with a per-token activation quantization kernel.
- 'hybrid' int4/int8 (tiles dense or 2:4, tile columns a multiple of 32): kernels/hybrid.py.
- Everything else (CPU, dense or bitmap storage, structured outliers, other bit widths or
  group sizes): None.
"""
from __future__ import annotations

import torch

from . import reference  # noqa: F401  (part of the public kernel API)

#: Largest token count sent to the decode kernel (measured crossover on an H100: 8 to 16).
DECODE_MAX_TOKENS = 8
#: Token counts sent to the skinny sparse-tensor-core CUDA kernel (``MmaSpState.skinny``: a warp per
#: 16-row tile and K slice, K slices added in shared memory, no global split-K) when a weight holds
#: the mma.sp layout. H100, five LLaMA shapes, geomean vs cuBLAS fp16 (benchmarks/bench_skinny.py,
#: BENCHMARKS.md "Skinny mma.sp kernel", runs 1-2): 1 token 3.4x against 2.58x for the previous
#: dispatch (decode over the mma.sp layout / tiled kernel), 2 tokens 2.97x vs 2.21x, 4 tokens 2.64x
#: vs 2.18x, 5 tokens 2.42x vs 2.20x; 6 tokens even (2.19x vs 2.18x), 8 tokens tiled (2.12x vs 1.96x).
#: Tall weights (N >= SKINNY_TALL_N) only up to SKINNY_TALL_TOKENS: at 5 tokens the tiled kernel was
#: as fast or faster on all four of them (14336x4096 17.4 vs 19.2 us, 22016x4096 23.2 vs 24.5).
SKINNY_TOKENS = 5
SKINNY_TALL_TOKENS = 4
SKINNY_TALL_N = 8192
#: Token counts sent to the tiled sparse-tensor-core CUDA kernel (mma_sp.py) above SKINNY_TOKENS.
#: Such a state holds only the mma.sp layout (one copy of the weight: the Triton-layout kernels
#: would need a second one, benchmarks/KERNEL_NOTES.md, "One layout per weight"); above 128 tokens
#: the layout is expanded once and multiplied by cuBLAS (512 tokens: expand + cuBLAS 0.67x vs 0.39x).
#: The decode kernel over the mma.sp layout (triton_decode_mma.py) is no longer dispatched: the
#: skinny kernel is faster on every measured shape at 1 token (e.g. 4096x4096 5.7-6.0 vs 9.0 us).
MMA_SP_TOKENS = (1, 128)
#: Many-token path: "auto", "expand" (dense buffer + cuBLAS) or "triton" (tl.dot prefill kernel).
#: "auto" takes the Triton kernel up to 32 tokens on wide outputs (N >= 8192), where it measured
#: faster than expanding (83 vs 100-131 us at 16 tokens), and expand + cuBLAS everywhere else.
PREFILL_PATH = "auto"


class Nm24State:
    """Prepared W4A16 / W8A16 2:4 weight: exactly one kernel layout of it on the device.

    ``mma`` (an ``mma_sp.MmaSpState``) when the sparse-tensor-core kernels support the weight
    here (Hopper, symmetric codes, groups 32/64/multiple of 128/per channel, nvcc built the
    library): every token count runs from its layout (decode kernel over it, tiled kernel, or
    expansion + cuBLAS).
    Otherwise ``layout`` (layout.py's ``Nm24Layout``) and the Triton kernels. Never both: two
    layouts would double the weight's memory (0.39x of fp16 instead of 0.195x).
    """

    def __init__(self, packed, device: torch.device, dtype: torch.dtype, layout=None, mma=None):
        if layout is not None and mma is not None:
            raise ValueError("a Nm24State holds one layout: pass layout or mma, not both")
        self.dtype = dtype
        self.device = torch.device(device)
        if layout is None and mma is None:
            mma = _mma_sp_state(packed, self.device, dtype)
            if mma is None:
                from .layout import build_layout

                layout = build_layout(packed, self.device)
        self.layout = layout  # Triton layout, or None
        self.mma = mma  # mma.sp state, or None
        self.workspace = None
        if layout is not None:
            from .triton_decode import DecodeWorkspace

            self.workspace = DecodeWorkspace(layout.n, self.device)
        lay = self._lay()
        self.n, self.k, self.bits = lay.n, lay.k, lay.bits
        self.kind = f"nm24-w{self.bits}a16" + ("-mma.sp" if mma is not None else "")

    @classmethod
    def from_layout(cls, layout, dtype: torch.dtype) -> "Nm24State":
        """A Triton-path state around an existing ``Nm24Layout``."""
        return cls(None, layout.meta.device, dtype, layout=layout)

    @classmethod
    def from_mma(cls, mma) -> "Nm24State":
        """An mma.sp-path state around an existing ``MmaSpState``."""
        return cls(None, mma.device, mma.dtype, mma=mma)

    def _lay(self):
        return self.mma.layout if self.mma is not None else self.layout

    def nbytes(self) -> int:
        """Bytes of the weight's layout on the device (codes, metadata, scales; no workspaces)."""
        return self._lay().nbytes()

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        m = x2d.shape[0]
        if self.mma is not None:
            if 1 <= m <= (SKINNY_TOKENS if self.n < SKINNY_TALL_N else SKINNY_TALL_TOKENS):
                return self.mma.skinny(x2d)
            if MMA_SP_TOKENS[0] <= m <= MMA_SP_TOKENS[1]:
                return self.mma(x2d)
            from .triton_expand import expand_mma_linear

            return expand_mma_linear(x2d.contiguous(), self.mma.layout)
        from .triton_decode import decode_linear
        from .triton_prefill import expand_linear, prefill_linear

        if m <= DECODE_MAX_TOKENS:
            return decode_linear(x2d, self.layout, self.workspace)
        if PREFILL_PATH == "triton" or (PREFILL_PATH == "auto" and m <= 32 and self.n >= 8192):
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
        from . import cuda_build

        cuda_build.library()  # build (or load) first: a failure leaves no half state
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
    if packed.storage == "hybrid" and act_quant is None:  # tiles dense or 2:4: kernels/hybrid.py
        from .hybrid import prepare_hybrid

        return prepare_hybrid(packed, device, dtype)
    if packed.storage != "nm24" or packed.quant is None or packed.quant.bits not in (4, 8):
        return None
    if packed.sparsity.outliers:  # no kernel adds structured outliers yet: the reference path does
        return None
    from .layout import kernel_group

    if act_quant is not None:
        if act_quant not in ("int8", "fp8"):
            raise ValueError(f"act_quant must be None, 'int8' or 'fp8', got {act_quant!r}")
        from .cslt import shape_supported

        if not shape_supported(*packed.shape):  # cuSPARSELt refuses it: the reference path runs it
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
