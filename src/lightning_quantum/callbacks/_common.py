"""Small helpers the callbacks share."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_quantum.activation_checkpointing import disable_activation_checkpointing
from lightning_quantum.fsdp import FSDP2Strategy, gather_whole, is_sharded
from lightning_quantum.quantization.qat import unprepare_qat

#: The DataModule (or LightningModule) loader each ``eval_split`` reads.
EVAL_LOADERS = {"test": "test_dataloader", "val": "val_dataloader"}


def eval_loader(trainer: pl.Trainer, split: str, who: str) -> Any:
    """The DataModule's (else the LightningModule's) ``test`` or ``val`` loader; ``who`` names the asker."""
    datamodule = getattr(trainer, "datamodule", None)
    source = datamodule if datamodule is not None else trainer.lightning_module
    loader_fn = getattr(source, EVAL_LOADERS[split], None)
    if loader_fn is None:
        raise RuntimeError(
            f"{who} needs a `{EVAL_LOADERS[split]}` on the DataModule or LightningModule (`eval_split`={split!r})."
        )
    return loader_fn()


C = TypeVar("C")


def find_callback(trainer: pl.Trainer, kind: type[C]) -> C | None:
    """The Trainer's first callback of type ``kind``, or ``None``."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)  # type: ignore[attr-defined]


class MeasuresInference:
    """A callback that measures the final model's inference (the ``OptimizationReport``). Others that
    time the model (the ``DeploymentGate``) take its batch size and threads, so that the figures
    agree; they find it by this type, which keeps the arrow from the report to the gate one-way."""

    batch_size: int
    num_threads: int | None


#: Callbacks that need the whole model on rank zero, and how lq-train leaves each out.
_NEEDS_WHOLE_MODEL = {
    "OptimizationReport": "callbacks.report=null",
    "DeploymentGate": "callbacks.deployment=null",
    "ModelExport": "callbacks.export=null",
}


def check_whole_model_available(trainer: pl.Trainer) -> None:
    """Stop at setup, not after the fit, when callbacks that need the whole model on rank zero run under a
    ``ModelParallelStrategy`` other than :class:`~lightning_quantum.FSDP2Strategy`, the one that keeps the
    model's structure to gather it whole; the message names all of them and what to do instead."""
    if not isinstance(trainer.strategy, ModelParallelStrategy) or isinstance(trainer.strategy, FSDP2Strategy):
        return
    found = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ in _NEEDS_WHOLE_MODEL]  # type: ignore[attr-defined]
    settings = " ".join(_NEEDS_WHOLE_MODEL[name] for name in found)
    raise MisconfigurationException(
        f"{', '.join(found)} need the whole model on rank zero, which {type(trainer.strategy).__name__} does not "
        'gather. Use `strategy="fsdp2"` (lightning_quantum.FSDP2Strategy: FSDP2 that gathers the model whole '
        f"on rank zero at fit end), or leave them out (`{settings}` in lq-train)."
    )


def whole_module(trainer: pl.Trainer, structure: nn.Module | None = None) -> nn.Module | None:
    """The LightningModule, whole, on rank zero; every rank must call it.

    Outside FSDP2 it is the module itself (on every rank). Under :class:`~lightning_quantum.FSDP2Strategy`
    it is the sharded weights gathered into a plain copy on rank zero's CPU (``None`` on the other ranks),
    one per optimizer step, shared by the callbacks. Under another ``ModelParallelStrategy``, ``structure``
    (the module on the meta device, taken before it was sharded) is what they are gathered into.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDP2Strategy):
        return strategy.whole_module()
    module = trainer.lightning_module
    if isinstance(strategy, ModelParallelStrategy) and structure is not None and is_sharded(module):
        return gather_whole(module, structure, trainer.is_global_zero)
    return module


def output_dir(trainer: pl.Trainer, configured: str | Path | None) -> Path:
    """``configured``, else the Trainer's log directory; every rank must call it (Lightning broadcasts
    ``log_dir`` from rank zero, a collective under ``ModelParallelStrategy``)."""
    log_dir = trainer.log_dir
    return Path(configured) if configured is not None else Path(log_dir or trainer.default_root_dir)


def is_sanity_checking(trainer: pl.Trainer) -> bool:
    return bool(trainer.sanity_checking)


def is_fast_dev_run(trainer: pl.Trainer) -> bool:
    return bool(getattr(trainer, "fast_dev_run", False))


def detached_copy(module: nn.Module, *, without: tuple[str, ...] = ()) -> nn.Module:
    """A deep copy of ``module`` that leaves the ``Trainer`` (and whatever it holds) behind.

    The attributes named in ``without`` (a distillation teacher, say) are ``None`` in the copy.
    """
    memo: dict[int, Any] = {}
    for name in ("_trainer", *without):
        value = module.__dict__.get(name, getattr(module, name, None))
        if value is not None:
            memo[id(value)] = None
    return copy.deepcopy(module, memo)


def inference_copy(module: nn.Module, *, keep_teacher: bool = False) -> nn.Module:
    """A detached copy for inference: no activation checkpointing wrappers, no QAT fake quantizers, and
    no distillation teacher unless ``keep_teacher``."""
    out = detached_copy(module, without=() if keep_teacher else ("teacher",))
    disable_activation_checkpointing(out)
    unprepare_qat(out)
    return out
