"""Measure activation checkpointing's effect on peak training memory, one configuration per process.

    python benchmarks/checkpointing_probe.py on|off [--blocks 8] [--width 256] [--batch 16384]

Prints one JSON line: ``{"peak_mb": ..., "step_ms": ...}``. Each configuration must run in a fresh
process with ``MALLOC_MMAP_THRESHOLD_=65536`` so that process RSS follows live tensor memory (see
:func:`lightning_quantum.benchmark.measure_training_peak_memory_mb`); :func:`run_probe` does that.
Used by ``benchmarks/activation_checkpointing.py`` and the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run_probe"]


def run_probe(mode: str, *, blocks: int = 8, width: int = 256, batch: int = 16384, steps: int = 0) -> dict[str, Any]:
    """Run the probe for ``mode`` (``"on"`` or ``"off"``) in a fresh process and return its figures."""
    if mode not in ("on", "off"):
        raise ValueError(f"`mode`={mode!r} is not valid. Choose one of: 'on', 'off'.")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        mode,
        "--blocks",
        str(blocks),
        "--width",
        str(width),
        "--batch",
        str(batch),
        "--steps",
        str(steps),
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["on", "off"])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=0, help="also time this many forward+backward passes")
    args = parser.parse_args()

    import torch
    from torch import nn

    from lightning_quantum.activation_checkpointing import enable_activation_checkpointing
    from lightning_quantum.benchmark import measure_training_peak_memory_mb
    from lightning_quantum.models.nets import MLPBlock

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = nn.Sequential(*[MLPBlock(args.width, args.width, dropout=0.1) for _ in range(args.blocks)])
    if args.mode == "on":
        enable_activation_checkpointing(net, ["MLPBlock"])
    x = torch.randn(args.batch, args.width)
    result: dict[str, Any] = {"peak_mb": measure_training_peak_memory_mb(net, x)}
    if args.steps:
        times = []
        for _ in range(args.steps + 1):
            net.zero_grad(set_to_none=True)
            started = time.perf_counter()
            net(x).sum().backward()
            times.append((time.perf_counter() - started) * 1000)
        result["step_ms"] = statistics.median(times[1:])
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _main()
