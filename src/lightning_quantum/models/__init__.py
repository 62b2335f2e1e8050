"""Reference models: the digits nets and a classification LightningModule."""

from lightning_quantum.models.classifier import Classifier
from lightning_quantum.models.nets import ConvBlock, DigitsCNN, DigitsMLP, MLPBlock

__all__ = ["Classifier", "DigitsMLP", "DigitsCNN", "MLPBlock", "ConvBlock"]
