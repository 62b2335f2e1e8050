"""Reading weights files safely: safetensors, or checkpoints through ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["WEIGHT_SUFFIXES", "read_checkpoint"]

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


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
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path))}
    import torch

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
