"""What the benchmark scripts share."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


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


def call(module: nn.Module, inputs: Any) -> Tensor:
    """``module`` on one batch: keyword inputs (a Hugging Face model's) or one tensor."""
    return module(**inputs) if isinstance(inputs, dict) else module(inputs)


def time_side_by_side(
    modules: dict[str, nn.Module], inputs: Any, *, warmup: int, repeats: int, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds per call of each module on the same ``inputs``, in this process, in alternating rounds
    (``repeats // rounds`` calls of each module per round), so that drift of a shared machine hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in modules}
    with torch.inference_mode():
        for module in modules.values():
            for _ in range(warmup):
                call(module, inputs)
        for _ in range(rounds):
            for name, module in modules.items():
                for _ in range(max(1, repeats // rounds)):
                    t0 = time.perf_counter()
                    call(module, inputs)
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
    return samples
