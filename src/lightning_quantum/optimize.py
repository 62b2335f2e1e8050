"""Post-training optimization of a model already trained: ``lq.optimize(model, level=...)``.

The same transforms the callbacks use, applied one step at a time to a copy of the model, each step
measured on the evaluation data and rolled back when it costs more accuracy than allowed.

Example:
    >>> result = lq.optimize(net, level="quantum", eval_data=dm.test_dataloader())  # doctest: +SKIP
    >>> result.report.compression_ratio, result.steps  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._batches import split_batch
from lightning_quantum._validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from lightning_quantum.benchmark import (
    OptimizationPerformanceMetrics,
    benchmark_model,
    evaluate_accuracy,
    serialized_size_bytes,
)
from lightning_quantum.compiled import FrozenInference, compile_for_inference
from lightning_quantum.deployment import (
    FORMS,
    CastInputs,
    choose_deployment,
    forms_for,
    recorded_freezing,
    trained_form,
)
from lightning_quantum.levels import OptimizationLevel, deployment_numerics, deployment_setting, level_definition
from lightning_quantum.models.causal_lm import CausalLM, LabelledBlocks, token_log_likelihood
from lightning_quantum.onnx_runtime import OnnxRuntimeModule, load_onnxruntime
from lightning_quantum.pruning import select_parameters, structured_masks, unstructured_masks
from lightning_quantum.pruning.masks import PRUNING_METHODS, make_pruning_permanent
from lightning_quantum.pruning.slimming import (
    build_dependency_graph,
    coupled_channel_masks,
    declared_channel_layers,
    output_layers,
    rebuild_architecture,
    record_architecture,
)
from lightning_quantum.pruning.slimming import slim_model as slim_layers
from lightning_quantum.quantization import (
    INT4_ALGORITHMS,
    quantize_dynamic_int8,
    quantize_static_int8,
    quantize_weights_bnb,
    quantize_weights_int4,
)
from lightning_quantum.quantization.export import (
    export_program,
    load_program,
    load_safetensors,
    save_safetensors,
)
from lightning_quantum.report import OptimizationReportData, ReportExtra, build_report, keep_existing, write_report

log = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZE_LEVELS",
    "OptimizationResult",
    "StepRecord",
    "load_optimized",
    "optimize",
    "optimize_and_save",
    "save_optimized",
]

#: The level names ``optimize`` takes: the levels' own (:class:`~lightning_quantum.levels.OptimizationLevel`).
OPTIMIZE_LEVELS = tuple(level.value for level in OptimizationLevel)
#: The pruning methods of ULTRA's post-training step: the registry's less N:M, which ``optimize`` does not
#: apply (the ``Pruning`` callback trains a 2:4 pattern in).
PRUNE_METHODS = tuple(method for method in PRUNING_METHODS if method != "nm")


@dataclass
class StepRecord:
    """One transform of the pipeline: what it did to accuracy and size, and whether it was kept."""

    name: str
    kept: bool
    accuracy: float | None
    accuracy_drop: float | None
    size_mb: float
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class OptimizationResult:
    """What :func:`optimize` returns: the optimized model, both measurements, the report and the steps."""

    model: nn.Module
    before: OptimizationPerformanceMetrics
    after: OptimizationPerformanceMetrics
    report: OptimizationReportData
    steps: list[StepRecord]

    @property
    def applied(self) -> list[str]:
        """The names of the steps that were kept."""
        return [s.name for s in self.steps if s.kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "report": self.report.to_dict(),
            "steps": [asdict(s) for s in self.steps],
        }


def _first_inputs(data: Iterable[Any]) -> Any:
    try:
        return split_batch(next(iter(data)))[0]
    except StopIteration:
        raise ValueError("The evaluation or calibration data is empty.") from None


def _prune(model: nn.Module, amount: float, method: str, slim: bool, example_inputs: Any) -> dict[str, Any]:
    """One-shot magnitude pruning in place: unstructured (global), or channels (optionally removed) of the
    layers the model declares (:func:`~lightning_quantum.pruning.slimming.declared_channel_layers`), else
    of every layer but the outputs."""
    structured = method != "l1_unstructured"
    modules = select_parameters(model, names=declared_channel_layers(model) if structured else None)
    weights: dict[str, Tensor] = {f"{name}.weight": m.weight for name, m in modules.items()}  # type: ignore[misc]
    if method == "l1_unstructured":
        masks = unstructured_masks(weights, amount)
        make_pruning_permanent(model, masks)
        return {"method": method, "amount": amount}
    graph = build_dependency_graph(model, example_inputs)
    outputs = set(output_layers(model, graph, list(modules)))
    weights = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] not in outputs}  # never the outputs
    if not weights:
        raise ValueError("Structured pruning found no layer to prune besides the model's outputs.")
    channel_masks = structured_masks(weights, amount, norm=1 if method == "l1_structured" else 2)
    if slim:
        removed = slim_layers(model, graph, channel_masks)
        return {
            "method": method,
            "amount": amount,
            "slimmed": True,
            "removed_channels": removed,
            "architecture": record_architecture(model),
        }
    make_pruning_permanent(model, coupled_channel_masks(model, graph, channel_masks))
    return {"method": method, "amount": amount, "slimmed": False, "kept_outputs": sorted(outputs)}


def _int4(
    model: nn.Module, group_size: int, algorithm: str, calibration_data: Iterable[Any] | None, batches: int
) -> nn.Module:
    return quantize_weights_int4(
        model,
        group_size=group_size,
        algorithm=algorithm,
        calibration=calibration_data if algorithm == "gptq" else None,
        calibration_batches=batches,
    )


def _int8(model: nn.Module, calibration_data: Iterable[Any] | None, calibration_batches: int) -> tuple[nn.Module, dict]:
    if calibration_data is not None:
        return quantize_static_int8(model, calibration_data, max_batches=calibration_batches), {"kind": "static"}

    layers = quantize_dynamic_int8(model)
    return model, {"kind": "dynamic", "layers": len(layers)}


def _nf4(model: nn.Module) -> tuple[nn.Module, dict]:
    layers = quantize_weights_bnb(model, "nf4")
    return model, {"layers": len(layers)}


def _bf16(model: nn.Module) -> tuple[nn.Module, dict]:
    return CastInputs(model.to(torch.bfloat16), torch.bfloat16), {"dtype": "bfloat16"}


#: The steps that change the numerics (the others, pruning, keep float weights).
_NUMERICS_STEPS = ("bf16", "int8", "int4", "nf4")
#: The weights QUANTUM and ULTRA quantize to: int8 (weights and activations), or int4 weight-only.
WEIGHTS = ("int8", "int4")


def optimize(
    model: nn.Module,
    level: str | OptimizationLevel = "quantum",
    *,
    calibration_data: Iterable[Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
    example_inputs: Any = None,
    max_accuracy_drop: float | None = None,
    prune_amount: float = 0.5,
    prune_method: str = "l1_unstructured",
    slim: bool = False,
    calibration_batches: int = 8,
    compile: bool = False,
    deploy: bool = True,
    keep_slower: bool = False,
    batch_size: int = 64,
    repeats: int = 30,
    weights: str = "int8",
    group_size: int = 32,
    int4_algorithm: str = "affine",
    max_size_ratio: float | str | None = "level",
) -> OptimizationResult:
    """Optimize a trained model for inference at ``level``; ``model`` itself is never modified.

    Steps by level (each applied to the previous step's result, measured, and kept only when the
    accuracy drop from the original stays within ``max_accuracy_drop``):

    - ``basic``: none; the model is measured as it is.
    - ``advanced``: bf16 weights (inputs and outputs stay float32).
    - ``quantum``: int8: static (PT2E, calibrated on ``calibration_data``) when calibration data is
      given, dynamic (torchao, linears) otherwise.
    - ``ultra``: one-shot magnitude pruning (``prune_amount``; with a structured ``prune_method``
      and ``slim``, channels are removed for real), then NF4 4-bit linear weights (bitsandbytes); when
      NF4 is rolled back or cannot run, QUANTUM's int8 step is tried in its place.

    Then, with ``deploy`` (the default), the deployment gate
    (:func:`~lightning_quantum.deployment.choose_deployment`) measures the result's inference forms
    on this machine (float, bf16 up to the level, int8 at QUANTUM and ULTRA; each eager and compiled)
    and the fastest within the accuracy budget is the result. When that is not the compressed
    numerics (int8 that runs slower than float here, say), the step that brought them is rolled back
    like a step over ``max_accuracy_drop``, with the times as its reason, unless ``keep_slower``.

    Args:
        model: the trained model (a plain ``nn.Module`` mapping inputs to outputs).
        level: an :class:`~lightning_quantum.levels.OptimizationLevel` or its name (``basic``,
            ``advanced``, ``quantum``, ``ultra``; any case).
        calibration_data: batches for static int8 calibration (as a DataLoader yields them).
        eval_data: labelled batches to measure accuracy on, before and after each step.
        metric: ``metric(outputs, targets) -> float``; top-1 accuracy by default.
        example_inputs: one batch of inputs to time (and to trace for slimming); taken from
            ``eval_data`` or ``calibration_data`` when ``None``.
        max_accuracy_drop: the largest accuracy drop from the original model a step may cause (in
            the metric's units, e.g. 0.01 = one point); a step that drops more is rolled back and the
            reason recorded. Needs ``eval_data``.
        prune_amount: ULTRA: share of weights (or channels) to remove, in [0, 1).
        prune_method: ULTRA: ``l1_unstructured`` (global), ``l1_structured`` or ``l2_structured``.
        slim: ULTRA with a structured method: remove the pruned channels (smaller, faster model).
        calibration_batches: batches of ``calibration_data`` to calibrate on.
        compile: without ``deploy``, compile the result with Inductor (freezing) for inference.
        deploy: choose the inference form by measuring it here (compiled forms among them).
        keep_slower: keep the compressed numerics even where another form is faster; the gate then
            picks among their forms only.
        batch_size: samples per timed batch when it is assembled from ``eval_data``.
        repeats: timed forward passes per measurement.
        weights: ``"int8"`` (the default: QUANTUM's and ULTRA's int8 step as above) or ``"int4"``: that
            step gives the linears int4 weights in groups of ``group_size`` and the embeddings int8 rows,
            activations staying float (:func:`~lightning_quantum.quantization.quantize_weights_int4`;
            for language models: pass ``eval_data=LabelledBlocks(loader)`` and
            ``metric=token_log_likelihood`` from :mod:`lightning_quantum.models`, and the step is rolled
            back when perplexity rises by more than about ``max_accuracy_drop`` (0.01: 1%)).
        group_size: ``weights="int4"``: input features per int4 scale.
        int4_algorithm: ``weights="int4"``: how the int4 weights are chosen (``INT4_ALGORITHMS``):
            ``"affine"`` (min/max grids, rounded to nearest), ``"hqq_scale_only"`` (HQQ's scales) or ``"gptq"``
            (min/max grids, GPTQ's rounding measured on ``calibration_batches`` batches of
            ``calibration_data``, which it then needs).
        max_size_ratio: the deployment gate's size budget, as a share of the float form's size: the
            fastest form within it that runs faster than float eager ships, else the fastest regardless
            (see :func:`~lightning_quantum.deployment.choose_deployment`). ``"level"``: the level's (0.3 at
            QUANTUM and ULTRA, none below); ``None``: size does not count.

    Raises:
        ValueError: for an invalid argument (named, with its value and the valid choices), for
            ``max_accuracy_drop`` without ``eval_data``, or when there is nothing to time on.
    """
    level = OptimizationLevel.parse(level).value
    check_choice("weights", weights, WEIGHTS)
    check_positive_int("group_size", group_size)
    check_choice("int4_algorithm", int4_algorithm, INT4_ALGORITHMS)
    if weights == "int4" and int4_algorithm == "gptq" and calibration_data is None:
        raise ValueError(
            "`int4_algorithm`='gptq' measures the layers' inputs on `calibration_data`, which is None: give "
            "training batches (lq-optimize: options.calibrate=true), or choose 'affine' or 'hqq_scale_only'."
        )
    size_budget = _size_budget(max_size_ratio, level)
    example_inputs = _checked_arguments(
        prune_amount, prune_method, slim, calibration_batches, batch_size, repeats, compile, deploy, keep_slower,
        max_accuracy_drop, eval_data, calibration_data, example_inputs,
    )  # fmt: skip
    started = time.perf_counter()
    was_training = model.training
    measure = dict(eval_data=eval_data, metric=metric, batch_size=batch_size, repeats=repeats)
    timed = example_inputs if eval_data is None else None
    pipeline = _Steps(copy.deepcopy(model).eval(), eval_data, metric, max_accuracy_drop)
    before = benchmark_model(pipeline.current, timed, **measure)  # type: ignore[arg-type]
    pipeline.reference = before.accuracy
    transforms: dict[str, Callable[[nn.Module], tuple[nn.Module, dict[str, Any]]]] = {
        "bf16": _bf16,
        "int8": lambda m: _int8(m, calibration_data, calibration_batches),
        "int4": lambda m: (
            _int4(m, group_size, int4_algorithm, calibration_data, calibration_batches),
            {"weights": "int4", "group_size": group_size, "algorithm": int4_algorithm},
        ),
        "prune": lambda m: (m, _prune(m, prune_amount, prune_method, slim, example_inputs)),
        "nf4": _nf4,
        "compile": lambda m: (compile_for_inference(m), {}),
    }
    for alternatives in level_definition(level).post_training:
        names = [weights if name == "int8" else name for name in alternatives]  # int4 takes int8's place
        next((name for name in names if pipeline.attempt(name, transforms[name])), None)
    if compile:
        pipeline.attempt("compile", transforms["compile"])
    extra = ReportExtra(steps=[], post_training=True)
    if deploy:
        pipeline.current = _deploy(
            pipeline.current, pipeline.float_current, pipeline.steps, level, keep_slower, eval_data, timed,
            example_inputs, metric, batch_size, repeats, max_accuracy_drop, before.accuracy, extra, size_budget,
        )  # fmt: skip
    duration = time.perf_counter() - started
    after = benchmark_model(pipeline.current, timed, **measure)  # type: ignore[arg-type]
    report = build_report(
        before,
        after,
        optimization_duration_seconds=duration,
        accuracy_reference="the original model",
        level=level,
        extra={**extra, "steps": [asdict(s) for s in pipeline.steps]},
    )
    model.train(was_training)
    return OptimizationResult(pipeline.current, before, after, report, pipeline.steps)


def _size_budget(max_size_ratio: float | str | None, level: str) -> float | None:
    """The deployment gate's ``max_size_ratio``: the level's for ``"level"``, else the number (checked) or ``None``."""
    if max_size_ratio == "level":
        return deployment_setting(level, "max_size_ratio")
    if max_size_ratio is None:
        return None
    if isinstance(max_size_ratio, str):
        raise ValueError(f"`max_size_ratio`={max_size_ratio!r} is not valid. Give a number, 'level' or None.")
    return float(check_positive("max_size_ratio", max_size_ratio))


def _checked_arguments(
    prune_amount: float,
    prune_method: str,
    slim: bool,
    calibration_batches: int,
    batch_size: int,
    repeats: int,
    compile: bool,
    deploy: bool,
    keep_slower: bool,
    max_accuracy_drop: float | None,
    eval_data: Iterable[Any] | None,
    calibration_data: Iterable[Any] | None,
    example_inputs: Any,
) -> Any:
    """Check :func:`optimize`'s arguments (a ``ValueError`` names the first bad one); return the inputs to time."""
    check_fraction("prune_amount", prune_amount)
    check_choice("prune_method", prune_method, PRUNE_METHODS)
    check_positive("calibration_batches", calibration_batches)
    check_positive("batch_size", batch_size)
    check_positive("repeats", repeats)
    if slim and prune_method == "l1_unstructured":
        raise ValueError(
            f"`slim`=True removes channels, so it needs a structured `prune_method`, not {prune_method!r}. "
            f"Choose one of: {PRUNE_METHODS[1:]}."
        )
    if compile and deploy:
        raise ValueError(
            "`compile`=True with `deploy`=True: the deployment gate already measures the compiled forms and ships "
            "one where it is faster. Set `deploy`=False to compile unconditionally."
        )
    if keep_slower and not deploy:
        raise ValueError("`keep_slower`=True only matters with `deploy`=True, which measures what is slower.")
    if max_accuracy_drop is not None:
        check_non_negative("max_accuracy_drop", max_accuracy_drop)  # NaN would switch the budget off
        if eval_data is None:
            raise ValueError("`max_accuracy_drop` needs `eval_data` to measure accuracy on.")
    if example_inputs is not None:
        return example_inputs
    source = eval_data if eval_data is not None else calibration_data
    if source is None:
        raise ValueError("Give `example_inputs`, `eval_data` or `calibration_data`: nothing to time the model on.")
    return _first_inputs(source)


class _Steps:
    """The steps of one :func:`optimize` call: each transforms a copy of the current model, is measured,
    and is kept, or rolled back when it drops accuracy over the budget."""

    def __init__(
        self,
        model: nn.Module,
        eval_data: Iterable[Any] | None,
        metric: Callable[[Tensor, Tensor], float] | None,
        max_accuracy_drop: float | None,
    ) -> None:
        self.current = model
        self.float_current = model  # the model before its numerics changed: the gate's float form
        self.eval_data, self.metric, self.max_accuracy_drop = eval_data, metric, max_accuracy_drop
        self.reference: float | None = None
        self.steps: list[StepRecord] = []

    def attempt(self, name: str, transform: Callable[[nn.Module], tuple[nn.Module, dict[str, Any]]]) -> bool:
        """Apply step ``name``; whether it was kept."""
        t0 = time.perf_counter()
        try:
            candidate, detail = transform(copy.deepcopy(self.current))
            candidate.eval()  # a wrapper a step adds starts in train mode
        except (ValueError, ImportError, RuntimeError) as error:  # e.g. nothing to quantize, no bnb
            self.steps.append(StepRecord(name, False, None, None, 0.0, time.perf_counter() - t0, reason=str(error)))
            log.warning("optimize: step %s not applied: %s", name, error)
            return False
        accuracy = None if self.eval_data is None else evaluate_accuracy(candidate, self.eval_data, metric=self.metric)
        drop = self.reference - accuracy if self.reference is not None and accuracy is not None else None
        record = StepRecord(
            name, True, accuracy, drop, serialized_size_bytes(candidate) / 2**20, time.perf_counter() - t0, detail
        )
        budget = self.max_accuracy_drop
        if budget is not None and drop is not None and drop > budget:
            record.kept = False
            record.reason = f"accuracy drop {drop:.4f} is above `max_accuracy_drop`={budget}: rolled back"
            log.warning("optimize: step %s rolled back: %s", name, record.reason)
        else:
            if name not in _NUMERICS_STEPS:
                self.float_current = candidate
            self.current = candidate
        self.steps.append(record)
        return record.kept


def _deploy(
    current: nn.Module,
    float_current: nn.Module,
    steps: list[StepRecord],
    level: str,
    keep_slower: bool,
    eval_data: Iterable[Any] | None,
    timed: Any,
    example_inputs: Any,
    metric: Callable[[Tensor, Tensor], float] | None,
    batch_size: int,
    repeats: int,
    max_accuracy_drop: float | None,
    reference: float | None,
    extra: ReportExtra,
    max_size_ratio: float | None = None,
) -> nn.Module:
    """Run the deployment gate on the result of the steps; roll back a numerics step the gate passed over."""
    t0 = time.perf_counter()
    trained = trained_form(current)
    numerics_step = next((s for s in reversed(steps) if s.kept and s.name in _NUMERICS_STEPS), None)
    if keep_slower and numerics_step is not None:
        forms = [trained, trained.replace("eager", "compiled")]
    else:
        forms = forms_for(deployment_numerics(level))
    module, decision = choose_deployment(
        current,
        eval_data,
        example_inputs=timed if timed is not None else (example_inputs if eval_data is None else None),
        float_model=float_current if float_current is not current else None,
        forms=forms,
        batch_size=batch_size,
        repeats=repeats,
        max_accuracy_drop=max_accuracy_drop if max_accuracy_drop is not None else 0.01,
        metric=metric,
        max_size_ratio=max_size_ratio,
    )
    winner = decision.winner
    if numerics_step is not None and decision.form.split()[0] not in (trained.split()[0], "trained"):
        own = [c for c in decision.candidates if c.form.split()[0] == trained.split()[0] and c.latency_p50_ms]
        best = min(own, key=lambda c: c.latency_p50_ms or 0.0) if own else None
        numerics_step.kept = False
        numerics_step.reason = (
            f"slower on this machine: its fastest form ({best.form if best else trained}, "
            f"{best.latency_p50_ms if best else float('nan'):.3f} ms p50) loses to {decision.form} "
            f"({winner.latency_p50_ms:.3f} ms): rolled back (`keep_slower`=True keeps it)"
        )
        log.warning("optimize: step %s rolled back: %s", numerics_step.name, numerics_step.reason)
    drop = reference - winner.accuracy if reference is not None and winner.accuracy is not None else None
    steps.append(
        StepRecord(
            "deploy",
            True,
            winner.accuracy,
            drop,
            serialized_size_bytes(module) / 2**20,
            time.perf_counter() - t0,
            {"form": decision.form, **({} if winner.freezing is None else {"freezing": winner.freezing})},
            reason=decision.reason,
        )
    )
    extra["deployment"] = decision.to_dict()
    return module


RECIPE = "optimized.json"


def save_optimized(
    result: OptimizationResult, directory: str | Path, *, example_inputs: Any = None, stem: str = "model"
) -> dict[str, Path]:
    """Write the optimized model, ``optimized.json`` and ``report.json`` / ``report.md`` into ``directory``.

    A static int8 model (a graph) is written as a ``torch.export`` program (``.pt2``, needs
    ``example_inputs``), an ONNX Runtime form (the deploy step's choice) as its ``.onnx`` file; any
    other as safetensors weights, with ``optimized.json`` recording the steps that were kept, so
    :func:`load_optimized` can rebuild the model around them. Earlier files are kept, renamed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_report(result.report, directory)
    model = result.model
    if isinstance(model, FrozenInference):  # a compiled form: its weights; the recipe says to compile again
        model = getattr(model, "source", model.model)  # the gate's compiled forms run the exported program
    if isinstance(model, OnnxRuntimeModule):
        target, fmt = directory / f"{stem}.onnx", "onnx"
        keep_existing(target)
        target.write_bytes(model.model_bytes())
        paths["model"] = target
    elif isinstance(model, torch.fx.GraphModule):
        if example_inputs is None:
            raise ValueError("A static int8 model is saved as a torch.export program: give `example_inputs`.")
        target, fmt = directory / f"{stem}.pt2", "pt2"
        keep_existing(target)
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        paths["model"] = export_program(model, args, target)
    else:
        target, fmt = directory / f"{stem}.safetensors", "safetensors"
        keep_existing(target)
        paths["model"] = save_safetensors(model, target)
    recipe = {
        "format": fmt,
        "file": target.name,
        "level": result.report.level,
        "steps": [{"name": s.name, "detail": s.detail} for s in result.steps if s.kept and s.name != "compile"],
    }
    paths["recipe"] = directory / RECIPE
    keep_existing(paths["recipe"])
    paths["recipe"].write_text(json.dumps(recipe, indent=2) + "\n")
    return paths


def optimize_and_save(
    model: nn.Module,
    level: str | OptimizationLevel,
    datamodule: Any,
    output_dir: str | Path,
    *,
    calibrate: bool = True,
    **options: Any,
) -> tuple[OptimizationResult, dict[str, Path]]:
    """The pipeline of ``lq-optimize`` and of the service's jobs: :func:`optimize` ``model`` on a
    LightningDataModule's data, then :func:`save_optimized` into ``output_dir``.

    Static int8 is calibrated on the training split when ``calibrate`` (dynamic int8 otherwise),
    accuracy is measured on the test split, and the first 8 test inputs are the example the
    artifact is traced with. A :class:`~lightning_quantum.models.CausalLM` is measured by its mean
    token log-likelihood on the test blocks (:func:`~lightning_quantum.models.token_log_likelihood`:
    ``max_accuracy_drop=0.01`` is a perplexity about 1% higher), unless ``options`` give a ``metric``.
    ``options`` are :func:`optimize`'s keyword arguments.
    """
    datamodule.setup("fit")
    eval_data: Iterable[Any] = datamodule.test_dataloader()
    if isinstance(model, CausalLM):  # a language model's targets are its own tokens
        eval_data = LabelledBlocks(eval_data)
        options.setdefault("metric", token_log_likelihood)
    result = optimize(
        model,
        level,
        calibration_data=datamodule.train_dataloader() if calibrate else None,
        eval_data=eval_data,
        **options,
    )
    example = split_batch(next(iter(eval_data)))[0][:8]
    return result, save_optimized(result, output_dir, example_inputs=example)


def load_optimized(model: nn.Module | None, directory: str | Path) -> nn.Module:
    """Load a model written by :func:`save_optimized`.

    A ``.pt2`` program or an ``.onnx`` file (opened in ONNX Runtime) needs no model code (``model`` may
    be ``None``). Safetensors weights go into
    ``model``, a fresh instance of the original architecture, after the recorded steps reshape and
    quantize it the same way (slimmed channels, bf16, dynamic int8, NF4). Weights are read only with
    safetensors or ``torch.export.load``; the recipe is plain JSON naming steps from a fixed set.

    Raises:
        ValueError: for a missing recipe, an unknown step or format, or no ``model`` for safetensors.
    """
    directory = Path(directory)
    recipe_path = directory / RECIPE
    if not recipe_path.is_file():
        raise ValueError(f"{directory} has no {RECIPE}: it was not written by `save_optimized`.")
    recipe = json.loads(recipe_path.read_text())
    fmt, file = recipe.get("format"), Path(str(recipe.get("file", ""))).name  # a bare name: stays in directory
    if fmt == "pt2":
        program = load_program(directory / file)
        deploy = next((s for s in recipe.get("steps", []) if s.get("name") == "deploy"), None)
        if deploy is not None and _deployed_form(deploy.get("detail") or {}, recipe_path)[1]:
            return compile_for_inference(program, freezing=recorded_freezing(deploy.get("detail") or {}))
        return program
    if fmt == "onnx":
        return load_onnxruntime(directory / file)
    if fmt != "safetensors":
        raise ValueError(f"{recipe_path}: `format`={fmt!r} is not valid. Choose from: 'pt2', 'onnx', 'safetensors'.")
    if model is None:
        raise ValueError("Safetensors weights load into a model: give a fresh instance of the original architecture.")
    model = model.eval()
    kept = {step.get("name") for step in recipe.get("steps", [])}
    compiled, freezing = False, True
    for step in recipe.get("steps", []):
        name, detail = step.get("name"), step.get("detail") or {}
        if name == "deploy":
            numerics, compiled = _deployed_form(detail, recipe_path)
            freezing = recorded_freezing(detail)
            if numerics == "bf16" and "bf16" not in kept:
                model = _bf16(model)[0]
            elif numerics == "int8" and "int8" not in kept:
                quantize_dynamic_int8(model)
        elif name == "prune":
            if detail.get("architecture"):
                rebuild_architecture(model, detail["architecture"])
        elif name == "bf16":
            model = _bf16(model)[0]
        elif name == "int8" and detail.get("kind") == "dynamic":
            quantize_dynamic_int8(model)
        elif name == "nf4":
            _nf4(model)
        else:
            raise ValueError(f"{recipe_path}: unknown step {name!r} ({detail}).")
    loaded = load_safetensors(model, directory / file).eval()
    if compiled:
        return compile_for_inference(loaded, freezing=freezing)
    return loaded


def _deployed_form(detail: dict[str, Any], recipe_path: Path) -> tuple[str, bool]:
    """(numerics, compiled) of a recipe's ``deploy`` step, or a ``ValueError`` naming a bad form."""
    form = detail.get("form")
    if form not in (*FORMS, "trained eager", "trained compiled"):
        raise ValueError(f"{recipe_path}: the deploy step's `form`={form!r} is not valid. Choose one of: {FORMS}.")
    numerics, runner = str(form).split()
    return numerics, runner == "compiled"
