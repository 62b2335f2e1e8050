"""Activation checkpointing as pure functions: wrap blocks to recompute activations in backward.

Hugging Face models get ``gradient_checkpointing_enable(use_reentrant=False)``. Plain modules get
their blocks swapped for ``torch``'s non-reentrant ``CheckpointWrapper`` (the wrapper Lightning's
FSDP strategy uses); the wrapper keeps ``state_dict`` keys unchanged, so checkpoints written while
it is on load into the bare model and back. Nothing patches ``forward``.

Which blocks: ``block_types`` (classes, or class names matched against the model's own modules, so
no config string ever imports code), else the ``activation_checkpoint_blocks`` attribute a net
declares (the reference nets in :mod:`lightning_quantum.models` do), else the Hugging Face switch.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> enable_activation_checkpointing(net, ["Linear"])
    ['0', '2']
    >>> disable_activation_checkpointing(net)
    2
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from lightning_quantum._modules import replace_module

log = logging.getLogger(__name__)

__all__ = ["enable_activation_checkpointing", "disable_activation_checkpointing", "BlockTypes"]

BlockTypes = Sequence[type[nn.Module] | str]


def _is_hf_model(module: nn.Module) -> bool:
    return bool(getattr(module, "supports_gradient_checkpointing", False)) and hasattr(
        module, "gradient_checkpointing_enable"
    )


def _declared_blocks(model: nn.Module) -> tuple[type[nn.Module], ...]:
    declared: list[type[nn.Module]] = []
    for module in model.modules():
        declared.extend(getattr(type(module), "activation_checkpoint_blocks", ()))
    return tuple(dict.fromkeys(declared))


def _matches(module: nn.Module, block_types: BlockTypes) -> bool:
    for block in block_types:
        if isinstance(block, str):
            if type(module).__name__ == block or f"{type(module).__module__}.{type(module).__qualname__}" == block:
                return True
        elif isinstance(module, block):
            return True
    return False


def enable_activation_checkpointing(model: nn.Module, block_types: BlockTypes | None = None) -> list[str]:
    """Turn on activation checkpointing; return the names of the blocks (or HF models) it covers.

    Safe to call twice: blocks already wrapped are left as they are.

    Args:
        model: the model to change in place.
        block_types: which blocks to wrap, as classes or class names (``"MLPBlock"`` or the dotted
            ``"pkg.module.MLPBlock"``). When ``None``, use the blocks the model declares, then any
            Hugging Face model inside.

    Raises:
        ValueError: when nothing in the model matches, with the module types that were searched.
    """
    if block_types is not None and len(block_types) == 0:
        raise ValueError("`block_types`=[] names no block: give class names, or None to use the model's own.")
    if block_types is None:
        hf_models = [(name, m) for name, m in model.named_modules() if _is_hf_model(m)]
        if hf_models:
            for _, hf_model in hf_models:
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return [name or type(m).__name__ for name, m in hf_models]
        block_types = _declared_blocks(model)
        if not block_types:
            types = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"`block_types`=None, but {type(model).__name__} declares no `activation_checkpoint_blocks` and "
                f"holds no Hugging Face model. Name the blocks to wrap; the model has these module types: {types}."
            )
    already = {name for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)}
    targets: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, CheckpointWrapper) or not _matches(module, block_types):
            continue
        if any(name == w or name.startswith(w + ".") for w in already) or any(
            name.startswith(t + ".") for t in targets
        ):
            continue  # inside a block that is (or will be) wrapped already
        targets.append(name)
    if not targets and not already:
        types = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"`block_types`={[getattr(b, '__name__', b) for b in block_types]} matches no module of "
            f"{type(model).__name__}. Its module types are: {types}."
        )
    for name in targets:
        replace_module(
            model, name, checkpoint_wrapper(model.get_submodule(name), checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        )
    log.debug("Activation checkpointing wraps %d blocks: %s", len(targets), targets)
    return sorted(already | set(targets))


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_activation_checkpointing`; return how many blocks or HF models it restored."""
    restored = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, CheckpointWrapper):
            replace_module(model, name, module._checkpoint_wrapped_module)
            restored += 1
    for module in model.modules():
        if _is_hf_model(module) and getattr(module, "is_gradient_checkpointing", False):
            module.gradient_checkpointing_disable()  # type: ignore[operator]
            restored += 1
    return restored
