"""Pruning as pure functions: schedules, masks, statistics and structured slimming.

The :class:`~lightning_quantum.callbacks.Pruning` callback decides *when* to call them.
"""

from lightning_quantum.pruning.masks import (
    PRUNING_METHODS,
    apply_masks,
    make_pruning_permanent,
    masks_sparsity,
    nm_masks,
    select_parameters,
    sparsity_report,
    structured_masks,
    unstructured_masks,
)
from lightning_quantum.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_quantum.pruning.slimming import (
    coupled_channel_masks,
    load_slimmed_checkpoint,
    rebuild_architecture,
    record_architecture,
    slim_model,
)

__all__ = [
    "PRUNING_METHODS",
    "SCHEDULES",
    "SparsitySchedule",
    "apply_masks",
    "coupled_channel_masks",
    "load_slimmed_checkpoint",
    "make_pruning_permanent",
    "masks_sparsity",
    "nm_masks",
    "rebuild_architecture",
    "record_architecture",
    "select_parameters",
    "slim_model",
    "sparsity_report",
    "structured_masks",
    "unstructured_masks",
]
