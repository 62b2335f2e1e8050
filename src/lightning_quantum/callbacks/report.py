"""Benchmark the model at fit start against the model at fit end, and write the report."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from rich.console import Console
from torch import nn
from typing_extensions import override

from lightning_quantum._batches import _call, _to_device, split_batch
from lightning_quantum._modules import eval_mode, module_device
from lightning_quantum._validation import check_choice, check_finite, check_non_negative, check_positive
from lightning_quantum.benchmark import (
    OptimizationPerformanceMetrics,
    benchmark_model,
    compare_train_step_ms,
    evaluate_accuracy,
    make_train_step,
)
from lightning_quantum.callbacks._common import (
    EVAL_LOADERS,
    MeasuresInference,
    check_whole_model_available,
    detached_copy,
    eval_loader,
    find_callback,
    inference_copy,
    is_fast_dev_run,
    output_dir,
    whole_module,
)
from lightning_quantum.callbacks.deployment import DeploymentGate
from lightning_quantum.callbacks.qat import QuantizationAwareTraining
from lightning_quantum.compiled import compile_for_inference
from lightning_quantum.report import (
    OptimizationReportData,
    ReportContext,
    ReportContributor,
    ReportExtra,
    build_report,
    render_rich_table,
    write_report,
)

log = logging.getLogger(__name__)

__all__ = ["OptimizationReport"]


#: Lightning's bitsandbytes layer classes, by the mode they were built for
_BNB_MODES = {
    "_NF4Linear": "nf4",
    "_NF4DQLinear": "nf4-dq",
    "_FP4Linear": "fp4",
    "_FP4DQLinear": "fp4-dq",
    "_Linear8bitLt": "int8-training",
    "_Int8LinearInference": "int8",
}
_TRUE_PRECISION_OF = {torch.bfloat16: "bf16-true", torch.float16: "16-true", torch.float32: "32-true"}


def precision_of(trainer: pl.Trainer) -> tuple[str, str]:
    """The precision the report names, and the one its measurement runs the model under.

    ``trainer.precision`` says ``"32-true"`` for a bitsandbytes plugin, whose model computes in the
    plugin's dtype with 4-bit (or 8-bit) linears: the report names it (``"nf4-dq (bitsandbytes,
    bfloat16 compute)"``) and measures it with inputs in that dtype, as the plugin feeds them.
    """
    plugin = trainer.precision_plugin
    if type(plugin).__name__ == "BitsandbytesPrecision":
        mode = _BNB_MODES.get(getattr(getattr(plugin, "_linear_cls", None), "__name__", ""), "bitsandbytes")
        dtype = getattr(plugin, "dtype", torch.float32)
        return f"{mode} (bitsandbytes, {str(dtype).removeprefix('torch.')} compute)", _TRUE_PRECISION_OF.get(
            dtype, "32-true"
        )
    return str(trainer.precision), str(trainer.precision)


def weights_precision(module: nn.Module) -> str:
    """The ``*-true`` precision of a module's floating-point weights (``"32-true"`` without any): the
    fit-start model of a bitsandbytes run was cast to the plugin's dtype before fit, and its baseline
    measurement feeds it inputs in that dtype."""
    return _TRUE_PRECISION_OF.get(_weights_dtype(module), "32-true")


def _weights_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _deployment_gate(trainer: pl.Trainer) -> DeploymentGate | None:
    return find_callback(trainer, DeploymentGate)


def _contribution(contributor: ReportContributor, context: ReportContext) -> ReportExtra:
    """``contributor.report_extra(context)``; a callback still written for the old signature,
    ``report_extra(self, pl_module)``, gets the module, with a deprecation warning (for one release)."""
    parameters = list(inspect.signature(contributor.report_extra).parameters)
    if parameters == ["pl_module"]:
        rank_zero_deprecation(
            f"{type(contributor).__name__}.report_extra(pl_module) is the old signature: take a "
            "`lightning_quantum.report.ReportContext` instead (`context.pl_module` is the module)."
        )
        return contributor.report_extra(context.pl_module)  # type: ignore[arg-type]
    if not parameters:  # the old LightningModule signature, report_extra(self)
        rank_zero_deprecation(
            f"{type(contributor).__name__}.report_extra() is the old signature: take a "
            "`lightning_quantum.report.ReportContext`."
        )
        return contributor.report_extra()  # type: ignore[call-arg]
    return contributor.report_extra(context)


class OptimizationReport(Callback, MeasuresInference):
    """Measure the model before and after ``fit`` and write ``report.json`` and ``report.md``.

    At ``setup("fit")`` it snapshots the model, before any compression has changed it (training-only
    wrappers such as activation checkpointing are taken off the copy); the snapshot's weights are
    kept in the checkpoint so a resumed run compares against the same baseline. At ``on_fit_end``
    it benchmarks the snapshot (fp32) and the final model (under the trainer's precision) with
    :func:`~lightning_quantum.benchmark.benchmark_model` on the DataModule's test (or val) loader,
    and times one training step of each configuration side by side. Then, on rank zero only, it
    writes the report, prints a rich table and logs the figures. Put it last among the callbacks,
    so every other ``on_fit_end`` has run before it measures.

    Args:
        output_dir: where the report goes; the trainer's ``log_dir`` (or ``default_root_dir``) if ``None``.
        batch_size: samples per timed inference batch.
        num_threads: torch threads while timing; the current setting if ``None``.
        warmup: untimed passes before timing.
        repeats: timed passes; latency is their p50 and p95.
        eval_split: ``"test"`` or ``"val"``: which DataModule loader gives accuracy.
        max_eval_batches: cap on the batches of the accuracy pass; all when ``None``.
        compare_train_step: time a training step of the baseline (fp32) and final configuration.
        train_step_repeats: timed training steps per configuration.
        reference_accuracy: the accuracy that ``accuracy_degradation`` is measured against, for
            example the test accuracy of a BASIC run. When ``None``: a distillation run's teacher, else
            the float model before QAT's int8 conversion, else the fit-start snapshot unless it is at
            chance level (then no degradation is reported, and the report says why).
        print_table: print the rich table on rank zero.
        log_to_logger: log the figures to the trainer's loggers as ``report/*``.
        keep_baseline_in_checkpoint: store the snapshot's weights in the callback state, so that
            resume compares against the real baseline.
        stem: file name stem of the report files.
        level: the optimization level to name in the report, when a recipe built the trainer.
        compile_optimized: also measure the final model compiled for inference (``torch.compile`` with
            Inductor freezing, on a copy), reported as ``extra.optimized_compiled``.

    Example:
        >>> trainer = L.Trainer(callbacks=[OptimizationReport(batch_size=256)])  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        batch_size: int = 64,
        num_threads: int | None = None,
        warmup: int = 10,
        repeats: int = 50,
        eval_split: Literal["test", "val"] = "test",
        max_eval_batches: int | None = None,
        compare_train_step: bool = True,
        train_step_repeats: int = 20,
        reference_accuracy: float | None = None,
        print_table: bool = True,
        log_to_logger: bool = True,
        keep_baseline_in_checkpoint: bool = True,
        stem: str = "report",
        level: str | None = None,
        compile_optimized: bool = False,
    ) -> None:
        err = MisconfigurationException
        check_positive("batch_size", batch_size, error=err)
        if num_threads is not None:
            check_positive("num_threads", num_threads, error=err)
        check_non_negative("warmup", warmup, error=err)
        check_positive("repeats", repeats, error=err)
        check_choice("eval_split", eval_split, EVAL_LOADERS, error=err)
        if max_eval_batches is not None:
            check_positive("max_eval_batches", max_eval_batches, error=err)
        check_positive("train_step_repeats", train_step_repeats, error=err)
        if (
            reference_accuracy is not None
            and not 0 <= check_finite("reference_accuracy", reference_accuracy, error=err) <= 1
        ):
            raise err(f"`reference_accuracy`={reference_accuracy!r} is not valid. It must lie in [0, 1].")
        if not stem or "/" in stem:
            raise err(f"`stem`={stem!r} is not valid. Give a plain file name without '/'.")
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.warmup = warmup
        self.repeats = repeats
        self.eval_split = eval_split
        self.max_eval_batches = max_eval_batches
        self.compare_train_step = compare_train_step
        self.train_step_repeats = train_step_repeats
        self.reference_accuracy = reference_accuracy
        self.print_table = print_table
        self.log_to_logger = log_to_logger
        self.keep_baseline_in_checkpoint = keep_baseline_in_checkpoint
        self.stem = stem
        self.level = level
        self.compile_optimized = compile_optimized
        self.report: OptimizationReportData | None = None
        self.paths: dict[str, Path] = {}
        self._baseline: nn.Module | None = None
        self._baseline_state: dict[str, torch.Tensor] | None = None
        self._elapsed_before = 0.0
        self._started: float | None = None
        self._batch_started: float | None = None
        self.fit_step_times_ms: list[float] = []

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_whole_model_available(trainer)
        if stage == "fit":
            self._take_baseline_snapshot(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self.fit_step_times_ms = []
        if self._baseline is not None and self._baseline_state is not None:
            # Resumed: the checkpoint (restored after `setup`) holds the model as the first fit found it.
            self._baseline.load_state_dict(self._baseline_state)
        self._baseline_state = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_started is not None:
            self.fit_step_times_ms.append((time.perf_counter() - self._batch_started) * 1000.0)
            self._batch_started = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._baseline is None:
            return
        out = output_dir(trainer, self.output_dir)  # every rank: collectives under FSDP2
        module = whole_module(trainer)  # under FSDP2: gathered whole on rank zero
        if not trainer.is_global_zero or module is None:
            return
        self._run_report(trainer, cast(pl.LightningModule, module), out)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"elapsed_seconds": self._elapsed()}
        if self.keep_baseline_in_checkpoint and self._baseline is not None:
            state["baseline_state_dict"] = {k: v.detach().cpu() for k, v in self._baseline.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed_before = float(state_dict.get("elapsed_seconds", 0.0))
        self._baseline_state = state_dict.get("baseline_state_dict")

    # -- work ----------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._elapsed_before + running

    def _take_baseline_snapshot(self, pl_module: pl.LightningModule) -> None:
        # Callbacks set up before this one may have wrapped blocks (activation checkpointing) or
        # prepared layers for QAT; the baseline is the plain model, so both come off the copy (the
        # model itself keeps them). A distillation teacher stays with it: the baseline's training
        # step is timed too, and that step runs the teacher.
        self._baseline = inference_copy(pl_module, keep_teacher=True)

    def _settings(self, trainer: pl.Trainer) -> dict[str, Any]:
        quick = is_fast_dev_run(trainer)
        return {
            "batch_size": self.batch_size,
            "num_threads": self.num_threads,
            "warmup": 1 if quick else self.warmup,
            "repeats": 2 if quick else self.repeats,
            "max_eval_batches": 1 if quick else self.max_eval_batches,
        }

    def _eval_loader(self, trainer: pl.Trainer) -> Any:
        return eval_loader(trainer, self.eval_split, "OptimizationReport, to measure accuracy,")

    def _benchmark(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[OptimizationPerformanceMetrics, OptimizationPerformanceMetrics]:
        assert self._baseline is not None
        settings = self._settings(trainer)
        loader = self._eval_loader(trainer)
        baseline = self._baseline.to(pl_module.device)
        name, runs_as = precision_of(trainer)
        baseline_metrics = benchmark_model(
            baseline, eval_data=loader, precision=weights_precision(baseline), **settings
        )
        gate = _deployment_gate(trainer)
        if gate is not None and gate.module is not None and gate.decision is not None:
            # The form that ships is the one measured: what the DeploymentGate chose (it takes float32 inputs).
            final_metrics = benchmark_model(gate.module, eval_data=loader, precision="32-true", **settings)
            return baseline_metrics, dataclasses.replace(
                final_metrics, precision=f"{gate.decision.form} ({name} training)"
            )
        final_metrics = benchmark_model(pl_module, eval_data=loader, precision=runs_as, **settings)
        return baseline_metrics, dataclasses.replace(final_metrics, precision=name)

    def _train_step_times(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        if not self.compare_train_step:
            return None
        assert self._baseline is not None
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
        if loader is None:
            return None
        batch = trainer.strategy.batch_to_device(next(iter(loader)), pl_module.device)
        # a model cast before fit (qlora_gpu's bf16) has a baseline in that dtype: its batch is cast to it
        dtype = _weights_dtype(self._baseline)
        baseline_batch = batch if dtype == torch.float32 else _to_device(batch, pl_module.device, dtype)
        steps = {
            "baseline": make_train_step(
                detached_copy(self._baseline), baseline_batch, forward_context=contextlib.nullcontext
            ),
            # the trainer's precision plugin casts the batch as in fit (bf16-true and 16-true need it)
            "optimized": make_train_step(
                detached_copy(pl_module),
                trainer.precision_plugin.convert_input(batch),
                forward_context=trainer.precision_plugin.forward_context,
            ),
        }
        quick = is_fast_dev_run(trainer)
        return compare_train_step_ms(
            steps,
            warmup=1 if quick else 3,
            repeats=2 if quick else self.train_step_repeats,
            rounds=1 if quick else 4,
            device=pl_module.device,
        )

    def _run_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Path) -> None:
        duration = self._elapsed()
        baseline_metrics, final_metrics = self._benchmark(trainer, pl_module)
        step_times = self._train_step_times(trainer, pl_module)
        extra: ReportExtra = {
            "fast_dev_run": is_fast_dev_run(trainer),
            "training_device": str(trainer.strategy.root_device),
            "global_step": trainer.global_step,
            # Median wall time of a training batch inside this fit, Lightning's loop included.
            "fit_step_time_ms_median": statistics.median(self.fit_step_times_ms) if self.fit_step_times_ms else None,
        }
        if self.compile_optimized:
            compiled = compile_for_inference(detached_copy(pl_module))
            settings = self._settings(trainer)
            extra["optimized_compiled"] = benchmark_model(
                compiled, eval_data=self._eval_loader(trainer), precision=str(trainer.precision), **settings
            ).to_dict()
        loader = self._eval_loader(trainer)
        settings = self._settings(trainer)
        context = ReportContext(
            trainer,
            pl_module,
            final_metrics,
            loader,
            measure=lambda module, precision: benchmark_model(
                module, eval_data=loader, precision=precision, **settings
            ),
            eval_split=self.eval_split,
            baseline=self._baseline,
            float_model=getattr(find_callback(trainer, QuantizationAwareTraining), "float_model", None),
        )
        # the LightningModule (a DistillationModule measures its teacher), then the callbacks (Pruning adds
        # its per-layer sparsity table, the DeploymentGate its candidates, ...)
        for contributor in (pl_module, *getattr(trainer, "callbacks", [])):
            if isinstance(contributor, ReportContributor) and contributor is not self:
                extra.update(_contribution(contributor, context))
        reference, reference_name, baseline_is_reference = self._accuracy_reference(
            trainer, baseline_metrics, extra.get("teacher")
        )
        self.report = build_report(
            baseline_metrics,
            final_metrics,
            optimization_duration_seconds=duration,
            reference_accuracy=reference,
            accuracy_reference=reference_name,
            baseline_is_reference=baseline_is_reference,
            train_step_time_ms=step_times,
            level=self.level,
            extra=extra,
        )
        self.paths = write_report(self.report, out, stem=self.stem)
        log.info("Optimization report written to %s", self.paths["json"])
        if self.print_table:
            Console().print(render_rich_table(self.report))
        if self.log_to_logger:
            self._log_figures(trainer)

    def _accuracy_reference(
        self, trainer: pl.Trainer, baseline: OptimizationPerformanceMetrics, teacher: dict[str, Any] | None
    ) -> tuple[float | None, str, bool]:
        """(reference accuracy, its name, whether the fit-start accuracy may serve) for ``accuracy_degradation``.

        In order: ``reference_accuracy`` when given; a distillation run's teacher; for QAT, the float
        model just before int8 conversion; the model at fit start, unless it is near chance level (at
        most 1.5x chance), where a "degradation" of -0.9 would say nothing.
        """
        if self.reference_accuracy is not None:
            return self.reference_accuracy, "the given reference_accuracy", True
        if teacher is not None and teacher.get("accuracy") is not None:
            return teacher["accuracy"], "the teacher", True
        qat = find_callback(trainer, QuantizationAwareTraining)
        if qat is not None and qat.float_model is not None and baseline.accuracy is not None:
            accuracy = evaluate_accuracy(
                qat.float_model, self._eval_loader(trainer), max_batches=self._settings(trainer)["max_eval_batches"]
            )
            return accuracy, "the float model before int8 conversion", True
        chance = self._chance_level(trainer)
        if baseline.accuracy is not None and chance is not None and baseline.accuracy <= 1.5 * chance:
            return (
                None,
                f"nothing: the model at fit start is at chance level (accuracy {baseline.accuracy:.4f}, chance "
                f"{chance:.4f}); set `reference_accuracy` (a BASIC run's test accuracy, say) to measure the change",
                False,
            )
        return None, "the model at fit start", True

    def _chance_level(self, trainer: pl.Trainer) -> float | None:
        """1 / the number of classes the model outputs, from one evaluation batch; ``None`` without labels."""
        assert self._baseline is not None
        inputs, targets = split_batch(next(iter(self._eval_loader(trainer))))
        if targets is None:
            return None
        with eval_mode(self._baseline), torch.inference_mode():
            inputs = _to_device(inputs, module_device(self._baseline), _weights_dtype(self._baseline))
            outputs = _call(self._baseline, inputs)
        width = outputs.shape[-1] if isinstance(outputs, torch.Tensor) and outputs.dim() > 1 else 0
        return 1.0 / width if width > 1 else None

    def _log_figures(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        figures = {
            f"report/{key}": float(value)
            for key, value in self.report.to_dict().items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
            logger.save()
