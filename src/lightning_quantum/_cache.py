"""Where the package keeps what it measured or built once per machine (the deployment gate's
measurements, trained tokenizers): ``$LIGHTNING_QUANTUM_CACHE``, else ``~/.cache/lightning_quantum``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "LIGHTNING_QUANTUM_CACHE"


def cache_root() -> Path:
    """``$LIGHTNING_QUANTUM_CACHE`` when set, else ``~/.cache/lightning_quantum``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "lightning_quantum"
