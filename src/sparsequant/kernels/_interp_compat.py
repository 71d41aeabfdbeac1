"""Make Triton 3.6's CPU interpreter (TRITON_INTERPRET=1) work with NumPy >= 2.3.

The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
NumPy 2.3+ refuses for arrays with a dimension. Any loop whose bound is a kernel argument
(``for i in range(0, n)``) then fails. We re-register ``__index__`` so it reads the single
element. Only the interpreter is touched; compiled GPU kernels never see this.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def install() -> None:
    try:
        from triton.runtime import interpreter
    except Exception:  # triton missing or reorganised: nothing to patch
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sparsequant_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsequant_patched = True
    interpreter._patch_lang_tensor = patched
