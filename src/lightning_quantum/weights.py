"""Reading weights files safely: safetensors, or checkpoints through ``torch.load(weights_only=True)``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["WEIGHT_SUFFIXES", "read_checkpoint", "read_safetensors", "state_mismatch"]

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def read_safetensors(path: str | Path, *, label: str | None = None) -> dict[str, Any]:
    """The tensors of a safetensors file, or a ``ValueError`` naming the file when it is not a whole one.

    safetensors raises its own ``SafetensorError`` ("incomplete metadata, file not fully covered")
    for a truncated or corrupt file, without the file's name.

    Args:
        path: the file.
        label: how the error names the file (an argument and a path relative to a served root, say).
    """
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        shown = label or repr(str(path))
        raise ValueError(f"{shown} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def read_checkpoint(path: str | Path, *, argument: str = "checkpoint", shown: str | None = None) -> dict[str, Any]:
    """The contents of a weights file as a checkpoint dict (safetensors: ``{"state_dict": tensors}``).

    Nothing but tensors and plain data is ever built: safetensors holds only tensors, and other files
    go through ``torch.load(weights_only=True)``, which refuses a pickle that would run code.

    Args:
        path: the file.
        argument: the argument name the errors use.
        shown: how the errors show the path (a path relative to a served root, say); ``path`` if ``None``.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: for another suffix, a file that is not weights only, or one without a state dict.
    """
    path = Path(path)
    label = f"`{argument}`={shown if shown is not None else str(path)!r}"
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{label} is not valid. Give a .ckpt (Lightning) or .safetensors file (or .pt, .pth).")
    if not path.is_file():
        raise FileNotFoundError(f"{label} is not a file.")
    if path.suffix == ".safetensors":
        return {"state_dict": read_safetensors(path, label=label)}

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an UnpicklingError for anything but tensors and plain data
        raise ValueError(
            f"{label} is not a weights-only file: it could not be read as weights only (it is not a plain "
            f"checkpoint, or it holds code): {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{label} holds no state dict.")
    return checkpoint if isinstance(checkpoint.get("state_dict"), dict) else {"state_dict": checkpoint}


_WRAPPER = "_checkpoint_wrapped_module."  # the activation-checkpointing wrapper's name in module paths


def state_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any], *, examples: int = 3) -> str | None:
    """A short account of how a state dict differs from the one a model expects, or ``None`` when it fits.

    Counts the missing keys, the unexpected ones and the shapes that differ, with a few examples each,
    without the activation-checkpointing wrapper's internal names (``load_state_dict`` lists every key).
    """

    def shown(keys: list[str]) -> str:
        names = [k.replace(_WRAPPER, "") for k in keys[:examples]]
        return ", ".join(names) + (f" and {len(keys) - examples} more" if len(keys) > examples else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        k
        for k in expected
        if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if shapes:
        first = shapes[0]
        parts.append(
            f"{len(shapes)} tensor(s) of another shape ({shown(shapes)}; e.g. {first.replace(_WRAPPER, '')}: "
            f"file {list(given[first].shape)}, model {list(expected[first].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} missing ({shown(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({shown(unexpected)})")
    return "; ".join(parts) or None
