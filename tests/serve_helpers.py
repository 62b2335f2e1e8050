"""Imported by lq-serve's spawned workers in tests/test_serve.py: a job that waits for a gate file."""

import os
import time
from pathlib import Path

from lightning_quantum.apps.serving import run_optimization_job


def gated_optimization_job(*args):
    """``run_optimization_job`` once the file named by ``LQ_TEST_GATE`` exists (the test opens it)."""
    gate = Path(os.environ["LQ_TEST_GATE"])
    (gate.parent / f"started-{os.getpid()}").write_text(args[2])  # the job id, for the test to see
    while not gate.exists():
        time.sleep(0.05)
    return run_optimization_job(*args)
