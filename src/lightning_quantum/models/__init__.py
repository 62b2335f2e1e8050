"""Reference models: the digits nets and a classification LightningModule."""

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
    "Classifier",
    "DigitsMLP",
    "DigitsCNN",
    "MLPBlock",
    "ConvBlock",
    "build_architecture",
    "digits_architecture_of",
]
