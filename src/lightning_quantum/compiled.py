"""Compiling a finished model for inference: ``torch.compile`` with Inductor's freezing, one cache per model.

A neutral home: the measuring, deployment, report and quantization modules all compile models.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import platform
import statistics
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quantum._batches import _call
from lightning_quantum._modules import module_device
from lightning_quantum._tensors import int8_activation_weights, int8_linears

# Imported inside the functions that use them: torch._inductor (Inductor's import takes ~2 s).

__all__ = ["FrozenInference", "compile_for_inference", "freezing_pays", "int8_products_saturate"]

log = logging.getLogger(__name__)

_COMPILED = itertools.count()

# Compiling a torchao int8 model without freezing (see `freezing_pays`), torch's AOT autograd cache warns once per
# process that `Int8Tensor` has no `_stable_hash_for_caching` and leaves that stage uncached; Inductor's FX graph
# cache, which holds the generated code, still caches the graph. Nothing a user of this package can act on.
warnings.filterwarnings(
    "ignore", message=r"Int8Tensor does not implement _stable_hash_for_caching", category=UserWarning
)

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


@functools.cache
def int8_products_saturate() -> bool:
    """Whether oneDNN's int8 linear (``onednn.qlinear_pointwise``) saturates on this CPU, as measured once a process.

    On x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) oneDNN multiplies unsigned 8-bit activations by
    signed 8-bit weights with ``vpmaddubsw``, which adds pairs of products into a signed 16-bit lane and saturates
    there (255 x 127 x 2 > 32767); oneDNN and torchao's ``X86InductorQuantizer`` document it and advise 7-bit
    activations on such CPUs. Inductor's freezing compiles torchao's dynamic int8 linears (activations quantized
    per token over the full unsigned range) to that kernel, so on a 2-core AMD EPYC (Zen 3, AVX2) a compiled int8
    MLP was 0.17 from its eager outputs where the eager int8 model was 0.01 from the float one (session 37).
    The probe: activations of 255 times weights of 127 over 64 features, which is exact only without saturation.
    False where this torch has no oneDNN int8 linear (then nothing compiles to it).
    """
    try:
        prepack = torch.ops.onednn.qlinear_prepack
        qlinear = torch.ops.onednn.qlinear_pointwise.tensor
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    w = torch.full((1, 64), 127, dtype=torch.int8)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        args = (x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), prepack(w, [1, 64]), torch.ones(1), zero)
        out = qlinear(*args, None, 1.0, 0, torch.float32, "none", [None], "")
    return float(out.item()) != 255.0 * 127 * 64


def _saturating_int8(model: nn.Module) -> list[str]:
    """The weights of ``model`` whose int8 products would saturate if compiled with freezing on this CPU."""
    if module_device(model).type != "cpu":
        return []
    names = int8_activation_weights(model)
    return names if names and int8_products_saturate() else []


def _int8_linear_shapes(model: nn.Module, inputs: Any) -> dict[tuple[int, int, int], int]:
    """``{(M, K, N): count}`` of the int8 linears (torchao ``Int8Tensor`` weights) one call of ``model`` runs on
    ``inputs``: M rows of K features into N outputs."""
    shapes: dict[tuple[int, int, int], int] = {}

    def record(module: nn.Linear, args: tuple[Any, ...]) -> None:
        x = args[0]
        key = (x.numel() // x.shape[-1] if x.dim() else 0, module.in_features, module.out_features)
        shapes[key] = shapes.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(record) for m in int8_linears(model)]
    try:
        with torch.inference_mode():
            _call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _int8_kernel_times(
    shapes: dict[tuple[int, int, int], int], prepack: Any, qlinear: Any, repeats: int
) -> tuple[float, float]:
    """Microseconds per model call of its int8 linears (``shapes``, see :func:`_int8_linear_shapes`) in oneDNN's
    ``qlinear`` with prepacked weights and in ``torch._int_mm``, timed on int8 data of those shapes (the values
    do not change an int8 kernel's time)."""

    def median_us(fn: Callable[[], Any]) -> float:  # as `benchmark.time_calls_ms`, which imports this module
        fn()  # untimed: oneDNN creates its primitive on the first call
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e6)
        return statistics.median(times)

    prepacked = unpacked = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for (rows, k, n), count in shapes.items():
            x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
            packed, w_t = prepack(w, [rows, k]), w.t()
            scale, zero = torch.ones(n), torch.zeros(n, dtype=torch.long)
            x_scale, x_zero = torch.tensor(0.02), torch.tensor(0, dtype=torch.int32)
            args = (x, x_scale, x_zero, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [None], "")
            prepacked += count * median_us(functools.partial(qlinear, *args))
            unpacked += count * median_us(functools.partial(torch._int_mm, x, w_t))
    return prepacked, unpacked


_SATURATES = "this CPU has no VNNI, so oneDNN's int8 linear, which freezing compiles them to, saturates"


def freezing_pays(model: nn.Module, inputs: Any, *, repeats: int = 15) -> tuple[bool, str]:
    """Whether ``model`` should be compiled with Inductor's freezing, as measured here, and why.

    Freezing is what lets Inductor prepack int8 weights for oneDNN: on the CPU it compiles each int8 linear
    (torchao ``Int8Tensor``) to oneDNN's ``qlinear`` with a prepacked weight; without freezing, to
    ``torch._int_mm``. Which is faster depends on the shapes: on the 2-core Xeon the prepacked kernel ran the
    all-MiniLM-L6-v2 student's linears (2048 x 384 x 1536 at batch 32) 1.2-1.9x faster, the DigitsMLP's
    (256 x 512 x 10 at batch 256) up to 4x slower, and the DigitsMLP compiled ran 0.70 ms frozen against
    0.46-0.58 ms not. So the two kernels are timed at the shapes of the model's int8 linears in one call on
    ``inputs`` (milliseconds for the DigitsMLP, 0.2-0.6 s for the MiniLM encoder at batch 32), and freezing is
    kept unless ``_int_mm`` is faster in sum. The kernels stand for the compiled forms (the quantization of the
    activations around them is fused either way). A model without int8 linears, off the CPU or without
    oneDNN's int8 operators keeps freezing, as :func:`compile_for_inference` does by default; int8 linears with
    int8 activations on a CPU where that kernel saturates (:func:`int8_products_saturate`) never do. (Compiled without
    freezing, a model of an architecture compiled before also skips Inductor's code generation: its FX graph
    cache refuses frozen graphs that hold prepacked weights.)

    Returns:
        ``(freezing, reason)``.
    """
    if module_device(model).type != "cpu" or not torch.backends.mkldnn.is_available():
        return True, "freezing: not a CPU model with oneDNN"
    if _saturating_int8(model):
        return False, f"compiled without freezing: {_SATURATES}"
    try:
        prepack = torch.ops.onednn.qlinear_prepack
        qlinear = torch.ops.onednn.qlinear_pointwise.tensor
    except (AttributeError, RuntimeError):
        return True, "freezing: this torch has no oneDNN int8 linear"
    shapes = _int8_linear_shapes(model, inputs)
    if not shapes:
        return True, "freezing: no int8 linears"
    prepacked, unpacked = _int8_kernel_times(shapes, prepack, qlinear, repeats)
    figures = f"its int8 linears took {prepacked:.0f} us in oneDNN's prepacked kernels, {unpacked:.0f} us in `_int_mm`"
    if unpacked < prepacked:
        return False, f"compiled without freezing: {figures}"
    return True, f"compiled with freezing: {figures}"


class FrozenInference(nn.Module):
    """A model compiled for inference, run with Inductor's freezing on.

    Returned by :func:`compile_for_inference`; it holds the model (so ``state_dict`` and ``.to`` work
    as usual) and calls the compiled version under ``torch._inductor.config.patch(freezing=True, ...)``
    (on the CPU with :data:`REALIZE_OPCOUNT_THRESHOLD`), which leaves the process-wide Inductor settings alone.

    Freezing stays off for a CPU model with int8 activations where oneDNN's int8 linear saturates
    (:func:`int8_products_saturate`): compiled without it, the int8 linears run ``torch._int_mm``, which is exact.

    Each instance compiles a function with a code object of its own. Dynamo keeps compiled code per
    code object, at most ``recompile_limit`` (8) entries: ``torch.compile(model)`` on a ninth model of
    the same class in one process (a service worker, a benchmark, a notebook) silently ran eagerly.
    With its own code object, a compiled model also takes its compiled code with it when it goes.
    """

    def __init__(self, model: nn.Module, freezing: bool = True) -> None:
        super().__init__()
        self.model = model
        saturating = _saturating_int8(model) if freezing else []
        if saturating:
            log.info("Compiling without freezing (%s, for example %s)", _SATURATES, saturating[0])
        self.freezing = freezing and not saturating
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
