"""Choose the inference form to ship, by measuring each candidate on the machine it will run on.

A trained model can run in several forms: as it is (eager), compiled by Inductor with freezing,
with int8 weights and activations (torchao ``Int8Tensor``), in bf16, and combinations of these.
Which one is fastest depends on the machine and the batch size: on a 2-core AVX512 CPU an int8
DigitsMLP is 1.4x *slower* than fp32 in eager mode and 2.7x faster once compiled. So nothing is
assumed: :func:`choose_deployment` builds each candidate form, measures its accuracy (or, without
labels, the cosine of its outputs to the trained model's) and its latency at the requested batch
size, in alternating rounds, and keeps the fastest one within the accuracy budget. Every candidate
and the reason for the choice go into a :class:`DeploymentDecision`, which the report prints.

The forms (``FORMS``) are ``"<numerics> <runner>"``:

- numerics ``float``: plain float32 weights (a quantized model's float form: the weights before
  conversion when given as ``float_model``, else its dequantized weights);
- ``bf16``: the float form cast to bfloat16, taking and returning float32;
- ``int8``: int8 linears (``Int8Tensor``: the model's own after QAT, else torchao dynamic int8 of
  the float form);
- runner ``eager``: called as it is; ``compiled``: :func:`~lightning_quantum.quantization.compile_for_inference`
  (with Inductor's freezing, unless :func:`~lightning_quantum.compiled.freezing_pays` finds the model's int8
  linears faster without it);
  ``onnxruntime``: exported to ONNX and run by ONNX Runtime on the CPU, its int8 being ONNX Runtime's
  own dynamic quantization of the float form (:mod:`~lightning_quantum.onnx_runtime`; only where the
  ``onnx`` extra is installed, else listed as not installed).

:func:`save_deployment` writes the winner as a ``torch.export`` program plus ``deployment.json``;
:func:`load_deployment` reads them back and compiles the program again when the form is compiled.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 10))
    >>> model, decision = choose_deployment(net, example_inputs=torch.randn(8, 64), forms=["float eager"], repeats=3)
    >>> decision.form
    'float eager'
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._batches import _call, _gather_inputs, _leading_dim, _rebatch, _to_device, split_batch
from lightning_quantum._cache import cache_root, write_whole
from lightning_quantum._modules import eval_mode, module_device
from lightning_quantum._tensors import int8_linears, is_quantized
from lightning_quantum._validation import check_finite, check_non_negative, check_positive
from lightning_quantum.benchmark import _sync, _threads, percentile, serialized_size_bytes
from lightning_quantum.compiled import FrozenInference, compile_for_inference, freezing_pays
from lightning_quantum.onnx_runtime import OnnxRuntimeModule, load_onnxruntime, to_onnxruntime
from lightning_quantum.precision import cpuinfo_field
from lightning_quantum.quantization.dynamic import quantize_dynamic_int8
from lightning_quantum.quantization.export import (
    export_program,
    load_program,
    program_module,
    save_program,
    trace_program,
)
from lightning_quantum.quantization.qat import dequantize_linears, is_converted
from lightning_quantum.report import keep_existing, ratio_words

log = logging.getLogger(__name__)

__all__ = [
    "FORMS",
    "CandidateResult",
    "DeploymentDecision",
    "CastInputs",
    "build_form",
    "choose_deployment",
    "default_cache_dir",
    "save_deployment",
    "load_deployment",
]

NUMERICS = ("float", "bf16", "int8")
RUNNERS = ("eager", "compiled", "onnxruntime")
#: Every candidate form, ``"<numerics> <runner>"`` (ONNX Runtime in float32 and int8: its bf16 CPU
#: kernels are few, and the graph falls back op by op).
FORMS = tuple(f"{n} {r}" for n in NUMERICS for r in RUNNERS if (n, r) != ("bf16", "onnxruntime"))
DEPLOYMENT_FILE = "deployment.json"
#: What the forms are built as, in the gate's cache key: raised when a form is built differently, so that
#: measurements cached before are not reused (2: int8 forms of int4 models, once listed as not running;
#: 3: compiled forms built from their exported program; 4: the program's int8 linears compiled to oneDNN's
#: prepacked ``qlinear``, as the eager module's are; 5: int8 compiled forms compiled without freezing where
#: ``_int_mm`` runs their linears faster, see :func:`~lightning_quantum.compiled.freezing_pays`).
FORMS_VERSION = 5
#: A repeated fit rebuilds the fastest float form only when the cached measurement found it within this
#: factor of the winner's p50 (a clear loser is not compiled again just to lose again; float eager, which
#: costs nothing to build, is always measured).
REBUILD_WITHIN = 1.5
#: The least size of a form with these numerics, as a share of the float form's: float forms keep every
#: floating tensor in 4 bytes and bf16 forms in 2 (integer buffers stay), less what a runner's graph never
#: reads. Under a ``max_size_ratio`` below its floor a form is built only when no form within the budget
#: runs faster than float eager (see :func:`choose_deployment`).
SIZE_FLOOR = {"float": 0.9, "bf16": 0.45}


class CastInputs(nn.Module):
    """A model in a low-precision dtype that takes and returns float32 (floating inputs cast in, outputs out)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def cast(x: Any) -> Any:
            return x.to(self.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x

        out = self.model(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
        return out.float() if isinstance(out, Tensor) else out


@dataclass
class CandidateResult:
    """One candidate form as measured: latency at the batch size, quality, build time, size.

    ``measured`` is ``False`` for a form left out because a cached measurement ranked it behind the
    winner (see ``cache_dir`` in :func:`choose_deployment`); its figures are then ``None``. ``freezing`` says
    whether a compiled form was compiled with Inductor's freezing (``None``: not compiled).
    """

    form: str
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    accuracy: float | None = None
    cosine_to_trained: float | None = None
    build_seconds: float = 0.0
    size_bytes: int | None = None
    eligible: bool = False
    note: str = ""
    measured: bool = True
    freezing: bool | None = None


@dataclass
class DeploymentDecision:
    """The form chosen, why, and every candidate's figures.

    ``reference_accuracy`` is the accuracy of the model as trained (its eager form: int8 after QAT,
    float otherwise); a candidate is within budget when it loses at most ``max_accuracy_drop`` from it
    (or, without labels, when its outputs' mean cosine to the trained model's is at least ``min_cosine``).
    ``cached_from`` is the time of the cached measurement whose ranking spared the forms not measured,
    ``None`` when every form was measured. ``max_size_ratio`` is the size budget, as a share of the float
    form's size ``float_size_bytes`` (``None``: no size budget).
    """

    form: str
    reason: str
    trained_form: str
    reference_accuracy: float | None
    max_accuracy_drop: float
    min_cosine: float
    batch_size: int
    device: str
    num_threads: int
    candidates: list[CandidateResult] = field(default_factory=list)
    gate_seconds: float = 0.0
    cached_from: str | None = None
    max_size_ratio: float | None = None
    float_size_bytes: int | None = None

    @property
    def winner(self) -> CandidateResult:
        return next(c for c in self.candidates if c.form == self.form)

    def candidate(self, form: str) -> CandidateResult | None:
        return next((c for c in self.candidates if c.form == form), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int8(model: nn.Module) -> bool:
    return bool(int8_linears(model))


def _has_quantized_weights(model: nn.Module) -> bool:
    return is_converted(model)


def _float_numerics(model: nn.Module, float_model: nn.Module | None) -> nn.Module:
    source = float_model if float_model is not None else model
    if float_model is None and any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        raise ValueError("a static int8 graph has no float weights to go back to: give `float_model`")
    out = copy.deepcopy(source)
    if _has_quantized_weights(out):
        dequantize_linears(out)
    return out


def _int8_numerics(model: nn.Module, float_model: nn.Module | None) -> nn.Module:
    """The model's own int8 linears (after int8 QAT), else torchao dynamic int8 of its float form: of a float
    model, of QAT's float weights, or of an int4 model's dequantized weights; the embedding tables that
    the model holds quantized (int4 QAT's int8 rows) get int8 rows again, the others stay float."""
    if _is_int8(model):
        return copy.deepcopy(model)
    out = _float_numerics(model, float_model)
    tables = {n: is_quantized(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    quantize_dynamic_int8(out, embeddings=any(tables.values()), ignore=[n for n, q in tables.items() if not q])
    return out


def build_form(
    form: str,
    model: nn.Module,
    float_model: nn.Module | None = None,
    example_inputs: Any = None,
    *,
    onnx_exports: dict[str, bytes] | None = None,
) -> nn.Module:
    """Build the candidate ``form`` of ``model`` (a copy: ``model`` is left as it is).

    Args:
        form: one of :data:`FORMS`, or ``trained_form(model)`` (the model as it is).
        model: the trained model (float, or with int8 linears after QAT).
        float_model: its float form, when the model was quantized (QAT's weights before conversion);
            the dequantized weights are used when ``None``.
        example_inputs: one batch to export with; needed by the ``onnxruntime`` forms. A ``compiled`` form
            on the CPU is built from the program exported with it (what ships), else from the module.
        onnx_exports: where the ONNX export of the float form is kept for the next ``onnxruntime``
            form of the same model (the float and int8 forms then export once).

    Raises:
        ValueError: for an unknown form, a float, bf16 or int8 form of a static int8 graph without
            ``float_model``, or an ``onnxruntime`` form without ``example_inputs``.
        ImportError: for an ``onnxruntime`` form without the ``onnx`` extra installed.
    """
    trained = trained_form(model)
    if form in (trained, trained.replace("eager", "compiled")):  # the model as it is, whatever it holds
        numerics, runner = "trained", form.split()[1]
    elif form in FORMS:
        numerics, runner = form.split()
    else:
        raise ValueError(f"`form`={form!r} is not valid. Choose one of: {', '.join(map(repr, FORMS))}.")
    if runner == "onnxruntime":
        if example_inputs is None:
            raise ValueError(f"`example_inputs` is needed for the form {form!r}: ONNX export traces one batch.")
        if onnx_exports is not None and "float" in onnx_exports:  # exported already: no float copy to make
            source = float_model if float_model is not None else model
        else:
            source = _float_numerics(model, float_model).eval()
        example = _to_device(example_inputs, torch.device("cpu"))
        return to_onnxruntime(source, example, int8=numerics == "int8", exports=onnx_exports)
    if numerics == "trained":
        built = copy.deepcopy(model)
    elif numerics == "int8":
        built = _int8_numerics(model, float_model)
    elif numerics == "bf16":
        built = CastInputs(_float_numerics(model, float_model).to(torch.bfloat16), torch.bfloat16)
    else:
        built = _float_numerics(model, float_model)
    built.eval()
    if runner == "compiled":
        if example_inputs is not None and module_device(built).type == "cpu":
            return _compiled_as_shipped(built, example_inputs)
        return compile_for_inference(built)
    return built


def _export_example(example_inputs: Any) -> tuple[Any, ...] | dict[str, Any]:
    """The inputs ``torch.export`` traces with, on the CPU: a dict of keyword inputs, else a tuple."""
    example = _to_device(example_inputs, torch.device("cpu"))
    if isinstance(example, dict):
        return example
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _compiled_as_shipped(built: nn.Module, example_inputs: Any) -> nn.Module:
    """``built`` exported as :func:`save_deployment` writes it and compiled: the gate times and judges the
    program that ships, whose graph (traced by ``torch.export``, batch dimension dynamic) Inductor may compile
    to other kernels than the eager module's (a DigitsMLP's int8 outputs differed in the last bits; before
    :func:`load_program` dropped the program's metadata checks, the MiniLM student's int8 program ran 1.14x
    slower than the module compiled). The module compiled is the one :func:`load_program` makes of the saved
    bytes, made from the program in memory (reading the bytes back cost 0.15 s of a DigitsMLP's first run).
    The program goes with it (``shipped_program``, serialized only by :func:`save_deployment`: 0.1-0.3 s that a
    form that loses does not pay), and the module it came from (``source``, which
    :func:`~lightning_quantum.optimize.save_optimized` saves). It is compiled with Inductor's freezing unless
    :func:`~lightning_quantum.compiled.freezing_pays` finds its int8 linears faster without
    (``freezing_reason`` says which, with the figures)."""
    example = _export_example(example_inputs)
    freezing, why = freezing_pays(built, example)
    program = trace_program(built, example)
    compiled = compile_for_inference(program_module(program, traced_in_eval=True), freezing=freezing)
    object.__setattr__(compiled, "shipped_program", program)  # not a submodule or buffer: no state_dict keys
    object.__setattr__(compiled, "source", built)
    object.__setattr__(compiled, "freezing_reason", why)
    return compiled


def trained_form(model: nn.Module) -> str:
    """The form the model is in as trained: ``"int8 eager"`` with int8 linears, ``"float eager"`` with
    plain float weights, and ``"trained eager"`` for anything else (int4 weights, a static int8 graph)."""
    if _is_int8(model):
        return "int8 eager"
    if _has_quantized_weights(model) or any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        return "trained eager"
    return "float eager"


def _first_tensor(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise ValueError(f"Cannot compare outputs of type {type(outputs).__name__}.")


def _quality(
    module: nn.Module,
    batches: list[tuple[Any, Tensor | None, int]],
    reference_outputs: list[Tensor] | None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
) -> tuple[float | None, float | None, list[Tensor]]:
    """(accuracy, mean cosine of the outputs to ``reference_outputs``, the outputs) over ``batches``.

    Accuracy is top-1, or the sample-weighted mean of ``metric(outputs, targets)`` when given.
    """
    device = module_device(module)
    correct = 0.0
    total = 0
    cosine = 0.0
    outputs: list[Tensor] = []
    labelled = all(targets is not None for _, targets, _ in batches)
    with torch.inference_mode():
        for index, (inputs, targets, count) in enumerate(batches):
            out = _first_tensor(_call(module, _to_device(inputs, device))).float()[:count]  # drop the fill
            outputs.append(out.detach().cpu())
            n = int(out.shape[0])
            total += n
            if labelled and targets is not None:
                if metric is None:
                    correct += float((out.argmax(dim=-1).cpu() == targets.cpu()).sum())
                else:
                    correct += float(metric(out, targets.to(out.device))) * n
            if reference_outputs is not None:
                ref = reference_outputs[index]
                cosine += float(torch.nn.functional.cosine_similarity(out.cpu().flatten(1), ref.flatten(1)).sum())
    accuracy = correct / total if labelled and total else None
    return accuracy, (cosine / total if reference_outputs is not None and total else None), outputs


def choose_deployment(
    model: nn.Module,
    eval_data: Iterable[Any] | None = None,
    *,
    example_inputs: Any = None,
    float_model: nn.Module | None = None,
    forms: Sequence[str] = FORMS,
    batch_size: int = 64,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 3,
    num_threads: int | None = None,
    max_accuracy_drop: float = 0.01,
    min_cosine: float = 0.99,
    max_eval_batches: int | None = None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
    cache_dir: str | Path | None = None,
    max_size_ratio: float | None = None,
    programs: dict[str, torch.export.ExportedProgram] | None = None,
) -> tuple[nn.Module, DeploymentDecision]:
    """Measure every candidate form of ``model`` and return the fastest within the accuracy budget.

    The model as trained (:func:`trained_form`) is always a candidate and sets the reference: every
    other form must keep its accuracy within ``max_accuracy_drop`` (or, on unlabelled data, a mean
    cosine of at least ``min_cosine`` to its outputs). Latency is the p50 of ``repeats`` calls on
    one batch of ``batch_size`` samples, taken in ``rounds`` alternating rounds over the candidates so
    that drift of a shared machine hits them alike; ``build_seconds`` includes compiling (the first
    call). A form that fails to build or run is listed with the error and not chosen.

    With ``max_size_ratio``, size counts too: the winner is the fastest form within the accuracy budget
    whose serialized size is at most that share of the float form's and which runs faster than float
    eager here. Only when no such form exists does the fastest form within the accuracy budget ship
    regardless of size, and the reason says so. Forms whose numerics cannot fit the size budget
    (:data:`SIZE_FLOOR`: float, bf16) are then built only in that case; otherwise they are listed as
    not built, which spares their compiling.

    With ``cache_dir``, the latencies of a full measurement are kept there, keyed by the machine (CPU,
    kernel set, library versions), the model's architecture (module types, tensor shapes and dtypes,
    not the values), the timed inputs' shapes, the threads, the forms and the budget. A later call
    with the same key builds only the forms that can still win: the model as trained, the cached
    winner, float eager, the fastest float form when it came within :data:`REBUILD_WITHIN` of the
    winner, and any form that was faster than the winner but over the budget; the others are listed
    as not rebuilt. Accuracy is always measured anew, and so is the winner's lead over float eager
    (and over the fastest float form when it came close): when another form wins than the cached
    ranking allows, every form is measured again (and the cache updated).

    Args:
        model: the trained model; never modified.
        eval_data: batches as a DataLoader yields them, for quality and the timed batch.
        example_inputs: one batch of inputs to time, when there is no ``eval_data``.
        float_model: the float form of a quantized ``model`` (see :func:`build_form`).
        forms: the candidate forms, from :data:`FORMS`.
        batch_size: samples per timed batch, when it is assembled from ``eval_data``.
        warmup: untimed calls per candidate before its first timed round.
        repeats: timed calls per candidate, over all rounds.
        rounds: alternating timing rounds.
        num_threads: torch threads while timing; the current setting when ``None``.
        max_accuracy_drop: the largest accuracy loss from the model as trained that a form may cause.
        min_cosine: without labels, the smallest mean cosine to the trained model's outputs.
        max_eval_batches: batches of ``eval_data`` for the quality pass; all when ``None``.
        metric: ``metric(outputs, targets) -> float`` for accuracy; top-1 when ``None``.
        cache_dir: where to keep and look up measurements (see above); nothing is cached when ``None``.
        max_size_ratio: the size budget, as a share of the float form's serialized size (e.g. ``0.3``:
            int8 weights); ``None``: the fastest form ships whatever its size.
        programs: when given, receives the ``torch.export`` program of each compiled form built from one (on
            the CPU), by form, as :func:`save_deployment` would write it: a caller that also exports the model
            as trained takes the program of its own numerics' compiled form instead of tracing it again.

    Returns:
        ``(module, decision)``: the winning form, ready to call (compiled forms already compiled), and
        the decision with every candidate.

    Raises:
        ValueError: for an invalid argument (named), or when neither ``eval_data`` nor ``example_inputs``
            is given.
    """
    _check_gate_arguments(forms, batch_size, warmup, repeats, rounds, num_threads, max_accuracy_drop, min_cosine)
    if max_size_ratio is not None:
        check_positive("max_size_ratio", max_size_ratio)
    if max_eval_batches is not None:
        check_positive("max_eval_batches", max_eval_batches)
    if eval_data is None and example_inputs is None:
        raise ValueError("Give `eval_data` or `example_inputs`: there is nothing to time the candidates on.")
    started = time.perf_counter()
    batches: list[tuple[Any, Tensor | None]] = [(example_inputs, None)]
    if eval_data is not None:
        batches = [split_batch(b) for b in itertools.islice(eval_data, max_eval_batches)]
    timed = example_inputs if example_inputs is not None else _gather_inputs(eval_data, batch_size)  # type: ignore[arg-type]
    threads = num_threads or torch.get_num_threads()
    device = module_device(model)
    reference_form = trained_form(model)
    order = [reference_form] + [f for f in forms if f != reference_form]
    if reference_form == "trained eager" and any(f.endswith("compiled") for f in forms):
        order.insert(1, "trained compiled")  # the model as it is, compiled
    gate = _Measurement(
        model, float_model, timed, _rebatch(batches, _leading_dim(timed)), list(dict.fromkeys(order)), metric=metric,
        max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine, warmup=warmup, repeats=repeats, rounds=rounds,
        device=device, threads=threads, started=started, max_size_ratio=max_size_ratio, programs=programs,
    )  # fmt: skip
    cache_file: Path | None = None
    key: dict[str, Any] = {}
    with _threads(threads), eval_mode(model):
        if cache_dir is not None:
            key = _cache_key(model, float_model, timed, gate.order, threads, device, gate.budgets(), metric)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            cache_file = Path(cache_dir) / f"{digest[:24]}.json"
            cached = _read_cache(cache_file, key, gate.order)
            chosen = gate.from_cache(cached) if cached is not None else None
            if chosen is not None:
                return chosen
        results, built = gate.measure_staged()
    winner = gate.choose(results, built)
    decision = gate.decide(results, winner, None)
    if cache_file is not None:
        _write_cache(cache_file, key, decision)
    log.info("deployment: %s", decision.reason)
    return built[winner.form], decision


def _check_gate_arguments(
    forms: Sequence[str],
    batch_size: int,
    warmup: int,
    repeats: int,
    rounds: int,
    num_threads: int | None,
    max_accuracy_drop: float,
    min_cosine: float,
) -> None:
    if isinstance(forms, str) or not forms:
        raise ValueError(f"`forms`={forms!r} is not valid. Give a list of: {', '.join(map(repr, FORMS))}.")
    for form in forms:
        if form not in (*FORMS, "trained eager", "trained compiled"):
            raise ValueError(f"`forms` entry {form!r} is not valid. Choose from: {', '.join(map(repr, FORMS))}.")
    check_positive("batch_size", batch_size)
    check_non_negative("warmup", warmup)
    check_positive("repeats", repeats)
    check_positive("rounds", rounds)
    if num_threads is not None:
        check_positive("num_threads", num_threads)
    check_non_negative("max_accuracy_drop", max_accuracy_drop)
    if not -1.0 <= check_finite("min_cosine", min_cosine) <= 1.0:
        raise ValueError(f"`min_cosine`={min_cosine!r} is not valid. It must lie in [-1, 1].")


class _Measurement:
    """Build, judge and time candidate forms of one model on fixed data, and decide (the body of
    :func:`choose_deployment`)."""

    def __init__(
        self,
        model: nn.Module,
        float_model: nn.Module | None,
        timed: Any,
        chunks: list[tuple[Any, Tensor | None, int]],
        order: list[str],
        *,
        metric: Callable[[Tensor, Tensor], float] | None,
        max_accuracy_drop: float,
        min_cosine: float,
        warmup: int,
        repeats: int,
        rounds: int,
        device: torch.device,
        threads: int,
        started: float,
        max_size_ratio: float | None = None,
        programs: dict[str, torch.export.ExportedProgram] | None = None,
    ) -> None:
        self.model, self.float_model, self.timed, self.chunks, self.metric = model, float_model, timed, chunks, metric
        self.order, self.reference_form = order, order[0]
        self.max_accuracy_drop, self.min_cosine, self.max_size_ratio = max_accuracy_drop, min_cosine, max_size_ratio
        self.warmup, self.repeats, self.rounds, self.device = warmup, repeats, rounds, device
        self.threads, self.started = threads, started
        self.reference_outputs: list[Tensor] | None = None
        self.float_size: int | None = None
        self.onnx_exports: dict[str, bytes] = {}  # the float ONNX export, shared by the onnxruntime forms
        self.programs = programs  # the compiled forms' programs, for the caller (see `choose_deployment`)

    def budgets(self) -> dict[str, float | None]:
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_cosine": self.min_cosine,
            "max_size_ratio": self.max_size_ratio,
        }

    def size_limit(self, results: dict[str, CandidateResult]) -> int | None:
        """The size budget in bytes (``max_size_ratio`` times the float form's size), ``None`` without one."""
        if self.max_size_ratio is None or self.float_size == 0:
            return None
        if self.float_size is None:
            measured = results.get("float eager")
            if measured is not None and measured.size_bytes:
                self.float_size = measured.size_bytes
            else:
                try:
                    self.float_size = serialized_size_bytes(_float_numerics(self.model, self.float_model))
                except ValueError as error:  # a static int8 graph without its float model: no size to go by
                    log.warning("deployment: `max_size_ratio` not applied: %s", error)
                    self.float_size = 0
                    return None
        return _size_limit(self.max_size_ratio, self.float_size)

    def _deferred(self, form: str) -> bool:
        """Whether ``form``'s numerics cannot fit the size budget (never the reference or float eager)."""
        floor = SIZE_FLOOR.get(form.split()[0])
        return (
            self.max_size_ratio is not None
            and floor is not None
            and floor > self.max_size_ratio
            and form not in (self.reference_form, "float eager")
        )

    def choose(self, results: dict[str, CandidateResult], built: dict[str, nn.Module]) -> CandidateResult:
        """The fastest form within the accuracy budget; with a size budget, the fastest within both that runs
        faster than float eager, else (none does) the fastest within the accuracy budget."""
        eligible = [results[f] for f in built if results[f].eligible]
        fastest = min(eligible, key=lambda c: c.latency_p50_ms or float("inf"))
        limit = self.size_limit(results)
        if limit is None:
            return fastest
        yardstick = results.get("float eager")
        bar = yardstick.latency_p50_ms if yardstick is not None and yardstick.latency_p50_ms else float("inf")
        small = [
            c
            for c in eligible
            if c.size_bytes is not None
            and c.size_bytes <= limit
            and (c.form == "float eager" or (c.latency_p50_ms or float("inf")) < bar)
        ]
        return min(small, key=lambda c: c.latency_p50_ms or float("inf")) if small else fastest

    def within_size(self, result: CandidateResult, results: dict[str, CandidateResult]) -> bool:
        limit = self.size_limit(results)
        return limit is None or (result.size_bytes is not None and result.size_bytes <= limit)

    def measure_staged(self) -> tuple[dict[str, CandidateResult], dict[str, nn.Module]]:
        """Every form measured, except those that cannot fit the size budget when a form within it won."""
        first = [f for f in self.order if not self._deferred(f)]
        results, built = self.measure(first)
        if len(first) == len(self.order):
            return results, built
        if self.within_size(self.choose(results, built), results):
            for form in self.order:
                if form not in results:
                    floor = SIZE_FLOOR[form.split()[0]]
                    note = f"not built: at least {floor}x the float size, over `max_size_ratio`={self.max_size_ratio}"
                    results[form] = CandidateResult(form, measured=False, note=note)
            return results, built
        log.info("deployment: no form within `max_size_ratio`=%s beat float eager: measuring the others too",
                 self.max_size_ratio)  # fmt: skip
        return self.measure(self.order, results, built)

    def decide(
        self, results: dict[str, CandidateResult], winner: CandidateResult, cached_from: str | None
    ) -> DeploymentDecision:
        candidates = [results[f] for f in self.order]
        limit = self.size_limit(results)
        reason = _reason(winner, results[self.reference_form], candidates, limit, self.max_size_ratio, self.float_size)
        unbuilt = [c.form for c in candidates if not c.measured]
        if cached_from is None and unbuilt:
            reason += (
                f" Not built: {', '.join(unbuilt)} (their numerics cannot fit `max_size_ratio`={self.max_size_ratio}; "
                "they are built only when no form within it beats float eager)."
            )
        if cached_from is not None:
            skipped = len(unbuilt)
            reason += (
                f" Measured {len(candidates) - skipped} of the {len(candidates)} forms: the other {skipped} were "
                f"slower than the winner, over the size budget (or could not run) in this machine's cached "
                f"measurement of {cached_from} (`cache=False` measures every form)."
            )
        return DeploymentDecision(
            form=winner.form,
            reason=reason,
            trained_form=self.reference_form,
            reference_accuracy=results[self.reference_form].accuracy,
            max_accuracy_drop=self.max_accuracy_drop,
            min_cosine=self.min_cosine,
            batch_size=_leading_dim(self.timed),
            device=str(self.device),
            num_threads=self.threads,
            candidates=candidates,
            gate_seconds=time.perf_counter() - self.started,
            cached_from=cached_from,
            max_size_ratio=self.max_size_ratio,
            float_size_bytes=self.float_size if limit is not None else None,
        )

    def from_cache(self, cached: dict[str, Any]) -> tuple[nn.Module, DeploymentDecision] | None:
        """The winner among the forms a cached ranking leaves, or ``None`` when the ranking no longer holds
        here (or spares no form): then every form is measured."""
        subset, acceptable = _cached_subset(cached, self.order, self.reference_form)
        if len(subset) == len(self.order):
            return None
        results, built = self.measure(subset)
        winner = self.choose(results, built)
        if winner.form not in acceptable:
            log.info(
                "deployment: the cached ranking of %s no longer holds (%s won among %s): measuring every form",
                cached["measured_at"],
                winner.form,
                subset,
            )
            return None
        for form in self.order:
            if form not in results:
                results[form] = CandidateResult(form, measured=False, note=_cached_note(cached, form))
        decision = self.decide(results, winner, str(cached["measured_at"]))
        log.info("deployment: %s", decision.reason)
        return built[winner.form], decision

    def measure(
        self,
        order: Sequence[str],
        results: dict[str, CandidateResult] | None = None,
        built: dict[str, nn.Module] | None = None,
    ) -> tuple[dict[str, CandidateResult], dict[str, nn.Module]]:
        """Every form in ``order`` (the reference first) as measured, and those that ran, built; forms in
        ``results`` already are not built again, but all are timed together."""
        results = {} if results is None else results
        built = {} if built is None else built
        for form in order:
            if form in results:
                continue
            result = results[form] = CandidateResult(form)
            t0 = time.perf_counter()
            try:
                module = build_form(form, self.model, self.float_model, self.timed, onnx_exports=self.onnx_exports)
                inputs = _to_device(self.timed, module_device(module))
                with torch.inference_mode():
                    _call(module, inputs)  # compiles a compiled form
                _sync(self.device)
                result.build_seconds = time.perf_counter() - t0
                result.accuracy, result.cosine_to_trained, outputs = _quality(
                    module, self.chunks, self.reference_outputs, self.metric
                )
                result.size_bytes = serialized_size_bytes(module)
                if isinstance(module, FrozenInference):
                    result.freezing = module.freezing
            except Exception as error:  # noqa: BLE001 - a form that cannot run here is listed, not fatal
                result.build_seconds = time.perf_counter() - t0
                result.note = (
                    f"could not run: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                )
                log.warning("deployment: form %r %s", form, result.note)
                if form == self.reference_form:
                    raise
                continue
            if form == self.reference_form:
                self.reference_outputs = outputs
            built[form] = module
            program = getattr(module, "shipped_program", None)
            if self.programs is not None and isinstance(program, torch.export.ExportedProgram):
                self.programs[form] = program
        reference_accuracy = results[self.reference_form].accuracy
        for form, module in built.items():
            self._judge(results[form], form == self.reference_form, reference_accuracy)
            why = getattr(module, "freezing_reason", "")
            if why.startswith("compiled"):  # the choice was measured (int8 linears on a CPU with oneDNN)
                results[form].note += f"; {why}"
        times = _time_interleaved(
            built, self.timed, warmup=self.warmup, repeats=self.repeats, rounds=self.rounds, device=self.device
        )
        for form, samples in times.items():
            results[form].latency_p50_ms = statistics.median(samples)
            results[form].latency_p95_ms = percentile(samples, 95)
        return results, built

    def _judge(self, result: CandidateResult, is_reference: bool, reference_accuracy: float | None) -> None:
        if is_reference:
            result.eligible, result.note = True, "as trained (the reference)"
        elif reference_accuracy is not None and result.accuracy is not None:
            drop = reference_accuracy - result.accuracy
            result.eligible = drop <= self.max_accuracy_drop
            result.note = (
                f"drop {drop:+.4f}, within budget"
                if result.eligible
                else f"drop {drop:+.4f} > `max_accuracy_drop`={self.max_accuracy_drop}"
            )
        else:
            cosine = result.cosine_to_trained if result.cosine_to_trained is not None else float("nan")
            result.eligible = cosine >= self.min_cosine
            result.note = (
                "cosine within budget" if result.eligible else f"cosine {cosine:.4f} < `min_cosine`={self.min_cosine}"
            )


def default_cache_dir() -> Path:
    """Where :class:`~lightning_quantum.callbacks.DeploymentGate` keeps its measurements: ``deployment/``
    under ``$LIGHTNING_QUANTUM_CACHE``, else under ``~/.cache/lightning_quantum``."""
    return cache_root() / "deployment"


def _describe(value: Any) -> Any:
    """Shapes and dtypes of a (nested) batch, for the cache key."""
    if isinstance(value, Tensor):
        return [list(value.shape), str(value.dtype), value.device.type]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return type(value).__name__


def _architecture(model: nn.Module | None) -> Any:
    """Module types and every tensor's name, shape, dtype and tensor type: what the kernels see, not the values."""
    if model is None:
        return None
    modules = [[name, f"{type(m).__module__}.{type(m).__qualname__}"] for name, m in model.named_modules()]
    tensors = [
        [name, list(t.shape), str(t.dtype), type(t).__name__]
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    ]
    return {"modules": modules, "tensors": tensors}


def _machine(device: torch.device) -> dict[str, Any]:
    """The CPU (or GPU), its kernel set and the library versions: a cached ranking holds only for these."""
    cpu = cpuinfo_field("model name") or platform.processor()
    versions: dict[str, str | None] = {}
    for package in ("lightning-quantum", "torch", "torchao", "onnxruntime", "onnx", "onnxscript"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions,
    }


def _cache_key(
    model: nn.Module,
    float_model: nn.Module | None,
    timed: Any,
    order: list[str],
    threads: int,
    device: torch.device,
    budgets: dict[str, float | None],
    metric: Callable[[Tensor, Tensor], float] | None,
) -> dict[str, Any]:
    return {
        "forms_version": FORMS_VERSION,
        "machine": _machine(device),
        "device": str(device),
        "threads": threads,
        "forms": order,
        "inputs": _describe(timed),
        "model": _architecture(model),
        "float_model": _architecture(float_model),
        **budgets,
        "metric": None if metric is None else getattr(metric, "__qualname__", type(metric).__name__),
    }


def _read_cache(path: Path, key: dict[str, Any], order: list[str]) -> dict[str, Any] | None:
    """The cached measurement for ``key``, or ``None`` (none, another key, or unreadable: then measured anew)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        p50 = {str(f): (None if v is None else float(v)) for f, v in record["p50"].items()}
        if record["key"] != json.loads(json.dumps(key)) or record["winner"] not in order:
            return None
        sizes = {str(f): (None if v is None else int(v)) for f, v in record.get("sizes", {}).items()}
        limit = record.get("size_limit")
        notes = {str(f): str(v) for f, v in record.get("notes", {}).items()}
        return {
            "winner": record["winner"],
            "p50": p50,
            "measured_at": str(record["measured_at"]),
            "sizes": sizes,
            "size_limit": None if limit is None else int(limit),
            "notes": notes,
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("deployment: ignoring the unreadable cache file %s (%s)", path, error)
        return None


def _cached_subset(cached: dict[str, Any], order: list[str], reference_form: str) -> tuple[list[str], set[str]]:
    """(the forms to measure again, the winners that confirm the cached ranking).

    Measured again: the reference, the cached winner, float eager (no build cost; the shipped form must
    beat it here and now), the fastest float form if it came within :data:`REBUILD_WITHIN` of the
    winner then, and every form that ran faster than the winner but was turned down then (its accuracy
    may pass with these weights). The ranking holds when the winner now is the cached winner or one of
    those faster forms. When the winner was within a size budget, forms over it are not measured again
    (their size follows from the architecture, which the cache key holds), unless they are float eager."""
    p50 = cached["p50"]
    winner = cached["winner"]
    best = p50.get(winner) or float("inf")
    over = _over_size(cached)
    faster = [f for f in order if p50.get(f) is not None and p50[f] < best and f not in over]
    floats = [f for f in order if f.startswith("float") and p50.get(f) is not None and f not in over]
    close = [f for f in floats if p50[f] <= best * REBUILD_WITHIN]
    fastest_float = min(close, key=lambda f: p50[f]) if close else "float eager"
    subset = [f for f in order if f in {reference_form, winner, "float eager", fastest_float, *faster}]
    return subset, {winner, *faster}


def _size_limit(max_size_ratio: float, float_size: int) -> int:
    """The size budget in bytes: ``max_size_ratio`` of the float form's ``float_size``."""
    return int(max_size_ratio * float_size)


def _over_size(cached: dict[str, Any]) -> set[str]:
    """The forms over the cached size budget, when the cached winner was within it (else none)."""
    limit, sizes = cached.get("size_limit"), cached.get("sizes", {})
    winner_size = sizes.get(cached["winner"])
    if limit is None or winner_size is None or winner_size > limit:
        return set()
    return {f for f, size in sizes.items() if size is not None and size > limit}


def _cached_note(cached: dict[str, Any], form: str) -> str:
    """Why a form was not rebuilt, from the cached measurement."""
    p50 = cached["p50"].get(form)
    if form in _over_size(cached):
        return f"not rebuilt: over the size budget in the cached measurement ({cached['sizes'][form] / 2**20:.2f} MB)"
    if p50 is not None:
        return f"not rebuilt: slower in the cached measurement ({p50:.3f} ms p50 then)"
    return cached.get("notes", {}).get(form) or "not rebuilt: it could not run in the cached measurement"


def _write_cache(path: Path, key: dict[str, Any], decision: DeploymentDecision) -> None:
    ratio, float_size = decision.max_size_ratio, decision.float_size_bytes
    limit = _size_limit(ratio, float_size) if ratio is not None and float_size is not None else None
    record = {
        "key": key,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "winner": decision.form,
        "p50": {c.form: c.latency_p50_ms for c in decision.candidates},
        "sizes": {c.form: c.size_bytes for c in decision.candidates},
        "size_limit": limit,
        "notes": {c.form: c.note for c in decision.candidates if not c.measured},
    }
    try:
        write_whole(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    except OSError as error:  # a read-only home is no reason to fail the fit
        log.warning("deployment: could not write the cache file %s (%s)", path, error)


def _time_interleaved(
    modules: dict[str, nn.Module], inputs: Any, *, warmup: int, repeats: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    per_round = max(1, -(-repeats // rounds))
    samples: dict[str, list[float]] = {form: [] for form in modules}
    moved = {form: _to_device(inputs, module_device(m)) for form, m in modules.items()}
    with torch.inference_mode():
        for form, module in modules.items():
            for _ in range(warmup):
                _call(module, moved[form])
        for _ in range(rounds):
            for form, module in modules.items():
                for _ in range(per_round):
                    _sync(device)
                    t0 = time.perf_counter()
                    _call(module, moved[form])
                    _sync(device)
                    samples[form].append((time.perf_counter() - t0) * 1000.0)
    return samples


def _reason(
    winner: CandidateResult,
    reference: CandidateResult,
    candidates: list[CandidateResult],
    size_limit: int | None = None,
    max_size_ratio: float | None = None,
    float_size: int | None = None,
) -> str:
    """Why the winner won, in one sentence: its speed against the trained and float forms, its size against
    a size budget, and any faster form that was turned down (for accuracy, or for size)."""
    p50 = winner.latency_p50_ms or float("nan")
    within = sum(c.eligible for c in candidates)
    over = [c for c in candidates if size_limit is not None and c.size_bytes is not None and c.size_bytes > size_limit]
    if size_limit is None or float_size is None:
        parts = [f"{winner.form} is the fastest of the {within} forms within the accuracy budget ({p50:.3f} ms p50)"]
    elif winner in over:
        parts = [
            f"{winner.form} is the fastest of the {within} forms within the accuracy budget ({p50:.3f} ms p50; "
            f"{(winner.size_bytes or 0) / float_size:.2f}x the float form's size: no form within "
            f"`max_size_ratio`={max_size_ratio} ran faster than float eager here, so it ships regardless of size)"
        ]
    else:
        parts = [
            f"{winner.form} is the fastest form within the accuracy budget and `max_size_ratio`={max_size_ratio} "
            f"({p50:.3f} ms p50, {(winner.size_bytes or 0) / float_size:.2f}x the float form's size)"
        ]
    floats = [c for c in candidates if c.form.startswith("float") and c.latency_p50_ms]
    fastest_float = min(floats, key=lambda c: c.latency_p50_ms or 0.0) if floats else None
    others = [
        (reference, f"the model as trained ({reference.form})"),
        (_form(candidates, "float eager"), "float eager"),
    ]
    if fastest_float is not None and fastest_float.form != "float eager":
        others.append((fastest_float, f"the fastest float form ({fastest_float.form})"))
    for other, label in others:
        if other is not None and other is not winner and other.latency_p50_ms:
            parts.append(f"{ratio_words(other.latency_p50_ms / p50, 'faster', 'slower')} than {label}")
    sentence = ", ".join(parts) + "."
    faster = [c for c in candidates if c.latency_p50_ms is not None and c.latency_p50_ms < p50]
    rejected = [c for c in faster if not c.eligible]
    if rejected:
        sentence += " Faster but turned down: " + "; ".join(f"{c.form} ({c.note})" for c in rejected) + "."
    too_big = [c for c in faster if c.eligible and c in over and winner not in over]
    if too_big and float_size is not None:
        sentence += (
            " Faster but over the size budget: "
            + "; ".join(
                f"{c.form} ({c.latency_p50_ms:.3f} ms p50, {(c.size_bytes or 0) / float_size:.2f}x)" for c in too_big
            )
            + "."
        )
    return sentence


def _form(candidates: list[CandidateResult], form: str) -> CandidateResult | None:
    return next((c for c in candidates if c.form == form), None)


def save_deployment(
    module: nn.Module, decision: DeploymentDecision, example_inputs: Any, directory: str | Path, *, stem: str = "model"
) -> dict[str, Path]:
    """Write the chosen form: ``<stem>.pt2`` (a ``torch.export`` program of its numerics, traced on the
    CPU), or ``<stem>.onnx`` for an ONNX Runtime form, and ``deployment.json`` (the form, the
    decision, and for a compiled form whether it was compiled with Inductor's freezing). Earlier files are
    kept, renamed."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    record = out / DEPLOYMENT_FILE
    if isinstance(module, OnnxRuntimeModule):
        program = out / f"{stem}.onnx"
        keep_existing(program)
        keep_existing(record)
        program.write_bytes(module.model_bytes())
        record.write_text(json.dumps({"program": program.name, **decision.to_dict()}, indent=2) + "\n")
        return {"program": program, "deployment": record}
    program = out / f"{stem}.pt2"
    keep_existing(program)
    keep_existing(record)
    exported = getattr(module, "shipped_program", None)
    if isinstance(exported, torch.export.ExportedProgram):  # a compiled form built from its program: ship the
        save_program(exported, program)  # very program it timed
    else:
        inner = module.model if isinstance(module, FrozenInference) else module
        export_program(copy.deepcopy(inner).cpu(), _export_example(example_inputs), program)
    freezing = {"freezing": module.freezing} if isinstance(module, FrozenInference) else {}
    record.write_text(json.dumps({"program": program.name, **freezing, **decision.to_dict()}, indent=2) + "\n")
    return {"program": program, "deployment": record}


def read_form_record(root: Path, filename: str, saver: str, forms: Sequence[str]) -> tuple[Path, dict[str, Any], str]:
    """``(path, record, form)`` of the JSON record ``filename`` in ``root`` that ``saver`` wrote.

    Raises:
        FileNotFoundError: when there is no such file.
        ValueError: for a file that is not valid JSON, or a ``form`` not among ``forms``.
    """
    record_path = root / filename
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} does not exist: save it with {saver} first.")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{record_path} is not valid JSON: {error}") from error
    form = record.get("form") if isinstance(record, dict) else None
    if not isinstance(form, str) or form not in forms:
        raise ValueError(f"{record_path}: `form`={form!r} is not valid. Choose one of: {', '.join(map(repr, forms))}.")
    return record_path, record, form


def load_deployment(directory: str | Path) -> nn.Module:
    """Load what :func:`save_deployment` wrote, in the chosen form (compiled again when it was compiled, with
    Inductor's freezing or without as the gate compiled it).

    Raises:
        FileNotFoundError: when the directory holds no ``deployment.json``.
        ValueError: for a record that names an unknown form or a program outside the directory.
        ImportError: for an ONNX Runtime form without the ``onnx`` extra installed.
    """
    root = Path(directory)
    record_path, record, form = read_form_record(root, DEPLOYMENT_FILE, "save_deployment", FORMS)
    suffix = ".onnx" if form.endswith("onnxruntime") else ".pt2"
    program = (root / str(record.get("program", ""))).resolve()
    if program.parent != root.resolve() or program.suffix != suffix:
        raise ValueError(f"{record_path}: `program`={record.get('program')!r} must name a {suffix} file in {root}.")
    if suffix == ".onnx":
        return load_onnxruntime(program, record.get("num_threads"))
    module = load_program(program)
    if not form.endswith("compiled"):
        return module
    return compile_for_inference(module, freezing=recorded_freezing(record))


def recorded_freezing(record: dict[str, Any]) -> bool:
    """Whether a record of a compiled form (``deployment.json``, a recipe's deploy step) says it was compiled with
    Inductor's freezing; records written before the choice was recorded were all frozen."""
    return record.get("freezing") is not False


def forms_for(allowed_numerics: Iterable[str]) -> list[str]:
    """The forms whose numerics are among ``allowed_numerics`` (``float``, ``bf16``, ``int8``)."""
    allowed = list(allowed_numerics)
    for numerics in allowed:
        if numerics not in NUMERICS:
            raise ValueError(f"numerics {numerics!r} is not valid. Choose from: {', '.join(map(repr, NUMERICS))}.")
    return [f for f in FORMS if f.split()[0] in allowed]
