"""Helpers on ``nn.Module`` that the measuring, pruning, quantization and training code share."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "drop_unused_tensors",
    "eval_mode",
    "held_modules",
    "meta_copy",
    "module_device",
    "owner_of",
    "replace_module",
    "select_parameters",
]


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (or buffers) live; the CPU for a module without tensors."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds the dotted ``name`` (a submodule, parameter or buffer) and its attribute name
    there: ``owner_of(net, "encoder.0.weight")`` is ``(net.encoder[0], "weight")``."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers that no ``get_attr`` node reads, in ``graph_module``'s graph or in
    the graphs it holds (a ``torch.cond`` branch), directly or through the submodule they belong to."""
    used: set[str] = set()
    for prefix, sub in graph_module.named_modules():
        if isinstance(sub, torch.fx.GraphModule):
            targets = (str(node.target) for node in sub.graph.find_nodes(op="get_attr"))
            used.update(f"{prefix}.{target}" if prefix else target for target in targets)
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        parts = name.split(".")
        if not any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
            delattr(*owner_of(graph_module, name))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule called ``name`` (dotted) in ``model``; return the old one."""
    parent, attr = owner_of(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def held_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The modules ``module`` holds as plain attributes, outside its module tree (a distillation teacher,
    set with ``object.__setattr__`` so that it stays out of the state dict and the optimizer)."""
    return {k: v for k, v in vars(module).items() if isinstance(v, nn.Module) and k not in module._modules}


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers (and those of the modules it holds
    outside its tree, see :func:`held_modules`) are on the meta device: no memory, no values. The
    ``Trainer`` it may hold stays behind; ``to_empty`` and ``load_state_dict`` make it whole.

    Each tensor is replaced before it is copied, so a large model is never copied in memory.
    """
    memo: dict[int, Any] = {}
    for part in (module, *held_modules(module).values()):
        for tensor in itertools.chain(part.parameters(), part.buffers()):
            meta = tensor.detach().to("meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    trainer = module.__dict__.get("_trainer")
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode, then give every submodule back the mode it had.

    ``module.train(was_training)`` would not: it sets every submodule to the top-level flag, so a
    model kept partly in eval mode (a frozen backbone, a Hugging Face model loaded with ``.eval()``)
    would come back with dropout switched on.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def select_parameters(
    model: nn.Module,
    module_types: Sequence[str] = ("Linear", "Conv1d", "Conv2d", "Conv3d"),
    names: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    parameter_name: str = "weight",
    purpose: str = "prune",
) -> dict[str, nn.Module]:
    """The modules whose ``parameter_name`` will be pruned (or quantized), by qualified module name.

    Args:
        model: the model to search.
        module_types: class names of the modules to prune.
        names: ``fnmatch`` patterns on module names; every module type when ``None``.
        ignore: ``fnmatch`` patterns of module names to leave alone (the classifier head, say).
        parameter_name: the parameter of each module to prune.
        purpose: the word the error uses for what is done ("prune", "quantize").

    Raises:
        ValueError: when a pattern (of ``names`` or ``ignore``) matches nothing, or nothing is left
            to prune, with what was searched.
    """
    candidates = {
        name: m
        for name, m in model.named_modules()
        if name and type(m).__name__ in set(module_types) and isinstance(getattr(m, parameter_name, None), Tensor)
    }
    all_names = [name for name, _ in model.named_modules() if name]
    for label, patterns in (("names", names or ()), ("ignore", ignore)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
                raise ValueError(
                    f"`{label}` pattern {pattern!r} matches no module of {type(model).__name__}. "
                    f"Module names: {all_names[:40]}{' ...' if len(all_names) > 40 else ''}"
                )
    selected = {
        name: m
        for name, m in candidates.items()
        if (names is None or any(fnmatch.fnmatchcase(name, p) for p in names))
        and not any(fnmatch.fnmatchcase(name, p) for p in ignore)
    }
    if not selected:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"Nothing to {purpose} in {type(model).__name__}: no module of `module_types`={list(module_types)} with a "
            f"`{parameter_name}` is left after `names`={names} and `ignore`={list(ignore)}. Module types present: "
            f"{found}."
        )
    return selected
