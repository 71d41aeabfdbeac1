"""QuantSpec: how a weight's kept values become integers."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QuantizationError

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSpec:
    """Integer quantization of weights.

    bits: 2..8. group_size: scales per group of this many consecutive input weights, or None for
    one scale per output channel. symmetric: absmax scale with the zero point fixed at
    ``2**(bits-1)``; otherwise min-max scale plus an integer zero point per group.
    Scales are stored as float16, and computed with the float16-rounded scale so that the stored
    checkpoint reproduces the in-memory model exactly.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantizationError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantizationError(f"group_size must be a positive integer or None, got {self.group_size!r}")

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def n_groups(self, in_features: int) -> int:
        gs = self.group_size or in_features
        return -(-in_features // gs)

    def effective_group(self, in_features: int) -> int:
        return self.group_size or in_features

    def __str__(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)
