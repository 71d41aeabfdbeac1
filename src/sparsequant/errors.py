"""Errors raised for bad input. Each says what was wrong and what to do instead."""


class SparseQuantError(Exception):
    """Base class of every error sparsequant raises on purpose."""


class PatternError(SparseQuantError, ValueError):
    """A shape that does not fit a sparsity pattern, or a mask that is not the pattern it claims."""


class QuantizationError(SparseQuantError, ValueError):
    """An invalid quantization spec or a weight that cannot be quantized."""


class NonFiniteWeightError(SparseQuantError, ValueError):
    """A weight or statistic holds NaN or Inf."""


class UnsupportedModelError(SparseQuantError, ValueError):
    """A model family sparsequant does not know how to walk."""


class CheckpointError(SparseQuantError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, or of another format version."""


class OutputExistsError(SparseQuantError, FileExistsError):
    """The output location already holds something and overwriting was not asked for."""


class RecipeError(SparseQuantError, ValueError):
    """A recipe that is incomplete or contradicts itself."""


class DataError(SparseQuantError, ValueError):
    """Calibration or evaluation data that cannot be found or is too short."""


class SolverError(SparseQuantError, RuntimeError):
    """A solver that cannot proceed (for example a Hessian that stays singular after damping)."""
