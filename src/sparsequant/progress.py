"""Progress bars that a user can switch off from the environment.

tqdm reads ``TQDM_DISABLE`` only for arguments the caller leaves out, and every bar here passes
``disable`` (to follow the ``progress`` flag of its function), so the variable would be ignored.
``progress_bar`` applies both: a bar shows when its caller wants it and ``TQDM_DISABLE`` is not set
to a true value (batch jobs and logs set it).
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm

_FALSE = ("", "0", "false", "no", "off")


def disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def progress_bar(*args, enabled: bool = True, **kwargs):
    """``tqdm(*args, **kwargs)``, hidden when ``enabled`` is false or TQDM_DISABLE is set."""
    return tqdm(*args, disable=(not enabled) or disabled_by_env(), **kwargs)
