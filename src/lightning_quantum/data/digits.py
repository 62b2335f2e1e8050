"""The digits DataModule: 1,797 real 8x8 handwritten digits shipped with scikit-learn."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._validation import (
    check_choice,
    check_non_negative,
)
from lightning_quantum.data._split import SeededSplitDataModule, check_split_settings
from lightning_quantum.data.sampling import EpochSeededSampler

# Imported inside the functions that use them: sklearn (slow to import, and only to read the digits once).

__all__ = ["DigitsDataModule", "EpochSeededSampler", "load_digits_arrays"]

_FILE_NAMES = ("digits.csv.gz", "digits.csv")


def load_digits_arrays(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 64) as float32 in 0..16 and labels (N,) as int64.

    Args:
        data_dir: a directory holding ``digits.csv.gz`` (or ``digits.csv``) in scikit-learn's format,
            64 pixel columns then the label; ``None`` reads the copy bundled with scikit-learn.

    Raises:
        FileNotFoundError: when ``data_dir`` does not exist or holds no digits file.
    """
    if data_dir is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"`data_dir`={str(data_dir)!r} does not exist or is not a directory. Point it at a directory "
            f"holding one of {list(_FILE_NAMES)}, or set it to null to use the copy bundled with scikit-learn."
        )
    for name in _FILE_NAMES:
        if (root / name).is_file():
            table = np.loadtxt(root / name, delimiter=",", dtype=np.float32)
            return table[:, :-1], table[:, -1].astype(np.int64)
    raise FileNotFoundError(
        f"`data_dir`={str(data_dir)!r} holds none of {list(_FILE_NAMES)}. Valid choices: a directory with one "
        "of those files, or null for the copy bundled with scikit-learn."
    )


class DigitsDataModule(SeededSplitDataModule):
    """Seeded train/val/test split of the digits, standardized with the training split's statistics.

    Args:
        batch_size: samples per training batch.
        eval_batch_size: samples per val/test batch; ``batch_size`` when ``None``.
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for test.
        seed: seed of the split permutation (the same seed always gives the same split).
        layout: ``"flat"`` gives (N, 64) inputs for MLPs, ``"image"`` gives (N, 1, 8, 8) for convnets.
        num_workers: DataLoader workers.
        data_dir: see :func:`load_digits_arrays`.
        return_index: training batches are ``(inputs, targets, sample index)``, which lets a
            distillation teacher's outputs be cached by index.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((32, 64), (32,))
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        layout: Literal["flat", "image"] = "flat",
        num_workers: int = 0,
        data_dir: str | Path | None = None,
        return_index: bool = False,
    ) -> None:
        super().__init__()
        check_split_settings(batch_size, eval_batch_size, val_fraction, test_fraction, max_held_out=0.9)
        check_choice("layout", layout, ("flat", "image"))
        check_non_negative("num_workers", num_workers)
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            load_digits_arrays(data_dir)  # raises the FileNotFoundError that names `data_dir`
        save_plain_hyperparameters(self)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.layout = layout
        self.num_workers = num_workers
        self.data_dir = data_dir
        self.return_index = return_index
        self.splits = {}
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = load_digits_arrays(self.data_dir)
        indices = self.split_indices(len(y))
        train_x = torch.from_numpy(x[indices["train"]])
        self.mean = train_x.mean(dim=0)
        self.std = train_x.std(dim=0).clamp_min(1e-3)  # border pixels are always 0 in training
        for name, idx in indices.items():
            inputs = (torch.from_numpy(x[idx]) - self.mean) / self.std
            if self.layout == "image":
                inputs = inputs.view(-1, 1, 8, 8)
            tensors = [inputs, torch.from_numpy(y[idx])]
            if self.return_index and name == "train":
                tensors.append(torch.arange(len(idx)))
            self.splits[name] = TensorDataset(*tensors)
