"""FSDP2: shard a model's blocks with ``torch.distributed.fsdp.fully_shard``, as Lightning's
``ModelParallelStrategy`` expects it done in ``configure_model``; and a strategy for data-parallel
sharding alone, registered as ``Trainer(strategy="fsdp2")``.

Each block a net declares (``activation_checkpoint_blocks``: ``MLPBlock``, ``ConvBlock``) becomes
one FSDP unit, so only one block's parameters are gathered at a time; the rest of the net (its head)
is sharded last, as the root unit. Parameters become ``DTensor``s split by rows over the data-parallel
ranks.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

__all__ = ["FSDP2Strategy", "shard_blocks"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 alone: every process (on every node) holds one shard of the
    parameters, gradients and optimizer state; no tensor parallelism.

    ``ModelParallelStrategy``'s own defaults (``"auto"``) make the data-parallel size the number of
    nodes and the tensor-parallel size the processes per node, which is tensor parallelism on one
    node. Registered as ``Trainer(strategy="fsdp2")``; ``lq-train trainer=fsdp2`` and
    ``lq.recipe(..., strategy="fsdp2")`` use it. Distributed (sharded) checkpoints by default.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process one shard
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) data parallelism")


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
