"""Small helpers the callbacks share."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from torch import nn


def is_sanity_checking(trainer: pl.Trainer) -> bool:
    return bool(trainer.sanity_checking)


def is_fast_dev_run(trainer: pl.Trainer) -> bool:
    return bool(getattr(trainer, "fast_dev_run", False))


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that leaves the ``Trainer`` (and whatever it holds) behind."""
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(module, memo)
