"""Parameter, gradient and optimizer memory per rank: FSDP2 against DDP, 2 CPU processes (gloo).

    python benchmarks/fsdp2_memory.py            # writes benchmarks/results/fsdp2_memory.json

The same model (a DigitsMLP with four hidden layers of 4096: 50.6M parameters), AdamW, a few
training steps under each strategy, each in its own pair of processes. At the end of the fit each
rank adds up the bytes of the tensors it holds: its parameters (a DTensor counts its local shard),
their gradients, and the optimizer's state; and reads its process's peak resident memory (VmHWM).
The ratio is FSDP2 over DDP, from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "fsdp2_memory.json"
HIDDEN = (4096, 4096, 4096, 4096)


def _local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(strategy: str, out: Path, steps: int) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_quantum.benchmark import _CPUPeakRSS

    def peak_rss_mb() -> float:
        return _CPUPeakRSS._vm_hwm_bytes() / 2**20

    from lightning_quantum.data import DigitsDataModule
    from lightning_quantum.models import Classifier, DigitsMLP

    class Count(Callback):
        def on_train_end(self, trainer, pl_module):
            params = list(pl_module.parameters())
            optimizer = trainer.optimizers[0]
            states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
            figures = {
                "parameters": sum(p.numel() for p in params if not hasattr(p, "to_local"))
                + sum(p.to_local().numel() for p in params if hasattr(p, "to_local")),
                "parameter_bytes": sum(_local_bytes(p) for p in params),
                "gradient_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
                "optimizer_bytes": sum(_local_bytes(v) for v in states),
                "peak_rss_mb": peak_rss_mb(),
            }
            (out / f"{strategy}-rank{trainer.global_rank}.json").write_text(json.dumps(figures))

    torch.manual_seed(0)
    model = Classifier(DigitsMLP(hidden=HIDDEN, dropout=0.0))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Count()],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.steps)
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp2"):
            command = [sys.executable, __file__, "--worker", strategy, "--out", tmp, "--steps", str(args.steps)]
            subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            runs[strategy] = [json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]
    held = {
        s: max(r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"] for r in rows)
        for s, rows in runs.items()
    }
    result = {
        "benchmark": f"parameter + gradient + optimizer bytes per rank, DigitsMLP hidden={list(HIDDEN)}, AdamW, "
        f"{args.steps} steps, 2 CPU processes (gloo)",
        "command": " ".join(["python benchmarks/fsdp2_memory.py", *sys.argv[1:]]),
        "runs": runs,
        "held_mb_per_rank": {s: v / 2**20 for s, v in held.items()},
        "fsdp2_over_ddp": held["fsdp2"] / held["ddp"],
        "peak_rss_mb_per_rank": {s: max(r["peak_rss_mb"] for r in rows) for s, rows in runs.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"per rank: DDP {result['held_mb_per_rank']['ddp']:.0f} MB, FSDP2 {result['held_mb_per_rank']['fsdp2']:.0f} MB "
        f"(parameters, gradients, optimizer state): {result['fsdp2_over_ddp']:.2f}x; peak RSS "
        f"{result['peak_rss_mb_per_rank']['ddp']:.0f} MB against {result['peak_rss_mb_per_rank']['fsdp2']:.0f} MB"
    )


if __name__ == "__main__":
    main()
