"""Where the package keeps what it measured or built once per machine (the deployment gate's
measurements, trained tokenizers): ``$LIGHTNING_QUANTUM_CACHE``, else ``~/.cache/lightning_quantum``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root", "write_whole"]

CACHE_ENV = "LIGHTNING_QUANTUM_CACHE"


def cache_root() -> Path:
    """``$LIGHTNING_QUANTUM_CACHE`` when set, else ``~/.cache/lightning_quantum``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "lightning_quantum"


def write_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file of this process beside it
    (DDP ranks may write the same file at once), which then replaces ``path`` in one step, so a
    reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f"{path.suffix}.{os.getpid()}.partial")
    write(partial)
    partial.replace(path)
    return path
