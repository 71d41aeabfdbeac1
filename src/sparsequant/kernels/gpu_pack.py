"""Magnitude 2:4 + symmetric RTN + packing in a few whole-tensor ops, fast on a GPU.

``pack_nm24_rtn(weight, bits, group_size)`` returns the same PackedWeight, bit for bit, as the CPU
compression path for that recipe: ``compress_weight(weight, None, LinearPlan("magnitude", 2:4,
"rtn", QuantSpec(bits, group_size, symmetric=True)))`` followed by ``PackedWeight.from_compressed``.
It is plain PyTorch, so it runs on any device; on a GPU a 7B model converts in seconds
(BENCHMARKS.md, '## GPU kernels'). The tensors of the result live on ``weight``'s device.

Why it matches the CPU path exactly:
- The 2:4 choice keeps the two largest ``|w|`` of each group of four. Where the second and third
  largest tie, ``torch.topk`` on the CPU decides by an order of its own (not simply by position),
  so those few groups are sent to the CPU and decided by the very ``nm_mask`` the CPU path uses.
- Scales, codes and packing repeat the CPU path's float32 operations in the same order (absmax over
  the kept weights, divide by ``2**(bits-1) - 1``, clamp, round through float16; ``round(w / s)``
  plus the zero point), only restricted to the kept half of the weights.
"""
from __future__ import annotations

import torch

from ..checkpoint.packed import PackedWeight
from ..errors import NonFiniteWeightError, PatternError, QuantizationError
from ..patterns import SparsitySpec, nm_mask
from ..patterns.bits import pack_bits
from ..quant import QuantSpec
from ..quant.rtn import _MAX_SCALE, _MIN_SCALE

#: Elements of the weight handled per step: bounds the temporary memory to a few hundred MB.
CHUNK_ELEMENTS = 1 << 24

# For the 16 four-bit keep patterns with exactly two bits set: the metadata nibble idx0 | idx1 << 2.
_NIBBLE_OF_PATTERN = torch.zeros(16, dtype=torch.uint8)
for _p in range(16):
    _pos = [i for i in range(4) if _p >> i & 1]
    if len(_pos) == 2:
        _NIBBLE_OF_PATTERN[_p] = _pos[0] | (_pos[1] << 2)


def _keep_mask(a: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, K/4, 4]``: the two largest of each group of ``a`` (non-negative scores)."""
    # Number of strictly larger entries in the group: the top two have fewer than two.
    larger = (a.unsqueeze(-1) < a.unsqueeze(-2)).sum(-1)
    keep = larger < 2
    ambiguous = keep.sum(-1) != 2  # second and third largest tie
    if bool(ambiguous.any()):
        rows, groups = ambiguous.nonzero(as_tuple=True)
        decided = nm_mask(a[rows, groups].cpu(), 2, 4).to(a.device)
        keep[rows, groups] = decided
    return keep


def _pack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``qweight`` tensor of PackedWeight.from_compressed for ``values [N, K/2]`` uint8 codes."""
    n, half = values.shape
    if bits == 8:
        return values
    if bits == 4:
        pair = values.reshape(n, half // 2, 2)
        return pair[..., 0] | (pair[..., 1] << 4)
    packed = pack_bits(values, bits)
    return packed.reshape(n, half * bits // 8) if (half * bits) % 8 == 0 else packed


def pack_nm24_rtn(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128) -> PackedWeight:
    """Magnitude-prune ``weight [N, K]`` to 2:4, quantize it symmetric RTN and pack it ('nm24')."""
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=True)
    if weight.dim() != 2:
        raise PatternError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not (weight.is_floating_point()):
        raise QuantizationError(f"expected a floating-point weight, got {weight.dtype}")
    n, k = weight.shape
    if k % 8:
        raise PatternError(f"2:4 storage needs the input dimension to be a multiple of 8, got {k}")
    g = spec.effective_group(k)
    if g % 4:
        raise QuantizationError(
            f"pack_nm24_rtn needs a group size that is a multiple of 4 (got {g}); "
            "use the CPU path (sparsequant.solvers.compress_weight) for other group sizes"
        )
    g = min(g, -(-k // 4) * 4)  # one group spans the row: same result, less padding
    n_groups = spec.n_groups(k)
    half_g = g // 2
    qmax = spec.sym_zero - 1
    dev = weight.device
    lut = _NIBBLE_OF_PATTERN.to(dev)
    pos = torch.arange(4, device=dev, dtype=torch.uint8)

    meta = torch.empty(n, k // 8, dtype=torch.uint8, device=dev)
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=dev)
    scales = torch.empty(n, n_groups, dtype=torch.float16, device=dev)
    step = max(1, CHUNK_ELEMENTS // k)
    for r0 in range(0, n, step):
        w = weight[r0 : r0 + step].float()
        rows = w.shape[0]
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteWeightError("weight holds NaN/Inf values; refusing to compress it")
        wg = w.reshape(rows, k // 4, 4)
        keep = _keep_mask(wg.abs())
        pattern = (keep.to(torch.uint8) << pos).sum(-1, dtype=torch.uint8)  # [rows, K/4]
        nib = lut[pattern.long()]
        meta[r0 : r0 + rows] = nib[:, 0::2] | (nib[:, 1::2] << 4)
        idx = torch.stack([nib & 3, nib >> 2], dim=-1).long()  # ascending kept positions
        kept = wg.gather(-1, idx).reshape(rows, k // 2)
        # Scales as fit_params computes them: absmax of the kept weights per group.
        pad = n_groups * half_g - k // 2
        kp = torch.nn.functional.pad(kept, (0, pad)) if pad else kept
        absmax = kp.abs().reshape(rows, n_groups, half_g).amax(-1)
        scale = absmax / qmax
        scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
        scale = scale.clamp(_MIN_SCALE, _MAX_SCALE).half()
        scales[r0 : r0 + rows] = scale
        s = scale.float().unsqueeze(-1).expand(rows, n_groups, half_g).reshape(rows, -1)[:, : k // 2]
        q = torch.round(kept / s) + float(spec.sym_zero)
        codes[r0 : r0 + rows] = q.clamp_(0, 2**bits - 1).to(torch.uint8)
    tensors = {"meta": meta, "qweight": _pack_codes(codes, bits), "scales": scales}
    return PackedWeight(shape=(n, k), storage="nm24", sparsity=SparsitySpec(kind="nm", n=2, m=4),
                        quant=spec, tensors=tensors)
