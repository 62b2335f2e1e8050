"""What the Hydra apps share: where the configs live, and checks of a composed config."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

_PACKAGED = Path(__file__).resolve().parents[1] / "conf"
_CHECKOUT = Path(__file__).resolve().parents[3] / "conf"


def config_dir() -> str:
    """Absolute path of the config directory."""
    return str(_PACKAGED if _PACKAGED.is_dir() else _CHECKOUT)


def non_finite_values(cfg: DictConfig) -> list[tuple[str, float]]:
    """Every ``(dotted.key, value)`` of the config whose value is a NaN or infinite float.

    Hydra reads ``nan`` and ``inf`` from the shell as floats; a range check such as ``drop < 0``
    lets NaN through (every comparison with NaN is false), so the apps refuse them all up front.
    Interpolations are left as they are (a value typed in the shell is a plain float); ``hydra``
    (the app's own settings) is skipped.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    found: list[tuple[str, float]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if prefix == "" and key == "hydra":
                    continue
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        elif isinstance(node, float) and not math.isfinite(node):
            found.append((prefix[:-1], node))

    walk(container, "")
    return found


def refuse_non_finite(cfg: DictConfig | ListConfig) -> None:
    """Raise a ``ValueError`` naming each NaN or infinite number in the config.

    Raises:
        ValueError: ``trainer.gradient_clip_val=nan is not valid: give a finite number.``
    """
    bad = non_finite_values(cfg)  # type: ignore[arg-type]
    if bad:
        listed = ", ".join(f"`{key}`={value}" for key, value in bad)
        raise ValueError(f"{listed} is not valid: give a finite number (NaN and infinity switch checks off).")


#: Errors that mean the input was wrong (each names the argument or file); anything else is a bug and
#: keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    MisconfigurationException,
    InstantiationException,
)


def tell(line: str) -> None:
    """One line for the person at the terminal, on stderr (the apps' only output outside logging)."""
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


@contextmanager
def report_user_errors(app: str) -> Iterator[None]:
    """Turn a bad-input error into one line on stderr and exit status 2, as ``argparse`` does.

    ``HYDRA_FULL_ERROR=1`` lets the exception through with its traceback, as Hydra itself does.
    """
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        tell(f"{app}: error: {message} (HYDRA_FULL_ERROR=1 shows the traceback)")
        raise SystemExit(2) from None
