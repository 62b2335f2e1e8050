"""Compiling a finished model for inference: ``torch.compile`` with Inductor's freezing, one cache per model.

A neutral home: the measuring, deployment, report and quantization modules all compile models.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Imported inside the functions that use them: torch._inductor (Inductor's import takes ~2 s).

__all__ = ["FrozenInference", "compile_for_inference"]

_COMPILED = itertools.count()


def _caller(model: nn.Module) -> Callable[..., Any]:
    def call_model(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    return call_model


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own (a new name), so Dynamo keeps a separate cache for it."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)  # type: ignore[attr-defined]


class FrozenInference(nn.Module):
    """A model compiled for inference, run with Inductor's freezing on.

    Returned by :func:`compile_for_inference`; it holds the model (so ``state_dict`` and ``.to`` work
    as usual) and calls the compiled version under ``torch._inductor.config.patch(freezing=True)``,
    which leaves the process-wide Inductor settings alone.

    Each instance compiles a function with a code object of its own. Dynamo keeps compiled code per
    code object, at most ``recompile_limit`` (8) entries: ``torch.compile(model)`` on a ninth model of
    the same class in one process (a service worker, a benchmark, a notebook) silently ran eagerly.
    With its own code object, a compiled model also takes its compiled code with it when it goes.
    """

    def __init__(self, model: nn.Module, freezing: bool = True) -> None:
        super().__init__()
        self.model = model
        self.freezing = freezing
        self.eval()  # for inference: dropout off (a later .train() on this wrapper would switch it back)
        # not a submodule: no duplicate keys
        object.__setattr__(self, "_compiled", torch.compile(_own_code(_caller(model))))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config  # lazy: importing Inductor takes ~2 s, paid at first use

        with inductor_config.patch(freezing=self.freezing):
            return self._compiled(*args, **kwargs)  # type: ignore[operator]


def compile_for_inference(model: nn.Module, *, freezing: bool = True) -> nn.Module:
    """``torch.compile`` for inference, with Inductor's freezing on by default.

    Freezing treats the weights as constants, which lets Inductor fold the quantization arithmetic
    and prepack int8 weights for oneDNN on CPU: on all-MiniLM-L6-v2 with torchao dynamic int8 it took
    batch-32 latency from about 0.6x to about 0.2x of fp32 eager on this project's 2-core CPU
    (``benchmarks/quantization.py``). Frozen weights cannot be trained: use it on a finished model.
    (``torch.compile(options={"freezing": True})`` did not give the same speed here.)
    """
    return FrozenInference(model, freezing=freezing)
