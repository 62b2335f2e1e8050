"""Pruning masks for weights sharded by FSDP2 (``DTensor``), computed without gathering a weight.

Under FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``) a weight is a ``DTensor``
whose rows are split over the ranks. Each rank scores its own rows; the ranks then agree on the
threshold that removes exactly the number of weights (or rows) a single process would remove, by
bisection over the scores' float32 bit patterns (which order as the non-negative values do), each
step one ``all_reduce`` of a count. Every rank keeps the mask of its own shard only, as a ``DTensor``
placed like the weight; no rank ever holds a whole weight or a whole mask.

The weights removed are the single-process choice: the ``n`` smallest scores among those still kept.
Equal scores at the threshold (rare with float weights) are broken by rank, then position, where a
single process breaks them by its selection algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["is_sharded", "local_parts", "shard_like", "sharded_keep_mask"]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a weight FSDP2 sharded)."""
    return isinstance(tensor, DTensor)


def shard_like(local: Tensor, like: DTensor) -> DTensor:
    """``local`` (this rank's part) as a ``DTensor`` placed as ``like`` is."""
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _global_sum(value: int, group: Any, device: torch.device) -> int:
    """``value`` summed over the ranks (on the scores' device: NCCL reduces CUDA tensors only)."""
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def sharded_keep_mask(scores: Tensor, n_prune: int, previous: Tensor | None, group: Any) -> Tensor:
    """This rank's keep-mask (shaped as its ``scores``) removing ``n_prune`` entries over all ranks.

    Args:
        scores: this rank's non-negative scores (magnitudes, or row norms).
        n_prune: how many entries to remove in all, over every rank's scores (those ``previous``
            removed count toward it, and stay removed).
        previous: this rank's earlier keep-mask, or ``None``.
        group: the process group of the shards.
    """
    device = scores.device
    keep = torch.ones_like(scores, dtype=torch.bool) if previous is None else previous.to(device).clone()
    n_new = n_prune - _global_sum(int((~keep).sum()), group, device)
    if n_new <= 0:
        return keep
    flat_keep = keep.view(-1)
    kept_at = torch.nonzero(flat_keep).flatten()
    bits = scores.detach().float().contiguous().view(-1).view(torch.int32)[kept_at].cpu().to(torch.int64)
    low, high = 0, int(torch.tensor(float("inf")).view(torch.int32))
    while low < high:  # the smallest threshold t with at least n_new kept scores <= t, over all ranks
        middle = (low + high) // 2
        if _global_sum(int((bits <= middle).sum()), group, device) >= n_new:
            high = middle
        else:
            low = middle + 1
    below = bits < low
    ties = torch.nonzero(bits == low).flatten()
    wanted = n_new - _global_sum(int(below.sum()), group, device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([ties.numel()], dtype=torch.int64, device=device), group=group)
    earlier = sum(int(c) for c in counts[: dist.get_rank(group)])  # ties go to the lower ranks first
    take = max(0, min(ties.numel(), wanted - earlier))
    remove = torch.cat([torch.nonzero(below).flatten(), ties[:take]])
    flat_keep[kept_at[remove.to(kept_at.device)]] = False
    return keep


def local_parts(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each mask's part on this rank (a plain mask is its own part)."""
    return {name: m.to_local() if isinstance(m, DTensor) else m for name, m in masks.items()}
