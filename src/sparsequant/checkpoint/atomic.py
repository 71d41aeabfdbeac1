"""Atomic folder writes: build in a temporary sibling, then rename into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError


def check_output_folder(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{path} already holds files; nothing was written. Choose another folder or pass overwrite=True "
            "(--overwrite) to replace it"
        )


@contextmanager
def atomic_folder(path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``path`` in one rename.

    An existing non-empty ``path`` is only replaced when ``overwrite`` is set, and even then the old
    folder is removed only after the new one is complete and in place.
    """
    path = Path(path)
    check_output_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
        tmp = f.name
    os.replace(tmp, path)
