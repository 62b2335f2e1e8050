"""Loaded by lq-train subprocesses in tests/test_interrupt.py (``+callbacks.step_file=...``)."""

import time
from pathlib import Path

import lightning.pytorch as pl


class StepFile(pl.Callback):
    """Writes the optimizer step count to ``path`` after every training batch, then waits ``delay`` seconds,
    so that a test can send a signal in the middle of an epoch and know which step the run had reached."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path = Path(path)
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.path.write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}")
        time.sleep(self.delay)
