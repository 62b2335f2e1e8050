"""Peak training memory and step time with and without activation checkpointing, on CPU.

    python benchmarks/activation_checkpointing.py

An MLP of 8 MLPBlocks (256 wide) on a batch of 16384: activations of 16 MiB per tensor, so
activation memory dominates. Each configuration runs in a fresh process (glibc started with a fixed
mmap threshold, so RSS follows live tensor memory), alternating off/on for --rounds rounds; figures
are medians and the ratio is on/off, measured in this run. Writes
benchmarks/results/activation_checkpointing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from checkpointing_probe import run_probe

RESULTS = Path(__file__).resolve().parent / "results" / "activation_checkpointing.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(run_probe(mode, steps=5))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    result = {
        "benchmark": "activation checkpointing, 8 x MLPBlock(256), batch 16384, CPU, 2 threads",
        "command": f"python benchmarks/activation_checkpointing.py --rounds {args.rounds}",
        "without": med["off"],
        "with": med["on"],
        "peak_memory_ratio": med["on"]["peak_mb"] / med["off"]["peak_mb"],
        "step_time_ratio": med["on"]["step_ms"] / med["off"]["step_ms"],
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"peak training memory {med['off']['peak_mb']:.0f} -> {med['on']['peak_mb']:.0f} MiB "
        f"({result['peak_memory_ratio']:.2f}x), step time {result['step_time_ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
