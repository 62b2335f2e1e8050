"""Measure a model: serialized size, latency, throughput, memory, accuracy and sparsity.

Everything here is measured, nothing is estimated. Report rendering lives in
:mod:`lightning_quantum.report`; this module only measures.

Example:
    >>> import torch
    >>> from lightning_quantum.benchmark import benchmark_model
    >>> net = torch.nn.Linear(64, 10)
    >>> m = benchmark_model(net, torch.randn(32, 64), warmup=1, repeats=3)
    >>> m.model_size_bytes > 64 * 10 * 4
    True
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import save
from torch import Tensor, nn

from lightning_quantum._batches import (
    _call,
    _gather_inputs,
    _leading_dim,
    _rebatch,
    _to_device,
    batch_indices,
    split_batch,
)
from lightning_quantum._modules import eval_mode, module_device
from lightning_quantum._tensors import dense_values, plain_tensors
from lightning_quantum._validation import check_non_negative, check_positive
from lightning_quantum.compiled import FrozenInference
from lightning_quantum.onnx_runtime import OnnxRuntimeModule
from lightning_quantum.precision import AUTOCAST_DTYPES
from lightning_quantum.quantization.export import safetensors_state

# Imported inside the functions that use them: bitsandbytes (slow to import, and only for 4-bit layers).

log = logging.getLogger(__name__)

__all__ = [
    "OptimizationPerformanceMetrics",
    "benchmark_model",
    "serialized_size_bytes",
    "measure_latency_ms",
    "measure_peak_memory_mb",
    "measure_training_peak_memory_mb",
    "evaluate_accuracy",
    "global_sparsity",
    "time_calls_ms",
    "percentile",
    "split_batch",
    "batch_indices",
    "plain_tensors",
]

_MB = 1024 * 1024
_TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


@dataclass
class OptimizationPerformanceMetrics:
    """What :func:`benchmark_model` measured for one model.

    Attributes:
        model_size_mb: bytes of the serialized weights (safetensors), in MiB.
        model_size_bytes: the same, in bytes.
        num_parameters: parameters of the model (unique tensors).
        inference_latency_ms: median latency of one batch, in milliseconds.
        inference_latency_p95_ms: 95th percentile latency of one batch.
        requests_per_second: samples per second over the timed repetitions.
        memory_consumption_mb: resident bytes of the model's tensors plus the peak working memory of
            one forward pass (CUDA peak allocated, or the CPU peak RSS increase), in MiB.
        accuracy: top-1 accuracy (or the given metric) on the evaluation data; ``None`` without it.
        sparsity: fraction of exact zeros in the weight matrices and kernels (tensors of 2+ dims).
        precision: the precision the model ran under, as a Lightning precision string.
        device: where it ran, for example ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``.
        batch_size: samples in each timed batch.
        num_threads: torch intra-op threads during timing.
        repeats: timed repetitions after warm-up.
    """

    model_size_mb: float
    model_size_bytes: int
    num_parameters: int
    inference_latency_ms: float
    inference_latency_p95_ms: float
    requests_per_second: float
    memory_consumption_mb: float
    accuracy: float | None
    sparsity: float
    precision: str
    device: str
    batch_size: int
    num_threads: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` with linear interpolation, as numpy computes it."""
    if not values:
        raise ValueError("`values` is empty: there is nothing to take a percentile of.")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def serialized_size_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take when saved with safetensors.

    Tensors that share storage (tied weights) are counted once. Quantized torchao weights are
    counted as torchao's safetensors support stores them (the packed values, scales and zero points,
    plus their JSON metadata), bitsandbytes weights as their packed data and quant state: always
    the size of a real file, nothing estimated.
    """
    try:
        tensors, metadata = safetensors_state(module)
    except (ImportError, ValueError, TypeError, AttributeError, IndexError) as error:
        # A tensor subclass torchao's safetensors support does not know (or, torchao 0.18, a quantized
        # weight of the top-level module, whose key has no dot): measure torch.save's file instead.
        log.debug("safetensors cannot store this model (%s); measuring torch.save instead", error)
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    return len(save(tensors, metadata=metadata))


def global_sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros over the floating-point tensors of two or more dims (weights, kernels)."""
    zeros = total = 0
    values: list[Any] = []
    packed: set[str] = set()
    for name, layer in module.named_modules():  # bitsandbytes 4-bit weights: count their dequantized values
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if type(layer).__name__ == "Linear4bit" and state is not None:
            import bitsandbytes.functional as bnb_functional

            values.append(bnb_functional.dequantize_4bit(layer.weight.data, state))
            packed.add(f"{name}.weight" if name else "weight")
    for key, tensor in module.state_dict().items():
        if key in packed or any(key.startswith(p + ".") for p in packed):
            continue
        values.append(tensor)
    for tensor in values:
        if isinstance(tensor, Tensor):
            tensor = dense_values(tensor)  # a quantized weight: count the zeros of the values it stands for
        if isinstance(tensor, Tensor) and tensor.dim() >= 2 and tensor.is_floating_point():
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
    return zeros / total if total else 0.0


def _num_parameters(module: nn.Module) -> int:
    declared = getattr(module, "num_parameters", None)  # a model run elsewhere (ONNX Runtime) says its count
    if isinstance(declared, int) and declared > 0:
        return declared
    return sum(p.numel() for p in module.parameters())


def _resident_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    params = itertools.chain(module.parameters(), module.buffers())
    for tensor in (inner for t in params for inner in plain_tensors(t)):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def _forward_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _threads(num_threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls_ms(
    fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device | None = None
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return each time in ms.

    CUDA is synchronized before and after each timed call, so the times cover the device work.
    """
    check_non_negative("warmup", warmup)
    check_positive("repeats", repeats)
    dev = device if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure_latency_ms(
    model: nn.Module,
    inputs: Any,
    *,
    warmup: int = 10,
    repeats: int = 50,
    precision: str = "32-true",
) -> list[float]:
    """Latency of each of ``repeats`` forward passes on ``inputs`` in eval mode, in ms."""
    device = module_device(model)
    inputs = _to_device(inputs, device, _TRUE_DTYPES.get(precision))
    with eval_mode(model), torch.inference_mode(), _forward_context(precision, device):
        return time_calls_ms(lambda: _call(model, inputs), warmup=warmup, repeats=repeats, device=device)


class _CPUPeakRSS:
    """Peak resident memory of this process while the block runs, above what it held before.

    On Linux the kernel's high-water mark is reset through ``/proc/self/clear_refs`` and read back
    from ``VmHWM``; elsewhere a thread samples ``psutil`` RSS every millisecond.
    """

    def __init__(self) -> None:
        self.peak_increase_bytes = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._sampled_peak = 0
        self._thread: threading.Thread | None = None
        self._kernel = Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _vm_hwm_bytes() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError("VmHWM missing from /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak = max(self._sampled_peak, self._proc.memory_info().rss)
            self._stop.wait(0.001)

    def __enter__(self) -> _CPUPeakRSS:
        self._before = self._proc.memory_info().rss
        if self._kernel:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self._kernel = False
        if not self._kernel:
            self._sampled_peak = self._before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._kernel:
            peak = self._vm_hwm_bytes()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = self._sampled_peak
        self.peak_increase_bytes = max(0, peak - self._before)


def measure_peak_memory_mb(model: nn.Module, inputs: Any, *, precision: str = "32-true") -> float:
    """Resident bytes of the model's tensors plus the peak working memory of one forward pass, in MiB.

    On CUDA the working memory is ``torch.cuda.max_memory_allocated`` above the allocation before
    the pass; on CPU it is the peak RSS increase of the process.
    """
    device = module_device(model)
    inputs = _to_device(inputs, device, _TRUE_DTYPES.get(precision))
    with eval_mode(model), torch.inference_mode(), _forward_context(precision, device):
        working = peak_increase_bytes(lambda: _call(model, inputs), device)
    return (_resident_bytes(model) + working) / _MB


def peak_increase_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """How far memory use rose above its level before ``fn()`` at the peak of the call, in bytes.

    CUDA: ``max_memory_allocated`` above what was allocated before, so the figure leaves out what
    else lives on the device (the model in training, its optimizer state, a baseline copy).
    CPU: the peak RSS increase of the process.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    with _CPUPeakRSS() as rss:
        fn()
    return rss.peak_increase_bytes


def measure_training_peak_memory_mb(model: nn.Module, inputs: Any) -> float:
    """Peak working memory of one forward and backward pass in train mode, in MiB.

    CUDA: peak allocated above what was allocated before. CPU: the peak RSS increase of the
    process. For a CPU figure that follows live tensor memory, run each configuration in a fresh
    process started with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc's default moving threshold keeps
    freed blocks resident, which hides memory that was in fact released.
    """
    device = module_device(model)
    inputs = _to_device(inputs, device)
    model.train()
    return peak_increase_bytes(lambda: _call(model, inputs).float().sum().backward(), device) / _MB


def _top1_correct(outputs: Tensor, targets: Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).sum())


def evaluate_accuracy(
    model: nn.Module,
    data: Iterable[Any],
    *,
    metric: Callable[[Tensor, Tensor], float] | None = None,
    precision: str = "32-true",
    max_batches: int | None = None,
    batch_size: int | None = None,
) -> float:
    """Sample-weighted mean of ``metric`` over ``data`` (top-1 accuracy by default).

    ``metric(outputs, targets)`` returns the mean over the batch; the default counts argmax hits.
    With ``batch_size``, the samples are regrouped into batches of that size, the last one filled up
    with repeats whose outputs are dropped: a compiled model then runs at the one shape it was
    compiled for, instead of compiling again for the loader's batch size and its short last batch.

    Raises:
        ValueError: when ``data`` is empty or its batches carry no targets.
    """
    device = module_device(model)
    total = 0
    score = 0.0
    batches: Iterator[tuple[Any, Tensor | None, int]] = _labelled_batches(data, max_batches)
    if batch_size is not None:
        check_positive("batch_size", batch_size)
        batches = iter(_rebatch(list(batches), batch_size))
    with eval_mode(model), torch.inference_mode(), _forward_context(precision, device):
        for inputs, targets, count in batches:
            outputs = _call(model, _to_device(inputs, device, _TRUE_DTYPES.get(precision)))
            if isinstance(outputs, Tensor) and outputs.shape[0] != count:
                outputs = outputs[:count]  # the fill of a regrouped last batch
            assert targets is not None  # labelled batches, regrouped or not
            targets = targets.to(device)
            score += _top1_correct(outputs, targets) if metric is None else float(metric(outputs, targets)) * count
            total += count
    if total == 0:
        raise ValueError("`eval_data` yielded no samples, so accuracy cannot be measured.")
    return score / total


def _at_timed_batch(model: nn.Module) -> bool:
    """Whether accuracy is measured at the timed batch size: a compiled model runs at the shape it was
    compiled for, and an ONNX Runtime int8 model quantizes its activations with one scale per call, so
    a sample's output depends on the batch it is in (as the deployment gate measured it)."""
    return isinstance(model, (FrozenInference, OnnxRuntimeModule, torch._dynamo.eval_frame.OptimizedModule))


def _labelled_batches(data: Iterable[Any], max_batches: int | None) -> Iterator[tuple[Any, Tensor, int]]:
    for index, batch in enumerate(data):
        if max_batches is not None and index >= max_batches:
            break
        inputs, targets = split_batch(batch)
        if targets is None:
            raise ValueError("The evaluation batches carry no targets, so accuracy cannot be measured.")
        yield inputs, targets, int(targets.shape[0])


def benchmark_model(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    eval_data: Iterable[Any] | None = None,
    batch_size: int = 64,
    num_threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    precision: str = "32-true",
    metric: Callable[[Tensor, Tensor], float] | None = None,
    max_eval_batches: int | None = None,
) -> OptimizationPerformanceMetrics:
    """Measure ``model`` the same way every time, so two models can be compared as ratios.

    Args:
        model: the model to measure; it is put in eval mode during the measurement and restored after.
        example_inputs: one batch of inputs to time. When ``None`` the timed batch is assembled from
            ``eval_data`` to ``batch_size`` samples.
        eval_data: ``(inputs, targets)`` batches for accuracy; optional when ``example_inputs`` is given.
        batch_size: samples per timed batch when the batch is assembled from ``eval_data``.
        num_threads: torch intra-op threads while timing; the current setting when ``None``.
        warmup: untimed forward passes before timing.
        repeats: timed forward passes; latency is their median (p50) and 95th percentile.
        precision: the Lightning precision to run under (``"bf16-mixed"`` runs under autocast).
        metric: ``metric(outputs, targets) -> float`` for the accuracy field; top-1 by default.
        max_eval_batches: stop the accuracy pass after this many batches.

    Raises:
        ValueError: for a non-positive ``batch_size``, ``repeats`` or ``num_threads``, or when neither
            ``example_inputs`` nor ``eval_data`` is given.
    """
    check_positive("batch_size", batch_size)
    check_positive("repeats", repeats)
    check_non_negative("warmup", warmup)
    if num_threads is not None:
        check_positive("num_threads", num_threads)
    if example_inputs is None and eval_data is None:
        raise ValueError("Give `example_inputs` or `eval_data`: there is nothing to time the model on.")
    inputs = example_inputs if example_inputs is not None else _gather_inputs(eval_data, batch_size)  # type: ignore[arg-type]
    timed_batch = _leading_dim(inputs)
    threads = num_threads or torch.get_num_threads()
    device = module_device(model)
    with _threads(threads):
        times = measure_latency_ms(model, inputs, warmup=warmup, repeats=repeats, precision=precision)
        memory = measure_peak_memory_mb(model, inputs, precision=precision)
        labelled = eval_data is not None and split_batch(next(iter(eval_data)))[1] is not None
        accuracy = (
            evaluate_accuracy(
                model,
                eval_data,  # type: ignore[arg-type]
                metric=metric,
                precision=precision,
                max_batches=max_eval_batches,
                batch_size=timed_batch if _at_timed_batch(model) else None,
            )
            if labelled
            else None  # unlabeled data (sentence embeddings, say): no accuracy to measure
        )
    size = serialized_size_bytes(model)
    total_seconds = sum(times) / 1000.0
    return OptimizationPerformanceMetrics(
        model_size_mb=size / _MB,
        model_size_bytes=size,
        num_parameters=_num_parameters(model),
        inference_latency_ms=statistics.median(times),
        inference_latency_p95_ms=percentile(times, 95),
        requests_per_second=timed_batch * len(times) / total_seconds,
        memory_consumption_mb=memory,
        accuracy=accuracy,
        sparsity=global_sparsity(model),
        precision=precision,
        device=_describe_device(device),
        batch_size=timed_batch,
        num_threads=threads,
        repeats=repeats,
    )


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict) and "optimizer" in configured:
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise ValueError(f"`configure_optimizers()` returned {type(configured).__name__}, which holds no optimizer.")


def make_train_step(
    module: nn.Module, batch: Any, *, forward_context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Callable[[], None]:
    """One training step of a LightningModule, outside any Trainer: forward, loss, backward, step.

    The optimizer comes from the module's own ``configure_optimizers``, and ``training_step`` runs
    under ``forward_context`` (autocast for mixed precision). Use it on a copy: it updates weights.
    """
    optimizer = _first_optimizer(module.configure_optimizers())  # type: ignore[operator]
    module.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `self.log` without a Trainer warns on every call
            with forward_context():
                out = module.training_step(batch, 0)  # type: ignore[operator]
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        optimizer.step()

    return step


def compare_train_step_ms(
    steps: dict[str, Callable[[], None]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 4,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median step time of each named step function, timed in alternating rounds so drift hits all alike."""
    check_positive("rounds", rounds)
    per_round = max(1, repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        time_calls_ms(fn, warmup=warmup, repeats=1, device=device)
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name] += time_calls_ms(fn, warmup=0, repeats=per_round, device=device)
    return {name: statistics.median(values) for name, values in times.items()}
