"""Knowledge distillation as a LightningModule: any teacher, any student."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quantum._validation import check_choice, check_non_negative, check_positive
from lightning_quantum.benchmark import split_batch
from lightning_quantum.distillation.losses import feature_loss, kd_loss

log = logging.getLogger(__name__)

__all__ = ["DistillationModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _resolve(model: nn.Module, name: str, role: str) -> nn.Module:
    names = [n for n, _ in model.named_modules() if n]
    try:
        return model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(
            f"`feature_pairs` names {role} layer {name!r}, which {type(model).__name__} does not have. "
            f"Close matches: {close or 'none'}."
        ) from None


def _output_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"A feature layer returned {type(output).__name__}; distillation needs a tensor.")


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
        beta: weight of the soft-target loss.
        temperature: softmax temperature of the soft targets, greater than 0.
        feature_pairs: ``{student_module_name: teacher_module_name}`` whose outputs are matched; a
            learned linear projection maps the student's width to the teacher's when they differ.
        feature_weight: weight of each feature pair's loss (gamma).
        feature_loss_kind: ``"mse"`` or ``"cosine"``.
        optimizer: a factory taking the parameters (student and projections); AdamW 1e-3 when ``None``.
        scheduler: an optional factory taking the optimizer.
        save_teacher: also store the teacher's weights in checkpoints.

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
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        save_teacher: bool = False,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        for name, value in (("alpha", alpha), ("beta", beta), ("feature_weight", feature_weight)):
            check_non_negative(name, value)
        pairs = dict(feature_pairs or {})
        if alpha == 0 and beta == 0 and (not pairs or feature_weight == 0):
            raise ValueError("All loss weights are zero (`alpha`, `beta` and the feature weight): nothing to learn.")
        check_choice("feature_loss_kind", feature_loss_kind, ("mse", "cosine"))
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer", "scheduler"], logger=False)
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        teacher.requires_grad_(False)
        teacher.eval()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.feature_pairs = pairs
        self.feature_weight = feature_weight
        self.feature_loss_kind = feature_loss_kind
        self.optimizer_factory = optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-3))
        self.scheduler_factory = scheduler
        self.save_teacher = save_teacher
        self.num_classes = num_classes
        self.projections = nn.ModuleDict()
        self._features: dict[str, Tensor] = {}
        for s_name, t_name in pairs.items():
            _resolve(student, s_name, "student").register_forward_hook(self._capture(f"s:{s_name}"))
            _resolve(teacher, t_name, "teacher").register_forward_hook(self._capture(f"t:{t_name}"))
        self.teacher_seconds = 0.0
        self.step_seconds = 0.0

    # -- plumbing --------------------------------------------------------------------------------
    def _capture(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._features[key] = _output_tensor(output)

        return hook

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
            self._run(self.student, inputs)
            self._run(self.teacher, inputs)
        for s_name, t_name in self.feature_pairs.items():
            s_dim = self._features[f"s:{s_name}"].shape[-1]
            t_dim = self._features[f"t:{t_name}"].shape[-1]
            key = self._projection_key(s_name)
            self.projections[key] = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim).to(self.device)

    @staticmethod
    def _run(model: nn.Module, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    def forward(self, x: Any) -> Any:
        return self._run(self.student, x)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()  # whatever Lightning asks, the teacher stays in eval mode
        return self

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._teacher_to_device()
        if stage == "fit" and self.feature_pairs and len(self.projections) < len(self.feature_pairs):
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None:
                raise RuntimeError("Feature distillation needs a DataModule to size its projections.")
            inputs, _ = split_batch(next(iter(datamodule.train_dataloader())))
            self._build_projections(inputs)

    def on_fit_start(self) -> None:
        self._teacher_to_device()

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    def _losses(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        inputs, targets = split_batch(batch)
        started = time.perf_counter()
        with torch.no_grad():
            teacher_out = self._run(self.teacher, inputs)
        teacher_seconds = time.perf_counter() - started
        student_out = self._run(self.student, inputs)
        parts: dict[str, Tensor] = {}
        if self.alpha:
            if targets is None:
                raise RuntimeError("`alpha` > 0 needs labelled batches; set `alpha`=0 to distill unlabeled data.")
            parts["task_loss"] = F.cross_entropy(student_out.float(), targets)
        if self.beta:
            parts["kd_loss"] = kd_loss(student_out, teacher_out, self.temperature)
        if self.feature_pairs and self.feature_weight:
            feats = []
            for s_name, t_name in self.feature_pairs.items():
                projected = self.projections[self._projection_key(s_name)](self._features[f"s:{s_name}"])
                feats.append(feature_loss(projected, self._features[f"t:{t_name}"].detach(), self.feature_loss_kind))
            parts["feature_loss"] = torch.stack(feats).sum()
        loss = (
            self.alpha * parts.get("task_loss", 0.0)
            + self.beta * parts.get("kd_loss", 0.0)
            + self.feature_weight * parts.get("feature_loss", 0.0)
        )
        self.teacher_seconds += teacher_seconds
        return loss, parts, student_out, teacher_out  # type: ignore[return-value]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        started = time.perf_counter()
        loss, parts, student_out, teacher_out = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"distill/{k}": v for k, v in parts.items()})
        self.log("distill/agreement", (student_out.argmax(-1) == teacher_out.argmax(-1)).float().mean())
        self.step_seconds += time.perf_counter() - started
        if self.step_seconds:
            self.log("distill/teacher_time_share", self.teacher_seconds / self.step_seconds)
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        loss, _, student_out, teacher_out = self._losses(batch)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True)
        self.log(
            f"{prefix}/agreement", (student_out.argmax(-1) == teacher_out.argmax(-1)).float().mean(), sync_dist=True
        )
        _, targets = split_batch(batch)
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
        params = list(self.student.parameters()) + list(self.projections.parameters())
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

    def report_extra(self) -> dict[str, Any]:
        """Teacher figures for the optimization report (size and parameters beside the student's)."""
        from lightning_quantum.benchmark import serialized_size_bytes

        return {
            "distillation": {
                "teacher_size_mb": serialized_size_bytes(self.teacher) / 2**20,
                "student_size_mb": serialized_size_bytes(self.student) / 2**20,
                "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
                "student_parameters": sum(p.numel() for p in self.student.parameters()),
                "teacher_time_share": self.teacher_seconds / self.step_seconds if self.step_seconds else None,
            }
        }
