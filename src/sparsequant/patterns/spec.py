"""SparsitySpec: which weights a layer may keep."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PatternError


@dataclass(frozen=True)
class SparsitySpec:
    """A sparsity pattern over a weight ``W[out, in]``.

    kind:
      - ``"dense"``: keep everything.
      - ``"unstructured"``: drop the fraction ``sparsity`` of weights, compared within each output
        row (``per_row=True``, Wanda's choice) or across the whole matrix.
      - ``"nm"``: in every group of ``m`` consecutive input weights of a row keep exactly ``n``.
    """

    kind: str = "dense"
    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    per_row: bool = True

    def __post_init__(self):
        if self.kind not in ("dense", "unstructured", "nm"):
            raise PatternError(f"unknown sparsity kind {self.kind!r}; use dense, unstructured or nm")
        if self.kind == "unstructured" and not 0.0 <= self.sparsity < 1.0:
            raise PatternError(f"unstructured sparsity must be in [0, 1), got {self.sparsity}")
        if self.kind == "nm":
            if not (self.m >= 2 and 1 <= self.n < self.m):
                raise PatternError(f"N:M needs 1 <= N < M and M >= 2, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str | None) -> "SparsitySpec":
        """Parse ``"2:4"``, ``"50%"``, ``"0.5"``, ``"50%-matrix"`` or ``"dense"``."""
        if text is None or str(text).strip().lower() in ("", "dense", "none", "0", "0%"):
            return cls()
        t = str(text).strip().lower()
        if ":" in t:
            a, b = t.split(":", 1)
            try:
                return cls(kind="nm", n=int(a), m=int(b))
            except ValueError:
                raise PatternError(f"cannot read N:M pattern {text!r}") from None
        per_row = True
        if t.endswith("-matrix"):
            per_row, t = False, t[: -len("-matrix")]
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise PatternError(f"cannot read sparsity {text!r}: use '2:4', '50%' or 'dense'") from None
        return cls(kind="unstructured", sparsity=value, per_row=per_row)

    @property
    def density(self) -> float:
        if self.kind == "nm":
            return self.n / self.m
        if self.kind == "unstructured":
            return 1.0 - self.sparsity
        return 1.0

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense" or (self.kind == "unstructured" and self.sparsity == 0.0)

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "unstructured":
            return f"{self.sparsity:.0%}" + ("" if self.per_row else "-matrix")
        return "dense"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sparsity": self.sparsity, "n": self.n, "m": self.m, "per_row": self.per_row}

    @classmethod
    def from_dict(cls, d: dict) -> "SparsitySpec":
        return cls(**d)
