"""The decode gate of a causal LM: which weights and which decode loop generate fastest within the
perplexity budget, measured on this machine; and the file that ships the choice.

The deployment gate (:func:`~lightning_quantum.deployment.choose_deployment`) times one forward pass
of a batch: for a language model that is prefill, the scoring of whole blocks. Generation is a loop of
one-token steps at batch 1, whose speed depends on other things (the KV cache, the Python around each
step, the bytes of weights read per token), so it gets a gate of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_quantum._modules import eval_mode
from lightning_quantum._validation import check_non_negative, check_positive_int
from lightning_quantum.benchmark import _threads, serialized_size_bytes, time_calls_ms
from lightning_quantum.deployment import read_form_record
from lightning_quantum.models.causal_lm import CausalLM, StaticCacheDecoder, evaluate_perplexity
from lightning_quantum.report import keep_existing

__all__ = [
    "DECODE_FORMS",
    "INT4_KERNEL_WEIGHTS",
    "DecodeCandidate",
    "DecodeDecision",
    "choose_decoder",
    "decode_table",
    "decoder_form",
    "generate_exactly",
    "load_decoder",
    "save_decoder",
    "time_decoding",
]

#: The decode loops a gate compares: Hugging Face ``generate`` (a KV cache that grows, eager), and
#: :class:`StaticCacheDecoder` (a fixed-size cache, compiled one-token step) with the process's threads
#: and with one thread.
DECODE_FORMS = ("generate", "static compiled", "static compiled 1 thread")
DECODER_FILE = "decoder.json"


@dataclasses.dataclass
class DecodeCandidate:
    """One decode form: its loop, its weights, and what it measured."""

    form: str
    weights: str
    tokens_per_second: float | None = None
    perplexity: float | None = None
    build_seconds: float | None = None
    size_bytes: int | None = None
    eligible: bool = False
    note: str = ""


@dataclasses.dataclass
class DecodeDecision:
    """The decode gate's choice and every candidate it measured."""

    form: str
    weights: str
    reason: str
    candidates: list[DecodeCandidate]
    prompt_tokens: int
    new_tokens: int
    max_accuracy_drop: float
    num_threads: int
    gate_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_arguments(
    model: Any,
    float_model: Any,
    forms: Sequence[str],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    rounds: int,
    max_accuracy_drop: float,
) -> None:
    for name, value in (("model", model), ("float_model", float_model)):
        if value is not None and not isinstance(value, CausalLM):
            raise TypeError(f"`{name}` must be a CausalLM, got {type(value).__name__}.")
    if isinstance(forms, str) or not forms or any(f not in DECODE_FORMS for f in forms):
        raise ValueError(f"`forms`={forms!r} is not valid. Give a list of: {', '.join(map(repr, DECODE_FORMS))}.")
    for name, number in (
        ("prompt_tokens", prompt_tokens),
        ("new_tokens", new_tokens),
        ("repeats", repeats),
        ("rounds", rounds),
    ):
        check_positive_int(name, number)
    check_non_negative("max_accuracy_drop", max_accuracy_drop)
    if prompt_tokens + new_tokens > model.context:
        raise ValueError(
            f"`prompt_tokens`={prompt_tokens} plus `new_tokens`={new_tokens} exceeds the model's context of "
            f"{model.context} tokens."
        )


def generate_exactly(decoder: Any, prompt: Tensor, new_tokens: int) -> Tensor:
    """``decoder.generate`` of exactly ``new_tokens`` greedy tokens after ``prompt``, in eval mode."""
    with eval_mode(decoder):
        return decoder.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def _build(
    weights: dict[str, CausalLM],
    blocks: Sequence[Tensor],
    forms: Sequence[str],
    max_accuracy_drop: float,
    generate: Callable[[Any], Tensor],
) -> tuple[list[DecodeCandidate], list[Any]]:
    """Every (weights, form) candidate judged by its weights' held-out log-likelihood, built and called
    once (``build_seconds``: compiling, for a compiled form); one that fails is listed, not chosen."""
    # the mean token log-likelihood: minus the log of the perplexity
    quality = {name: -math.log(evaluate_perplexity(m, blocks)) for name, m in weights.items()}
    candidates: list[DecodeCandidate] = []
    decoders: list[Any] = []
    for name, lm in weights.items():
        drop = quality["as trained"] - quality[name]
        for form in forms:
            candidate = DecodeCandidate(
                form, name, perplexity=math.exp(-quality[name]), size_bytes=serialized_size_bytes(lm)
            )
            candidate.eligible = drop <= max_accuracy_drop
            candidate.note = (
                "as trained (the reference)"
                if name == "as trained"
                else f"log-likelihood drop {drop:+.4f}, {'within' if candidate.eligible else 'over'} budget"
            )
            decoder = decoder_form(lm, form)
            build = time.perf_counter()
            try:
                generate(decoder)
            except Exception as error:  # noqa: BLE001 - a form that cannot run is listed, not chosen
                candidate.eligible = False
                candidate.note = f"failed: {type(error).__name__}: {error}"[:300]
            candidate.build_seconds = time.perf_counter() - build
            decoders.append(decoder)
            candidates.append(candidate)
    return candidates, decoders


def time_decoding(
    decoders: Sequence[Any], prompt: Tensor, new_tokens: int, *, repeats: int, rounds: int, device: torch.device
) -> list[list[float]]:
    """Per decoder, in each of ``rounds`` rounds, the median ms of ``repeats`` calls of
    :func:`generate_exactly`; the decoders alternate, so that a slow spell of a shared machine hits
    them alike. Call each once before (compiling)."""
    times: list[list[float]] = [[] for _ in decoders]
    for _ in range(rounds):
        for i, decoder in enumerate(decoders):
            calls = time_calls_ms(
                functools.partial(generate_exactly, decoder, prompt, new_tokens),
                warmup=0,
                repeats=repeats,
                device=device,
            )
            times[i].append(statistics.median(calls))
    return times


def choose_decoder(
    model: CausalLM,
    eval_blocks: Iterable[Tensor],
    *,
    float_model: CausalLM | None = None,
    forms: Sequence[str] = DECODE_FORMS,
    prompt_tokens: int = 16,
    new_tokens: int = 64,
    repeats: int = 3,
    rounds: int = 2,
    max_accuracy_drop: float = 0.01,
    max_eval_batches: int | None = 8,
    num_threads: int | None = None,
    int4_kernel: bool = True,
) -> tuple[nn.Module, DecodeDecision]:
    """Measure greedy decoding of ``model`` (and of ``float_model``, its weights before QAT's conversion)
    in each of ``forms`` and return the fastest within the perplexity budget.

    Speed is tokens/s at batch 1: ``new_tokens`` tokens exactly after the first ``prompt_tokens`` of the
    first held-out block, KV cache on; the median of ``repeats`` calls per round, candidates alternating
    over ``rounds``, after one untimed call (``build_seconds``: compiling, for a compiled form).
    Quality is the held-out mean token log-likelihood of each set of weights (``exp`` of minus it is the
    perplexity): weights whose log-likelihood is more than ``max_accuracy_drop`` below the model's as
    trained are not chosen (0.01 is about 1% of perplexity). A decode loop does not change the model's
    logits beyond the last bits, so each form is judged by its weights. A CPU model with int4 weights
    is also measured with them packed for ATen's CPU int4 kernel (:data:`INT4_KERNEL_WEIGHTS`: the same
    int4 values, bf16 activations), judged by its own perplexity, unless ``int4_kernel`` is False.

    Returns:
        ``(decoder, decision)``: the winner, ready to call ``generate`` on, and every candidate.

    Raises:
        ValueError: for an invalid argument (named), a prompt plus new tokens beyond the model's context,
            or held-out blocks shorter than the prompt.
        TypeError: for a ``model`` or ``float_model`` that is not a :class:`CausalLM`.
    """
    _check_arguments(model, float_model, forms, prompt_tokens, new_tokens, repeats, rounds, max_accuracy_drop)
    started = time.perf_counter()
    device = next(model.parameters()).device
    blocks = [b.to(device) for b in itertools.islice(eval_blocks, max_eval_batches)]
    if not blocks or blocks[0].shape[1] < prompt_tokens:
        raise ValueError(f"`eval_blocks` must give blocks of at least `prompt_tokens`={prompt_tokens} tokens.")
    prompt = blocks[0][:1, :prompt_tokens]
    threads = num_threads or torch.get_num_threads()
    weights = {"as trained": model, **({"float": float_model} if float_model is not None else {})}
    if int4_kernel:
        weights.update(_int4_kernel_weights(model))
    generate = functools.partial(generate_exactly, prompt=prompt, new_tokens=new_tokens)
    with _threads(threads):
        candidates, decoders = _build(weights, blocks, forms, max_accuracy_drop, generate)
        ok = [i for i, c in enumerate(candidates) if not c.note.startswith("failed")]
        times = time_decoding(
            [decoders[i] for i in ok], prompt, new_tokens, repeats=repeats, rounds=rounds, device=device
        )
    for i, per_round in zip(ok, times):
        candidates[i].tokens_per_second = new_tokens / (statistics.median(per_round) / 1000.0)
    reference = candidates[0]  # the model as trained, in the first form
    eligible = [i for i, c in enumerate(candidates) if c.eligible and c.tokens_per_second is not None]
    if not eligible:  # every form failed: the model as trained, as it is
        winner_index = 0
    else:
        winner_index = max(eligible, key=lambda i: candidates[i].tokens_per_second or 0.0)
    winner = candidates[winner_index]
    reason = _reason(winner, reference, len(candidates))
    decision = DecodeDecision(
        form=winner.form,
        weights=winner.weights,
        reason=reason,
        candidates=candidates,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        max_accuracy_drop=max_accuracy_drop,
        num_threads=threads,
        gate_seconds=time.perf_counter() - started,
    )
    return decoders[winner_index], decision


#: The name of the weights :func:`choose_decoder` adds for an int4 model: its own int4 values packed for ATen's
#: CPU int4 kernel, with bf16 activations (:func:`~lightning_quantum.quantization.pack_int4_for_cpu`).
INT4_KERNEL_WEIGHTS = "int4 kernel (bf16 activations)"


def _int4_kernel_weights(model: CausalLM) -> dict[str, CausalLM]:
    """``{INT4_KERNEL_WEIGHTS: packed}`` for a CPU model whose int4 linears ATen's CPU int4 kernel can take, else
    ``{}``: on a 2-core Zen 3 EPYC it decoded 1.5x fp32 where torchao's int4 form, compiled, made 0.5x."""
    from lightning_quantum.quantization.int4_kernel import pack_int4_for_cpu

    try:
        return {INT4_KERNEL_WEIGHTS: cast(CausalLM, pack_int4_for_cpu(model))}
    except ValueError:  # no int4 linear, not on the CPU, or groups the kernel does not take
        return {}


def decoder_form(lm: CausalLM, form: str) -> nn.Module:
    """``lm`` in the decode form ``form`` (one of :data:`DECODE_FORMS`)."""
    if form == "generate":
        return lm
    return StaticCacheDecoder(lm, num_threads=1 if form.endswith("1 thread") else None)


def _reason(winner: DecodeCandidate, reference: DecodeCandidate, count: int) -> str:
    name = f"{winner.weights} weights, {winner.form}"
    if winner.tokens_per_second is None or reference.tokens_per_second is None:
        return f"{name}: no decode form could be timed."
    ratio = winner.tokens_per_second / reference.tokens_per_second
    return (
        f"{name} decodes fastest of the {count} forms within the perplexity budget "
        f"({winner.tokens_per_second:.0f} tokens/s, perplexity {winner.perplexity:.2f}), "
        f"{ratio:.2f}x the tokens/s of the model as trained through {reference.form}."
    )


def decode_table(decision: DecodeDecision) -> list[dict[str, Any]]:
    """The decode gate's candidates as report rows (the report's ``decoding`` table)."""
    rows = []
    for c in decision.candidates:
        shipped = c.form == decision.form and c.weights == decision.weights
        rows.append(
            {
                "form": c.form,
                "weights": c.weights,
                f"tokens/s (batch 1, {decision.new_tokens} new)": c.tokens_per_second,
                "perplexity": c.perplexity,
                "build s": c.build_seconds,
                "MB": None if c.size_bytes is None else c.size_bytes / 2**20,
                "verdict": (f"SHIPPED: {decision.reason} " if shipped else "") + c.note,
            }
        )
    return rows


def save_decoder(
    decoder: nn.Module, decision: DecodeDecision, directory: str | Path, *, stem: str = "decoder"
) -> dict[str, Path]:
    """Write the chosen decode form: ``<stem>.pt`` (the language model's hyperparameters and weights,
    quantized ones included, readable with ``torch.load(weights_only=True)``) and ``decoder.json`` (the
    decision). Earlier files are kept, renamed. :func:`load_decoder` reads them back."""
    lm = decoder.lm if isinstance(decoder, StaticCacheDecoder) else decoder
    if not isinstance(lm, CausalLM):
        raise TypeError(f"`decoder` must be a CausalLM or a StaticCacheDecoder, got {type(decoder).__name__}.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights, record = out / f"{stem}.pt", out / DECODER_FILE
    keep_existing(weights)
    keep_existing(record)
    torch.save(
        {"hyper_parameters": dict(lm.hparams), "int4": _int4_settings(lm), "state_dict": lm.state_dict()}, weights
    )
    record.write_text(json.dumps({"weights_file": weights.name, **decision.to_dict()}, indent=2) + "\n")
    return {"decoder": weights, "decoder_record": record}


def _int4_settings(lm: CausalLM) -> dict[str, Any] | None:
    """How :func:`~lightning_quantum.quantization.quantize_weights_int4` rebuilds ``lm``'s structure:
    ``None`` for float linears."""
    from lightning_quantum.quantization.int4_kernel import Int4CpuLinear

    head = lm.model.lm_head
    kernel = isinstance(head, Int4CpuLinear)
    block = (None, head.group_size) if kernel else getattr(head.weight, "block_size", None)
    if block is None:
        return None
    embedding = lm.model.get_input_embeddings().weight
    settings: dict[str, Any] = {"group_size": int(block[-1]), "embeddings": hasattr(embedding, "block_size")}
    if kernel:  # packed for ATen's CPU int4 kernel: packed again on loading, from the same structure
        settings["kernel_activations"] = str(head.activation_dtype).removeprefix("torch.")
    return settings


def load_decoder(directory: str | Path) -> nn.Module:
    """The decode form :func:`save_decoder` wrote in ``directory``, ready to call ``generate`` on.

    Raises:
        FileNotFoundError: when ``directory`` holds no ``decoder.json``.
        ValueError: for a record that is not valid JSON, names an unknown form, or a weights file outside
            the directory.
    """
    root = Path(directory)
    record_path, record, form = read_form_record(root, DECODER_FILE, "save_decoder", DECODE_FORMS)
    weights = (root / str(record.get("weights_file", ""))).resolve()
    if weights.parent != root.resolve() or weights.suffix != ".pt" or not weights.is_file():
        raise ValueError(
            f"{record_path}: `weights_file`={record.get('weights_file')!r} must name a .pt file in {root}."
        )
    import torchao.quantization  # noqa: F401  # registers its tensor classes (int4/int8 weights) as safe to load

    content = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or not isinstance(content.get("hyper_parameters"), dict):
        raise ValueError(f"{weights} holds no decoder: save it with save_decoder.")
    lm = CausalLM(**{k: v for k, v in content["hyper_parameters"].items() if k != "optimizer"})
    if content.get("int4") is not None:
        from lightning_quantum.quantization import pack_int4_for_cpu, quantize_weights_int4

        settings = dict(content["int4"])
        activations = settings.pop("kernel_activations", None)
        lm = cast(CausalLM, quantize_weights_int4(lm, **settings))
        if activations is not None:
            lm = cast(CausalLM, pack_int4_for_cpu(lm, activation_dtype=activations))
    lm.load_state_dict(content["state_dict"], assign=True)
    return decoder_form(lm.eval(), form)
