"""Run by tests/test_fsdp2.py: pruning under FSDP2 (2 CPU processes, gloo, ModelParallelStrategy), or the
same fit in one process with the global batch (`single`); each rank writes its weights and masks."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.tensor import DTensor

from lightning_quantum.callbacks import Pruning
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import finish_distributed, fsdp2_script_parser, fsdp2_trainer_kwargs

parser = fsdp2_script_parser()
parser.add_argument("--schedule", default="one_shot")
parser.add_argument("--save-at", type=int, default=0, help="write a (sharded) checkpoint at this step")
parser.add_argument("--resume", type=Path, default=None)
parser.add_argument("--tag", default="")
args = parser.parse_args()
out, mode, steps = args.out, args.mode, args.steps


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
end = {"end_step": 8, "frequency": 2} if args.schedule != "one_shot" else {}
pruning = Pruning(method="l1_unstructured", final_sparsity=0.5, schedule=args.schedule, start_step=2, **end)
zeros = ZerosOnEveryShard(pruning)
sharded = mode == "fsdp2"
callbacks = [pruning, zeros]
if args.save_at:
    callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.save_at, save_top_k=-1))
kwargs = fsdp2_trainer_kwargs(args, callbacks=callbacks, enable_checkpointing=bool(args.save_at))
trainer = pl.Trainer(**kwargs)
trainer.fit(model, DigitsDataModule(batch_size=32 if sharded else 64), ckpt_path=args.resume)
params = dict(model.named_parameters())
state = {f"weight/{n}": full(p.detach()).cpu().clone() for n, p in params.items()}
state.update({f"mask/{n}": full(m).cpu().clone() for n, m in pruning.masks.items()})
state["bad_zeros"] = torch.tensor(zeros.bad)
state["sharded"] = torch.tensor(isinstance(params["net.head.weight"], DTensor))
state["history"] = torch.tensor(pruning.history)
torch.save(state, out / f"{mode}{args.tag}-rank{trainer.global_rank}.pt")
finish_distributed()
