"""Students built from their teachers: fewer layers, initialised from a subset of the teacher's."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_quantum.data.text import load_minilm, mean_pooled_embeddings
from lightning_quantum.models.causal_lm import CausalLM

__all__ = ["student_from_teacher", "causal_lm_student", "layer_map", "SentenceEncoder", "minilm_student"]


def student_from_teacher(
    teacher: Any,
    layers: Sequence[int],
    dropout: float | None = None,
    freeze_word_embeddings: bool = False,
) -> Any:
    """A BERT-like Hugging Face encoder with only ``layers`` of ``teacher``'s, copied (DistilBERT-style).

    The embeddings (and pooler, if any) are copied too; ``teacher`` is not changed.

    Args:
        teacher: a Hugging Face model with ``config.num_hidden_layers`` and ``encoder.layer``.
        layers: teacher layer indices to keep, in order, e.g. ``[0, 2, 4]`` of 6.
        dropout: the student's dropout probability (hidden and attention), in [0, 1); ``None`` keeps
            the teacher's. Matching a teacher's embeddings is regression, not a task to regularise:
            without dropout all-MiniLM-L6-v2's 3-layer student ends closer to the teacher on
            held-out sentences (``benchmarks/minilm_recipes.py``).
        freeze_word_embeddings: keep the token embedding table (which the student shares with the
            teacher) fixed. For MiniLM it is 12 M of the student's 17 M parameters, so its AdamW
            update is a third of a CPU training step; frozen, training is 1.5x faster and the
            student as close to the teacher (``benchmarks/minilm_recipes.py``).

    Raises:
        ValueError: for an empty, repeated, unordered or out-of-range layer choice, a model without
            ``encoder.layer``, or a dropout outside [0, 1).
    """
    if dropout is not None and (
        isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1
    ):
        raise ValueError(
            f"`dropout`={dropout!r} is not valid: give a probability in [0, 1), or None for the teacher's."
        )
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
    if dropout is not None:
        student.config.hidden_dropout_prob = student.config.attention_probs_dropout_prob = dropout
        for module in student.modules():
            if isinstance(module, nn.Dropout):  # Hugging Face attention reads its probability from here too
                module.p = dropout
    if freeze_word_embeddings:
        embeddings = getattr(getattr(student, "embeddings", None), "word_embeddings", None)
        if not isinstance(embeddings, nn.Embedding):
            raise ValueError(f"{type(teacher).__name__} has no `embeddings.word_embeddings` table to freeze.")
        embeddings.weight.requires_grad_(False)
    return student


def causal_lm_student(teacher: CausalLM, layers: Sequence[int]) -> CausalLM:
    """A :class:`~lightning_quantum.models.CausalLM` with ``teacher``'s settings and only ``layers`` of its
    decoder layers, copied, with its embedding table, final norm and output layer: a student that starts
    where the teacher is (``teacher`` is not changed).

    The student is built anew with ``num_layers=len(layers)`` (so its checkpoints rebuild it, and each
    layer's KV-cache index is its own) and the chosen layers' weights are loaded into it.

    Raises:
        ValueError: for an empty, repeated, unordered or out-of-range layer choice.
    """
    count = int(teacher.hparams["num_layers"])
    chosen = list(layers)
    if not chosen or chosen != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= count:
        raise ValueError(
            f"`layers`={chosen} is not valid. Give increasing, distinct teacher layer indices in [0, {count - 1}]."
        )
    student = CausalLM(**{**teacher.hparams, "num_layers": len(chosen)})  # its hparams: sizes and settings
    source, target = teacher.model, student.model
    target.model.embed_tokens.load_state_dict(source.model.embed_tokens.state_dict())
    target.model.norm.load_state_dict(source.model.norm.state_dict())
    target.lm_head.load_state_dict(source.lm_head.state_dict())
    for i, t in enumerate(chosen):
        target.model.layers[i].load_state_dict(source.model.layers[t].state_dict())
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

    Structured pruning (``Pruning(method="l2_structured", slim=True)``, ULTRA's) removes the
    feed-forward hidden units of a BERT-style encoder (``channel_pruning_layers``): each is one row of
    ``intermediate.dense`` and one column of ``output.dense``. Attention projections are left whole:
    their channels are split into heads.
    """

    channel_pruning_layers = ("model.encoder.layer.*.intermediate.dense",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return mean_pooled_embeddings(self.model, input_ids, attention_mask)


def minilm_student(
    layers: Sequence[int] = (0, 4, 5), dropout: float | None = 0.0, freeze_word_embeddings: bool = True
) -> SentenceEncoder:
    """A sentence encoder with ``layers`` of all-MiniLM-L6-v2's six, copied from it (DistilBERT-style).

    The defaults (no dropout, the token embedding table frozen) are the ones that distilled best and
    fastest in ``benchmarks/minilm_recipes.py``; see :func:`student_from_teacher`.
    """
    return SentenceEncoder(student_from_teacher(load_minilm()[1], layers, dropout, freeze_word_embeddings))
