"""PackedWeight: the stored form of one compressed linear weight.

Storage kinds (``W[N, K]``; codes are the unsigned quantization codes of kept weights):
- ``dense``:  quantized: ``qweight`` [N, K*bits/8] (row-packed, LSB first) else ``weight`` [N, K].
- ``nm24``:   2:4 along K (see patterns/pack24.py): ``meta`` [N, K/8] uint8 plus either
              ``qweight`` [N, (K/2)*bits/8] (the kept codes of each row, packed) or ``values`` [N, K/2].
- ``bitmap``: any other mask (unstructured, 4:8, 8:16, ...): ``bitmap`` (1 bit per weight,
              row-major, LSB first) plus the kept entries in row-major order: ``qweight`` (a flat
              bitstream) or ``values`` (flat).
- ``hybrid``: tiles each dense or 2:4 (see patterns/pack_hybrid.py): ``tile_flags`` [R, C] uint8,
              ``tile_offsets`` [R, C, 2] int32, tile by tile ``qweight`` (bytes) or ``values``, and
              ``meta`` (the 2:4 tiles' pack24 metadata).
Quantized weights add ``scales`` [N, groups] float16 and, when asymmetric, ``zeros`` [N, groups]
uint8. Unquantized values use the checkpoint's storage dtype (float16 or bfloat16).
Structured outliers (patterns/outliers.py), beside any kind: ``outlier_values`` [N, T] in the
storage dtype and ``outlier_index`` [N, T] uint8 (position within its block of 256 inputs).
A low-rank adapter (solvers/lowrank.py) adds ``adapter_down`` [r, K] and ``adapter_up`` [N, r] in
the storage dtype, or, quantized, their codes as flat bit streams plus ``adapter_down_scales`` /
``adapter_up_scales`` (float16); the description's ``adapter`` entry gives rank, quant and dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, PatternError
from ..patterns import SparsitySpec
from ..patterns.bits import pack_bits, pack_mask, unpack_bits, unpack_mask
from ..patterns.hybrid import grid_for, tile_flags
from ..patterns.outliers import OutlierSet
from ..patterns.pack24 import pack_24, unpack_24
from ..patterns.pack_hybrid import pack_hybrid, unpack_hybrid
from ..quant import QuantParams, QuantSpec
from ..solvers.base import CompressedWeight
from ..solvers.lowrank import LowRankAdapter

ADAPTER_PREFIX = "adapter_"

STORAGE_KINDS = ("dense", "nm24", "bitmap", "hybrid")


def storage_kind(sparsity: SparsitySpec, in_features: int) -> str:
    if sparsity.is_dense:
        return "dense"
    if sparsity.kind == "hybrid":
        return "hybrid"
    if sparsity.kind == "nm" and (sparsity.n, sparsity.m) == (2, 4) and in_features % 8 == 0:
        return "nm24"
    return "bitmap"


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row separately when rows end on a byte boundary (so kernels can index rows)."""
    n, k = codes.shape
    if (k * bits) % 8 == 0:
        return pack_bits(codes, bits).reshape(n, k * bits // 8)
    return pack_bits(codes, bits)


def _unpack_rows(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    return unpack_bits(packed, bits, n * k).reshape(n, k)


@dataclass
class PackedWeight:
    shape: tuple[int, int]
    storage: str
    sparsity: SparsitySpec
    quant: QuantSpec | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter: dict | None = None  # LowRankAdapter.describe() when an adapter is stored

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_compressed(cls, cw: CompressedWeight, storage_dtype: torch.dtype = torch.float16) -> "PackedWeight":
        n, k = cw.shape
        kind = storage_kind(cw.sparsity, k)
        t: dict[str, torch.Tensor] = {}
        q = cw.quant
        if kind == "dense":
            if q is not None:
                t["qweight"] = _pack_rows(cw.codes, q.bits)
            else:
                t["weight"] = cw.weight.to(storage_dtype)
        elif kind == "nm24":
            src = cw.codes if q is not None else cw.weight.to(storage_dtype)
            values, t["meta"] = pack_24(src, cw.mask)
            if q is not None:
                t["qweight"] = _pack_rows(values, q.bits)
            else:
                t["values"] = values
        elif kind == "hybrid":
            src = cw.codes if q is not None else cw.weight.to(storage_dtype)
            grid = grid_for(cw.sparsity, (n, k))
            t.update(pack_hybrid(src, cw.mask, tile_flags(cw.mask, cw.sparsity), grid, None if q is None else q.bits))
        else:
            t["bitmap"] = pack_mask(cw.mask)
            if q is not None:
                t["qweight"] = pack_bits(cw.codes[cw.mask], q.bits)
            else:
                t["values"] = cw.weight.to(storage_dtype)[cw.mask]
        if q is not None:
            t["scales"] = cw.qparams.scale.to(torch.float16)
            if not q.symmetric:
                t["zeros"] = cw.qparams.zero.to(torch.uint8)
        if cw.outliers is not None:
            t["outlier_values"], t["outlier_index"] = cw.outliers.values, cw.outliers.index
        adapter = None
        if cw.adapter is not None:
            t.update({ADAPTER_PREFIX + name: v for name, v in cw.adapter.tensors().items()})
            adapter = cw.adapter.describe()
        return cls(shape=(n, k), storage=kind, sparsity=cw.sparsity, quant=q, tensors=t, adapter=adapter)

    def without_adapter(self) -> "PackedWeight":
        """The sparse/quantized part alone (what the GPU kernels compute)."""
        return dataclasses.replace(self, adapter=None, tensors={
            k: v for k, v in self.tensors.items() if not k.startswith(ADAPTER_PREFIX)})

    def lowrank(self) -> LowRankAdapter | None:
        """The stored adapter, or None."""
        if self.adapter is None:
            return None
        own = {k[len(ADAPTER_PREFIX):]: v for k, v in self.tensors.items() if k.startswith(ADAPTER_PREFIX)}
        return LowRankAdapter.from_tensors(self.adapter, own, self.shape)

    # -- reading ----------------------------------------------------------------------------
    def _need(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"packed {self.storage} weight is missing tensor {name!r}") from None

    def qparams(self) -> QuantParams | None:
        if self.quant is None:
            return None
        n, k = self.shape
        scale = self._need("scales").float()
        if tuple(scale.shape) != (n, self.quant.n_groups(k)):
            raise CheckpointError(f"scales shape {tuple(scale.shape)} does not fit weight {self.shape} / {self.quant}")
        if self.quant.symmetric:
            zero = torch.full_like(scale, float(self.quant.sym_zero))
        else:
            zero = self._need("zeros").float()
        return QuantParams(scale=scale, zero=zero, spec=self.quant, in_features=k)

    def mask(self) -> torch.Tensor | None:
        n, k = self.shape
        if self.storage == "dense":
            return None
        if self.storage == "nm24":
            meta = self._need("meta")
            return unpack_24(torch.zeros(n, k // 2, dtype=torch.uint8, device=meta.device), meta)[1]
        if self.storage == "hybrid":
            return self._hybrid()[1]
        return unpack_mask(self._need("bitmap"), (n, k))

    def to_compressed(self) -> CompressedWeight:
        """Rebuild the CompressedWeight; its ``weight`` (and adapter) equal the packed ones, bit for bit."""
        cw = self._base_compressed()
        cw.adapter = self.lowrank()
        cw.outliers = self.outlier_set()
        return cw

    def outlier_set(self) -> OutlierSet | None:
        """The stored structured outliers, checked (exactly k per 256 inputs), or None."""
        if not self.sparsity.outliers:
            return None
        try:
            return OutlierSet(self._need("outlier_values"), self._need("outlier_index"), self.sparsity.outliers,
                              self.shape[1]).validate(self.shape)
        except PatternError as exc:
            raise CheckpointError(f"stored outliers are corrupt: {exc}") from exc

    def _hybrid(self):
        """(entries, mask, flags) of 'hybrid' storage."""
        names = ("tile_flags", "tile_offsets", "meta", "values" if self.quant is None else "qweight")
        try:
            return unpack_hybrid({m: self._need(m) for m in names}, grid_for(self.sparsity, self.shape),
                                 None if self.quant is None else self.quant.bits)
        except PatternError as exc:
            raise CheckpointError(f"packed hybrid weight of shape {self.shape} is corrupt: {exc}") from exc

    def _base_compressed(self) -> CompressedWeight:
        n, k = self.shape
        q = self.quant
        try:
            if self.storage == "dense":
                mask = None
                if q is not None:
                    codes = _unpack_rows(self._need("qweight"), q.bits, n, k)
                else:
                    return CompressedWeight(weight=self._need("weight").float(), sparsity=self.sparsity)
            elif self.storage == "nm24":
                meta = self._need("meta")
                if q is not None:
                    values = _unpack_rows(self._need("qweight"), q.bits, n, k // 2)
                else:
                    values = self._need("values")
                dense, mask = unpack_24(values, meta)
                if q is None:
                    return CompressedWeight(weight=dense.float(), sparsity=self.sparsity, mask=mask)
                codes = dense
            elif self.storage == "hybrid":
                entries, mask, _ = self._hybrid()
                if q is None:
                    return CompressedWeight(weight=entries.float(), sparsity=self.sparsity, mask=mask)
                codes = entries
            elif self.storage == "bitmap":
                mask = unpack_mask(self._need("bitmap"), (n, k))
                kept = int(mask.sum())
                if q is not None:
                    codes = torch.zeros(n, k, dtype=torch.uint8, device=mask.device)
                    codes[mask] = unpack_bits(self._need("qweight"), q.bits, kept)
                else:
                    values = self._need("values")
                    if values.numel() != kept:
                        raise CheckpointError(f"bitmap keeps {kept} weights but {values.numel()} values are stored")
                    w = torch.zeros(n, k, dtype=torch.float32, device=mask.device)
                    w[mask] = values.float()
                    return CompressedWeight(weight=w, sparsity=self.sparsity, mask=mask)
            else:
                raise CheckpointError(f"unknown storage kind {self.storage!r}")
        except CheckpointError:
            raise
        except Exception as exc:  # a shape mismatch deep inside unpacking means a corrupt file
            raise CheckpointError(f"packed {self.storage} weight of shape {self.shape} is corrupt: {exc}") from exc
        return CompressedWeight.from_quantized(codes, self.qparams(), self.sparsity, mask)

    # -- accounting -------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "storage": self.storage,
            "sparsity": self.sparsity.to_dict(),
            "quant": None if self.quant is None else self.quant.to_dict(),
            **({} if self.adapter is None else {"adapter": self.adapter}),
        }

    @classmethod
    def from_description(cls, d: dict, tensors: dict[str, torch.Tensor]) -> "PackedWeight":
        try:
            shape = tuple(int(x) for x in d["shape"])
            storage = d["storage"]
            sparsity = SparsitySpec.from_dict(d["sparsity"])
            quant = None if d.get("quant") is None else QuantSpec.from_dict(d["quant"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"layer description is malformed: {exc}") from exc
        if storage not in STORAGE_KINDS:
            raise CheckpointError(f"unknown storage kind {storage!r}")
        adapter = d.get("adapter")
        if adapter is not None and not isinstance(adapter, dict):
            raise CheckpointError(f"layer description's adapter entry is malformed: {adapter!r}")
        return cls(shape=shape, storage=storage, sparsity=sparsity, quant=quant, tensors=tensors, adapter=adapter)
