"""Helpers on ``nn.Module`` that the measuring, distillation and training code share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "owner_of", "replace_module"]


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds the dotted ``name`` (a submodule, parameter or buffer) and its attribute name
    there: ``owner_of(net, "encoder.0.weight")`` is ``(net.encoder[0], "weight")``."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule called ``name`` (dotted) in ``model``; return the old one."""
    parent, attr = owner_of(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


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
