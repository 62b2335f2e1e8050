"""Real data that ships with installed packages; nothing is downloaded."""

from lightning_quantum.data.digits import DigitsDataModule, load_digits_arrays
from lightning_quantum.data.lm import TextLMDataModule
from lightning_quantum.data.sampling import EpochSeededSampler
from lightning_quantum.data.sentences import SentenceDataModule

__all__ = ["DigitsDataModule", "EpochSeededSampler", "SentenceDataModule", "TextLMDataModule", "load_digits_arrays"]
