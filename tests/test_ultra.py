"""ULTRA in one fit: distillation, gradual pruning and QAT together; export, resume parity and DDP parity."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
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
    return DistillationModule(
        DigitsMLP(hidden=(32,), dropout=0.0),
        teacher,
        num_classes=10,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )


def all_digits_accuracy(model):
    """Accuracy over all 1,797 digits (train, val and test): a parity figure with a fine grain."""
    import itertools

    dm = DigitsDataModule(batch_size=256)
    dm.setup()
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    return evaluate_accuracy(model, list(itertools.chain(*loaders)))


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


@pytest.mark.parity
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


@pytest.mark.parity
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


@pytest.mark.parity
def test_ultra_resume_from_an_exception_checkpoint_mid_epoch(tmp_path):
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    full, (full_pruning, full_qat), full_losses = _fit(tmp_path / "a")

    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 15:  # the 4th of 6 batches of epoch 2: mid-epoch, mid-schedule
                raise RuntimeError("crash")

    crashed = pl.Trainer(
        **trainer_kwargs(
            tmp_path / "b",
            max_epochs=4,
            limit_train_batches=6,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[*ultra_callbacks(), Crash(), OnExceptionCheckpoint(tmp_path / "b")],
        )
    )
    with pytest.raises(RuntimeError, match="crash"):
        crashed.fit(ultra_model(), DigitsDataModule(batch_size=32))
    resumed, (res_pruning, res_qat), res_losses = _fit(tmp_path / "c", ckpt_path=tmp_path / "b" / "on_exception.ckpt")
    assert len(res_losses.losses) == 9  # the rest of epoch 2, then epochs 3 and 4
    assert all(torch.equal(full_pruning.masks[k], res_pruning.masks[k]) for k in full_pruning.masks)
    assert full_qat.state_dict() == res_qat.state_dict()
    assert abs(full_losses.losses[-1] - res_losses.losses[-1]) <= 1e-6
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(dense_values(a), dense_values(b))


@pytest.mark.slow
@pytest.mark.parity
def test_ultra_ddp_masks_agree_across_ranks_and_match_one_process(tmp_path):
    from pathlib import Path

    ranks = run_rank_script(Path(__file__).parent / "ddp_ultra_script.py", tmp_path)
    single = ultra_model()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=12, limit_train_batches=None, limit_val_batches=0, callbacks=ultra_callbacks()
        )
    )
    trainer.fit(single, DigitsDataModule(batch_size=32))  # the global batch of the 2 ranks of 16
    single_acc = all_digits_accuracy(single)
    assert ranks[0]["masks"] == ranks[1]["masks"]  # identical masks on both ranks
    assert ranks[0]["converted"] and ranks[1]["converted"]
    print(f"ULTRA accuracy: 2-process DDP {ranks[0]['accuracy']:.4f}, one process {single_acc:.4f}")
    assert abs(ranks[0]["accuracy"] - single_acc) <= 0.01 + 1e-9
    assert ranks[0]["report_written"] and not ranks[1]["report_written"]


class _NaNAt(DistillationModule):
    """A distillation module whose loss is NaN at one step."""

    nan_step = 5

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_step else loss


# fp16 with a GradScaler needs CUDA (Lightning runs "16-mixed" as bf16 on CPU).
@pytest.mark.parametrize("precision", ["bf16-mixed", pytest.param("16-mixed", marks=pytest.mark.gpu)])
def test_a_nan_loss_is_skipped_counted_and_harms_neither_masks_nor_qat(tmp_path, precision):
    from lightning_quantum.callbacks import GradScalerMonitor

    model = ultra_model()
    model.__class__ = _NaNAt
    monitor = GradScalerMonitor()
    pruning, qat = ultra_callbacks()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=4,
            limit_train_batches=6,
            limit_val_batches=0,
            precision=precision,
            accelerator="gpu" if precision == "16-mixed" else "cpu",
            gradient_clip_val=1.0,
            callbacks=[monitor, pruning, qat],
        )
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    # counted: by the scaler's skip (fp16) or by the monitor, which skips the step itself (bf16)
    assert monitor.skipped_steps + monitor.nonfinite_steps >= 1
    assert is_converted(model) and qat.phase == "converted"
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(dense_values(tensor).float()).all(), name
    for name, mask in pruning.masks.items():  # the masks reached the target and still hold
        weight = dense_values(model.get_submodule(name.rsplit(".", 1)[0]).weight)
        assert (weight[~mask] == 0).all()
    assert (
        abs(
            1 - sum(int(m.sum()) for m in pruning.masks.values()) / sum(m.numel() for m in pruning.masks.values()) - 0.5
        )
        < 0.01
    )


def test_report_charts_render_into_markdown_and_html(tmp_path):
    from lightning_quantum.callbacks import OptimizationReport

    report = OptimizationReport(
        output_dir=tmp_path / "report", warmup=0, repeats=2, compare_train_step=False, print_table=False
    )
    model = ultra_model()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=6, callbacks=[*ultra_callbacks(), report])
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    out = tmp_path / "report"
    pngs = sorted((out / "charts").glob("report_*.png"))
    assert [p.name for p in pngs] == ["report_curves.png", "report_sparsity.png", "report_tradeoff.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    markdown = (out / "report.md").read_text()
    assert "![Per-layer sparsity](charts/report_sparsity.png)" in markdown
    html = (out / "report.html").read_text()
    assert "<img src='charts/report_tradeoff.png'" in html and "Student vs teacher" in html


def test_sigint_during_ultra_leaves_a_loadable_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, lightning.pytorch as pl\n"
        "from lightning.pytorch.callbacks import OnExceptionCheckpoint\n"
        "from lightning_quantum.data import DigitsDataModule\n"
        "from tests.test_ultra import ultra_model, ultra_callbacks\n"
        "class Ready(pl.Callback):\n"
        "    def on_train_batch_end(self, trainer, *a):\n"
        "        if trainer.global_step == 12:\n"
        "            print('READY', flush=True)\n"
        f"trainer = pl.Trainer(default_root_dir={str(tmp_path)!r}, max_epochs=1000, logger=False, accelerator='cpu',\n"
        "    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, limit_train_batches=6,\n"
        f"    callbacks=[*ultra_callbacks(), Ready(), OnExceptionCheckpoint({str(tmp_path)!r})])\n"
        "trainer.fit(ultra_model(), DigitsDataModule(batch_size=32))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "READY" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)
    states = {k.split("{")[0]: v for k, v in checkpoint["callbacks"].items()}
    assert checkpoint["global_step"] >= 12
    assert states["Pruning"]["masks"] and states["QuantizationAwareTraining"]["phase"] in ("prepared", "float")
    resumed = ultra_model()
    resumed.load_state_dict(checkpoint["state_dict"])  # weights_only, into a fresh model
