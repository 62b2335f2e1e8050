"""Reference models: the digits nets, a classification LightningModule and a small causal LM."""

from lightning_quantum.models.causal_lm import (
    CausalLM,
    LabelledBlocks,
    StaticCacheDecoder,
    decode_tokens_per_second,
    evaluate_perplexity,
    load_causal_lm,
    prefill_latency_ms,
    token_log_likelihood,
)
from lightning_quantum.models.classifier import Classifier
from lightning_quantum.models.nets import (
    ARCHITECTURES,
    ConvBlock,
    DigitsCNN,
    DigitsMLP,
    MLPBlock,
    build_architecture,
    digits_architecture_of,
)

__all__ = [
    "ARCHITECTURES",
    "CausalLM",
    "Classifier",
    "LabelledBlocks",
    "StaticCacheDecoder",
    "DigitsMLP",
    "DigitsCNN",
    "MLPBlock",
    "ConvBlock",
    "build_architecture",
    "decode_tokens_per_second",
    "digits_architecture_of",
    "evaluate_perplexity",
    "load_causal_lm",
    "prefill_latency_ms",
    "token_log_likelihood",
]
