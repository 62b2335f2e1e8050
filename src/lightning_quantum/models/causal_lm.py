"""A small decoder-only language model, built from a ``transformers`` config and trained from scratch."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._modules import eval_mode
from lightning_quantum._validation import check_fraction, check_non_negative, check_positive, check_positive_int
from lightning_quantum.benchmark import _threads, time_calls_ms
from lightning_quantum.compiled import compile_for_inference
from lightning_quantum.report import ReportContext, ReportExtra
from lightning_quantum.weights import read_checkpoint, state_mismatch

# Imported inside the functions that use them: transformers (slow to import).

__all__ = [
    "CausalLM",
    "LabelledBlocks",
    "StaticCacheDecoder",
    "decode_tokens_per_second",
    "evaluate_perplexity",
    "load_causal_lm",
    "next_token_loss",
    "prefill_latency_ms",
    "token_log_likelihood",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class CausalLM(pl.LightningModule):
    """A causal language model (the Llama architecture of ``transformers``, at a small size) with its
    loss, perplexity and Hugging Face ``generate``.

    The architecture is Llama's rather than GPT-2's because GPT-2's layers are ``transformers``'
    ``Conv1D`` (a transposed linear), which torchao's quantization and QAT do not take; Llama's are
    ``nn.Linear``, as in the models torchao's QAT figures are for. The input and output embeddings
    are not tied, so that each can be quantized in its own way (int8 rows, int4 groups).

    Training batches are ``(batch, context)`` tensors of token ids; the model's labels are the same
    ids (``transformers`` shifts them). ``val/ppl`` and ``test/ppl`` are ``exp`` of the mean token loss
    over the whole split (all ranks together), not a mean of per-batch perplexities. The learning
    rate warms up linearly over ``warmup_fraction`` of the fit, then decays along a cosine to 10%.
    Only plain hyperparameters are saved, so checkpoints load with ``torch.load(weights_only=True)``.
    Structured pruning removes MLP hidden units (``channel_pruning_layers``: a unit is one output row
    of ``gate_proj`` and ``up_proj`` and one input column of ``down_proj``); the attention projections,
    split into heads, stay whole.

    Args:
        vocab_size: the tokenizer's vocabulary (``TextLMDataModule.tokenizer_config()``).
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: width of each layer's MLP.
        context: the longest sequence (positions) the model takes.
        eos_token_id: the end-of-text token (also padding in ``generate``).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's weight decay.
        warmup_fraction: share of the fit's steps spent warming the learning rate up.
        dropout: attention dropout.
        optimizer: a factory taking the parameters (AdamW with ``lr`` and ``weight_decay`` when ``None``).

    Example:
        >>> model = CausalLM(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        >>> tuple(model(torch.zeros(1, 8, dtype=torch.long)).shape)
        (1, 8, 512)
    """

    channel_pruning_layers = ("model.model.layers.*.mlp.gate_proj",)

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        intermediate_size: int = 1024,
        context: int = 128,
        eos_token_id: int = 0,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        warmup_fraction: float = 0.05,
        dropout: float = 0.0,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
            ("context", context),
        ):
            check_positive_int(name, value)
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size`={hidden_size} must divide by `num_heads`={num_heads}.")
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < vocab_size:
            raise ValueError(
                f"`eos_token_id`={eos_token_id!r} is not valid. It must be a token id in [0, {vocab_size})."
            )
        check_positive("lr", lr)
        check_non_negative("weight_decay", weight_decay)
        check_fraction("warmup_fraction", warmup_fraction)
        check_fraction("dropout", dropout)
        save_plain_hyperparameters(self, ignore=["optimizer"])
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=context,
            attention_dropout=dropout,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)
        self.context = context
        self.eos_token_id = eos_token_id
        self.optimizer_factory = optimizer
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits, ``(batch, sequence, vocab)``."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: Tensor) -> Tensor:
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=batch.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=False)
        self.val_loss.reset()

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.test_loss.update(self._loss(batch), weight=batch.numel())

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss.compute()
        self.log_dict({"test/loss": loss, "test/ppl": loss.exp()}, sync_dist=False)
        self.test_loss.reset()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 64, **kwargs: Any) -> Tensor:
        """Greedy continuation through Hugging Face ``generate``, with the KV cache (``kwargs`` go to it)."""
        options = {"do_sample": False, "use_cache": True, "pad_token_id": self.eos_token_id, **kwargs}
        attention_mask = torch.ones_like(input_ids)
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **options
        )

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """For the optimization report: held-out perplexity (as trained, before QAT's conversion when
        there was one, and at fit start), the unigram model's, decode speed at batch 1 (greedy, 64 new
        tokens, KV cache), prefill latency at batch 8, and greedy continuations of held-out prompts.

        Measured on the model as trained (``context.pl_module``: eager, in its training numerics);
        the shipped form's latency is the report's main table."""
        model = context.pl_module
        blocks = [b for b, _ in zip(context.eval_loader, range(8))]
        held_out = torch.cat(blocks)
        prompts = held_out[:3, :16]
        figures = [{"figure": "held-out perplexity", "value": evaluate_perplexity(model, context.eval_loader)}]
        for label, other in (
            ("held-out perplexity before int conversion (float weights)", context.float_model),
            ("held-out perplexity at fit start", context.baseline),
        ):
            if other is not None:
                figures.append({"figure": label, "value": evaluate_perplexity(other, context.eval_loader)})
        figures += [
            {
                "figure": "decode tokens/s (batch 1, 64 new tokens, KV cache)",
                "value": decode_tokens_per_second(model, prompts[:1]),
            },
            {
                "figure": f"prefill ms (batch 8, {held_out.shape[1]} tokens)",
                "value": prefill_latency_ms(model, held_out[:8]),
            },
        ]
        datamodule = getattr(context.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "unigram_perplexity"):
            unigram = datamodule.unigram_perplexity(context.eval_split)
            figures.insert(1, {"figure": "unigram perplexity (token frequencies alone)", "value": unigram})
        tokenizer = getattr(datamodule, "tokenizer", None)
        samples = []
        if tokenizer is not None:
            out = model.generate(prompts.to(model.device), max_new_tokens=32)
            for prompt, tokens in zip(prompts, out):
                samples.append(
                    {
                        "prompt": _one_line(tokenizer.decode(prompt)),
                        "continuation": _one_line(tokenizer.decode(tokens[prompt.shape[0] :])),
                    }
                )
        extra: ReportExtra = {"language_model": figures}
        if samples:
            extra["samples"] = samples
        return extra

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
            no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
            optimizer = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=self.hparams["lr"],
                betas=(0.9, 0.95),
            )
        trainer = self._trainer  # None for a detached copy (the report times its training step)
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if not math.isfinite(total):
            return optimizer  # a fit of unknown length: the peak rate throughout
        warmup = max(1, int(total * self.hparams["warmup_fraction"]))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _DecodeStep(nn.Module):
    """One forward pass of a Hugging Face causal LM against a static KV cache: the next-token logits
    of the last position. The unit :class:`StaticCacheDecoder` compiles (fixed shapes per batch size)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, positions: Tensor, cache: Any) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()


class StaticCacheDecoder(nn.Module):
    """Greedy decoding of a :class:`CausalLM` (or of its quantized copy) with a KV cache of fixed size
    and, with ``compile``, a compiled one-token step: the decode form to deploy on a CPU.

    Hugging Face's ``generate`` grows its KV cache with every token and runs the model's Python (and
    its own: logits processors, stopping criteria) for each one; at batch 1 a small model spends most
    of its decode time there. Here the cache holds ``max_length`` positions from the start, so every
    decode step has the same shapes and compiles once per batch size (``torch.compile``, no freezing:
    Inductor's constant folding does not keep the cache's index arithmetic). The prompt is run eagerly,
    once. Greedy choice, ``min_new_tokens`` and end-of-text handling follow ``CausalLM.generate``
    (a finished row continues with the end-of-text token, and decoding stops when every row has
    finished), so the two give the same tokens up to ties in the last bits of the logits.

    Args:
        model: the language model; its weights are used as they are (float, or quantized by
            :func:`~lightning_quantum.quantization.quantize_weights_int4`).
        compile: compile the one-token step (``False``: the same loop, eager).
        max_length: prompt plus new tokens at most; the model's ``context`` when ``None``.
        num_threads: torch threads while decoding (restored after); the process's setting when
            ``None``. At batch 1 a step is many small kernels: on this project's 2-core machine one
            thread decoded int4 as fast as two, and a busy second core slowed the two-thread int4
            kernels about 2.5x (see ``docs/causal_lm.md``).
    """

    _prompt_step: nn.Module
    _step: nn.Module
    _caches: dict[int, Any]

    def __init__(
        self, model: CausalLM, *, compile: bool = True, max_length: int | None = None, num_threads: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(model, CausalLM):
            raise TypeError(f"`model` must be a CausalLM, got {type(model).__name__}.")
        if not isinstance(compile, bool):
            raise ValueError(f"`compile`={compile!r} is not valid. Give True or False.")
        if max_length is not None:
            check_positive_int("max_length", max_length)
        if num_threads is not None:
            check_positive_int("num_threads", num_threads)
        self.num_threads = num_threads
        self.lm = model
        self.compiled = compile  # (``compile`` is nn.Module's method)
        self.max_length = max_length or model.context
        self.eos_token_id = model.eos_token_id
        step = _DecodeStep(model.model)
        # not submodules: the weights are the language model's, listed once
        object.__setattr__(self, "_prompt_step", step)  # eager: the prompt's length varies
        object.__setattr__(self, "_step", compile_for_inference(step, freezing=False) if compile else step)
        object.__setattr__(self, "_caches", {})
        self.eval()

    def _cache(self, batch: int) -> Any:
        from transformers import StaticCache

        caches = self._caches
        if batch not in caches:
            caches[batch] = StaticCache(config=self.lm.model.config, max_cache_len=self.max_length)
        else:
            caches[batch].reset()
        return caches[batch]

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 64, min_new_tokens: int = 0) -> Tensor:
        """The prompt ``input_ids`` (``(batch, length)``, unpadded) followed by up to ``max_new_tokens``
        greedy tokens (at least ``min_new_tokens`` before an end-of-text token may be chosen).

        Raises:
            ValueError: for a prompt that is not a 2-D tensor of token ids, or a length beyond ``max_length``.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"`input_ids` must be a (batch, length) tensor of token ids, got {shape}.")
        check_positive_int("max_new_tokens", max_new_tokens)
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"`min_new_tokens`={min_new_tokens!r} is not valid. Give a non-negative integer.")
        batch, length = input_ids.shape
        if length + max_new_tokens > self.max_length:
            raise ValueError(
                f"A prompt of {length} tokens plus `max_new_tokens`={max_new_tokens} exceeds `max_length`="
                f"{self.max_length} of this decoder: shorten the prompt or build it with a larger max_length."
            )
        with _threads(self.num_threads or torch.get_num_threads()):
            return self._decode(input_ids, max_new_tokens, min_new_tokens)

    def _decode(self, input_ids: Tensor, max_new_tokens: int, min_new_tokens: int) -> Tensor:
        batch, length = input_ids.shape
        device = next(self.lm.parameters()).device
        input_ids = input_ids.to(device)
        cache = self._cache(batch)
        logits = self._prompt_step(input_ids, torch.arange(length, device=device), cache)
        tokens = [input_ids]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            if i < min_new_tokens:
                logits[:, self.eos_token_id] = -math.inf
            token = logits.argmax(-1).masked_fill(finished, self.eos_token_id)
            tokens.append(token.unsqueeze(1))
            finished |= token == self.eos_token_id
            if i + 1 == max_new_tokens or bool(finished.all()):
                break
            position = torch.tensor([length + i], device=device)
            logits = self._step(token.unsqueeze(1), position, cache)
        return torch.cat(tokens, dim=1)


def load_causal_lm(checkpoint: str | Path, *, shown: str | None = None) -> CausalLM:
    """The :class:`CausalLM` a Lightning checkpoint of one holds, rebuilt from its saved hyperparameters
    and weights (read with ``torch.load(weights_only=True)``), in eval mode: a trained teacher for
    ULTRA's distillation (``conf/model/gpt_cpython_ultra.yaml``).

    ``shown``: how the errors name the file (a path relative to a served root, say); ``checkpoint`` if ``None``.

    Raises:
        FileNotFoundError: when ``checkpoint`` is not a file.
        ValueError: for a file that is not a weights-only checkpoint of a ``CausalLM`` (no saved sizes,
            or weights that do not fit them).
    """
    content = read_checkpoint(checkpoint, shown=shown)
    label = f"`checkpoint`={shown if shown is not None else str(checkpoint)!r}"
    hparams = content.get("hyper_parameters")
    if not isinstance(hparams, dict) or "num_layers" not in hparams:
        raise ValueError(
            f"{label} holds no CausalLM hyperparameters: give a Lightning .ckpt written "
            "by a CausalLM fit (lq-train experiment=gpt_cpython)."
        )
    model = CausalLM(**{k: v for k, v in hparams.items() if k != "optimizer"})
    mismatch = state_mismatch(model.state_dict(), content["state_dict"])
    if mismatch is not None:
        raise ValueError(f"{label} does not fit the CausalLM it describes: {mismatch}.")
    model.load_state_dict(content["state_dict"])
    return model.eval()


def next_token_loss(logits: Tensor, token_ids: Tensor, reduction: str = "mean") -> Tensor:
    """A causal language model's loss: cross-entropy of the logits at each position against the next
    token (``logits`` ``(batch, length, vocab)``, or a Hugging Face output holding them; ``token_ids``
    ``(batch, length)``), in float32."""
    logits = getattr(logits, "logits", logits)
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), token_ids[:, 1:].reshape(-1), reduction=reduction)


def token_log_likelihood(logits: Tensor, token_ids: Tensor) -> float:
    """The mean log-likelihood of each next token (higher is better; ``exp`` of minus it is perplexity).

    A ``metric`` for :func:`~lightning_quantum.optimize.optimize` and the deployment gate, with
    :class:`LabelledBlocks` as their data: a drop of 0.01 is a perplexity about 1% higher, so
    ``max_accuracy_drop=0.01`` rolls back a step that raises perplexity by more than about 1%.
    """
    return -float(next_token_loss(logits, token_ids))


class LabelledBlocks:
    """Batches of token blocks as ``(inputs, targets)`` pairs, the targets being the blocks themselves
    (a causal LM predicts its own input, shifted): the layout that measures a model's quality in
    :func:`~lightning_quantum.optimize.optimize` and the deployment gate. Iterable again and again."""

    def __init__(self, loader: Iterable[Tensor]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            yield batch, batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, loader: Iterable[Tensor], max_batches: int | None = None) -> float:
    """``exp`` of the mean next-token loss of ``model`` (any module mapping token ids to logits: the
    LightningModule, a quantized or compiled form) over the blocks of ``loader``."""
    total, tokens = 0.0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            ids = batch.to(device)
            total += float(next_token_loss(model(ids), ids, reduction="sum"))
            tokens += ids[:, 1:].numel()
    if tokens == 0:
        raise ValueError("`loader` gave no tokens to measure perplexity on.")
    return math.exp(total / tokens)


def _one_line(text: str) -> str:
    """``text`` fit for a Markdown table cell: one line, no column separators."""
    return " ".join(text.split()).replace("|", "\\|")


@torch.no_grad()
def decode_tokens_per_second(model: Any, prompt: Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Greedy decoding speed of ``model`` (anything with :meth:`CausalLM.generate`'s signature): exactly
    ``new_tokens`` tokens after ``prompt`` (``(1, length)`` token ids), KV cache on; the median of
    ``repeats`` runs after one warm-up run."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    with eval_mode(model):
        times = time_calls_ms(
            lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens),
            warmup=1,
            repeats=repeats,
            device=device,
        )
    return new_tokens / (statistics.median(times) / 1000.0)


@torch.no_grad()
def prefill_latency_ms(model: nn.Module, blocks: Tensor, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass of ``model`` over ``blocks`` (``(batch, tokens)`` ids)
    after one warm-up pass: the prompt-processing (prefill) latency."""
    device = next(model.parameters()).device
    blocks = blocks.to(device)
    with eval_mode(model):
        return statistics.median(time_calls_ms(lambda: model(blocks), warmup=1, repeats=repeats, device=device))
