"""Knowledge distillation: a LightningModule for any teacher and student, and its losses."""

from lightning_quantum.distillation.losses import attention_kl, feature_loss, kd_loss
from lightning_quantum.distillation.module import DistillationModule
from lightning_quantum.distillation.students import (
    SentenceEncoder,
    causal_lm_student,
    layer_map,
    minilm_student,
    student_from_teacher,
)
from lightning_quantum.distillation.teachers import digits_teacher, minilm_teacher

__all__ = [
    "DistillationModule",
    "SentenceEncoder",
    "attention_kl",
    "causal_lm_student",
    "digits_teacher",
    "feature_loss",
    "kd_loss",
    "layer_map",
    "minilm_student",
    "minilm_teacher",
    "student_from_teacher",
]
