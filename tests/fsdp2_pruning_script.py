"""Run by tests/test_fsdp2.py: pruning under FSDP2 (2 CPU processes, gloo, ModelParallelStrategy), or the
same fit in one process with the global batch (`single`); each rank writes its weights and masks."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from lightning_quantum.callbacks import Pruning
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import trainer_kwargs

out, mode, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


class ZerosOnEveryShard(Callback):
    """After every optimizer step (and the pruning callback's mask application): are the pruned weights 0?"""

    def __init__(self, pruning):
        self.pruning, self.bad = pruning, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            weight, keep = params[name], mask
            local_w = weight.to_local() if isinstance(weight, DTensor) else weight
            local_m = keep.to_local() if isinstance(keep, DTensor) else keep
            self.bad += int((local_w.detach()[~local_m] != 0).sum())


torch.manual_seed(0)
model = Classifier(DigitsMLP(hidden=(64, 64), dropout=0.0))
pruning = Pruning(method="l1_unstructured", final_sparsity=0.5, schedule="one_shot", start_step=2)
zeros = ZerosOnEveryShard(pruning)
sharded = mode == "fsdp2"
kwargs = trainer_kwargs(
    out,
    max_steps=steps,
    max_epochs=-1,
    limit_train_batches=None,
    callbacks=[pruning, zeros],
    devices=2 if sharded else 1,
    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto",
)
trainer = pl.Trainer(**kwargs)
trainer.fit(model, DigitsDataModule(batch_size=32 if sharded else 64))
params = dict(model.named_parameters())
state = {f"weight/{n}": full(p.detach()).clone() for n, p in params.items()}
state.update({f"mask/{n}": full(m).clone() for n, m in pruning.masks.items()})
state["bad_zeros"] = torch.tensor(zeros.bad)
state["sharded"] = torch.tensor(isinstance(params["net.head.weight"], DTensor))
torch.save(state, out / f"{mode}-rank{trainer.global_rank}.pt")
