"""FSDP2: shard a model's blocks with ``torch.distributed.fsdp.fully_shard``, as Lightning's
``ModelParallelStrategy`` expects it done in ``configure_model``; and a strategy for data-parallel
sharding alone, registered as ``Trainer(strategy="fsdp2")``.

Each block a net declares (``activation_checkpoint_blocks``: ``MLPBlock``, ``ConvBlock``) becomes
one FSDP unit, so only one block's parameters are gathered at a time; the rest of the net (its head)
is sharded last, as the root unit. Parameters become ``DTensor``s split by rows over the data-parallel
ranks.

What needs the whole model (the report, the deployment gate, the export, QAT's conversion) gets it on
rank zero from :func:`gather_whole`: the sharded weights gathered into a copy of the model's structure,
kept on the meta device from the moment before ``configure_model`` shards it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Generator
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

from lightning_quantum._modules import held_modules, meta_copy

__all__ = ["FSDP2Strategy", "gather_whole", "is_sharded", "shard_blocks"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` sharded ``module`` or one of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def gather_whole(module: nn.Module, structure: nn.Module, is_global_zero: bool) -> nn.Module | None:
    """``module`` whole, on the CPU, on rank zero (``None`` on the others); every rank must call it.

    The ranks gather the full state dicts of ``module`` and of the modules it holds outside its tree
    (a distillation teacher, sharded or not) onto rank zero's CPU, which loads them into a copy of
    ``structure`` (``module`` as it was before sharding, on the meta device, from
    :func:`~lightning_quantum._modules.meta_copy`), and copies from ``module`` the buffers a state dict
    leaves out (non-persistent ones) and its plain attributes (numbers and strings: a module's
    counters). The copy is a plain module: no ``DTensor``, no FSDP unit, so it runs in one process.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    live = {"": module, **held_modules(module)}
    states = {name: get_model_state_dict(part, options=options) for name, part in live.items()}
    if not is_global_zero:
        return None
    whole = copy.deepcopy(structure)
    parts = {"": whole, **held_modules(whole)}
    for part in parts.values():  # every part first: a module's `_apply` may reach the modules it holds
        part.to_empty(device="cpu")
    whole.cpu()  # a LightningModule's `device` follows (`to_empty` leaves it as it was)
    for name, part in parts.items():
        part.load_state_dict(states[name])
        buffers = dict(live[name].named_buffers())
        for key, buffer in part.named_buffers():
            if key not in states[name] and key in buffers:
                buffer.copy_(buffers[key].detach().cpu())
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str)):
            setattr(whole, key, value)
    return whole


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
        self._structure: nn.Module | None = None
        self._whole: tuple[int, nn.Module | None] | None = None

    @override
    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Lightning enters it around ``configure_model``: the last moment the module is whole, so its
        structure is kept here (on the meta device, no memory) for :meth:`whole_module`."""
        module = self._lightning_module
        if module is not None and not is_sharded(module):
            self._structure = meta_copy(module)
        self._whole = None
        with super().model_sharded_context():
            yield

    def whole_module(self) -> nn.Module | None:
        """The LightningModule whole, on the CPU, on rank zero; ``None`` on the other ranks.

        Every rank must call it (the ranks gather the shards). Calls at the same optimizer step
        share one gathered module, so the callbacks that need the whole model at fit end (QAT's
        conversion, then the gate, the report, the export) gather once, and what one does to it
        (QAT converts it) the next one sees, as they would see the one module under DDP. A module
        that ``configure_model`` did not shard is returned as it is.
        """
        module = self.lightning_module
        assert module is not None
        step = int(module.trainer.global_step)
        if self._whole is None or self._whole[0] != step:
            whole: nn.Module | None
            if self._structure is None or not is_sharded(module):
                whole = module if self.is_global_zero else None
            else:
                whole = gather_whole(module, self._structure, self.is_global_zero)
            self._whole = (step, whole)
        return self._whole[1]

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
