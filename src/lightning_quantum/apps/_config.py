"""Where the Hydra configs live: inside the installed wheel, or the repository's conf/ in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parents[1] / "conf"
_CHECKOUT = Path(__file__).resolve().parents[3] / "conf"


def config_dir() -> str:
    """Absolute path of the config directory."""
    return str(_PACKAGED if _PACKAGED.is_dir() else _CHECKOUT)
