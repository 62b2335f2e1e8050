"""Compiling a finished model for inference: ``torch.compile`` with Inductor's freezing, one cache per model.

A neutral home: the measuring, deployment, report and quantization modules all compile models.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import platform
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quantum._modules import module_device

# Imported inside the functions that use them: torch._inductor (Inductor's import takes ~2 s).

__all__ = ["FrozenInference", "compile_for_inference"]

_COMPILED = itertools.count()

#: Inductor's ``realize_opcount_threshold`` for the models compiled here (its default: 30). A pointwise result read
#: by several kernels is recomputed in each unless its computation has more operations than this. In a transformer
#: compiled with int8 activations, the feed-forward layer's GELU (with the dequantization before it) is read by
#: the per-token absolute maximum and then by the quantization, so with the default every element's ``erf`` ran
#: twice: the all-MiniLM-L6-v2 student's int8 form spent a third of its time in that one kernel. At 20 Inductor
#: keeps the GELU's result instead: the int8 student ran 0.78-0.84x the time at batch 32 (0.81-0.85x at 18 and
#: 22, 0.88x at 16; the same outputs to the last bit), its bf16 form 0.95x; the DigitsMLP's forms, MiniLM's
#: float form and the causal LM's compiled decoding did not change (session 33, 2-core Xeon). CPU models only.
REALIZE_OPCOUNT_THRESHOLD = 20


def _caller(model: nn.Module) -> Callable[..., Any]:
    def call_model(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    return call_model


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own (a new name), so Dynamo keeps a separate cache for it."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)  # type: ignore[attr-defined]


def _load_marker(library: str) -> Path:
    """The file that says ``library`` loaded in a child process of this host, this Python and this torch."""
    who = f"{platform.node()}|{sys.executable}|{torch.__version__}|{os.path.dirname(torch.__file__)}"
    return Path(f"{library}.loads-{hashlib.sha256(who.encode()).hexdigest()[:16]}")


def _remembering(probe_load: Callable[[Any, str], bool]) -> Callable[[Any, str], bool]:
    """``probe_load(isa, library)``, skipped for a library whose load passed before (:func:`_load_marker`)."""

    def probe(isa: Any, library: str) -> bool:
        marker = _load_marker(library)
        try:
            if marker.stat().st_mtime >= os.stat(library).st_mtime:
                return True
        except OSError:  # no marker yet (or no library: the probe says so)
            pass
        loads = bool(probe_load(isa, library))
        if loads:
            try:
                marker.touch()
            except OSError:  # a read-only cache: checked again next time
                pass
        return loads

    return probe


_ISA_LOCK = threading.Lock()


@functools.cache
def _check_cpu_isa() -> None:
    """Inductor's check of the CPU's instruction sets, with the probes that passed remembered on disk.

    Before its first CPU compile in a process, Inductor checks each instruction set the CPU reports: it
    builds a tiny library with the set's flags (kept in its cache directory, built once per machine) and
    loads it in a child process (``VecISA._probe_load``), every process again. On the 2-core AMX Xeon that
    is ten children and 1.4 s of every process that compiles (0.14 s each: the library loads libtorch).
    Whether one library file loads does not change from one process to the next, so a load that passed
    leaves a marker beside the library, named for this host, Python and torch (:func:`_load_marker`), and
    is not tried again while the marker is newer than the library. A failed load is not remembered; the
    flags the CPU reports are still read in each process. Without ``VecISA._probe_load`` (another torch)
    Inductor checks as it does.
    """
    from torch._inductor import cpu_vec_isa

    with _ISA_LOCK:  # two threads' first compiles (a service's workers) patch and restore the class once
        original = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
        if original is None:
            cpu_vec_isa.pick_vec_isa()
            return
        cpu_vec_isa.VecISA._probe_load = _remembering(original)  # type: ignore[method-assign,assignment]
        try:
            cpu_vec_isa.pick_vec_isa()  # each instruction set's answer is then cached for the process
        finally:
            cpu_vec_isa.VecISA._probe_load = original  # type: ignore[method-assign]


class FrozenInference(nn.Module):
    """A model compiled for inference, run with Inductor's freezing on.

    Returned by :func:`compile_for_inference`; it holds the model (so ``state_dict`` and ``.to`` work
    as usual) and calls the compiled version under ``torch._inductor.config.patch(freezing=True, ...)``
    (on the CPU with :data:`REALIZE_OPCOUNT_THRESHOLD`), which leaves the process-wide Inductor settings alone.

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

        settings: dict[str, Any] = {"freezing": self.freezing}
        if module_device(self.model).type == "cpu":  # measured on CPUs only: CUDA keeps Inductor's default
            _check_cpu_isa()
            settings["realize_opcount_threshold"] = REALIZE_OPCOUNT_THRESHOLD
        with inductor_config.patch(**settings):
            return self._compiled(*args, **kwargs)  # type: ignore[operator]


def compile_for_inference(model: nn.Module, *, freezing: bool = True) -> nn.Module:
    """``torch.compile`` for inference, with Inductor's freezing on by default.

    Freezing treats the weights as constants, which lets Inductor fold the quantization arithmetic
    and prepack int8 weights for oneDNN on CPU: on all-MiniLM-L6-v2 with torchao dynamic int8 it took
    batch-32 latency from about 0.6x to about 0.2x of fp32 eager on this project's 2-core CPU
    (``benchmarks/quantization.py``). Frozen weights cannot be trained: use it on a finished model.
    (``torch.compile(options={"freezing": True})`` did not give the same speed here.)

    Two more settings, both for the CPU: a pointwise result that two kernels read is kept rather than
    computed twice from a lower operation count (:data:`REALIZE_OPCOUNT_THRESHOLD`), and Inductor's check of
    the CPU's instruction sets remembers the probes that passed (:func:`_check_cpu_isa`).
    """
    return FrozenInference(model, freezing=freezing)
