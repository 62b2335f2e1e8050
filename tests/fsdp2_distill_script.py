"""Run by tests/test_fsdp2.py: a DistillationModule under FSDP2 (2 CPU processes, gloo), or the same fit in
one process with the global batch (`single`); rank zero writes the student's and the teacher's weights."""

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from lightning_quantum.data import DigitsDataModule
from lightning_quantum.distillation import DistillationModule
from lightning_quantum.models import DigitsMLP
from tests.conftest import finish_distributed, fsdp2_script_parser, fsdp2_trainer_kwargs

parser = fsdp2_script_parser()
parser.add_argument("--teacher-sharding", default="replicate", choices=["replicate", "shard"])
args = parser.parse_args()


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


torch.manual_seed(0)
teacher = DigitsMLP(hidden=(128, 128), dropout=0.0)
before = {n: t.detach().clone() for n, t in teacher.state_dict().items()}
model = DistillationModule(
    student=DigitsMLP(hidden=(32,), dropout=0.0),
    teacher=teacher,
    num_classes=10,
    teacher_sharding=args.teacher_sharding,
)
sharded = args.mode == "fsdp2"
trainer = pl.Trainer(**fsdp2_trainer_kwargs(args))
trainer.fit(model, DigitsDataModule(batch_size=32 if sharded else 64))
teacher_after = {n: full(t) for n, t in model.teacher.state_dict().items()}  # every rank: a gather if sharded
result = {f"student/{n}": full(p) for n, p in model.student.named_parameters()}
result.update({f"teacher_unchanged/{n}": torch.tensor(torch.equal(teacher_after[n], before[n])) for n in before})
result["teacher_training"] = torch.tensor(model.teacher.training)
result["teacher_sharded"] = torch.tensor(any(isinstance(p, DTensor) for p in model.teacher.parameters()))
if trainer.is_global_zero:
    torch.save(result, args.out / f"distill-{args.mode}-{args.teacher_sharding}.pt")
finish_distributed()
