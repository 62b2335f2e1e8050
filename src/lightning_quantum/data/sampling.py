"""A shuffling sampler whose order depends only on the seed and the epoch, sharded across ranks itself."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

__all__ = ["EpochSeededSampler"]


class EpochSeededSampler(DistributedSampler):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only, sharded across ranks.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees exactly the batches the uninterrupted run saw, with no RNG state to restore. A checkpoint
    written mid-epoch (an interrupt, a step-based ``ModelCheckpoint``) resumes mid-epoch:
    ``samples_done`` tells how many samples of this epoch's order the ranks together already trained
    on, and the order starts after them.

    Under DDP it shards the epoch's order as ``DistributedSampler`` does (rank ``r`` of ``n`` takes
    every ``n``-th sample from ``r``; the order is padded with its first samples to a multiple of
    ``n``). It is a ``DistributedSampler`` so that Lightning uses it as it is rather than wrapping it:
    the wrapper sized its shards by ``len(sampler)`` and indexed past the end of a resumed epoch.

    Args:
        data: the dataset (only its length is used).
        seed: the seed of every epoch's order.
        samples_done: called at each ``iter``; the samples of the epoch to skip, all ranks together
            (0 outside a resume).
        num_replicas: the number of ranks sharing the data.
        rank: this process's rank, in ``[0, num_replicas)``.

    Raises:
        ValueError: for ``num_replicas`` < 1 or a ``rank`` outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        data: Sized,
        seed: int,
        samples_done: Callable[[], int] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        # DistributedSampler.__init__ is not called: it would ask torch.distributed for the world size.
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"`num_replicas`={num_replicas!r} is not valid. It must be an integer >= 1.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank`={rank!r} is not valid. It must be an integer in [0, {num_replicas}).")
        self.dataset = data  # type: ignore[assignment]
        self.size = len(data)
        self.seed = seed
        self.samples_done = samples_done
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False
        self.num_samples = math.ceil(self.size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """This epoch's order of all samples, padded to a multiple of ``num_replicas``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return order + order[: self.total_size - self.size]

    def __iter__(self) -> Iterator[int]:
        skip = self.samples_done() if self.samples_done is not None else 0
        return iter(self.epoch_order()[skip + self.rank :: self.num_replicas])

    def __len__(self) -> int:
        """This rank's samples in a whole epoch (a resumed epoch yields fewer: Lightning counts the rest as done)."""
        return self.num_samples
