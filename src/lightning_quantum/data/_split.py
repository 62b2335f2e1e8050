"""What the bundled DataModules share: a seeded train/val/test split and its loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from lightning_quantum.data.sampling import EpochSeededSampler

__all__ = ["SeededSplitDataModule"]


class SeededSplitDataModule(pl.LightningDataModule):
    """Base of the bundled DataModules: subclasses fill ``self.splits`` in ``setup``.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``num_workers``, ``seed``, ``val_fraction``
    and ``test_fraction``. Training batches are shuffled by an :class:`EpochSeededSampler`, so a
    resumed run sees the batches the uninterrupted one saw.
    """

    batch_size: int
    eval_batch_size: int
    num_workers: int = 0
    seed: int
    val_fraction: float
    test_fraction: float
    splits: dict[str, Dataset[Any]]

    def split_indices(self, n: int) -> dict[str, np.ndarray]:
        """The index sets of the seeded split of ``n`` samples."""
        order = np.random.RandomState(self.seed).permutation(n)
        n_test = int(round(n * self.test_fraction))
        n_val = int(round(n * self.val_fraction))
        return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup("fit")
        dataset = self.splits[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochSeededSampler(dataset, self.seed, self._samples_done) if shuffle else None,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _samples_done(self) -> int:
        """Samples of the current epoch's order already trained on: nonzero only when a fit resumes mid-epoch.

        Lightning restores how many batches of the interrupted epoch were done (all ranks together
        under DDP, whose sampler wrapper shards the order after this skip).
        """
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return int(done) * self.batch_size * int(trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
