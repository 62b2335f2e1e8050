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
- runner ``eager``: called as it is; ``compiled``: :func:`~lightning_quantum.quantization.compile_for_inference`;
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
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._batches import _call, _gather_inputs, _leading_dim, _rebatch, _to_device, split_batch
from lightning_quantum._modules import eval_mode
from lightning_quantum._validation import check_finite, check_non_negative, check_positive
from lightning_quantum.benchmark import _module_device, _sync, _threads, percentile, serialized_size_bytes

log = logging.getLogger(__name__)

__all__ = [
    "FORMS",
    "CandidateResult",
    "DeploymentDecision",
    "CastInputs",
    "build_form",
    "choose_deployment",
    "save_deployment",
    "load_deployment",
]

NUMERICS = ("float", "bf16", "int8")
RUNNERS = ("eager", "compiled", "onnxruntime")
#: Every candidate form, ``"<numerics> <runner>"`` (ONNX Runtime in float32 and int8: its bf16 CPU
#: kernels are few, and the graph falls back op by op).
FORMS = tuple(f"{n} {r}" for n in NUMERICS for r in RUNNERS if (n, r) != ("bf16", "onnxruntime"))
DEPLOYMENT_FILE = "deployment.json"


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
    """One candidate form as measured: latency at the batch size, quality, build time, size."""

    form: str
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    accuracy: float | None = None
    cosine_to_trained: float | None = None
    build_seconds: float = 0.0
    size_bytes: int | None = None
    eligible: bool = False
    note: str = ""


@dataclass
class DeploymentDecision:
    """The form chosen, why, and every candidate's figures.

    ``reference_accuracy`` is the accuracy of the model as trained (its eager form: int8 after QAT,
    float otherwise); a candidate is within budget when it loses at most ``max_accuracy_drop`` from it
    (or, without labels, when its outputs' mean cosine to the trained model's is at least ``min_cosine``).
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

    @property
    def winner(self) -> CandidateResult:
        return next(c for c in self.candidates if c.form == self.form)

    def candidate(self, form: str) -> CandidateResult | None:
        return next((c for c in self.candidates if c.form == form), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and type(m.weight).__name__ == "Int8Tensor" for m in model.modules())


def _has_quantized_weights(model: nn.Module) -> bool:
    from lightning_quantum.quantization.qat import is_converted

    return is_converted(model)


def _float_numerics(model: nn.Module, float_model: nn.Module | None) -> nn.Module:
    from lightning_quantum.quantization.qat import dequantize_linears

    source = float_model if float_model is not None else model
    if float_model is None and any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):
        raise ValueError("a static int8 graph has no float weights to go back to: give `float_model`")
    out = copy.deepcopy(source)
    if _has_quantized_weights(out):
        dequantize_linears(out)
    return out


def _int8_numerics(model: nn.Module, float_model: nn.Module | None) -> nn.Module:
    if _is_int8(model):
        return copy.deepcopy(model)
    if _has_quantized_weights(model):
        raise ValueError("the model holds quantized weights of another kind (int4, static int8), not int8 linears")
    from lightning_quantum.quantization.dynamic import quantize_dynamic_int8

    out = _float_numerics(model, float_model)
    quantize_dynamic_int8(out)
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
        example_inputs: one batch to export with; needed by the ``onnxruntime`` forms only.
        onnx_exports: where the ONNX export of the float form is kept for the next ``onnxruntime``
            form of the same model (the float and int8 forms then export once).

    Raises:
        ValueError: for an unknown form, int8 numerics of a model quantized some other way, or an
            ``onnxruntime`` form without ``example_inputs``.
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
        from lightning_quantum.onnx_runtime import to_onnxruntime

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
        from lightning_quantum.quantization.export import compile_for_inference

        return compile_for_inference(built)
    return built


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
    device = _module_device(module)
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
) -> tuple[nn.Module, DeploymentDecision]:
    """Measure every candidate form of ``model`` and return the fastest within the accuracy budget.

    The model as trained (:func:`trained_form`) is always a candidate and sets the reference: every
    other form must keep its accuracy within ``max_accuracy_drop`` (or, on unlabelled data, a mean
    cosine of at least ``min_cosine`` to its outputs). Latency is the p50 of ``repeats`` calls on
    one batch of ``batch_size`` samples, taken in ``rounds`` alternating rounds over the candidates so
    that drift of a shared machine hits them alike; ``build_seconds`` includes compiling (the first
    call). A form that fails to build or run is listed with the error and not chosen.

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

    Returns:
        ``(module, decision)``: the winning form, ready to call (compiled forms already compiled), and
        the decision with every candidate.

    Raises:
        ValueError: for an invalid argument (named), or when neither ``eval_data`` nor ``example_inputs``
            is given.
    """
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
    if max_eval_batches is not None:
        check_positive("max_eval_batches", max_eval_batches)
    if eval_data is None and example_inputs is None:
        raise ValueError("Give `eval_data` or `example_inputs`: there is nothing to time the candidates on.")
    started = time.perf_counter()
    batches: list[tuple[Any, Tensor | None]] = []
    if eval_data is not None:
        for index, batch in enumerate(eval_data):
            if max_eval_batches is not None and index >= max_eval_batches:
                break
            batches.append(split_batch(batch))
    else:
        batches = [(example_inputs, None)]
    timed = example_inputs if example_inputs is not None else _gather_inputs(eval_data, batch_size)  # type: ignore[arg-type]
    chunks = _rebatch(batches, _leading_dim(timed))
    threads = num_threads or torch.get_num_threads()
    device = _module_device(model)
    reference_form = trained_form(model)
    order = [reference_form] + [f for f in forms if f != reference_form]
    if reference_form == "trained eager" and any(f.endswith("compiled") for f in forms):
        order.insert(1, "trained compiled")  # the model as it is, compiled
    order = list(dict.fromkeys(order))
    results: dict[str, CandidateResult] = {}
    built: dict[str, nn.Module] = {}
    onnx_exports: dict[str, bytes] = {}
    reference_outputs: list[Tensor] | None = None
    with _threads(threads), eval_mode(model):
        for form in order:
            result = results[form] = CandidateResult(form)
            t0 = time.perf_counter()
            try:
                module = build_form(form, model, float_model, timed, onnx_exports=onnx_exports)
                inputs = _to_device(timed, _module_device(module))
                with torch.inference_mode():
                    _call(module, inputs)  # compiles a compiled form
                _sync(device)
                result.build_seconds = time.perf_counter() - t0
                result.accuracy, result.cosine_to_trained, outputs = _quality(module, chunks, reference_outputs, metric)
                result.size_bytes = serialized_size_bytes(module)
            except Exception as error:  # noqa: BLE001 - a form that cannot run here is listed, not fatal
                result.build_seconds = time.perf_counter() - t0
                result.note = (
                    f"could not run: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                )
                log.warning("deployment: form %r %s", form, result.note)
                if form == reference_form:
                    raise
                continue
            if form == reference_form:
                reference_outputs = outputs
            built[form] = module
        reference_accuracy = results[reference_form].accuracy
        for form in built:
            result = results[form]
            if form == reference_form:
                result.eligible, result.note = True, "as trained (the reference)"
            elif reference_accuracy is not None and result.accuracy is not None:
                drop = reference_accuracy - result.accuracy
                result.eligible = drop <= max_accuracy_drop
                result.note = (
                    f"drop {drop:+.4f}, within budget"
                    if result.eligible
                    else f"drop {drop:+.4f} > `max_accuracy_drop`={max_accuracy_drop}"
                )
            else:
                cosine = result.cosine_to_trained if result.cosine_to_trained is not None else float("nan")
                result.eligible = cosine >= min_cosine
                result.note = (
                    "cosine within budget" if result.eligible else f"cosine {cosine:.4f} < `min_cosine`={min_cosine}"
                )
        times = _time_interleaved(built, timed, warmup=warmup, repeats=repeats, rounds=rounds, device=device)
    for form, samples in times.items():
        results[form].latency_p50_ms = statistics.median(samples)
        results[form].latency_p95_ms = percentile(samples, 95)
    eligible = [results[f] for f in built if results[f].eligible]
    winner = min(eligible, key=lambda c: c.latency_p50_ms or float("inf"))
    decision = DeploymentDecision(
        form=winner.form,
        reason=_reason(winner, results[reference_form], [results[f] for f in order]),
        trained_form=reference_form,
        reference_accuracy=reference_accuracy,
        max_accuracy_drop=max_accuracy_drop,
        min_cosine=min_cosine,
        batch_size=_leading_dim(timed),
        device=str(device),
        num_threads=threads,
        candidates=[results[f] for f in order],
        gate_seconds=time.perf_counter() - started,
    )
    log.info("deployment: %s", decision.reason)
    return built[winner.form], decision


def _time_interleaved(
    modules: dict[str, nn.Module], inputs: Any, *, warmup: int, repeats: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    per_round = max(1, -(-repeats // rounds))
    samples: dict[str, list[float]] = {form: [] for form in modules}
    moved = {form: _to_device(inputs, _module_device(m)) for form, m in modules.items()}
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


def _reason(winner: CandidateResult, reference: CandidateResult, candidates: list[CandidateResult]) -> str:
    """Why the winner won, in one sentence: its speed against the trained and float forms, and any
    faster form that was turned down."""
    from lightning_quantum.report import ratio_words

    p50 = winner.latency_p50_ms or float("nan")
    within = sum(c.eligible for c in candidates)
    parts = [f"{winner.form} is the fastest of the {within} forms within the accuracy budget ({p50:.3f} ms p50)"]
    for other, label in (
        (reference, f"the model as trained ({reference.form})"),
        (_form(candidates, "float eager"), "float eager"),
    ):
        if other is not None and other is not winner and other.latency_p50_ms:
            parts.append(f"{ratio_words(other.latency_p50_ms / p50, 'faster', 'slower')} than {label}")
    sentence = ", ".join(parts) + "."
    rejected = [c for c in candidates if not c.eligible and c.latency_p50_ms is not None and c.latency_p50_ms < p50]
    if rejected:
        sentence += " Faster but turned down: " + "; ".join(f"{c.form} ({c.note})" for c in rejected) + "."
    return sentence


def _form(candidates: list[CandidateResult], form: str) -> CandidateResult | None:
    return next((c for c in candidates if c.form == form), None)


def save_deployment(
    module: nn.Module, decision: DeploymentDecision, example_inputs: Any, directory: str | Path, *, stem: str = "model"
) -> dict[str, Path]:
    """Write the chosen form: ``<stem>.pt2`` (a ``torch.export`` program of its numerics, traced on the
    CPU), or ``<stem>.onnx`` for an ONNX Runtime form, and ``deployment.json`` (the form, the
    decision). Earlier files are kept, renamed."""
    from lightning_quantum.onnx_runtime import OnnxRuntimeModule
    from lightning_quantum.quantization.export import FrozenInference, export_program
    from lightning_quantum.report import keep_existing

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
    inner = module.model if isinstance(module, FrozenInference) else module
    cpu_copy = copy.deepcopy(inner).cpu()
    example = _to_device(example_inputs, torch.device("cpu"))
    if not isinstance(example, dict):
        example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    program = out / f"{stem}.pt2"
    keep_existing(program)
    keep_existing(record)
    export_program(cpu_copy, example, program)
    record.write_text(json.dumps({"program": program.name, **decision.to_dict()}, indent=2) + "\n")
    return {"program": program, "deployment": record}


def load_deployment(directory: str | Path) -> nn.Module:
    """Load what :func:`save_deployment` wrote, in the chosen form (compiled again when it was compiled).

    Raises:
        FileNotFoundError: when the directory holds no ``deployment.json``.
        ValueError: for a record that names an unknown form or a program outside the directory.
        ImportError: for an ONNX Runtime form without the ``onnx`` extra installed.
    """
    from lightning_quantum.quantization.export import compile_for_inference, load_program

    root = Path(directory)
    record_path = root / DEPLOYMENT_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} does not exist: save the deployment with save_deployment first.")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{record_path} is not valid JSON: {error}") from error
    form = record.get("form")
    if form not in FORMS:
        raise ValueError(f"{record_path}: `form`={form!r} is not valid. Choose one of: {', '.join(map(repr, FORMS))}.")
    suffix = ".onnx" if form.endswith("onnxruntime") else ".pt2"
    program = (root / str(record.get("program", ""))).resolve()
    if program.parent != root.resolve() or program.suffix != suffix:
        raise ValueError(f"{record_path}: `program`={record.get('program')!r} must name a {suffix} file in {root}.")
    if suffix == ".onnx":
        from lightning_quantum.onnx_runtime import load_onnxruntime

        return load_onnxruntime(program, record.get("num_threads"))
    module = load_program(program)
    return compile_for_inference(module) if form.endswith("compiled") else module


def forms_for(allowed_numerics: Iterable[str]) -> list[str]:
    """The forms whose numerics are among ``allowed_numerics`` (``float``, ``bf16``, ``int8``)."""
    allowed = list(allowed_numerics)
    for numerics in allowed:
        if numerics not in NUMERICS:
            raise ValueError(f"numerics {numerics!r} is not valid. Choose from: {', '.join(map(repr, NUMERICS))}.")
    return [f for f in FORMS if f.split()[0] in allowed]
