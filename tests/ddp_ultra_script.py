"""Run by tests/test_ultra.py: a 2-process CPU DDP (gloo) ULTRA fit; each rank writes what it saw."""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_quantum.callbacks import OptimizationReport
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.quantization import is_converted
from tests.conftest import ddp_trainer_kwargs, finish_distributed
from tests.test_ultra import all_digits_accuracy, ultra_callbacks, ultra_model

out = Path(sys.argv[1])
model = ultra_model()
pruning, qat = ultra_callbacks()
report = OptimizationReport(output_dir=out / "report", warmup=0, repeats=2, train_step_repeats=2, print_table=False)
trainer = pl.Trainer(**ddp_trainer_kwargs(out, max_epochs=12, limit_val_batches=0, callbacks=[pruning, qat, report]))
trainer.fit(model, DigitsDataModule(batch_size=16))  # 2 ranks x 16: the one-process run's batch of 32
digest = hashlib.sha256()
for name in sorted(pruning.masks):
    digest.update(pruning.masks[name].numpy().tobytes())
report_written = trainer.global_rank == 0 and (out / "report" / "report.json").is_file()
(out / f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "masks": digest.hexdigest(),
            "converted": is_converted(model),
            "accuracy": all_digits_accuracy(model),
            "report_written": report_written,
        }
    )
)
finish_distributed()
