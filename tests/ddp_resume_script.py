"""Run by tests/test_data.py: 2-process CPU DDP. An uninterrupted fit, the same fit stopped by an exception in
the middle of its second epoch (checkpointed), and its resume; each rank writes the samples it saw and its weights."""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import ddp_trainer_kwargs, finish_distributed

out = Path(sys.argv[1])


class Seen(pl.Callback):
    """The sample indices of every training batch this rank ran, by epoch; raises at `stop_at` if given."""

    def __init__(self, stop_at=None):
        self.samples, self.stop_at = {}, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())
        if trainer.global_step == self.stop_at:
            raise RuntimeError("stopped on purpose")


def fit(callbacks, ckpt_path=None):
    pl.seed_everything(0)
    model = Classifier(DigitsMLP(hidden=(32,), dropout=0.0))
    trainer = pl.Trainer(
        **ddp_trainer_kwargs(out, max_epochs=2, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True)
    )
    try:
        trainer.fit(model, DigitsDataModule(batch_size=16, return_index=True), ckpt_path=ckpt_path, weights_only=True)
    except RuntimeError as error:
        assert "stopped on purpose" in str(error)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return trainer, digest


whole = Seen()
trainer, whole_weights = fit([whole])
rank = trainer.global_rank
cut = Seen(stop_at=55)  # 40 steps an epoch per rank (1257 samples, 2 ranks, batches of 16): mid second epoch
checkpoint = ModelCheckpoint(
    dirpath=out, filename="interrupted", save_top_k=0, every_n_epochs=0, save_on_exception=True
)
fit([cut, checkpoint])
rest = Seen()
_, resumed_weights = fit([rest], ckpt_path=str(out / "interrupted.ckpt"))
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "whole": {str(k): v for k, v in whole.samples.items()},
            "cut": {str(k): v for k, v in cut.samples.items()},
            "rest": {str(k): v for k, v in rest.samples.items()},
            "checkpoint_step": torch.load(out / "interrupted.ckpt", weights_only=True)["global_step"],
            "whole_weights": whole_weights,
            "resumed_weights": resumed_weights,
        }
    )
)
finish_distributed()
