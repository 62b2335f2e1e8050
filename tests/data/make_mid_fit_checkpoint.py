"""Write a small mid-fit checkpoint with the code from before the module reorganisation.

git worktree add /tmp/oldtree a833bc6
PYTHONPATH=/tmp/oldtree/src python tests/data/make_mid_fit_checkpoint.py /tmp/oldckpt
cp /tmp/oldckpt/old.ckpt tests/data/mid_fit_before_refactor.ckpt
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.conftest

import lightning_quantum
from lightning_quantum.callbacks import OptimizationReport, Pruning, QuantizationAwareTraining, RandomStateCheckpoint
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import trainer_kwargs

assert "oldtree" in lightning_quantum.__file__, lightning_quantum.__file__
out = Path(sys.argv[1])
torch.manual_seed(0)
model = Classifier(DigitsMLP(hidden=(16,), dropout=0.1), num_classes=10)
callbacks = [
    RandomStateCheckpoint(),
    Pruning(method="l1_unstructured", final_sparsity=0.5, start_step=2, end_step=30, frequency=4),
    QuantizationAwareTraining(start_step=10),
    OptimizationReport(output_dir=out, repeats=2, warmup=1, print_table=False, compare_train_step=False),
    ModelCheckpoint(dirpath=out, filename="old", save_last=False, every_n_epochs=1, save_top_k=-1),
]
trainer = pl.Trainer(**trainer_kwargs(out, limit_train_batches=20, enable_checkpointing=True, callbacks=callbacks))
trainer.fit(model, DigitsDataModule(batch_size=32, seed=7))
print(sorted(p.name for p in out.iterdir()))
