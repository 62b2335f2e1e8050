"""Distillation on digits, in one run: teacher, the student alone, the distilled student, and the cache.

    python benchmarks/distillation.py        # writes benchmarks/results/distillation.json

Like Hinton et al.'s MNIST table (teacher 67 errors, student alone 146, distilled 74): a DigitsCNN
teacher (188k parameters, trained by `digits_teacher`), an MLP student (64-128-128-10, 25.9k
parameters, under a quarter of the teacher's) trained alone and distilled with the same seed, data
order and epochs. Then the teacher cache: the time of an epoch after the first, with the cache and
without, against an epoch of the student alone (medians over epochs 2 onwards).

The MiniLM part of issue 5's benchmark is not in this script yet.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_quantum.benchmark import evaluate_accuracy  # noqa: E402
from lightning_quantum.data import DigitsDataModule  # noqa: E402
from lightning_quantum.distillation import DistillationModule, digits_teacher  # noqa: E402
from lightning_quantum.models import Classifier, DigitsMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distillation.json"
SEED, EPOCHS = 42, 40


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t)


def _optimizer(p):
    return torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-4)


def _scheduler(o):
    return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS)


def _student() -> DigitsMLP:
    return DigitsMLP(hidden=(128, 128), dropout=0.0)


def _fit(model: pl.LightningModule, return_index: bool) -> list[float]:
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(seed=SEED, return_index=return_index))
    return timer.seconds


def main() -> None:
    torch.set_num_threads(2)
    dm = DigitsDataModule(seed=SEED, eval_batch_size=512)
    dm.setup()
    test = dm.test_dataloader()
    n_test = len(dm.splits["test"])

    teacher = digits_teacher(epochs=15, seed=0, data_seed=SEED)
    rows: dict[str, Any] = {
        "teacher": {
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "test_accuracy": evaluate_accuracy(teacher, test),
        }
    }

    pl.seed_everything(SEED, verbose=False)
    alone = Classifier(_student(), optimizer=_optimizer, scheduler=_scheduler)
    alone_epochs = _fit(alone, return_index=False)
    rows["student_alone"] = {
        "parameters": sum(p.numel() for p in alone.net.parameters()),
        "test_accuracy": evaluate_accuracy(alone.net, test),
    }

    timings: dict[str, list[float]] = {"student_alone": alone_epochs}
    for cache in ("off", "memory"):
        pl.seed_everything(SEED, verbose=False)
        distilled = DistillationModule(
            _student(),
            teacher,
            num_classes=10,
            alpha=0.5,
            beta=0.5,
            temperature=4.0,
            optimizer=_optimizer,
            scheduler=_scheduler,
            cache_teacher=cache,
        )
        timings[f"distilled_cache_{cache}"] = _fit(distilled, return_index=True)
        rows[f"distilled_cache_{cache}"] = {
            "parameters": sum(p.numel() for p in distilled.student.parameters()),
            "test_accuracy": evaluate_accuracy(distilled.student, test),
        }
        print(cache, rows[f"distilled_cache_{cache}"], file=sys.stderr)
    for row in rows.values():
        row["test_errors"] = round((1 - row["test_accuracy"]) * n_test)
    alone_epoch = statistics.median(timings["student_alone"][1:])
    cache_ratio = {name: statistics.median(t[1:]) / alone_epoch for name, t in timings.items()}
    result = {
        "benchmark": "distillation on digits: teacher, student alone, distilled student, teacher cache",
        "command": "python benchmarks/distillation.py",
        "settings": {"epochs": EPOCHS, "seed": SEED, "test_samples": n_test},
        "digits": rows,
        "epoch_time_ratio_vs_student_alone": cache_ratio,
        "epoch_seconds": timings,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:22s} params {row['parameters']:7d} acc {row['test_accuracy']:.4f} errors {row['test_errors']}")
    for name, ratio in cache_ratio.items():
        print(f"epoch time {name:24s} {ratio:.2f}x student alone")


if __name__ == "__main__":
    main()
