"""Locations of the local data copies and of the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "RMSAE_DATA_DIR"
CACHE_DIR_ENV = "RMSAE_CACHE_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the local data directory: the argument, else ``$RMSAE_DATA_DIR``, else None (hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    return Path(from_env).expanduser() if from_env else None


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache root: the argument, else ``$RMSAE_CACHE_DIR``, else ``~/.cache/rmsae``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "rmsae"
