"""Run by tests/test_distillation_ddp.py: 2-process CPU DDP distillation; each rank writes what it saw."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_quantum.data import DigitsDataModule
from lightning_quantum.distillation import DistillationModule
from lightning_quantum.models import DigitsCNN, DigitsMLP
from tests.conftest import ddp_trainer_kwargs, finish_distributed

out = Path(sys.argv[1])
pl.seed_everything(0)
torch.manual_seed(1)
teacher = DigitsCNN().eval()
bn_before = teacher.features[0].bn.running_mean.clone()
model = DistillationModule(DigitsMLP(hidden=(32,), dropout=0.0), teacher, num_classes=10, cache_teacher="memory")
trainer = pl.Trainer(**ddp_trainer_kwargs(out, max_epochs=2))
trainer.fit(model, DigitsDataModule(batch_size=32, return_index=True))
cached = int(model._cached.sum()) if model._cached is not None else -1
(out / f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "teacher_training": model.teacher.training,
            "bn_unchanged": bool(torch.equal(teacher.features[0].bn.running_mean, bn_before)),
            "cache_hits": model.cache_hits,
            "cache_lookups": model.cache_lookups,
            "cached_samples": cached,
            "student_sum": float(sum(p.double().sum() for p in model.student.parameters())),
        }
    )
)
finish_distributed()
