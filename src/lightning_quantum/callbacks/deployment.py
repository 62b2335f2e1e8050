"""At fit end, choose the inference form to ship by measuring the candidates on this machine."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_quantum._batches import _gather_inputs, split_batch
from lightning_quantum._validation import (
    check_choice,
    check_finite,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from lightning_quantum.callbacks._common import (
    EVAL_LOADERS,
    MeasuresInference,
    check_whole_model_available,
    eval_loader,
    find_callback,
    inference_copy,
    is_fast_dev_run,
    output_dir,
    whole_module,
)
from lightning_quantum.callbacks.qat import QuantizationAwareTraining
from lightning_quantum.deployment import (
    FORMS,
    NUMERICS,
    RUNNERS,
    DeploymentDecision,
    choose_deployment,
    default_cache_dir,
    save_deployment,
    trained_form,
)
from lightning_quantum.models.causal_lm import CausalLM
from lightning_quantum.models.decoding import DecodeDecision, choose_decoder, decode_table, save_decoder
from lightning_quantum.report import ReportContext, ReportExtra

log = logging.getLogger(__name__)

__all__ = ["DeploymentGate"]

#: Lightning precisions whose model keeps float32 weights.
_FLOAT32_WEIGHTS = ("32-true", "32", "bf16-mixed", "16-mixed", "transformer-engine")


class DeploymentGate(Callback):
    """Ship the fastest inference form that keeps the accuracy, as measured here, at fit end.

    After the other callbacks' ``on_fit_end`` (QAT's conversion included), on rank zero, it builds
    the candidate forms of the final model (:data:`~lightning_quantum.deployment.FORMS`: float, bf16
    and int8 numerics, each eager and compiled, and float and int8 in ONNX Runtime), measures their
    accuracy on the DataModule's test (or val) loader and their latency at ``batch_size``, and keeps
    the fastest within ``max_accuracy_drop`` of the model as trained
    (:func:`~lightning_quantum.deployment.choose_deployment`). A compressed model that runs slower
    than its float form is therefore never shipped: the float form wins, and the report says why.
    The winner is written as ``<stem>.pt2`` (``<stem>.onnx`` for an ONNX Runtime form) and
    ``deployment.json`` (reload with :func:`~lightning_quantum.deployment.load_deployment`), and the
    :class:`~lightning_quantum.callbacks.OptimizationReport` measures it as the optimized model.
    Put it after the callbacks that change the model and before ``ModelExport`` and the report.

    For a :class:`~lightning_quantum.models.CausalLM` (or a distillation into one: its student) it
    also runs the decode gate
    (:func:`~lightning_quantum.models.decoding.choose_decoder`): greedy decoding at batch 1 through
    Hugging Face ``generate`` and through :class:`~lightning_quantum.models.StaticCacheDecoder`
    (compiled; with the process's threads and with one), with the weights as trained and, after QAT,
    the float weights before conversion; the
    fastest within ``max_accuracy_drop`` of held-out log-likelihood is written as ``decoder.pt`` and
    ``decoder.json`` (reload with :func:`~lightning_quantum.models.decoding.load_decoder`) and listed
    in the report's ``decoding`` table.

    Args:
        numerics: the numerics to try: any of ``"float"``, ``"bf16"``, ``"int8"``. ``int8`` is a
            model's own int8 layers after int8 QAT, else torchao dynamic int8 of its float form (after
            int4 QAT: of the weights before conversion, with int8 embedding rows where QAT made them).
        runners: any of ``"eager"``, ``"compiled"`` (Inductor; with freezing unless the model's int8 linears run
            faster without, see :func:`~lightning_quantum.compiled.freezing_pays`) and ``"onnxruntime"``
            (float and int8 only; listed as not installed without the ``onnx`` extra).
        batch_size: samples per timed batch; the ``OptimizationReport``'s when ``None`` (else 64).
        max_accuracy_drop: the accuracy a form may lose against the model as trained.
        min_cosine: without labels, the least mean cosine of a form's outputs to the trained model's.
        max_size_ratio: a size budget, as a share of the float form's serialized size: the fastest form
            within it that runs faster than float eager ships; only when none does, the fastest form
            regardless of size (the reason says so). QUANTUM and ULTRA set 0.3 (int8 weights). ``None``:
            size does not count.
        warmup: untimed calls per form.
        repeats: timed calls per form.
        rounds: alternating timing rounds over the forms.
        num_threads: torch threads while timing; the report's (else the current setting) when ``None``.
        eval_split: ``"test"`` or ``"val"``: the loader for accuracy and the timed batch.
        max_eval_batches: cap on the batches of the accuracy pass; all when ``None``.
        export: write ``<stem>.pt2`` and ``deployment.json``.
        output_dir: where they go; the trainer's ``log_dir`` (or ``default_root_dir``) if ``None``.
        stem: file name stem of the program.
        cache: keep the latencies measured here, keyed by this machine, the libraries and the model's
            architecture, and on a later fit with the same key build only the forms that can still win
            (the trained form, the cached winner, float eager, the fastest float form when it came within
            1.5x of the winner, and faster forms that failed the accuracy budget then); accuracy and the winner's
            lead over float eager are measured anew every time.
            See :func:`~lightning_quantum.deployment.choose_deployment`. ``False`` measures every form.
        cache_dir: where; :func:`~lightning_quantum.deployment.default_cache_dir` when ``None``
            (``$LIGHTNING_QUANTUM_CACHE/deployment``, else ``~/.cache/lightning_quantum/deployment``).
        decode_prompt_tokens: a language model's decode gate: the prompt, held-out tokens.
        decode_new_tokens: the tokens it generates per timed call (fewer when the model's context is
            shorter than prompt plus new tokens).
        decode_int4_kernel: also measure an int4 language model's weights packed for ATen's CPU int4 kernel
            (:func:`~lightning_quantum.quantization.pack_int4_for_cpu`, bf16 activations).

    Example:
        >>> trainer = L.Trainer(callbacks=[QuantizationAwareTraining(), DeploymentGate()])  # doctest: +SKIP
    """

    def __init__(
        self,
        numerics: Sequence[str] = NUMERICS,
        runners: Sequence[str] = RUNNERS,
        batch_size: int | None = None,
        max_accuracy_drop: float = 0.01,
        min_cosine: float = 0.99,
        warmup: int = 5,
        repeats: int = 30,
        rounds: int = 3,
        num_threads: int | None = None,
        eval_split: str = "test",
        max_eval_batches: int | None = None,
        export: bool = True,
        output_dir: str | Path | None = None,
        stem: str = "deployed",
        cache: bool = True,
        cache_dir: str | Path | None = None,
        decode_prompt_tokens: int = 16,
        decode_new_tokens: int = 64,
        max_size_ratio: float | None = None,
        decode_int4_kernel: bool = True,
    ) -> None:
        err = MisconfigurationException
        for label, values, choices in (("numerics", numerics, NUMERICS), ("runners", runners, RUNNERS)):
            if isinstance(values, str) or not values or any(v not in choices for v in values):
                raise err(f"`{label}`={values!r} is not valid. Give a list of: {', '.join(map(repr, choices))}.")
        if batch_size is not None:
            check_positive("batch_size", batch_size, error=err)
        check_non_negative("max_accuracy_drop", max_accuracy_drop, error=err)
        if not -1.0 <= check_finite("min_cosine", min_cosine, error=err) <= 1.0:
            raise err(f"`min_cosine`={min_cosine!r} is not valid. It must lie in [-1, 1].")
        if max_size_ratio is not None:
            check_positive("max_size_ratio", max_size_ratio, error=err)
        check_non_negative("warmup", warmup, error=err)
        check_positive("repeats", repeats, error=err)
        check_positive("rounds", rounds, error=err)
        if num_threads is not None:
            check_positive("num_threads", num_threads, error=err)
        check_choice("eval_split", eval_split, EVAL_LOADERS, error=err)
        if max_eval_batches is not None:
            check_positive("max_eval_batches", max_eval_batches, error=err)
        if not stem or "/" in stem:
            raise err(f"`stem`={stem!r} is not valid. Give a plain file name without '/'.")
        self.numerics = list(numerics)
        self.runners = list(runners)
        self.batch_size = batch_size
        self.max_accuracy_drop = max_accuracy_drop
        self.min_cosine = min_cosine
        self.max_size_ratio = max_size_ratio
        self.warmup = warmup
        self.repeats = repeats
        self.rounds = rounds
        self.num_threads = num_threads
        self.eval_split = eval_split
        self.max_eval_batches = max_eval_batches
        self.export = export
        self.output_dir = output_dir
        self.stem = stem
        if not isinstance(cache, bool):
            raise err(f"`cache`={cache!r} is not valid. Give True or False.")
        self.cache = cache
        self.cache_dir = cache_dir
        check_positive_int("decode_prompt_tokens", decode_prompt_tokens, error=err)
        check_positive_int("decode_new_tokens", decode_new_tokens, error=err)
        self.decode_prompt_tokens = decode_prompt_tokens
        self.decode_new_tokens = decode_new_tokens
        if not isinstance(decode_int4_kernel, bool):
            raise err(f"`decode_int4_kernel`={decode_int4_kernel!r} is not valid. Give True or False.")
        self.decode_int4_kernel = decode_int4_kernel
        self.decode_decision: DecodeDecision | None = None
        self.module: nn.Module | None = None
        self.decision: DeploymentDecision | None = None
        self.trained_program: torch.export.ExportedProgram | None = None
        self.paths: dict[str, Path] = {}

    @property
    def forms(self) -> list[str]:
        return [f for f in (f"{n} {r}" for n, r in itertools.product(self.numerics, self.runners)) if f in FORMS]

    def _report_setting(self, trainer: pl.Trainer, name: str) -> Any:
        report = find_callback(trainer, MeasuresInference)
        return getattr(report, name) if report is not None else None

    @staticmethod
    def _float_model(trainer: pl.Trainer) -> nn.Module | None:
        """The float weights from before QAT's conversion, when a QAT callback converted this fit."""
        qat = find_callback(trainer, QuantizationAwareTraining)
        return qat.float_model if qat is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_whole_model_available(trainer)
        # Inductor's first compile in a process probes the CPU's instruction sets (about 1 s). Started in a
        # background thread at fit start, the probe and Inductor's import slowed the training on 2 cores by
        # more than they saved, and a run whose gate compiles nothing (a cached ranking) paid for nothing
        # (`lq-train level=quantum` cached: +10.7% with it, +1.1% without; first run +32.0% / +31.0%). The
        # probe's loads are now remembered on disk instead (`lightning_quantum.compiled._check_cpu_isa`).

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = output_dir(trainer, self.output_dir)  # every rank: collectives under FSDP2
        whole = whole_module(trainer)  # under FSDP2: gathered whole on rank zero
        if not trainer.is_global_zero or whole is None:
            return
        precision = str(trainer.precision)
        if precision not in _FLOAT32_WEIGHTS or type(trainer.precision_plugin).__name__ == "BitsandbytesPrecision":
            # Weights kept in 16 bits or 4 bits are shipped as trained: the forms here start from float32.
            rank_zero_info(f"Deployment: a model trained with precision {precision!r} is shipped as trained.")
            return
        loader = eval_loader(trainer, self.eval_split, "DeploymentGate")
        quick = is_fast_dev_run(trainer)
        batch_size = self.batch_size or self._report_setting(trainer, "batch_size") or 64
        threads = self.num_threads or self._report_setting(trainer, "num_threads")
        model = inference_copy(whole)
        forms = [trained_form(model)] if quick else self.forms  # fast_dev_run: no compiling, one form
        programs: dict[str, torch.export.ExportedProgram] = {}
        self.module, self.decision = choose_deployment(
            model,
            loader,
            example_inputs=None,
            float_model=self._float_model(trainer),
            forms=forms,
            batch_size=batch_size,
            warmup=1 if quick else self.warmup,
            repeats=2 if quick else self.repeats,
            rounds=1 if quick else self.rounds,
            num_threads=threads,
            max_accuracy_drop=self.max_accuracy_drop,
            min_cosine=self.min_cosine,
            max_eval_batches=1 if quick else self.max_eval_batches,
            cache_dir=None if quick or not self.cache else (self.cache_dir or default_cache_dir()),
            max_size_ratio=self.max_size_ratio,
            programs=programs,
        )
        # the program of the model as trained, compiled (its own numerics), when the gate built that form: a
        # ModelExport after this callback writes it rather than trace the same model again (0.6 s of a digits run)
        self.trained_program = programs.get(self.decision.trained_form.replace("eager", "compiled"))
        rank_zero_info(f"Deployment: {self.decision.reason}")
        if self.export:
            self.paths = save_deployment(
                self.module, self.decision, _gather_inputs(loader, batch_size), out, stem=self.stem
            )
        language_model = _language_model(model)
        if language_model is not None and not quick:
            self._choose_decoder(trainer, language_model, loader, threads, out)

    def _choose_decoder(
        self, trainer: pl.Trainer, model: CausalLM, loader: Any, threads: int | None, out: Path
    ) -> None:
        """The decode gate of a language model (see the class's description)."""
        float_model = _language_model(self._float_model(trainer))
        new_tokens = min(self.decode_new_tokens, model.context - self.decode_prompt_tokens)
        if new_tokens < 1:
            rank_zero_info(
                f"Deployment: no decode gate: `decode_prompt_tokens`={self.decode_prompt_tokens} leaves no room in "
                f"the model's context of {model.context} tokens."
            )
            return
        decoder, self.decode_decision = choose_decoder(
            model,
            (split_batch(b)[0] for b in loader),
            float_model=float_model,
            prompt_tokens=self.decode_prompt_tokens,
            new_tokens=new_tokens,
            max_accuracy_drop=self.max_accuracy_drop,
            max_eval_batches=self.max_eval_batches or 8,
            num_threads=threads,
            int4_kernel=self.decode_int4_kernel,
        )
        rank_zero_info(f"Decoding: {self.decode_decision.reason}")
        if self.export:
            self.paths.update(save_decoder(decoder, self.decode_decision, out))

    def report_extra(self, context: ReportContext) -> ReportExtra:
        if self.decision is None:
            return {}
        record = self.decision.to_dict()
        record["files"] = {name: str(path) for name, path in self.paths.items()}
        extra: ReportExtra = {"deployment": record}
        if self.decode_decision is not None:
            extra["decoding"] = decode_table(self.decode_decision)
        return extra


def _language_model(module: nn.Module | None) -> CausalLM | None:
    """The causal LM that ``module`` is or distils into (a ``DistillationModule``'s student), else ``None``."""
    for candidate in (module, getattr(module, "student", None)):
        if isinstance(candidate, CausalLM):
            return candidate
    return None
