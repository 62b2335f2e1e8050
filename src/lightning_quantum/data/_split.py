"""What the bundled DataModules share: a seeded train/val/test split and its loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_quantum._validation import check_fraction, check_positive_int
from lightning_quantum.data.sampling import EpochSeededSampler

__all__ = ["SeededSplitDataModule", "check_split_settings"]


def check_split_settings(
    batch_size: Any, eval_batch_size: Any, val_fraction: Any, test_fraction: Any, *, max_held_out: float
) -> None:
    """Check a DataModule's batch sizes (positive integers; ``eval_batch_size`` may be ``None``) and split
    fractions (each in [0, 1), together under ``max_held_out``), naming the argument that is wrong.

    Raises:
        ValueError: for a bad batch size or fraction, or held-out fractions that leave too little to train on.
    """
    check_positive_int("batch_size", batch_size)
    if eval_batch_size is not None:
        check_positive_int("eval_batch_size", eval_batch_size)
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= max_held_out:
        raise ValueError(
            f"`val_fraction`={val_fraction} and `test_fraction`={test_fraction} leave under "
            f"{1 - max_held_out:.0%} for training."
        )


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
        trainer = self.trainer  # None outside a fit: one process
        sampler = None
        if shuffle:
            sampler = EpochSeededSampler(
                dataset,  # type: ignore[arg-type]
                self.seed,
                self._samples_done,
                num_replicas=int(trainer.world_size) if trainer is not None else 1,
                rank=int(trainer.global_rank) if trainer is not None else 0,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating an iterator draws a seed, which would otherwise come from the
            # global generator that dropout uses, and shift a resumed fit's masks by one draw an epoch
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _samples_done(self) -> int:
        """Samples of the current epoch's order already trained on: nonzero only when a fit resumes mid-epoch.

        Lightning restores how many batches of the interrupted epoch each rank had done; the ranks
        together did ``world_size`` times as many, and the sampler shards the order after them.
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
