"""Knowledge distillation as a LightningModule: any teacher, any student."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_quantum._batches import batch_indices, split_batch
from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._modules import eval_mode, module_device
from lightning_quantum._validation import check_choice, check_non_negative, check_positive
from lightning_quantum.benchmark import serialized_size_bytes
from lightning_quantum.distillation.losses import attention_kl, feature_loss, is_token_batch, kd_loss, next_token_loss
from lightning_quantum.fsdp import shard_blocks
from lightning_quantum.quantization.dynamic import quantize_dynamic_int8
from lightning_quantum.report import (
    DistillationFigures,
    ReportContext,
    ReportContributor,
    ReportExtra,
    StudentVsTeacher,
)

log = logging.getLogger(__name__)

__all__ = ["DistillationModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _resolve(model: nn.Module, name: str, role: str, argument: str = "feature_pairs") -> nn.Module:
    names = [n for n, _ in model.named_modules() if n]
    try:
        return model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(
            f"`{argument}` names {role} layer {name!r}, which {type(model).__name__} does not have. "
            f"Close matches: {close or 'none'}."
        ) from None


def _select(inputs: Any, mask: Tensor) -> Any:
    """The rows of a batch's inputs (a tensor, or a dict of tensors) where ``mask`` is true."""
    if isinstance(inputs, dict):
        return {k: v[mask] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs[mask]


def _device_of(inputs: Any) -> torch.device:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return first.device if isinstance(first, Tensor) else torch.device("cpu")


class _Stopwatch:
    """Seconds spent in timed spans, summed. On CUDA the spans are timed with events and read only when
    the total is asked for, so timing does not stall the GPU every step (wall clock alone would time
    the kernel launches, not the work)."""

    def __init__(self) -> None:
        self._done = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
            return
        started = time.perf_counter()
        yield
        self._done += time.perf_counter() - started

    @property
    def seconds(self) -> float:
        for start, end in self._pending:
            end.synchronize()
            self._done += start.elapsed_time(end) / 1000.0
        self._pending.clear()
        return self._done

    def __getstate__(self) -> dict[str, Any]:
        # CUDA events cannot be copied or pickled: a copy of the module (the fit-end callbacks deep-copy
        # it) gets the total, read from them, and no pending spans.
        return {"_done": self.seconds, "_pending": []}


def _keep_output(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of a distilled layer: keep its latest output on the layer."""
    module._lq_output = _output_tensor(output)


def _keep_attention(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of a distilled attention module: keep its attention probabilities on the module.

    Hugging Face attention modules return ``(attn_output, attn_weights)``; the weights are ``None``
    unless the model runs its eager attention.
    """
    weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    if not isinstance(weights, Tensor):
        raise ValueError(
            f"{type(module).__name__} returned no attention probabilities. Attention distillation needs "
            "them: load the Hugging Face model with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager'))."
        )
    module._lq_attention = weights


def _output_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"A feature layer returned {type(output).__name__}; distillation needs a tensor.")


def _lower_precision(teacher: nn.Module, precision: str) -> nn.Module:
    """A copy of ``teacher`` in bf16, or with int8 linears (torchao dynamic int8); ``teacher`` when fp32.

    The user's teacher is never changed: lower precisions work on a copy.
    """
    if precision == "fp32":
        return teacher
    lowered = copy.deepcopy(teacher)
    if precision == "bf16":
        return lowered.to(torch.bfloat16)

    quantize_dynamic_int8(lowered.eval())
    return lowered


def _cast_floats(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, dict):
        return {k: _cast_floats(v, dtype) for k, v in inputs.items()}
    return inputs.to(dtype) if isinstance(inputs, Tensor) and inputs.is_floating_point() else inputs


class DistillationModule(pl.LightningModule):
    """Train ``student`` to match ``teacher``: ``alpha * task + beta * T^2 KL + sum gamma_i * feature_i``.

    The teacher is frozen: its parameters take no gradients, it is kept out of the optimizer, out of
    the checkpoint (unless ``save_teacher``) and out of ``.train()`` (it is not a registered
    submodule, so nothing switches it back to train mode; Lightning 18930), and it always runs in
    eval mode, so its BatchNorm statistics never change. ``forward`` is the student's, so the
    optimization report measures the student.

    Args:
        student: the network to train; maps inputs to logits.
        teacher: the trained network to learn from, with outputs of the same shape.
        num_classes: classes for accuracy, when the task is classification.
        alpha: weight of the task loss (cross-entropy on the labels); 0 for unlabeled data.
        beta: weight of the output loss: the soft-target KL for logits, or ``mse`` / ``cosine`` for
            embeddings (``output_loss``).
        temperature: softmax temperature of the soft targets, greater than 0.
        feature_pairs: ``{student_module_name: teacher_module_name}`` whose outputs are matched; a
            learned linear projection maps the student's width to the teacher's when they differ.
        feature_weight: weight of each feature pair's loss (gamma).
        feature_loss_kind: ``"mse"`` or ``"cosine"``.
        output_loss: ``"kl"`` (temperature soft targets, for classifiers), or ``"mse"`` / ``"cosine"``
            between student and teacher outputs (for embedding models).
        optimizer: a factory taking the parameters (student and projections); AdamW 1e-3 when ``None``.
        scheduler: an optional factory taking the optimizer.
        save_teacher: also store the teacher's weights in checkpoints.
        cache_teacher: ``"memory"`` keeps the teacher's training outputs by sample index after the first
            epoch, so later epochs pay no teacher forward; ``"disk"`` keeps them in a memory-mapped
            ``.npy`` file per rank under ``cache_dir``, removed when fit ends. It needs batches that
            carry sample indices (``DigitsDataModule(return_index=True)``) and data without random
            augmentation; otherwise (or with feature or attention pairs, which need the teacher's
            inner activations every step) it turns itself off and logs why.
        cache_max_mb: the largest cache allowed; a larger one (or one the disk has no room for) turns
            caching off with a logged reason.
        cache_dir: where the disk cache goes; ``<trainer.default_root_dir>/teacher_cache`` when ``None``.
        teacher_precision: ``"fp32"``; ``"bf16"`` runs a bf16 copy of the teacher (half the memory);
            ``"int8"`` a copy with torchao dynamic int8 linears (a quarter of their memory). Outputs
            are float32 either way; the user's teacher is not changed.
        attention_pairs: ``{student_attention_module: teacher_attention_module}`` of Hugging Face
            attention modules (e.g. ``model.encoder.layer.0.attention.self``) whose attention
            probabilities are matched with ``KL(teacher || student)`` (MiniLM-style). The models must
            run eager attention (``attn_implementation="eager"``).
        attention_weight: weight of the attention losses.
        teacher_sharding: under FSDP2 (``strategy="fsdp2"``): ``"replicate"`` keeps the whole teacher on
            every rank (a small teacher: its forward needs no gathers); ``"shard"`` shards it as the
            student is, block by block (a teacher too large for one device). Ignored otherwise.

    Raises:
        ValueError: for a temperature of 0 or below, negative weights, all loss weights zero, or a
            feature layer name the model lacks (with close matches).
    """

    teacher: nn.Module  # set with object.__setattr__: kept out of the module tree

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        num_classes: int | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        temperature: float = 4.0,
        feature_pairs: Mapping[str, str] | None = None,
        feature_weight: float = 1.0,
        feature_loss_kind: Literal["mse", "cosine"] = "mse",
        output_loss: Literal["kl", "mse", "cosine"] = "kl",
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        save_teacher: bool = False,
        cache_teacher: Literal["off", "memory", "disk"] = "off",
        cache_max_mb: float = 1024.0,
        cache_dir: str | None = None,
        teacher_precision: Literal["fp32", "bf16", "int8"] = "fp32",
        attention_pairs: Mapping[str, str] | None = None,
        attention_weight: float = 1.0,
        teacher_sharding: Literal["replicate", "shard"] = "replicate",
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        weights = {"alpha": alpha, "beta": beta, "feature_weight": feature_weight, "attention_weight": attention_weight}
        for name, value in weights.items():
            check_non_negative(name, value)
        pairs = dict(feature_pairs or {})
        attention = dict(attention_pairs or {})
        if alpha == 0 and beta == 0 and (not pairs or feature_weight == 0) and (not attention or attention_weight == 0):
            raise ValueError(
                "All loss weights are zero (`alpha`, `beta`, and the feature and attention weights of any "
                "pairs): nothing to learn."
            )
        check_choice("feature_loss_kind", feature_loss_kind, ("mse", "cosine"))
        check_choice("cache_teacher", cache_teacher, ("off", "memory", "disk"))
        check_choice("teacher_precision", teacher_precision, ("fp32", "bf16", "int8"))
        check_choice("output_loss", output_loss, ("kl", "mse", "cosine"))
        check_choice("teacher_sharding", teacher_sharding, ("replicate", "shard"))
        self.teacher_sharding = teacher_sharding
        check_positive("cache_max_mb", cache_max_mb)
        save_plain_hyperparameters(self, ignore=["student", "teacher", "optimizer", "scheduler"])
        self.student = student
        self.teacher_precision = teacher_precision
        teacher = _lower_precision(teacher, teacher_precision)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        teacher.requires_grad_(False)
        teacher.eval()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.feature_pairs = pairs
        self.feature_weight = feature_weight
        self.feature_loss_kind = feature_loss_kind
        self.output_loss = output_loss
        self.optimizer_factory = optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-3))
        self.scheduler_factory = scheduler
        self.save_teacher = save_teacher
        self.num_classes = num_classes
        self.projections = nn.ModuleDict()
        for s_name, t_name in pairs.items():
            # The hook keeps the output on the layer itself (not in a closure over this module), so a
            # deep copy of the DistillationModule captures into its own layers.
            _resolve(student, s_name, "student").register_forward_hook(_keep_output)
            _resolve(teacher, t_name, "teacher").register_forward_hook(_keep_output)
        self.attention_pairs = attention
        self.attention_weight = attention_weight
        for s_name, t_name in attention.items():
            _resolve(student, s_name, "student", "attention_pairs").register_forward_hook(_keep_attention)
            _resolve(teacher, t_name, "teacher", "attention_pairs").register_forward_hook(_keep_attention)
        self._teacher_time = _Stopwatch()
        self._step_time = _Stopwatch()
        self.cache_teacher = cache_teacher
        self.cache_max_mb = cache_max_mb
        self.cache_dir = cache_dir
        self.cache_path: Path | None = None
        self.cache_off_reason: str | None = None
        self._cache: Tensor | None = None
        self._cached: Tensor | None = None
        self.cache_hits = 0
        self.cache_lookups = 0
        self._outputs_checked = False

    # -- plumbing --------------------------------------------------------------------------------
    def _feature(self, role: str, name: str) -> Tensor:
        model = self.student if role == "s" else self.teacher
        return model.get_submodule(name)._lq_output  # type: ignore[return-value]

    def _release_kept_outputs(self) -> None:
        """Drop the layer outputs and attention maps the hooks kept for this step's losses: they hold the
        step's autograd graph (memory until the next step), and a module holding them cannot be copied
        (``copy.deepcopy`` refuses non-leaf tensors: QAT's float copy at fit end, the report's copies)."""
        pairs = [*self.feature_pairs.items(), *self.attention_pairs.items()]
        for s_name, t_name in pairs:
            for model, name in ((self.student, s_name), (self.teacher, t_name)):
                module = model.get_submodule(name)
                for attribute in ("_lq_output", "_lq_attention"):
                    if getattr(module, attribute, None) is not None:
                        setattr(module, attribute, None)

    @staticmethod
    def _projection_key(student_name: str) -> str:
        return student_name.replace(".", "__")

    def _teacher_to_device(self) -> None:
        self.teacher.to(self.device)
        self.teacher.eval()

    def _build_projections(self, inputs: Any) -> None:
        """Add a linear projection for each feature pair whose widths differ (probing one batch)."""
        if not self.feature_pairs or len(self.projections) == len(self.feature_pairs):
            return
        with torch.no_grad():
            self._run_where(self.student, inputs)
        self._teacher_forward(inputs)
        for s_name, t_name in self.feature_pairs.items():
            s_dim = self._feature("s", s_name).shape[-1]
            t_dim = self._feature("t", t_name).shape[-1]
            key = self._projection_key(s_name)
            self.projections[key] = (
                nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim).to(module_device(self.student))
            )

    @staticmethod
    def _run(model: nn.Module, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    @classmethod
    def _run_where(cls, model: nn.Module, inputs: Any) -> Any:
        """``model`` on ``inputs`` moved to its device (tensors or dicts of them; setup and probes only)."""
        return cls._run(model, move_data_to_device(inputs, module_device(model)))

    def _teacher_forward(self, inputs: Any) -> Tensor:
        """The teacher's outputs under ``no_grad``, as float32 whatever precision it runs at.

        The inputs go where the teacher lives (in a training step they are there already; at setup,
        before Lightning moves the student, they may not be).
        """
        inputs = move_data_to_device(inputs, module_device(self.teacher))
        with torch.no_grad():
            if self.teacher_precision == "bf16":
                return self._run(self.teacher, _cast_floats(inputs, torch.bfloat16)).float()
            return self._run(self.teacher, inputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DistillationModule:
        """Every move or cast of the module (``.to``, ``.cuda``, ``.half``, a deep copy's ``.to``) reaches
        the teacher, which is kept out of the module tree and so would otherwise stay behind.

        A teacher kept at a lower precision on purpose (``teacher_precision``) follows the device only.
        """
        super()._apply(fn, recurse)
        teacher = self.__dict__.get("teacher")
        if isinstance(teacher, nn.Module):
            if self.__dict__.get("teacher_precision", "fp32") == "fp32":
                teacher._apply(fn, recurse)
            else:
                teacher.to(fn(torch.empty(0)).device)
        return self

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.__dict__.get("teacher") is not None:  # an inference copy leaves the teacher behind
            self.teacher.eval()  # whatever Lightning asks, the teacher stays in eval mode
        return self

    # -- hooks -----------------------------------------------------------------------------------
    def _turn_cache_off(self, reason: str) -> None:
        self.cache_off_reason = reason
        self._cache = self._cached = None
        log.info("Teacher cache off: %s", reason)

    def _setup_cache(self) -> None:
        if self.cache_teacher == "off":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.feature_pairs or self.attention_pairs:
            return self._turn_cache_off(
                "feature or attention pairs are distilled, and only the teacher's outputs are cached"
            )
        if datamodule is None or getattr(datamodule, "has_augmentation", False):
            return self._turn_cache_off("the data may be augmented (or comes without a DataModule to ask)")
        loader = datamodule.train_dataloader()
        first = next(iter(loader))
        if batch_indices(first) is None:
            return self._turn_cache_off(
                "training batches carry no sample index (e.g. DigitsDataModule(return_index=True))"
            )
        inputs, _ = split_batch(first)
        out = self._teacher_forward(inputs)
        size = len(loader.dataset)  # type: ignore[arg-type]
        mb = size * out[0].numel() * 4 / 2**20
        if mb > self.cache_max_mb:
            return self._turn_cache_off(f"it would take {mb:.0f} MB, above `cache_max_mb`={self.cache_max_mb}")
        shape = (size, *out.shape[1:])
        if self.cache_teacher == "memory":
            self._cache = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self._cached = torch.zeros(size, dtype=torch.bool, device=self.device)
            return None

        directory = Path(self.cache_dir or self.trainer.default_root_dir) / "teacher_cache"
        directory.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(directory).free / 2**20
        if mb > free_mb:
            return self._turn_cache_off(f"it would take {mb:.0f} MB on disk, and {directory} has {free_mb:.0f} MB free")
        # One file per rank: under DDP each rank caches its own shard.
        self.cache_path = directory / f"rank{self.global_rank}.npy"
        array = np.lib.format.open_memmap(self.cache_path, mode="w+", dtype=np.float32, shape=shape)
        self._cache = torch.from_numpy(array)
        self._cached = torch.zeros(size, dtype=torch.bool)
        log.info("Teacher cache on disk: %s (%.1f MB)", self.cache_path, mb)
        return None

    def _teacher_outputs(self, inputs: Any, indices: Tensor | None) -> Tensor:
        """The teacher's outputs: from the cache for samples already in it, computed for the rest.

        Only the samples of the batch that are not cached yet go through the teacher (under DDP each
        epoch's shard differs, so batches are often partly cached); hits are counted per sample.
        """
        if self._cache is None or self._cached is None or indices is None or not self.training:
            return self._teacher_forward(inputs)
        indices = indices.to(self._cached.device)
        missing = ~self._cached[indices]
        self.cache_lookups += int(indices.numel())
        self.cache_hits += int(indices.numel() - missing.sum())
        if bool(missing.any()):
            subset = inputs if bool(missing.all()) else _select(inputs, missing.to(_device_of(inputs)))
            out = self._teacher_forward(subset)
            self._cache[indices[missing]] = out.detach().float().to(self._cache.device)
            self._cached[indices[missing]] = True
        # float32 values, the same whether just computed or read back (from memory or from disk)
        return self._cache[indices].to(_device_of(inputs))

    def configure_model(self) -> None:
        """Under FSDP2: shard the student block by block, and the feature projections; the teacher too
        with ``teacher_sharding="shard"`` (it stays frozen and in eval mode either way)."""
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        shard_blocks(self.student, mesh)
        if any(True for _ in self.projections.parameters()):
            shard_blocks(self.projections, mesh)  # trained with the student: their gradients are reduced too
        if self.teacher_sharding == "shard":
            shard_blocks(self.teacher, mesh)

    def setup(self, stage: str) -> None:
        self._teacher_to_device()
        if stage != "fit":
            return
        self._setup_cache()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            if self.feature_pairs and len(self.projections) < len(self.feature_pairs):
                raise RuntimeError("Feature distillation needs a DataModule to size its projections.")
            return  # without a DataModule the outputs are checked at the first step
        inputs, _ = split_batch(next(iter(datamodule.train_dataloader())))
        # At setup Lightning has not moved the student yet (the teacher is already on the target
        # device): each model gets the batch where it lives.
        with eval_mode(self.student), torch.no_grad():  # a probe: no dropout draw, no BatchNorm update
            self._check_outputs(self._run_where(self.student, inputs), self._teacher_forward(inputs))
        if self.feature_pairs and len(self.projections) < len(self.feature_pairs):
            self._build_projections(inputs)

    def _check_outputs(self, student_out: Any, teacher_out: Any) -> None:
        """Refuse a student whose outputs cannot be compared with the labels or with the teacher's.

        Raises:
            ValueError: naming ``num_classes`` and both output widths.
        """
        if self._outputs_checked or not isinstance(student_out, Tensor) or not isinstance(teacher_out, Tensor):
            return
        s_width, t_width = int(student_out.shape[-1]), int(teacher_out.shape[-1])
        if self.num_classes is not None and self.alpha and s_width != self.num_classes:
            raise ValueError(
                f"`num_classes`={self.num_classes}, but the student outputs {s_width} values per sample (the "
                f"teacher {t_width}): the task loss needs one student output per class."
            )
        if self.beta and student_out.shape != teacher_out.shape:
            raise ValueError(
                f"The student outputs {tuple(student_out.shape[1:])} per sample and the teacher "
                f"{tuple(teacher_out.shape[1:])}: the `output_loss`={self.output_loss!r} compares them one to one. "
                "Give the student the teacher's output width (classes), or set `beta`=0."
            )
        self._outputs_checked = True

    def on_fit_start(self) -> None:
        self._teacher_to_device()

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.cache_path is not None:
            self._cache = self._cached = None  # closes the memory map before its file goes
            self.cache_path.unlink(missing_ok=True)
            self.cache_path = None

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    @property
    def teacher_seconds(self) -> float:
        """Seconds the teacher took in training steps so far (cache lookups included)."""
        return self._teacher_time.seconds

    @property
    def step_seconds(self) -> float:
        """Seconds of the training steps' forward passes and losses so far."""
        return self._step_time.seconds

    def _losses(self, batch: Any, training: bool = False) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        inputs, targets = split_batch(batch)
        with self._teacher_time.span(_device_of(inputs)) if training else contextlib.nullcontext():
            teacher_out = self._teacher_outputs(inputs, batch_indices(batch))
        student_out = self._run(self.student, inputs)
        self._check_outputs(student_out, teacher_out)
        parts: dict[str, Tensor] = {}
        if self.alpha:
            if targets is None and is_token_batch(inputs, student_out):  # a causal LM: the next token is the label
                parts["task_loss"] = next_token_loss(student_out, inputs)
            elif targets is None:
                raise RuntimeError("`alpha` > 0 needs labelled batches; set `alpha`=0 to distill unlabeled data.")
            else:
                parts["task_loss"] = F.cross_entropy(student_out.float(), targets)
        if self.beta:
            if self.output_loss == "kl":
                parts["kd_loss"] = kd_loss(student_out, teacher_out, self.temperature)
            else:
                parts["output_loss"] = feature_loss(student_out, teacher_out.to(student_out.dtype), self.output_loss)
        if self.feature_pairs and self.feature_weight:
            feats = []
            if len(self.projections) < len(self.feature_pairs):  # a copy made before setup sized them
                self._build_projections(inputs)
                student_out = self._run(self.student, inputs)
            for s_name, t_name in self.feature_pairs.items():
                projected = self.projections[self._projection_key(s_name)](self._feature("s", s_name))
                target = self._feature("t", t_name).detach()
                feats.append(feature_loss(projected, target, self.feature_loss_kind))
            parts["feature_loss"] = torch.stack(feats).sum()
        if self.attention_pairs and self.attention_weight:
            maps = [
                attention_kl(
                    self.student.get_submodule(s_name)._lq_attention,  # type: ignore[arg-type]
                    self.teacher.get_submodule(t_name)._lq_attention.detach(),  # type: ignore[operator]
                )
                for s_name, t_name in self.attention_pairs.items()
            ]
            parts["attention_loss"] = torch.stack(maps).sum()
        self._release_kept_outputs()
        loss = (
            self.alpha * parts.get("task_loss", 0.0)
            + self.beta * parts.get("kd_loss", parts.get("output_loss", 0.0))
            + self.feature_weight * parts.get("feature_loss", 0.0)
            + self.attention_weight * parts.get("attention_loss", 0.0)
        )
        return loss, parts, student_out, teacher_out  # type: ignore[return-value]

    def _agreement(self, student_out: Tensor, teacher_out: Tensor) -> Tensor:
        """Top-1 agreement for classifiers, mean cosine similarity for embedding models."""
        if self.output_loss == "kl":
            return (student_out.argmax(-1) == teacher_out.argmax(-1)).float().mean()
        return F.cosine_similarity(student_out.float(), teacher_out.float(), dim=-1).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        with self._step_time.span(_device_of(split_batch(batch)[0])):
            loss, parts, student_out, teacher_out = self._losses(batch, training=True)
        self.log("train/loss", loss, prog_bar=True)
        # Each self.log costs about a millisecond of Lightning bookkeeping on CPU (profiled: more than
        # the distillation arithmetic itself), so the detail is logged only on the steps the loggers
        # write (`log_every_n_steps`).
        every = max(1, int(getattr(self._trainer, "log_every_n_steps", 1) or 1)) if self._trainer else 1
        if (self.global_step + 1) % every == 0:
            detail = {f"distill/{k}": v.detach() for k, v in parts.items()}
            detail["distill/agreement"] = self._agreement(student_out.detach(), teacher_out.detach())
            step_seconds = self.step_seconds
            if step_seconds:
                detail["distill/teacher_time_share"] = torch.tensor(self.teacher_seconds / step_seconds)
            if self.cache_lookups:
                detail["distill/cache_hit_rate"] = torch.tensor(self.cache_hits / self.cache_lookups)
            self.log_dict(detail)
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        loss, _, student_out, teacher_out = self._losses(batch)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True)
        self.log(f"{prefix}/agreement", self._agreement(student_out, teacher_out), sync_dist=True)
        inputs, targets = split_batch(batch)
        if targets is None and is_token_batch(inputs, student_out):  # exp of the mean of lm_loss: perplexity
            self.log(
                f"{prefix}/lm_loss", next_token_loss(student_out, inputs), prog_bar=prefix == "val", sync_dist=True
            )
        if targets is not None and self.num_classes:
            self.log(
                f"{prefix}/acc",
                (student_out.argmax(-1) == targets).float().mean(),
                prog_bar=prefix == "val",
                sync_dist=True,
            )
            self.log(f"{prefix}/teacher_acc", (teacher_out.argmax(-1) == targets).float().mean(), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        # frozen parameters (e.g. a student's fixed embedding table) stay out of the optimizer
        params = [p for p in [*self.student.parameters(), *self.projections.parameters()] if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for s_name in self.feature_pairs:  # projections exist before the weights load into them
            key = self._projection_key(s_name)
            weight = state.get(f"projections.{key}.weight")
            if key not in self.projections:
                self.projections[key] = nn.Identity() if weight is None else nn.Linear(weight.shape[1], weight.shape[0])
        if "teacher_state_dict" in checkpoint:
            self.teacher.load_state_dict(checkpoint["teacher_state_dict"])

    def teacher_agreement(self, loader: Any) -> float | None:
        """The student's agreement with the teacher over ``loader``, weighted by batch size.

        Top-1 agreement for classifiers, mean cosine similarity of the outputs for embedding models
        (the quality of a student distilled without labels). ``None`` for an empty loader.
        """
        self._teacher_to_device()
        total, count = 0.0, 0
        with eval_mode(self), torch.inference_mode():
            for batch in loader:
                inputs, _ = split_batch(batch)
                inputs = move_data_to_device(inputs, self.device)
                student_out = self._run(self.student, inputs)
                n = int(student_out.shape[0])
                total += float(self._agreement(student_out, self._teacher_forward(inputs))) * n
                count += n
        return total / count if count else None

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """The teacher, measured as the report measures the student, and the two side by side; the
        distillation figures (sizes, parameters, the teacher's share of step time, the cache)."""
        teacher = context.measure(self.teacher, "bf16-true" if self.teacher_precision == "bf16" else "32-true")
        student = context.optimized
        versus: StudentVsTeacher = {
            "size_ratio": student.model_size_bytes / teacher.model_size_bytes,
            "speedup": teacher.inference_latency_ms / student.inference_latency_ms,
            "accuracy_difference": None
            if student.accuracy is None or teacher.accuracy is None
            else student.accuracy - teacher.accuracy,
        }
        # quality without labels: how closely the student follows the teacher
        versus["agreement"] = self.teacher_agreement(context.eval_loader)
        versus["agreement_kind"] = "top-1" if self.output_loss == "kl" else "cosine"
        extra: ReportExtra = {
            "teacher": teacher.to_dict(),
            "student_vs_teacher": versus,
            "distillation": self.distillation_figures(),
        }
        if isinstance(self.student, ReportContributor):  # a student with sections of its own (a CausalLM's)
            extra.update(self.student.report_extra(dataclasses.replace(context, pl_module=self.student)))
        return extra

    def distillation_figures(self) -> DistillationFigures:
        """Sizes and parameters of teacher and student, the teacher's share of training step time, the cache."""
        return {
            "teacher_size_mb": serialized_size_bytes(self.teacher) / 2**20,
            "student_size_mb": serialized_size_bytes(self.student) / 2**20,
            "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
            "student_parameters": sum(p.numel() for p in self.student.parameters()),
            "teacher_time_share": self.teacher_seconds / self.step_seconds if self.step_seconds else None,
            "cache": self.cache_teacher if self.cache_off_reason is None else f"off: {self.cache_off_reason}",
            "cache_hit_rate": self.cache_hits / self.cache_lookups if self.cache_lookups else None,
            "teacher_precision": self.teacher_precision,
        }
