"""Reference models: the digits nets, a classification LightningModule and a small causal LM."""

from lightning_quantum.models.causal_lm import CausalLM, evaluate_perplexity
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
    "DigitsMLP",
    "DigitsCNN",
    "MLPBlock",
    "ConvBlock",
    "build_architecture",
    "digits_architecture_of",
    "evaluate_perplexity",
]
