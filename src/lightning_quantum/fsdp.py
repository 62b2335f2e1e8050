"""FSDP2: shard a model's blocks with ``torch.distributed.fsdp.fully_shard``, as Lightning's
``ModelParallelStrategy`` expects it done in ``configure_model``.

Each block a net declares (``activation_checkpoint_blocks``: ``MLPBlock``, ``ConvBlock``) becomes
one FSDP unit, so only one block's parameters are gathered at a time; the rest of the net (its head)
is sharded last, as the root unit. Parameters become ``DTensor``s split by rows over the data-parallel
ranks.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

__all__ = ["shard_blocks"]


def shard_blocks(net: nn.Module, mesh: Any) -> int:
    """Shard each declared block of ``net``, then ``net`` itself, over ``mesh``; return the blocks sharded.

    Calling it again on a sharded net does nothing (Lightning calls ``configure_model`` once per fit).
    """
    if isinstance(net, FSDPModule):
        return 0
    block_types = tuple(getattr(type(net), "activation_checkpoint_blocks", ()))
    blocks = [m for m in net.modules() if block_types and isinstance(m, block_types)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return len(blocks)
