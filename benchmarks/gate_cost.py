"""The deployment gate's wall-time cost, as a user pays it: `lq-train level=quantum` in fresh processes.

    python benchmarks/gate_cost.py              # 3 alternated rounds; writes benchmarks/results/gate_cost.json
    python benchmarks/gate_cost.py --rounds 5 --level ultra

Each round runs, one after another, each in a new process:

- ``without gate``: ``lq-train level=<level> ~callbacks.deployment``;
- ``gate, empty cache``: the gate measures every candidate form (a first run on this machine);
- ``gate, cached``: the gate with the cache a previous run left (a repeated run: it builds only the
  forms that can still win, see ``DeploymentGate(cache=...)``).

The cached variant's cache is filled once before the rounds. Figures are medians over rounds of the
whole process's wall time (imports, data, training, test, report); the growth is against the run
without the gate, of the medians and, per round (``paired_growth``), against the same round's run without
the gate, which a machine that drifts between rounds shifts alike. Each run's gate figures (forms measured,
build seconds, gate seconds) come from its ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "gate_cost.json"
VARIANTS = ("without gate", "gate, empty cache", "gate, cached")


def _run(level: str, out: Path, cache: Path, gate: bool, extra: list[str]) -> dict:
    env = {**os.environ, "LIGHTNING_QUANTUM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_quantum.apps.train",
        f"level={level}",
        f"paths.output_dir={out}",
        *([] if gate else ["~callbacks.deployment"]),
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out.parent, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "report.json").read_text()).get("extra", {}).get("deployment")
    figures: dict = {"wall_seconds": wall}
    if record:
        figures.update(
            form=record["form"],
            forms_measured=sum(c.get("measured", True) for c in record["candidates"]),
            forms=len(record["candidates"]),
            build_seconds=sum(c["build_seconds"] for c in record["candidates"]),
            gate_seconds=record["gate_seconds"],
            cached_from=record.get("cached_from"),
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level", default="quantum")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="more lq-train overrides, for every run")
    args = parser.parse_args()
    extra = ["logger=none", "callbacks.rich_progress_bar=null", *args.overrides]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = root / "cache-warm"
        _run(args.level, root / "prime", warm, True, extra)  # fills the cache of the "cached" variant
        for r in range(args.rounds):
            for variant in VARIANTS:
                # a new, empty cache directory for every run but the cached variant's
                cache = warm if variant == "gate, cached" else root / f"cache-{r}-{VARIANTS.index(variant)}"
                out = root / f"run-{r}-{VARIANTS.index(variant)}"
                runs[variant].append(_run(args.level, out, cache, variant != "without gate", extra))
                print(f"round {r} {variant}: {runs[variant][-1]}", file=sys.stderr)
    base = statistics.median(r["wall_seconds"] for r in runs["without gate"])
    summary = {}
    for variant, rows in runs.items():
        wall = statistics.median(r["wall_seconds"] for r in rows)
        # each round's growth against the run without the gate just before it: a machine that drifts between
        # rounds shifts both runs of a round alike
        paired = [r["wall_seconds"] / b["wall_seconds"] - 1.0 for r, b in zip(rows, runs["without gate"])]
        summary[variant] = {"wall_seconds": wall, "growth": wall / base - 1.0, "paired_growth": paired}
        if variant != "without gate":
            summary[variant].update(
                gate_seconds=statistics.median(r["gate_seconds"] for r in rows),
                build_seconds=statistics.median(r["build_seconds"] for r in rows),
                forms_measured=statistics.median(r["forms_measured"] for r in rows),
                forms=rows[0]["forms"],
                shipped=sorted({r["form"] for r in rows}),
            )
    result = {
        "benchmark": f"lq-train level={args.level} wall time in fresh processes, with and without the deployment gate",
        "command": " ".join(["python benchmarks/gate_cost.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {"rounds": args.rounds, "level": args.level, "overrides": extra},
        "summary": summary,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for variant, f in summary.items():
        gate = (
            f"  gate {f['gate_seconds']:.1f} s (building {f['build_seconds']:.1f} s, "
            f"{f['forms_measured']:.0f} of {f['forms']} forms measured), shipped {', '.join(f['shipped'])}"
            if "gate_seconds" in f
            else ""
        )
        paired = sorted(f["paired_growth"])
        rounds = f" (per round {paired[0]:+.1%}..{paired[-1]:+.1%}, median {statistics.median(paired):+.1%})"
        rounds = rounds if "gate_seconds" in f else ""
        print(f"{variant:18s} {f['wall_seconds']:6.1f} s ({f['growth']:+.1%}){rounds}{gate}")


if __name__ == "__main__":
    main()
