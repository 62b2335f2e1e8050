"""Distillation losses as pure functions.

Example:
    >>> import torch
    >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    >>> float(kd_loss(s, t, temperature=2.0))
    0.0
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_quantum._validation import check_choice, check_positive
from lightning_quantum.models.causal_lm import next_token_loss

__all__ = ["kd_loss", "feature_loss", "attention_kl", "is_token_batch", "next_token_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    The KL divergence is summed over classes and averaged over the batch (``batchmean``); the ``T^2``
    factor keeps the gradient scale of the soft targets independent of the temperature.

    Args:
        student_logits: ``(batch, ..., classes)``.
        teacher_logits: the same shape.
        temperature: softmax temperature, greater than 0.

    Raises:
        ValueError: for a temperature of 0 or below, or logits of different shapes (both shapes named).
    """
    check_positive("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher outputs differ in shape: student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}. They must match to distill."
        )
    classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def is_token_batch(inputs: Any, outputs: Any) -> bool:
    """Whether ``inputs`` are token ids ``(batch, length)`` and ``outputs`` a causal LM's logits for them."""
    return (
        isinstance(inputs, Tensor)
        and isinstance(outputs, Tensor)
        and inputs.dim() == 2
        and not inputs.is_floating_point()
        and outputs.dim() == 3
        and tuple(outputs.shape[:2]) == tuple(inputs.shape)
    )


def feature_loss(student: Tensor, teacher: Tensor, kind: Literal["mse", "cosine"] = "mse") -> Tensor:
    """Distance between matched hidden features: mean squared error, or ``1 - cosine`` averaged over rows.

    Raises:
        ValueError: for an unknown kind or features of different shapes.
    """
    check_choice("kind", kind, ("mse", "cosine"))
    if student.shape != teacher.shape:
        raise ValueError(
            f"Feature shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)} "
            "(a projection should have mapped the student's width to the teacher's)."
        )
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def attention_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(teacher || student)`` between attention distributions, averaged over every query row.

    Shapes are ``(batch, heads, queries, keys)``; when the head counts differ, the head-averaged maps
    are compared.
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if student.shape != teacher.shape:
        raise ValueError(
            f"Attention maps differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}."
        )
    eps = 1e-8
    t = teacher.float()
    return (t * ((t + eps).log() - (student.float() + eps).log())).sum(-1).mean()
