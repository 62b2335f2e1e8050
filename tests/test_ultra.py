"""ULTRA in one fit: distillation, gradual pruning and QAT together; export, resume parity and DDP parity."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_quantum.benchmark import dense_values, evaluate_accuracy
from lightning_quantum.callbacks import ModelExport, Pruning, QuantizationAwareTraining
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.distillation import DistillationModule
from lightning_quantum.models import DigitsMLP
from lightning_quantum.quantization import is_converted
from tests.conftest import run_rank_script, trainer_kwargs

LINEARS = ("student.blocks.0.linear", "student.head")


def _teacher():
    """A small MLP teacher trained for two epochs (deterministic on CPU)."""
    torch.manual_seed(1)
    teacher = DigitsMLP(hidden=(64,), dropout=0.0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    loader = DigitsDataModule(batch_size=32).train_dataloader()
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(teacher(x), y).backward()
            optimizer.step()
    return teacher.eval()


def ultra_model():
    teacher = _teacher()
    torch.manual_seed(0)
    return DistillationModule(DigitsMLP(hidden=(32,), dropout=0.0), teacher, num_classes=10)


def ultra_callbacks():
    return [
        Pruning(final_sparsity=0.5, start_step=2, end_step=16, frequency=2),
        QuantizationAwareTraining(start_step=None, start_after_pruning=True),
    ]


class LastLoss(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(float(outputs["loss"]))


def _fit(root, epochs=4, ckpt_path=None, extra=()):
    model = ultra_model()
    callbacks = ultra_callbacks()
    losses = LastLoss()
    ckpt = ModelCheckpoint(dirpath=root / "ckpts", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = pl.Trainer(
        **trainer_kwargs(
            root,
            max_epochs=epochs,
            limit_train_batches=6,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[*callbacks, ckpt, losses, *extra],
        )
    )
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path, weights_only=True)
    return model, callbacks, losses


def test_ultra_export_keeps_sparsity_and_int8(tmp_path):
    export = ModelExport(formats=["safetensors"], output_dir=tmp_path / "export")
    model, (pruning, qat), _ = _fit(tmp_path, extra=[export])
    assert is_converted(model) and qat.phase == "converted"
    assert qat._resolved_start == pruning.schedule.end == 16  # QAT began at the final sparsity
    for name in LINEARS:
        weight = model.get_submodule(name).weight
        assert type(weight).__name__ != "Parameter" and weight.qdata.dtype == torch.int8
        mask = pruning.masks[f"{name}.weight"]
        assert (dense_values(weight)[~mask] == 0).all()  # masked weights are exact zeros in the int8 model
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    int8 = {k: v for k, v in saved.items() if v.dtype == torch.int8}
    assert int8, sorted(saved)
    zeros = sum(int((v == 0).sum()) for v in int8.values()) / sum(v.numel() for v in int8.values())
    assert zeros >= 0.49  # the exported file keeps the pruning: half the int8 weights are zero


def test_ultra_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, (full_pruning, full_qat), full_losses = _fit(tmp_path / "a")
    mid = tmp_path / "a" / "ckpts" / "epoch=1.ckpt"  # step 12: mid pruning schedule, before QAT starts
    resumed, (res_pruning, res_qat), res_losses = _fit(tmp_path / "b", ckpt_path=mid)
    assert full_pruning.masks.keys() == res_pruning.masks.keys()
    assert all(torch.equal(full_pruning.masks[k], res_pruning.masks[k]) for k in full_pruning.masks)
    assert full_qat.state_dict() == res_qat.state_dict()
    assert abs(full_losses.losses[-1] - res_losses.losses[-1]) <= 1e-6
    for (ka, a), (kb, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb and torch.equal(dense_values(a), dense_values(b)), ka
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    assert evaluate_accuracy(full, dm.test_dataloader()) == evaluate_accuracy(resumed, dm.test_dataloader())


def test_ultra_ddp_masks_agree_across_ranks_and_match_one_process(tmp_path):
    from pathlib import Path

    ranks = run_rank_script(Path(__file__).parent / "ddp_ultra_script.py", tmp_path)
    single = ultra_model()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=6, limit_train_batches=None, limit_val_batches=0, callbacks=ultra_callbacks()
        )
    )
    trainer.fit(single, DigitsDataModule(batch_size=32))  # the global batch of the 2 ranks of 16
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    single_acc = evaluate_accuracy(single, dm.test_dataloader())
    assert ranks[0]["masks"] == ranks[1]["masks"]  # identical masks on both ranks
    assert ranks[0]["converted"] and ranks[1]["converted"]
    print(f"ULTRA accuracy: 2-process DDP {ranks[0]['accuracy']:.4f}, one process {single_acc:.4f}")
    assert abs(ranks[0]["accuracy"] - single_acc) <= 0.01 + 1e-9
    assert ranks[0]["report_written"] and not ranks[1]["report_written"]
