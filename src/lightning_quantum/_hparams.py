"""Saved hyperparameters as plain Python values, so that checkpoints load with ``weights_only=True``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plain_hyperparameters", "save_plain_hyperparameters"]


def save_plain_hyperparameters(owner: Any, *, ignore: Sequence[str] | None = None) -> None:
    """``owner.save_hyperparameters(ignore=ignore, logger=False)`` from the ``__init__`` that calls this,
    then :func:`plain_hyperparameters`: what every LightningModule and DataModule here saves."""
    caller = inspect.currentframe()
    frame = caller.f_back if caller is not None else None  # Lightning reads the arguments from that frame
    owner.save_hyperparameters(ignore=list(ignore) if ignore is not None else None, frame=frame, logger=False)
    plain_hyperparameters(owner)


def plain_hyperparameters(owner: Any) -> None:
    """Turn the hyperparameters ``owner.save_hyperparameters()`` kept into plain lists and dicts.

    Arguments that come from a Hydra config are OmegaConf ``ListConfig`` / ``DictConfig`` objects, and
    ``save_hyperparameters`` keeps them as they are: the checkpoint then holds a class that
    ``torch.load(weights_only=True)`` refuses, so the run could neither resume nor be read by
    ``lq-optimize`` (found with ``data.sources=[topics]``). Any mapping becomes a ``dict``, any other
    sequence but a string or tuple a ``list``, recursively.
    """
    for store in ("_hparams", "_hparams_initial"):
        values = getattr(owner, store, None)
        if values is not None:
            for key in list(values):
                values[key] = _plain(values[key])


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, Sequence):
        return [_plain(item) for item in value]
    return value
