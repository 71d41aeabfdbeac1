"""sparsequant: make LLMs small and fast with sparsity + quantization, and run them on GPUs."""
from .api import compress, generate, load, save
from .errors import SparseQuantError
from .recipe import PRESETS, Recipe, get_recipe

__version__ = "0.1.0"

__all__ = ["PRESETS", "Recipe", "SparseQuantError", "compress", "generate", "get_recipe", "load", "save", "__version__"]
