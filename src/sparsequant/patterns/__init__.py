"""Sparsity patterns: specs, masks from scores, validators and packed storage."""
from .masks import is_nm, mask_from_scores, nm_mask, unstructured_mask, validate_mask, validate_nm
from .spec import SparsitySpec

__all__ = [
    "SparsitySpec",
    "is_nm",
    "mask_from_scores",
    "nm_mask",
    "unstructured_mask",
    "validate_mask",
    "validate_nm",
]
