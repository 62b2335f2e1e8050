"""Reference models: the digits nets and a classification LightningModule."""

from lightning_quantum.models.classifier import Classifier
from lightning_quantum.models.nets import ConvBlock, DigitsCNN, DigitsMLP, MLPBlock, digits_architecture_of

__all__ = ["Classifier", "DigitsMLP", "DigitsCNN", "MLPBlock", "ConvBlock", "digits_architecture_of"]
