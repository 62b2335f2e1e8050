"""What the benchmark scripts share."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(max_epochs: int, **overrides: Any) -> pl.Trainer:
    """A CPU ``Trainer`` that prints, logs and checkpoints nothing, and skips the sanity check."""
    kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
