"""A shuffling sampler whose order depends only on the seed and the epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSeededSampler"]


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees exactly the batches the uninterrupted run saw, with no RNG state to restore. A checkpoint
    written mid-epoch (``OnExceptionCheckpoint``, a step-based ``ModelCheckpoint``) resumes mid-epoch:
    ``samples_done`` tells how many samples of this epoch's order the run already trained on, and the
    order starts after them.

    Args:
        data: the dataset (only its length is used).
        seed: the seed of every epoch's order.
        samples_done: called at each ``iter``; the samples of the epoch to skip (0 outside a resume).
    """

    def __init__(self, data: Sized, seed: int, samples_done: Callable[[], int] | None = None) -> None:
        self.size = len(data)
        self.seed = seed
        self.samples_done = samples_done
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        skip = self.samples_done() if self.samples_done is not None else 0
        return iter(torch.randperm(self.size, generator=generator).tolist()[skip:])

    def __len__(self) -> int:
        return self.size
