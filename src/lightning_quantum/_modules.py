"""Helpers on ``nn.Module`` that the measuring, distillation and training code share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


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
