"""A real lq-train process stopped by SIGTERM or Ctrl-C: non-zero exit, a checkpoint at the interrupt,
a printed resume command, and a resume that reproduces the uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 1,257 training digits in batches of 64: 20 optimizer steps an epoch, 60 in all
ARGS = [
    "trainer.max_epochs=3",
    "callbacks.report=null",
    "callbacks.deployment=null",
    "callbacks.memory_monitor=null",
    "callbacks.rich_progress_bar=null",
    "logger=none",
    "test=false",
]


def _marker(path, delay):
    return [
        "+callbacks.step_file._target_=tests.interrupt_helpers.StepFile",
        f"+callbacks.step_file.path={path}",
        f"+callbacks.step_file.delay={delay}",
    ]


def _start(args, run_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_quantum.apps.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _state(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    out, err = _start([*ARGS, *_marker(run.parent / "steps", 0.0)], run).communicate(timeout=300)
    assert (run / "checkpoints" / "last.ckpt").is_file(), err[-3000:]
    return _state(run / "checkpoints" / "last.ckpt")


@pytest.mark.parity
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    # Ctrl-C takes the same path as SIGTERM after the handler (and test_ultra interrupts with SIGINT by default)
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
def test_a_signal_mid_epoch_checkpoints_exits_nonzero_and_resumes_exactly(tmp_path, uninterrupted, signum, exit_code):
    steps = tmp_path / "steps"
    run = tmp_path / "run"
    process = _start([*ARGS, *_marker(steps, 0.05)], run)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the middle of the second epoch
        text = steps.read_text() if steps.is_file() else ""
        if text and int(text.split()[0]) >= 30:
            break
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.01)
    at_signal = int(steps.read_text().split()[0])
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)

    assert process.returncode == exit_code, err[-3000:]
    checkpoint = run / "checkpoints" / "interrupted.ckpt"
    step, _ = _state(checkpoint)
    assert at_signal <= step <= at_signal + 1 and step < 40  # within one step of the interrupt, mid-epoch
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lq-train: stopped by {signal.Signals(signum).name}"), line
    resume = re.search(r"Resume with: lq-train (.*)$", line).group(1).split()
    assert f"ckpt_path={checkpoint}" in resume

    resumed = tmp_path / "resumed"
    out, err = _start(resume, resumed).communicate(timeout=300)
    final_step, weights = _state(resumed / "checkpoints" / "last.ckpt")
    reference_step, reference = uninterrupted
    assert final_step == reference_step == 60, err[-3000:]
    # the same operations on the same batches in the same order: bitwise the same weights
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name
