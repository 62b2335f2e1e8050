import getpass
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Inductor's on-disk cache does not key its compiled CPU code on ATEN_CPU_CAPABILITY: a run with other kernels
# (make test-parity) loaded the code compiled in a run with this CPU's own kernel set, and an int8 program
# then computed NaN (a Zen 4 EPYC, ATEN_CPU_CAPABILITY=avx2 or default after a plain run). Such a run gets a
# cache of its own, so its compiled code is built for the kernel set it names.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _capability = os.environ["ATEN_CPU_CAPABILITY"]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_aten_{_capability}"
    )

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_quantum.data import DigitsDataModule, EpochSeededSampler  # noqa: E402
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
    """The arguments every FSDP2 test script takes: output folder, mode, steps, accelerator.

    The modes: ``fsdp2`` (2 sharded processes of 32 samples a batch), ``single`` (one process with the
    global batch of 64) and ``accumulated`` (one process that accumulates the gradients of the two
    ranks' batches, see :class:`RankBatches`: the same sums in the same order as the 2 ranks').
    """
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("mode", choices=["fsdp2", "single", "accumulated"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    return parser


def finish_distributed():
    """End a multi-process test script's process group before the interpreter exits: left to exit-time
    destruction, its threads once aborted a finished run ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp2_trainer_kwargs(args, **overrides):
    """``trainer_kwargs`` for an FSDP2 test script's mode (see :func:`fsdp2_script_parser`)."""
    sharded = args.mode == "fsdp2"
    return trainer_kwargs(
        args.out,
        max_steps=args.steps,
        max_epochs=-1,
        limit_train_batches=None,
        accelerator=args.accelerator,
        devices=2 if sharded else 1,
        strategy="fsdp2" if sharded else "auto",
        accumulate_grad_batches=2 if args.mode == "accumulated" else 1,
        **overrides,
    )


class RankBatches(EpochSeededSampler):
    """One process's sampler that yields rank 0's batch of an epoch, then rank 1's, and so on.

    With ``accumulate_grad_batches=2`` each optimizer step then sums the gradients of the two batches
    the 2 ranks of a sharded run see, each computed on the same 32 samples: (g0 + g1) / 2 in either
    process, so the sharded and the one-process runs differ by nothing that rounds differently.
    """

    def __init__(self, data, seed, batch_size):
        super().__init__(data, seed, num_replicas=2)
        self.batch_size = batch_size

    def __iter__(self):
        shards = [self.epoch_order()[rank::2] for rank in range(2)]
        for start in range(0, self.num_samples, self.batch_size):
            for shard in shards:
                yield from shard[start : start + self.batch_size]

    def __len__(self):
        return self.total_size


class AccumulatedDigits(DigitsDataModule):
    """Digits whose training batches come from :class:`RankBatches` (the ``accumulated`` mode)."""

    def train_dataloader(self):
        self.setup("fit")
        dataset = self.splits["train"]
        sampler = RankBatches(dataset, self.seed, self.batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def fsdp2_digits(args, **kwargs):
    """The digits for an FSDP2 test script's mode: 32 samples a rank, 64 in one process, or 2 x 32 accumulated."""
    if args.mode == "accumulated":
        return AccumulatedDigits(batch_size=32, **kwargs)
    return DigitsDataModule(batch_size=32 if args.mode == "fsdp2" else 64, **kwargs)
