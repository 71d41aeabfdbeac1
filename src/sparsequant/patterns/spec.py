"""SparsitySpec: which weights a layer may keep."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import PatternError

OUTLIER_BLOCK = 256  # outliers are counted per this many input weights (uint8 index within a block)
OUTLIER_KS = (4, 8, 16)


@dataclass(frozen=True)
class SparsitySpec:
    """A sparsity pattern over a weight ``W[out, in]``.

    kind:
      - ``"dense"``: keep everything.
      - ``"unstructured"``: drop the fraction ``sparsity`` of weights, compared within each output
        row (``per_row=True``, Wanda's choice) or across the whole matrix.
      - ``"nm"``: in every group of ``m`` consecutive input weights of a row keep exactly ``n``.
      - ``"hybrid"``: tiles of ``tile = (rows, cols)`` weights (edge tiles partial), each either
        fully kept or 2:4, with ``sparsity`` in [0, 0.5] the fraction of the whole matrix pruned
        (met exactly as ``patterns/hybrid.py`` defines it).

    outliers: k > 0 keeps k of every 256 input weights of each row beside the sparse part, in the
    checkpoint's 16-bit float (``patterns/outliers.py``); the pattern then describes the rest.
    """

    kind: str = "dense"
    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    per_row: bool = True
    tile: tuple = (128, 128)  # hybrid only: (rows along out, columns along in)
    outliers: int = 0  # k per OUTLIER_BLOCK input weights; 0 = none

    def __post_init__(self):
        if self.kind not in ("dense", "unstructured", "nm", "hybrid"):
            raise PatternError(f"unknown sparsity kind {self.kind!r}; use dense, unstructured, nm or hybrid")
        object.__setattr__(self, "tile", tuple(self.tile))  # from JSON it arrives as a list
        if self.kind == "hybrid":
            if not 0.0 <= self.sparsity <= 0.5:
                raise PatternError(
                    f"hybrid sparsity must be in [0%, 50%] (every tile is dense or 2:4), got {self.sparsity:g}"
                )
            r, c = self.tile if len(self.tile) == 2 else (0, 0)
            if not (isinstance(r, int) and isinstance(c, int) and r >= 1 and c >= 8 and c % 8 == 0):
                raise PatternError(
                    f"hybrid tile {self.tile} must be (rows >= 1, columns a multiple of 8): a 2:4 tile "
                    "stores one metadata byte per 8 input weights of a row"
                )
        if self.outliers:
            if self.outliers not in OUTLIER_KS:
                raise PatternError(f"outliers keep k of every {OUTLIER_BLOCK} inputs with k in {OUTLIER_KS}, got {self.outliers}")
            if self.is_dense:
                raise PatternError("outliers sit beside a sparse part: give a sparse base pattern, e.g. '2:4+8/256'")
        if self.kind == "unstructured" and not 0.0 <= self.sparsity < 1.0:
            raise PatternError(f"unstructured sparsity must be in [0, 1), got {self.sparsity}")
        if self.kind == "nm":
            if not (self.m >= 2 and 1 <= self.n < self.m):
                raise PatternError(f"N:M needs 1 <= N < M and M >= 2, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str | None) -> "SparsitySpec":
        """Parse ``"2:4"``, ``"50%"``, ``"0.5"``, ``"50%-matrix"``, ``"dense"``, ``"hybrid:35%"``
        (128x128 tiles), ``"hybrid:35%@64"`` (64x64), ``"hybrid:35%@64x128"`` (rows x columns);
        any sparse pattern may end in ``"+K/256"`` (K = 4, 8, 16 outliers per 256 inputs)."""
        t = "" if text is None else str(text).strip().lower()
        if "+" in t:
            base, _, extra = t.partition("+")
            k, slash, block = extra.partition("/")
            if not slash or block.strip() != str(OUTLIER_BLOCK) or not k.strip().isdigit():
                raise PatternError(f"cannot read outliers {extra!r} in {text!r}: write e.g. '2:4+8/256'")
            spec = cls.parse(base)
            return cls(**{**spec.to_dict(), "tile": spec.tile, "outliers": int(k)})
        if t.startswith("hybrid:"):
            return cls._parse_hybrid(text, t[len("hybrid:"):])
        if t in ("", "dense", "none", "0", "0%"):
            return cls()
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

    @classmethod
    def _parse_hybrid(cls, text: str, t: str) -> "SparsitySpec":
        amount, _, tile = t.partition("@")
        try:
            value = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
            if not tile:
                size = (128, 128)
            elif "x" in tile:
                size = tuple(int(v) for v in tile.split("x", 1))
            else:
                size = (int(tile), int(tile))
        except ValueError:
            raise PatternError(f"cannot read hybrid pattern {text!r}: write e.g. 'hybrid:35%' or 'hybrid:35%@64x128'") from None
        return cls(kind="hybrid", sparsity=value, tile=size)

    @property
    def density(self) -> float:
        if self.kind == "nm":
            return self.n / self.m
        if self.kind in ("unstructured", "hybrid"):
            return 1.0 - self.sparsity
        return 1.0

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense" or (self.kind in ("unstructured", "hybrid") and self.sparsity == 0.0)

    @property
    def base(self) -> "SparsitySpec":
        """The same pattern without outliers (what the pruners apply to W minus the outliers)."""
        return replace(self, outliers=0)

    def __str__(self) -> str:
        extra = f"+{self.outliers}/{OUTLIER_BLOCK}" if self.outliers else ""
        if self.kind == "nm":
            return f"{self.n}:{self.m}{extra}"
        if self.kind == "unstructured":
            return f"{self.sparsity:.0%}" + ("" if self.per_row else "-matrix") + extra
        if self.kind == "hybrid":
            tile = "" if self.tile == (128, 128) else f"@{self.tile[0]}x{self.tile[1]}"
            return f"hybrid:{self.sparsity * 100:g}%{tile}{extra}"
        return "dense"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "sparsity": self.sparsity, "n": self.n, "m": self.m, "per_row": self.per_row}
        # Only where they matter, so descriptions of the older patterns stay as they were.
        if self.kind == "hybrid":
            d["tile"] = list(self.tile)
        if self.outliers:
            d["outliers"] = self.outliers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SparsitySpec":
        return cls(**d)
