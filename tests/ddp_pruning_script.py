"""Run by tests/test_pruning_ddp.py: 2-process CPU DDP (gloo) pruning; each rank writes what it saw."""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_quantum.callbacks import OptimizationReport, Pruning
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import ddp_trainer_kwargs, finish_distributed

out = Path(sys.argv[1])
pl.seed_everything(0)
model = Classifier(DigitsMLP(hidden=(64,), dropout=0.0))
pruning = Pruning(final_sparsity=0.7, start_step=2, end_step=12, frequency=2)
report = OptimizationReport(output_dir=out, warmup=0, repeats=2, train_step_repeats=2, print_table=False)
trainer = pl.Trainer(**ddp_trainer_kwargs(out, max_epochs=2, limit_train_batches=8, callbacks=[pruning, report]))
trainer.fit(model, DigitsDataModule(batch_size=32))
digest = hashlib.sha256()
for name in sorted(pruning.masks):
    digest.update(pruning.masks[name].numpy().tobytes())
zeros = sum(int((dict(model.named_parameters())[n] == 0).sum()) for n in pruning.masks)
total = sum(m.numel() for m in pruning.masks.values())
(out / f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "masks": digest.hexdigest(),
            "sparsity": zeros / total,
            "target": pruning.current_sparsity,
            "weights": float(sum(p.double().sum() for p in model.parameters())),
        }
    )
)
finish_distributed()
