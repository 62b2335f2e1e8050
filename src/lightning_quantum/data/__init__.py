"""Real data that ships with installed packages; nothing is downloaded."""

from lightning_quantum.data.digits import DigitsDataModule, load_digits_arrays

__all__ = ["DigitsDataModule", "load_digits_arrays"]
