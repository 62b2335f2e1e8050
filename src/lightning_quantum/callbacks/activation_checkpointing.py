"""Turn activation checkpointing on for ``fit`` and off again afterwards."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_quantum.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing

log = logging.getLogger(__name__)

__all__ = ["ActivationCheckpointing"]


class ActivationCheckpointing(Callback):
    """Recompute activations of chosen blocks during backward to cut peak training memory.

    Applied in ``setup("fit")`` and removed in ``teardown("fit")``, so validation, test and
    predict after ``fit`` run the plain model, and ``fit`` can be called again. Checkpoint keys do
    not change while it is on. See :func:`lightning_quantum.activation_checkpointing.enable_activation_checkpointing`
    for how blocks are chosen.

    Args:
        block_types: class names (or dotted paths) of the blocks to wrap; ``None`` uses the blocks
            the model declares in ``activation_checkpoint_blocks``, or ``gradient_checkpointing_enable``
            on Hugging Face models.

    Raises:
        MisconfigurationException: at ``setup`` when nothing in the model matches.

    Example:
        >>> trainer = L.Trainer(callbacks=[ActivationCheckpointing(block_types=["BertLayer"])])  # doctest: +SKIP
    """

    def __init__(self, block_types: Sequence[str | type[nn.Module]] | None = None) -> None:
        if block_types is not None:
            if isinstance(block_types, str) or not all(isinstance(b, (str, type)) for b in block_types):
                raise MisconfigurationException(
                    f"`block_types`={block_types!r} is not valid. Give a list of class names, or None."
                )
            block_types = list(block_types)
        self.block_types = block_types
        self.wrapped: list[str] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self.wrapped = enable_activation_checkpointing(pl_module, self.block_types)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        rank_zero_info(f"Activation checkpointing on {len(self.wrapped)} blocks: {self.wrapped}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.wrapped:
            return
        disable_activation_checkpointing(pl_module)
        self.wrapped = []
