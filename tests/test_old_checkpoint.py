"""A checkpoint written by the code before the module reorganisation still resumes.

``tests/data/mid_fit_before_refactor.ckpt`` was written by ``tests/data/make_mid_fit_checkpoint.py``
run against commit a833bc6 (a 16-unit DigitsMLP, one epoch of 20 steps: pruning halfway through its
schedule, QAT on since step 10, the report's baseline snapshot and the generator states inside).
"""

import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_quantum.callbacks import OptimizationReport, Pruning, QuantizationAwareTraining, RandomStateCheckpoint
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from lightning_quantum.quantization import is_converted
from tests.conftest import trainer_kwargs

OLD = Path(__file__).parent / "data" / "mid_fit_before_refactor.ckpt"


def test_a_checkpoint_from_before_the_refactor_resumes(tmp_path):
    checkpoint = torch.load(OLD, map_location="cpu", weights_only=True)  # plain tensors and types only
    assert checkpoint["global_step"] == 20
    path = tmp_path / "old.ckpt"
    shutil.copy(OLD, path)
    pruning = Pruning(method="l1_unstructured", final_sparsity=0.5, start_step=2, end_step=30, frequency=4)
    qat = QuantizationAwareTraining(start_step=10)
    report = OptimizationReport(output_dir=tmp_path, repeats=2, warmup=1, print_table=False, compare_train_step=False)
    callbacks = [RandomStateCheckpoint(), pruning, qat, report]
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=20, callbacks=callbacks)
    trainer = pl.Trainer(**kwargs)
    model = Classifier(DigitsMLP(hidden=(16,), dropout=0.1), num_classes=10)
    trainer.fit(model, DigitsDataModule(batch_size=32, seed=7), ckpt_path=path)
    assert trainer.global_step == 40  # resumed at step 20, not from the start
    assert pruning.current_sparsity == 0.5  # the schedule went on from where it was, to its end at step 30
    assert is_converted(model)  # QAT was on (restored), and converted at the end
    # the state each callback kept came back: the pruning curve goes on from the old one, and the report
    # compares against the fit-start snapshot in the checkpoint (the old run's baseline: 28 of 270 test images)
    old_history = checkpoint["callbacks"]["Pruning"]["history"]
    assert [list(h) for h in pruning.history[: len(old_history)]] == [list(h) for h in old_history]
    assert len(pruning.history) > len(old_history)
    assert report.report is not None
    assert abs(report.report.baseline["accuracy"] - 28 / 270) <= 1 / 270  # one test image: other CPU kernels
