"""Pruning on digits, our Pruning callback beside Lightning's ModelPruning, in one run.

    python benchmarks/pruning.py            # writes benchmarks/results/pruning.json

MLP (64-512-512-10), same seed, data order and epochs for every configuration:
  dense                      no pruning
  ours cubic 90%             Pruning(final_sparsity=0.9, schedule="cubic"), global L1, per optimizer step
  lightning one-shot 90%     ModelPruning("l1_unstructured", amount=0.9 once), at the epoch our schedule ends
  lightning per-epoch 90%    ModelPruning with a per-epoch cubic amount reaching 90% at the same epoch
Both prune from the same start to the same end, leaving the last quarter of training to fine-tune.
Training-step time is the mean and median wall time of a batch inside `fit` over the steps where
pruning is active (start to end of the schedule), measured for every configuration over the same
steps, with configurations alternated over --rounds rounds.

CNN (DigitsCNN, conv + BatchNorm): dense against 50% L2 channel pruning of every conv and hidden
linear layer, removed for real at the end (slim=True); parameters, p50 latency at batch 256 and
accuracy after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import machine_info, quiet_trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelPruning  # noqa: E402

from lightning_quantum.benchmark import benchmark_model  # noqa: E402
from lightning_quantum.callbacks import Pruning  # noqa: E402
from lightning_quantum.data import DigitsDataModule  # noqa: E402
from lightning_quantum.models import Classifier, DigitsCNN, DigitsMLP  # noqa: E402
from lightning_quantum.pruning import sparsity_report  # noqa: E402
from lightning_quantum.pruning.schedules import cubic_sparsity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pruning.json"
SEED = 42


class StepTimer(pl.Callback):
    """Wall time of each training batch inside fit, by global step."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times[trainer.global_step] = (time.perf_counter() - self._t) * 1000.0


class TimedPruning(Pruning):
    """Our callback with a stopwatch around each of its hooks: the time it adds to training, directly."""

    hook_ms: float = 0.0

    def _timed(self, hook, *args):
        started = time.perf_counter()
        hook(*args)
        self.hook_ms += (time.perf_counter() - started) * 1000.0

    def on_train_batch_start(self, *args):
        self._timed(super().on_train_batch_start, *args)

    def on_before_optimizer_step(self, *args):
        self._timed(super().on_before_optimizer_step, *args)

    def on_train_batch_end(self, *args):
        self._timed(super().on_train_batch_end, *args)

    def on_train_epoch_start(self, *args):
        self._timed(super().on_train_epoch_start, *args)


def _classifier(net: torch.nn.Module, epochs: int) -> Classifier:
    return Classifier(
        net,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )


def _fit(model: Classifier, dm: DigitsDataModule, epochs: int, callbacks: list[pl.Callback]) -> dict[str, Any]:
    timer = StepTimer()
    trainer = quiet_trainer(epochs, callbacks=[*callbacks, timer])
    started = time.perf_counter()
    trainer.fit(model, dm)
    (test,) = trainer.test(model, dm, verbose=False)
    return {
        "test_accuracy": test["test/acc"],
        "fit_seconds": time.perf_counter() - started,
        "steps": timer.times,
        "steps_per_epoch": trainer.num_training_batches,
    }


def _peer_per_epoch_amounts(start_epoch: int, end_epoch: int, final: float):
    """ModelPruning's amount is the fraction of the *remaining* weights; convert a cumulative cubic schedule."""
    cumulative = {
        e: cubic_sparsity((e - start_epoch) / (end_epoch - start_epoch), 0.0, final)
        for e in range(start_epoch, end_epoch + 1)
    }

    def amount(epoch: int) -> float:
        if epoch not in cumulative or epoch == start_epoch:
            return 0.0
        before, now = cumulative[epoch - 1], cumulative[epoch]
        return 1.0 - (1.0 - now) / (1.0 - before)

    return amount


def run_mlp(epochs: int, rounds: int) -> dict[str, Any]:
    steps_per_epoch = len(DigitsDataModule().train_dataloader())
    total = epochs * steps_per_epoch
    start, end = round(0.1 * total), round(0.75 * total)
    end_epoch = end // steps_per_epoch - 1  # ModelPruning prunes at epoch ends: the last one before `end`
    start_epoch = start // steps_per_epoch
    configs = {
        "dense": lambda: [],
        "ours_cubic_90": lambda: [
            TimedPruning(final_sparsity=0.9, schedule="cubic", start_step=start, end_step=end, log_per_layer=False)
        ],  # default frequency: every 25 steps
        "lightning_one_shot_90": lambda: [
            ModelPruning(
                "l1_unstructured",
                amount=lambda e: 0.9 if e == end_epoch else 0.0,
                use_global_unstructured=True,
                verbose=0,
            )
        ],
        "lightning_per_epoch_90": lambda: [
            ModelPruning(
                "l1_unstructured",
                amount=_peer_per_epoch_amounts(start_epoch, end_epoch, 0.9),
                use_global_unstructured=True,
                verbose=0,
            )
        ],
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, make_callbacks in configs.items():
            pl.seed_everything(SEED, verbose=False)
            model = _classifier(DigitsMLP(), epochs)
            result = _fit(model, DigitsDataModule(seed=SEED), epochs, make_callbacks())
            for cb in model.trainer.callbacks if model._trainer else []:
                if isinstance(cb, ModelPruning):
                    cb.make_pruning_permanent(model)
                if isinstance(cb, TimedPruning):
                    # all the time our hooks took over the fit, spread over its steps
                    result["hook_ms_per_step"] = cb.hook_ms / model.trainer.global_step
            result["sparsity"] = sparsity_report(model)[-1]["sparsity"]
            window = [result["steps"][s] for s in range(start + 1, end + 1) if s in result["steps"]]
            result["active_step_ms_mean"] = statistics.fmean(window)
            result["active_step_ms_median"] = statistics.median(window)
            del result["steps"]
            runs[name].append(result)
            print(f"round {r} {name}: {result}", file=sys.stderr)
    summary = {}
    for name, results in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "steps_per_epoch"}
    dense = summary["dense"]
    ours = summary["ours_cubic_90"]
    ours["hook_overhead_ratio"] = 1.0 + ours["hook_ms_per_step"] / dense["active_step_ms_mean"]
    for figures in summary.values():
        figures["accuracy_drop_vs_dense_points"] = 100 * (dense["test_accuracy"] - figures["test_accuracy"])
        figures["active_step_time_ratio_vs_dense_mean"] = figures["active_step_ms_mean"] / dense["active_step_ms_mean"]
        figures["active_step_time_ratio_vs_dense_median"] = (
            figures["active_step_ms_median"] / dense["active_step_ms_median"]
        )
    return {
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "schedule_steps": [start, end],
        "peer_prune_epochs": [start_epoch, end_epoch],
        "configs": summary,
        "runs": runs,
    }


def run_cnn(epochs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    models = {}
    for name in ("dense", "ours_l2_structured_50_slim"):
        pl.seed_everything(SEED, verbose=False)
        model = _classifier(DigitsCNN(), epochs)
        callbacks = []
        if name != "dense":
            callbacks = [
                Pruning(
                    method="l2_structured",
                    final_sparsity=0.5,
                    module_types=["Conv2d", "Linear"],
                    ignore=["net.classifier.4"],
                    slim=True,
                    log_per_layer=False,
                )
            ]
        result = _fit(model, DigitsDataModule(seed=SEED, layout="image"), epochs, callbacks)
        del result["steps"]
        result["parameters"] = sum(p.numel() for p in model.parameters())
        models[name] = model
        out[name] = result
    dm = DigitsDataModule(seed=SEED, layout="image", eval_batch_size=256)
    dm.setup()
    # Latency side by side: alternate the two models over 3 rounds, medians.
    lat: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(3):
        for name, model in models.items():
            m = benchmark_model(
                model,
                eval_data=dm.test_dataloader(),
                batch_size=256,
                num_threads=torch.get_num_threads(),
                warmup=10,
                repeats=50,
            )
            lat[name].append(m.inference_latency_ms)
            out[name]["size_mb"] = m.model_size_mb
    for name in models:
        out[name]["latency_p50_ms_batch256"] = statistics.median(lat[name])
    pruned, dense = out["ours_l2_structured_50_slim"], out["dense"]
    out["ratios"] = {
        "parameters": pruned["parameters"] / dense["parameters"],
        "size": pruned["size_mb"] / dense["size_mb"],
        "latency_p50_batch256": pruned["latency_p50_ms_batch256"] / dense["latency_p50_ms_batch256"],
        "accuracy_drop_points": 100 * (dense["test_accuracy"] - pruned["test_accuracy"]),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cnn-epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    mlp = run_mlp(args.epochs, args.rounds)
    cnn = run_cnn(args.cnn_epochs)
    result = {
        "benchmark": "pruning on digits: ours vs lightning.pytorch.callbacks.ModelPruning",
        "command": f"python benchmarks/pruning.py --epochs {args.epochs} --cnn-epochs {args.cnn_epochs} "
        f"--rounds {args.rounds}",
        "machine": machine_info(),
        "mlp": mlp,
        "cnn": cnn,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, f in mlp["configs"].items():
        print(
            f"MLP {name:24s} acc {f['test_accuracy']:.4f} (drop {f['accuracy_drop_vs_dense_points']:+.2f} pts) "
            f"sparsity {f['sparsity']:.3f} active step {f['active_step_ms_mean']:.3f} ms mean "
            f"({f['active_step_time_ratio_vs_dense_mean']:.3f}x dense), median ratio "
            f"{f['active_step_time_ratio_vs_dense_median']:.3f}x"
            + (
                f", hooks {f['hook_ms_per_step']:.3f} ms/step = {f['hook_overhead_ratio']:.3f}x"
                if "hook_ms_per_step" in f
                else ""
            )
        )
    r = cnn["ratios"]
    print(
        f"CNN structured 50% + slim: params {r['parameters']:.3f}x, size {r['size']:.3f}x, p50 latency "
        f"{r['latency_p50_batch256']:.3f}x at batch 256, accuracy drop {r['accuracy_drop_points']:+.2f} pts "
        f"({cnn['dense']['test_accuracy']:.4f} -> {cnn['ours_l2_structured_50_slim']['test_accuracy']:.4f})"
    )


if __name__ == "__main__":
    main()
