"""The causal LM on CPython's text: BASIC training, then int4 post-training quantization against int4 QAT.

    python benchmarks/causal_lm.py                  # 10-18 minutes here; writes benchmarks/results/causal_lm.json
    python benchmarks/causal_lm.py --quick          # a smoke run: a tiny model, a few steps

1. **BASIC**: the 6-layer, width-256 ``CausalLM`` (``conf/model/gpt_cpython.yaml``) trained from scratch in
   fp32 for ``--steps`` steps on the training documents; its held-out (test) perplexity against a unigram
   model's, and the wall time of the fit.
2. Two branches continue from the BASIC weights for ``--finetune-steps`` more steps each, so that both
   have trained equally long:
   - **float**: plain training; its perplexity is the fp32 figure; then post-training quantization of its
     weights to int4 (torchao ``IntxWeightOnlyConfig(int4, PerGroup(32))`` on every linear, int8 rows on
     the embedding table), with torchao's affine ranges (``PTQ int4``), with HQQ's scale-only ranges
     (``HQQ int4``, torchao's CPU HQQ) and with the affine ranges and GPTQ's rounding, measured on the
     16 training batches (``GPTQ int4``, ``quantize_weights_int4(algorithm="gptq")``: torchao's GPTQ runs
     on CUDA only);
   - **QAT**: int4 weight-only fake quantization of the same layers and int8 of the embedding table
     from half-way through the branch, as ``lq-train experiment=gpt_cpython level=quantum`` runs it
     (``QuantizationAwareTraining(..., start_step=None)`` with the experiment's ``callbacks.qat``
     settings, read from ``conf/experiment/gpt_cpython.yaml``: group size, embeddings, range
     freezing), then conversion to the same int4 form; PTQ uses the same group size. The same trained
     weights are also converted with GPTQ's rounding onto the same grids (``qat_int4.gptq_ppl``), an
     experiment the callback does not offer.
3. ``recovery = (PTQ ppl - QAT ppl) / (PTQ ppl - fp32 ppl)``: the share of PTQ's perplexity loss QAT wins
   back (torchao reports 68% on wikitext for Llama-3), against each PTQ peer.
4. Size of each form (serialized bytes), decode speed at batch 1 (greedy, 64 new tokens, KV cache) two ways:
   Hugging Face ``generate`` in eager mode (``decode_tokens_per_s``) and the deployed decode loop,
   ``StaticCacheDecoder`` (a fixed-size KV cache, compiled one-token step: ``static_decode_tokens_per_s``,
   and the same with one thread: ``static_1t_decode_tokens_per_s``; each with its range over the rounds),
   and prefill latency at batch 8. The decode forms of every model are timed together at the end, each
   once per round over ``--decode-rounds`` alternating rounds (medians), so that the ratios compare
   forms measured side by side. The ``*_vs_basic`` ratios compare each form's deployed loop with BASIC's
   fp32 model through ``generate`` (``static_decode_vs_basic``) and through the same loop
   (``static_decode_vs_basic_static``). Each int4 model is also timed with its int4 values packed for ATen's
   CPU int4 kernel (``pack_int4_for_cpu``, bf16 activations: ``kernel_*`` for QUANTUM, ``int4_kernel_*`` for
   ULTRA, with the packed model's perplexity and size), a form the decode gate weighs as weights of their own.
5. **ULTRA** (``--ultra-steps``, 0 to skip): the BASIC model (after its float branch) as the teacher of a
   3-layer student initialised from its embeddings, final norm, output layer and layers 0, 3 and 5;
   distilled with the next-token loss, per-token soft targets (T=2) and the hidden states of those layers
   (``DistillationModule``), with ULTRA's structured pruning (``conf/level/ultra.yaml``): half the MLP hidden
   units removed by L2 norm along a cubic schedule over the first half (``Pruning(method="l2_structured",
   slim=True)``: a unit is a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``), and int4 QAT of
   every linear (int8 embedding rows) from the final sparsity on; at fit end the pruned units are removed for
   real (smaller dense layers) and the model converted.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import torch
import yaml
from _common import machine_info, quiet_trainer
from torch import nn

from lightning_quantum.benchmark import serialized_size_bytes
from lightning_quantum.callbacks import Pruning, QuantizationAwareTraining
from lightning_quantum.callbacks._common import detached_copy
from lightning_quantum.data import TextLMDataModule
from lightning_quantum.distillation import DistillationModule, causal_lm_student
from lightning_quantum.models import CausalLM, evaluate_perplexity, prefill_latency_ms
from lightning_quantum.models.decoding import decoder_form, generate_exactly, time_decoding
from lightning_quantum.quantization import (
    convert_qat,
    dequantize_linears,
    pack_int4_for_cpu,
    quantize_weights_int4,
    set_fake_quant_enabled,
)
from lightning_quantum.quantization.gptq import gptq_round_prepared

RESULTS = Path(__file__).resolve().parent / "results" / "causal_lm.json"
EXPERIMENT = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "gpt_cpython.yaml"


def qat_recipe() -> dict:
    """The ``QuantizationAwareTraining`` arguments of ``lq-train experiment=gpt_cpython level=quantum``: the
    experiment's ``callbacks.qat`` block, with the level's start (``start_step=None``: half-way)."""
    return yaml.safe_load(EXPERIMENT.read_text())["callbacks"]["qat"] | {"start_step": None}


def _model(data: TextLMDataModule, args: argparse.Namespace, lr: float, num_layers: int | None = None) -> CausalLM:
    sizes = (
        {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
        if args.quick
        else {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "intermediate_size": 1024}
    )
    if num_layers is not None:
        sizes["num_layers"] = num_layers
    return CausalLM(**data.tokenizer_config(), context=data.context, lr=lr, **sizes)


def _ultra(teacher: CausalLM, data: TextLMDataModule, args: argparse.Namespace, decoders: dict) -> dict:
    """Distil ``teacher`` into 3 layers (or 1 of 2 with ``--quick``), remove half the MLP units, int4 QAT."""
    n = teacher.model.config.num_hidden_layers
    chosen = [0, n // 2, n - 1] if n >= 3 else [n - 1]
    student = causal_lm_student(teacher, chosen)
    module = DistillationModule(
        student=student,
        teacher=copy.deepcopy(teacher).eval(),
        alpha=0.5,
        beta=0.5,
        temperature=2.0,
        feature_pairs={f"model.model.layers.{i}": f"model.model.layers.{t}" for i, t in enumerate(chosen)},
        feature_weight=0.1,
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1),
    )
    steps = args.ultra_steps
    # ULTRA's pruning (conf/level/ultra.yaml): the MLP hidden units the model declares, half of them by L2 norm
    # along a cubic schedule over the first half, removed for real at fit end; QAT from the final sparsity on
    pruning = Pruning(
        method="l2_structured", final_sparsity=0.5, start_step=0, end_step=steps // 2, frequency=10, slim=True
    )
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only", group_size=32, embeddings=True, start_step=None, start_after_pruning=True
    )
    seconds = _fit(module, data, steps, [pruning, qat])
    test = data.test_dataloader()
    out = {"fit_seconds": seconds, "layers_from_teacher": chosen, "ppl": evaluate_perplexity(student, test)}
    out |= {"bytes": serialized_size_bytes(student.model), "mlp_units_removed": pruning.removed_channels}
    out["mlp_width"] = student.model.model.layers[0].mlp.gate_proj.out_features
    out |= {f"int4_{k}": v for k, v in _prefill(student, data).items()}
    decoders["ultra int4"] = copy.deepcopy(student)
    decoders["ultra int4_kernel"] = _kernel_form(student, out, "int4_", test)
    dequantize_linears(student)  # the same (slimmed) weights in fp32: the student's float form
    out |= {"float_ppl": evaluate_perplexity(student, test)} | {
        f"float_{k}": v for k, v in _prefill(student, data).items()
    }
    decoders["ultra float"] = student
    return out


def _kernel_form(model: CausalLM, figures: dict, prefix: str, test: object) -> CausalLM:
    """``model``'s int4 weights packed for ATen's CPU int4 kernel (bf16 activations), the decode gate's extra
    candidate; its perplexity and size go into ``figures`` under ``{prefix}kernel_``."""
    packed = cast(CausalLM, pack_int4_for_cpu(model))
    figures[f"{prefix}kernel_ppl"] = evaluate_perplexity(packed, test)
    figures[f"{prefix}kernel_bytes"] = serialized_size_bytes(packed.model)
    return packed


def _fit(model: pl.LightningModule, data: TextLMDataModule, steps: int, callbacks: list | None = None) -> float:
    """Train ``model`` for ``steps`` steps (no validation) with ``callbacks``; the wall time in seconds."""
    start = time.perf_counter()
    quiet_trainer(max_epochs=-1, max_steps=steps, limit_val_batches=0, callbacks=callbacks or []).fit(model, data)
    return time.perf_counter() - start


def _prefill(model: nn.Module, data: TextLMDataModule) -> dict[str, float]:
    return {"prefill_ms_batch8": prefill_latency_ms(model, next(iter(data.test_dataloader()))[:8])}


def _decode_speeds(models: dict[str, CausalLM], prompt: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Greedy decode tokens/s of every model through ``generate`` and through the deployed loop
    (``StaticCacheDecoder``, compiled), measured side by side: each decode form once per round, the
    forms alternating over ``rounds`` rounds after one untimed call each, so that a slow spell of
    the shared machine hits them alike; the median per form."""
    loops = {"generate": "generate", "static": "static compiled", "static_1t": "static compiled 1 thread"}
    forms = {(name, loop): decoder_form(model, form) for name, model in models.items() for loop, form in loops.items()}
    compile_seconds = {}
    for key, decoder in forms.items():
        start = time.perf_counter()
        generate_exactly(decoder, prompt, 64)
        compile_seconds[key] = time.perf_counter() - start
    per_round = time_decoding(list(forms.values()), prompt, 64, repeats=1, rounds=rounds, device=prompt.device)
    times = dict(zip(forms, per_round))
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for (name, loop), calls in times.items():
        prefix = "" if loop == "generate" else f"{loop}_"
        out[name][f"{prefix}decode_tokens_per_s"] = 64 / (statistics.median(calls) / 1000.0)
        out[name][f"{prefix}decode_tokens_per_s_range"] = [64 / (max(calls) / 1000.0), 64 / (min(calls) / 1000.0)]
        if loop != "generate":
            out[name][f"{prefix}decode_first_call_seconds"] = compile_seconds[(name, loop)]
    return out


def _decode_ratios(figures: dict, prefix: str, basic: dict) -> dict[str, float]:
    """The deployed decode loop's tokens/s against BASIC's fp32 model through generate and through the same loop."""
    ratios = {
        f"{prefix}generate_vs_basic_generate": figures[f"{prefix}decode_tokens_per_s"] / basic["decode_tokens_per_s"]
    }
    for loop in ("static", "static_1t"):
        speed = figures[f"{prefix}{loop}_decode_tokens_per_s"]
        ratios[f"{prefix}{loop}_decode_vs_basic"] = speed / basic["decode_tokens_per_s"]
        ratios[f"{prefix}{loop}_decode_vs_basic_{loop}"] = speed / basic[f"{loop}_decode_tokens_per_s"]
    return ratios


class _GPTQConversion(pl.Callback):
    """Put before ``qat`` in the callbacks: at fit end, just before ``qat`` converts (to nearest), converts a
    copy of the trained model with GPTQ's rounding instead (16 batches of the training loader) and measures
    its perplexity on ``held_out``: the two conversions of one QAT run."""

    def __init__(self, qat: QuantizationAwareTraining, held_out: object) -> None:
        self.qat, self.held_out, self.ppl = qat, held_out, float("nan")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule  # type: ignore[attr-defined]
        self.ppl = evaluate_perplexity(converted_copy(pl_module, self.qat, "gptq", data), self.held_out)


def converted_copy(
    model: pl.LightningModule, qat: QuantizationAwareTraining, rounding: str, data: TextLMDataModule
) -> pl.LightningModule:
    """A copy of ``model``, prepared and trained by ``qat``, converted as ``qat`` does (``rounding="nearest"``)
    or with GPTQ's rounding onto the same grids (``"gptq"``, measured on 16 batches of ``data``'s training
    loader): an experiment of the benchmarks, which ``QuantizationAwareTraining`` does not offer."""
    twin = detached_copy(model)
    set_fake_quant_enabled(twin, True)
    if rounding == "gptq":
        gptq_round_prepared(twin, data.train_dataloader(), max_batches=16)
    convert_qat(twin, qat.scheme, group_size=qat.group_size)
    return twin


def _ptq_against_qat(
    result: dict, state: dict, data: TextLMDataModule, args: argparse.Namespace, decoders: dict
) -> None:
    """The float and QAT branches from the BASIC weights, PTQ of the float one, and QAT's recovery."""
    test = data.test_dataloader()
    floating = _model(data, args, lr=5e-4)
    floating.load_state_dict(state)
    result["fp32"] = {
        "fit_seconds": _fit(floating, data, args.finetune_steps),
        "ppl": evaluate_perplexity(floating, test),
    }
    recipe = qat_recipe()
    if args.quick:
        recipe["group_size"] = 32  # the tiny model is 32 wide
    result["qat_recipe"] = recipe
    for name, algorithm in (("ptq_int4", "affine"), ("hqq_int4", "hqq_scale_only"), ("gptq_int4", "gptq")):
        # a copy with int4 linears and int8 embedding rows, by torchao's PTQ (GPTQ: its rounding, ours)
        calibration = {"calibration": data.train_dataloader()} if algorithm == "gptq" else {}
        quantized = quantize_weights_int4(floating, group_size=recipe["group_size"], algorithm=algorithm, **calibration)
        result[name] = {"ppl": evaluate_perplexity(quantized, test), "bytes": serialized_size_bytes(quantized.model)}

    qat = _model(data, args, lr=5e-4)
    qat.load_state_dict(state)
    callback = QuantizationAwareTraining(**recipe)  # converted at fit end
    other = _GPTQConversion(callback, test)  # the same weights converted with GPTQ's rounding
    result["qat_int4"] = {
        "fit_seconds": _fit(qat, data, args.finetune_steps, [other, callback]),
        "float_weights_ppl": evaluate_perplexity(callback.float_model, test),
        "ppl": evaluate_perplexity(qat, test),
        "bytes": serialized_size_bytes(qat.model),
    }
    result["qat_int4"]["gptq_ppl"] = other.ppl
    result["qat_int4"] |= _prefill(qat, data)
    decoders["qat_int4"] = qat
    decoders["qat_int4_kernel"] = _kernel_form(qat, result["qat_int4"], "", test)

    fp32, qat_ppl = result["fp32"]["ppl"], result["qat_int4"]["ppl"]
    for peer in ("ptq_int4", "hqq_int4", "gptq_int4"):
        lost = result[peer]["ppl"] - fp32
        result[peer]["qat_recovery"] = (result[peer]["ppl"] - qat_ppl) / lost if lost > 0 else None
    result["qat_int4"]["size_vs_basic"] = result["qat_int4"]["bytes"] / result["basic"]["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="BASIC training steps (batch 16 x 128 tokens)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps of each branch after BASIC")
    parser.add_argument("--ultra-steps", type=int, default=300, help="ULTRA's distillation steps (0: skip ULTRA)")
    parser.add_argument("--skip-ptq", action="store_true", help="BASIC and ULTRA only")
    parser.add_argument("--decode-rounds", type=int, default=15, help="alternating rounds of the decode timing")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.finetune_steps, args.ultra_steps = (
            min(args.steps, 20),
            min(args.finetune_steps, 10),
            min(args.ultra_steps, 10),
        )
    torch.manual_seed(0)
    data = TextLMDataModule(
        batch_size=16, context=128, eval_batch_size=32, sources=("topics",) if args.quick else ("topics", "docstrings")
    )
    data.setup()
    test = data.test_dataloader()
    result: dict = {
        "machine": machine_info(),
        "settings": vars(args) | {"out": str(args.out)},
        "corpus": {
            split: {"documents": len(names), "tokens": int(data.token_ids[split].numel())}
            for split, names in data.documents.items()
        },
        "unigram_ppl": data.unigram_perplexity("test"),
    }

    basic = _model(data, args, lr=2e-3)
    result["basic"] = {"fit_seconds": _fit(basic, data, args.steps), "ppl": evaluate_perplexity(basic, test)}
    result["basic"] |= {"bytes": serialized_size_bytes(basic.model)} | _prefill(basic, data)
    decoders: dict[str, CausalLM] = {"basic": copy.deepcopy(basic)}
    state = copy.deepcopy(basic.state_dict())
    print(json.dumps(result, indent=1), flush=True)

    if not args.skip_ptq:
        _ptq_against_qat(result, state, data, args, decoders)
    if args.ultra_steps:
        basic.load_state_dict(state)
        result["ultra"] = _ultra(basic, data, args, decoders)
        result["ultra"]["size_vs_basic"] = result["ultra"]["bytes"] / result["basic"]["bytes"]
        result["ultra"]["ppl_vs_basic"] = result["ultra"]["ppl"] / result["basic"]["ppl"]
    speeds = _decode_speeds(decoders, next(iter(test))[:1, :16], rounds=args.decode_rounds)
    result["basic"] |= speeds["basic"]
    if "qat_int4" in speeds:
        result["qat_int4"] |= speeds["qat_int4"]
        result["qat_int4"] |= _decode_ratios(result["qat_int4"], "", result["basic"])
        result["qat_int4"] |= {f"kernel_{k}": v for k, v in speeds["qat_int4_kernel"].items()}
        result["qat_int4"] |= _decode_ratios(result["qat_int4"], "kernel_", result["basic"])
    for form in ("int4", "int4_kernel", "float") if "ultra" in result else ():
        result["ultra"] |= {f"{form}_{k}": v for k, v in speeds[f"ultra {form}"].items()}
        result["ultra"] |= _decode_ratios(result["ultra"], f"{form}_", result["basic"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
