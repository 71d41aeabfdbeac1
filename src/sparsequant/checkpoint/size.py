"""Size accounting: bits per original weight and compression ratio against float16."""
from __future__ import annotations

from dataclasses import dataclass

from .packed import ADAPTER_PREFIX, PackedWeight


@dataclass
class SizeReport:
    compressed_params: int  # weights of the compressed linears
    compressed_bytes: int  # everything stored for them: values, metadata, scales, zero points, adapters
    other_params: int  # embeddings, norms, skipped linears, lm_head (unless tied)
    other_bytes: int
    adapter_bytes: int = 0  # low-rank adapters, part of compressed_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per original weight of the compressed linears, all overheads included."""
        return 8.0 * self.compressed_bytes / max(self.compressed_params, 1)

    @property
    def linear_ratio(self) -> float:
        """Stored size of the compressed linears over their float16 size."""
        return self.compressed_bytes / max(2 * self.compressed_params, 1)

    @property
    def total_bytes(self) -> int:
        return self.compressed_bytes + self.other_bytes

    @property
    def model_ratio(self) -> float:
        """Whole stored model over the whole model in float16."""
        return self.total_bytes / max(2 * (self.compressed_params + self.other_params), 1)

    def to_dict(self) -> dict:
        return {
            "compressed_params": self.compressed_params,
            "compressed_bytes": self.compressed_bytes,
            "other_params": self.other_params,
            "other_bytes": self.other_bytes,
            "adapter_bytes": self.adapter_bytes,
            "bits_per_weight": self.bits_per_weight,
            "linear_ratio_vs_fp16": self.linear_ratio,
            "total_bytes": self.total_bytes,
            "model_ratio_vs_fp16": self.model_ratio,
        }


def size_report(packed: dict[str, PackedWeight], other_tensors: dict) -> SizeReport:
    cp = sum(p.shape[0] * p.shape[1] for p in packed.values())
    cb = sum(p.nbytes() for p in packed.values())
    op = sum(t.numel() for t in other_tensors.values())
    ob = sum(t.numel() * t.element_size() for t in other_tensors.values())
    ab = sum(t.numel() * t.element_size() for p in packed.values() for name, t in p.tensors.items()
             if name.startswith(ADAPTER_PREFIX))
    return SizeReport(cp, cb, op, ob, ab)
