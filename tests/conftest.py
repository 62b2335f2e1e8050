import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_quantum.data import DigitsDataModule  # noqa: E402
from lightning_quantum.models import Classifier, DigitsMLP  # noqa: E402


@pytest.fixture
def tiny_classifier():
    """A BoringModel-sized classifier on the digits."""
    torch.manual_seed(0)
    return Classifier(DigitsMLP(hidden=(32,), dropout=0.0), num_classes=10)


@pytest.fixture
def digits():
    return DigitsDataModule(batch_size=32, eval_batch_size=128)


def trainer_kwargs(tmp_path, **overrides):
    """Quiet, CPU-only Trainer arguments for tests."""
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
    )
    kwargs.update(overrides)
    return kwargs


def ddp_trainer_kwargs(out_dir, **overrides):
    """``trainer_kwargs`` for a 2-process CPU DDP (gloo) run over the whole training set."""
    return trainer_kwargs(out_dir, **{"devices": 2, "strategy": "ddp", "limit_train_batches": None, **overrides})


def run_rank_script(script, out_dir, ranks=(0, 1)):
    """Run a multi-process test script (it launches its own DDP ranks) and read each rank's JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(script).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, str(script), str(out_dir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in ranks]


@pytest.fixture(autouse=True)
def _private_deployment_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own cache of the deployment gate's measurements (never the user's)."""
    monkeypatch.setenv("LIGHTNING_QUANTUM_CACHE", str(tmp_path_factory.mktemp("lq_cache")))


def fsdp2_script_parser():
    """The arguments every FSDP2 test script takes: output folder, `fsdp2` or `single`, steps, accelerator."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=["fsdp2", "single"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    return parser


def fsdp2_trainer_kwargs(args, **overrides):
    """``trainer_kwargs`` for an FSDP2 test script: 2 sharded processes, or one with the global batch."""
    sharded = args.mode == "fsdp2"
    return trainer_kwargs(
        args.out,
        max_steps=args.steps,
        max_epochs=-1,
        limit_train_batches=None,
        accelerator=args.accelerator,
        devices=2 if sharded else 1,
        strategy="fsdp2" if sharded else "auto",
        **overrides,
    )
