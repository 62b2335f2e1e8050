"""NaN and infinity are refused by every float argument: a range check alone lets NaN through."""

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_quantum as lq
from lightning_quantum._validation import check_finite, check_fraction, check_non_negative, check_positive
from lightning_quantum.callbacks import GradScalerMonitor, OptimizationReport, Pruning
from lightning_quantum.data import DigitsDataModule, SentenceDataModule
from lightning_quantum.distillation import DistillationModule, kd_loss
from lightning_quantum.models import Classifier, DigitsCNN, DigitsMLP
from lightning_quantum.pruning import structured_masks, unstructured_masks
from lightning_quantum.pruning.schedules import SparsitySchedule

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def _mlp():
    return DigitsMLP(hidden=(8,))


# (what is called, the float argument) for every float argument of the public API
FLOAT_ARGUMENTS = {
    "optimize.max_accuracy_drop": lambda v: lq.optimize(_mlp(), example_inputs=torch.randn(2, 64), max_accuracy_drop=v),
    "optimize.prune_amount": lambda v: lq.optimize(_mlp(), example_inputs=torch.randn(2, 64), prune_amount=v),
    "Pruning.final_sparsity": lambda v: Pruning(final_sparsity=v),
    "Pruning.initial_sparsity": lambda v: Pruning(initial_sparsity=v),
    "GradScalerMonitor.max_skip_rate": lambda v: GradScalerMonitor(max_skip_rate=v),
    "OptimizationReport.reference_accuracy": lambda v: OptimizationReport(reference_accuracy=v),
    "DistillationModule.alpha": lambda v: DistillationModule(_mlp(), _mlp(), alpha=v),
    "DistillationModule.beta": lambda v: DistillationModule(_mlp(), _mlp(), beta=v),
    "DistillationModule.temperature": lambda v: DistillationModule(_mlp(), _mlp(), temperature=v),
    "DistillationModule.feature_weight": lambda v: DistillationModule(_mlp(), _mlp(), feature_weight=v),
    "DistillationModule.attention_weight": lambda v: DistillationModule(_mlp(), _mlp(), attention_weight=v),
    "DistillationModule.cache_max_mb": lambda v: DistillationModule(_mlp(), _mlp(), cache_max_mb=v),
    "kd_loss.temperature": lambda v: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), v),
    "Classifier.label_smoothing": lambda v: Classifier(_mlp(), label_smoothing=v),
    "DigitsMLP.dropout": lambda v: DigitsMLP(dropout=v),
    "DigitsCNN.dropout": lambda v: DigitsCNN(dropout=v),
    "DigitsDataModule.val_fraction": lambda v: DigitsDataModule(val_fraction=v),
    "DigitsDataModule.test_fraction": lambda v: DigitsDataModule(test_fraction=v),
    "SentenceDataModule.val_fraction": lambda v: SentenceDataModule(val_fraction=v),
    "SentenceDataModule.test_fraction": lambda v: SentenceDataModule(test_fraction=v),
    "unstructured_masks.sparsity": lambda v: unstructured_masks({"w": torch.randn(4, 4)}, v),
    "structured_masks.sparsity": lambda v: structured_masks({"w": torch.randn(4, 4)}, v),
    "SparsitySchedule.final_sparsity": lambda v: SparsitySchedule("cubic", final_sparsity=v),
    "SparsitySchedule.initial_sparsity": lambda v: SparsitySchedule("cubic", 0.5, initial_sparsity=v),
}


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("name", sorted(FLOAT_ARGUMENTS))
def test_every_float_argument_refuses_non_finite_values(name, value):
    argument = name.split(".")[-1]
    shown = "sparsity" if argument == "sparsity" else argument
    with pytest.raises((ValueError, MisconfigurationException), match=rf"`{shown}`=-?(nan|inf)"):
        FLOAT_ARGUMENTS[name](value)


def test_student_dropout_refuses_non_finite_values():
    from transformers import BertConfig, BertModel

    from lightning_quantum.distillation import student_from_teacher

    teacher = BertModel(
        BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
    )
    for value in NON_FINITE:
        with pytest.raises(ValueError, match=r"`dropout`=-?(nan|inf) is not valid"):
            student_from_teacher(teacher, [0], dropout=value)


@pytest.mark.parametrize("check", [check_finite, check_positive, check_non_negative, check_fraction])
def test_the_checks_refuse_nan_inf_and_bool(check):
    for bad in (*NON_FINITE, True, "0.5", None):
        with pytest.raises(ValueError, match=r"`x`=.* is not valid"):
            check("x", bad)
    assert check("x", 0.5) == 0.5 and math.isfinite(check("x", 0.5))
