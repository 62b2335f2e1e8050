"""Keep the random number generators' state in checkpoints, so a resumed fit draws what the uninterrupted one would.

Lightning's checkpoints hold the weights, the optimizer and the loops, but not the generators that
dropout (and any other random op in a training step) draws from. A fit resumed from a checkpoint
re-seeds them at start, so from the resume on it trains with other dropout masks than the run it
continues. :class:`RandomStateCheckpoint` saves the torch (CPU and every CUDA device), NumPy and
Python generators with each checkpoint and puts them back on resume.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["RandomStateCheckpoint", "collect_random_state", "restore_random_state"]


def collect_random_state() -> dict[str, Any]:
    """The state of the torch, CUDA, NumPy and Python generators, as tensors and plain types.

    Everything in it loads with ``torch.load(weights_only=True)`` (NumPy's key array becomes a tensor).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # type: ignore[misc]
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_random_state(state: dict[str, Any]) -> None:
    """Put back a state from :func:`collect_random_state` (generators it lacks are left alone).

    CUDA states are restored when the device count matches; a checkpoint from another machine
    with another GPU count restores the CPU generators only.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["position"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RandomStateCheckpoint(Callback):
    """Save the generators' state with every checkpoint and restore it on resume.

    A checkpoint written in the middle of a training batch (Ctrl-C during the step) holds the state
    from that batch's start, since a resumed fit runs that batch again. Under DDP, rank zero's state
    is saved and every rank restores it (``seed_everything`` gives all ranks the same generators).

    Example:
        >>> trainer = L.Trainer(callbacks=[RandomStateCheckpoint(), ModelCheckpoint(save_last=True)])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._at_batch_start: dict[str, Any] | None = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._at_batch_start = collect_random_state()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._at_batch_start = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._at_batch_start if self._at_batch_start is not None else collect_random_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_random_state(state_dict)
