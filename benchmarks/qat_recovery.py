r"""How much of int4 PTQ's perplexity loss QAT wins back on the CPython LM, by group size, QAT start and shuffle.

    python benchmarks/qat_recovery.py               # about 25 minutes here; writes benchmarks/results/qat_recovery.json
    python benchmarks/qat_recovery.py --quick       # a smoke run: a tiny model, a few steps
    python benchmarks/qat_recovery.py --groups 32 --starts 0.7 0.85 --out benchmarks/results/qat_recovery_starts.json
    python benchmarks/qat_recovery.py --groups 32 --starts 0.7 --freeze-after 0 \
        --out benchmarks/results/qat_recovery_fixed.json
    python benchmarks/qat_recovery.py --groups 32 64 --starts 0.5 --freeze-after none 0 --split val \
        --out benchmarks/results/qat_recovery_val.json
    python benchmarks/qat_recovery.py --groups 64 --starts --freeze-after 0 --learn-scales 0 1e-5 1e-4 --split val \
        --out benchmarks/results/qat_recovery_learned_scales.json
    python benchmarks/qat_recovery.py --groups 64 --starts --freeze-after 0 --rounding nearest gptq \
        --out benchmarks/results/qat_recovery_gptq_test.json

``benchmarks/causal_lm.py`` gives one recovery figure: its recipe, one order of the training batches.
This one asks how far such a figure is from noise:

1. BASIC as in ``causal_lm.py`` (the 6-layer, width-256 ``CausalLM``, ``--steps`` fp32 steps).
2. For each shuffle seed (``--seeds``; the split stays, only the order of the training batches changes),
   a float branch of ``--finetune-steps`` steps from the BASIC weights, its PTQ at each group size
   (torchao ``IntxWeightOnlyConfig(int4, PerGroup(g))``, int8 embedding rows), and QAT branches of the
   same length from the same weights (``QuantizationAwareTraining``: int4 weight-only fake quantization
   with int8 embedding rows from ``start_step``, converted at fit end): groups of 32 from each start in
   ``--starts`` (fractions of a branch; step 0 by default, what ``causal_lm.py`` ran before it started
   QAT half-way too), and each group size in ``--groups`` from half-way (``start_step`` = half); with
   ``--freeze-after N``, each QAT branch fixes its fake-quant ranges N steps after its start
   (``freeze_ranges_step``; conversion then uses those ranges); several values (``none``: ranges that
   follow the weights to the end) run each variant with each. With ``--learn-scales LR ...``, each
   variant with fixed ranges runs once per rate: from the step the ranges are fixed, their scales become
   trainable parameters (a parameter group of their own, peak rate ``LR``, no weight decay, the same
   schedule), as in LSQ; ``0`` keeps them fixed. This is an experiment of this script (one process; the
   library's ``QuantizationAwareTraining`` does not learn ranges). ``--rounding`` converts each trained
   QAT branch once per rounding: ``nearest`` (what fake quantization did, and the callback does) and
   ``gptq`` (GPTQ's rounding onto the same ranges, measured on 16 training batches: an experiment of this
   script); with ``gptq``, the float branch also gets GPTQ PTQ (``quantize_weights_int4(algorithm="gptq")``)
   at each group size, whose perplexity is listed beside PTQ's.
3. ``recovery = (PTQ ppl - QAT ppl) / (PTQ ppl - fp32 ppl)`` per branch, and its mean and range over the
   shuffles. Perplexity is that of ``--split`` (``test`` by default; ``val`` to choose a recipe without
   looking at the test documents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from causal_lm import _fit, _model, converted_copy
from torch import nn
from torch.utils.data import DataLoader

from lightning_quantum._validation import check_non_negative
from lightning_quantum.callbacks import QuantizationAwareTraining
from lightning_quantum.data import TextLMDataModule
from lightning_quantum.models import evaluate_perplexity
from lightning_quantum.quantization import quantize_weights_int4

RESULTS = Path(__file__).resolve().parent / "results" / "qat_recovery.json"


def _steps_or_none(value: str) -> int | None:
    """An ``--freeze-after`` value: a number of steps >= 0, or ``none``."""
    if value == "none":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not valid: give a number of steps >= 0, or none")
    return int(value)


def _rate(value: str) -> float:
    """A ``--learn-scales`` value: a finite learning rate >= 0 (the package's own check)."""
    try:
        rate: object = float(value)
    except ValueError:
        rate = value  # not a number: refused by the check, shown as given
    return check_non_negative("--learn-scales", rate, error=argparse.ArgumentTypeError)


class _LearnedScales(pl.Callback):
    """From the first step with frozen weight ranges, train their scales: each frozen ``scale`` buffer becomes a
    parameter, in a new optimizer group (peak rate ``lr``, no weight decay) that follows the first scheduler's
    schedule. One process only: under DDP the new parameters would not be synchronised."""

    def __init__(self, lr: float) -> None:
        self.lr, self.learning = lr, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, i: int) -> None:
        if self.learning:
            return
        scales = []
        for module in pl_module.modules():
            quantizer = getattr(module, "weight_fake_quantizer", None)
            if quantizer is not None and quantizer.enabled and "scale" in quantizer._buffers:
                quantizer.scale = nn.Parameter(quantizer._buffers.pop("scale").clone())
                scales.append(quantizer.scale)
        if not scales:
            return
        trainer.optimizers[0].add_param_group({"params": scales, "lr": self.lr, "weight_decay": 0.0})
        for config in trainer.lr_scheduler_configs:
            schedule = config.scheduler
            schedule.base_lrs.append(self.lr)
            schedule.lr_lambdas.append(schedule.lr_lambdas[0])
            schedule.optimizer.param_groups[-1]["lr"] = self.lr * schedule.lr_lambdas[0](schedule.last_epoch)
        self.learning = True


def _held_out(data: TextLMDataModule, split: str) -> DataLoader:
    return data.val_dataloader() if split == "val" else data.test_dataloader()


def _qat_branch(
    state: dict,
    data: TextLMDataModule,
    args: argparse.Namespace,
    variant: tuple[int, int, int | None, float, int | None],
) -> dict[str, float]:
    """One QAT branch, trained once and converted with each ``--rounding``: the perplexity of each."""
    group, start, after, rate, refresh = variant
    model = _model(data, args, lr=5e-4)
    model.load_state_dict(state)
    freeze = None if after is None else start + after
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only",
        group_size=group,
        embeddings=True,
        start_step=start,
        freeze_ranges_step=freeze,
        refresh_ranges_every=refresh,
        convert_on_fit_end=False,
    )
    _fit(model, data, args.finetune_steps, [qat, _LearnedScales(rate)] if rate else [qat])
    held_out = _held_out(data, args.split)
    return {r: evaluate_perplexity(converted_copy(model, qat, r, data), held_out) for r in args.rounding}


def _one_shuffle(state: dict, data: TextLMDataModule, args: argparse.Namespace, seed: int) -> dict:
    data.seed = seed  # the order of the training batches; the split was made at setup
    held_out = _held_out(data, args.split)
    floating = _model(data, args, lr=5e-4)
    floating.load_state_dict(state)
    _fit(floating, data, args.finetune_steps)
    row: dict = {"seed": seed, "fp32": evaluate_perplexity(floating, held_out), "ptq": {}, "qat": {}}
    for group in sorted({32, *args.groups}):
        row["ptq"][group] = evaluate_perplexity(quantize_weights_int4(floating, group_size=group), held_out)
        if "gptq" in args.rounding:
            loader = data.train_dataloader()
            gptq = quantize_weights_int4(floating, group_size=group, algorithm="gptq", calibration=loader)
            row.setdefault("ptq_gptq", {})[group] = evaluate_perplexity(gptq, held_out)
    half = args.finetune_steps // 2
    starts = [(32, int(f * args.finetune_steps)) for f in args.starts] + [(g, half) for g in args.groups]
    variants = [
        (group, start, after, rate, refresh)
        for group, start in dict.fromkeys(starts)
        for after in args.freeze_after
        for rate in (args.learn_scales if after is not None else [0.0])
        for refresh in (args.refresh_every if after is not None else [None])
    ]
    for group, start, after, rate, refresh in variants:
        name = f"g{group} from step {start}"
        if after is not None:
            name += f", ranges fixed {after} steps later"
        if refresh is not None:
            name += f", refreshed every {refresh} steps"
        if rate:
            name += f", scales learned at rate {rate:g}"
        lost = row["ptq"][group] - row["fp32"]
        for rounding, ppl in _qat_branch(state, data, args, (group, start, after, rate, refresh)).items():
            label = name + (", converted with GPTQ rounding" if rounding == "gptq" else "")
            row["qat"][label] = {"ppl": ppl, "recovery": (row["ptq"][group] - ppl) / lost if lost > 0 else None}
            print(json.dumps({"seed": seed, label: row["qat"][label]}), flush=True)
    return row


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in rows[0]["qat"]:
        values = [r["qat"][name]["recovery"] for r in rows if r["qat"][name]["recovery"] is not None]
        group = int(name.split()[0][1:])
        losses = [r["ptq"][group] / r["fp32"] - 1 for r in rows]
        out[name] = {
            "recovery_mean": statistics.fmean(values) if values else None,
            "recovery_min": min(values, default=None),
            "recovery_max": max(values, default=None),
            "ptq_loss_mean": statistics.fmean(losses),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="BASIC training steps (batch 16 x 128 tokens)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps of each branch after BASIC")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 256], help="group sizes, QAT from half-way")
    parser.add_argument(
        "--starts",
        type=float,
        nargs="*",
        default=[0.0],
        help="QAT starts for groups of 32 (fractions of a branch; none given: only the --groups variants)",
    )
    parser.add_argument(
        "--freeze-after",
        type=_steps_or_none,
        nargs="+",
        default=[None],
        help="fix the fake-quant ranges N steps after QAT starts (none: never); several: each variant with each",
    )
    parser.add_argument(
        "--refresh-every",
        type=_steps_or_none,
        nargs="+",
        default=[None],
        help="recompute fixed ranges every N steps (refresh_ranges_every; none: never); several: each fixed-range "
        "variant with each",
    )
    parser.add_argument(
        "--learn-scales",
        type=_rate,
        nargs="+",
        default=[0.0],
        help="peak learning rates of the frozen scales (0: fixed); several: each fixed-range variant with each",
    )
    parser.add_argument(
        "--rounding",
        choices=("nearest", "gptq"),
        nargs="+",
        default=["nearest"],
        help="how each QAT branch is converted (several: each, from the same trained weights)",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the held-out split to measure")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="shuffles of the training batches")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(not 0.0 <= f < 1.0 for f in args.starts):
        parser.error(f"--starts={args.starts} is not valid: each start is a fraction in [0, 1) of a branch")
    if args.quick:
        args.steps, args.finetune_steps, args.seeds = min(args.steps, 10), min(args.finetune_steps, 4), args.seeds[:1]
        args.groups = [32]  # the tiny model is 32 wide
    torch.manual_seed(0)
    data = TextLMDataModule(
        batch_size=16, context=128, eval_batch_size=32, sources=("topics",) if args.quick else ("topics", "docstrings")
    )
    data.setup()
    basic = _model(data, args, lr=2e-3)
    seconds = _fit(basic, data, args.steps)
    result: dict = {
        "settings": vars(args) | {"out": str(args.out)},
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "basic": {"fit_seconds": seconds, "ppl": evaluate_perplexity(basic, _held_out(data, args.split))},
    }
    state = {k: v.clone() for k, v in basic.state_dict().items()}
    result["shuffles"] = [_one_shuffle(state, data, args, seed) for seed in args.seeds]
    result["summary"] = _summary(result["shuffles"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
