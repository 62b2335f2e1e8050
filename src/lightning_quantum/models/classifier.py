"""A classification LightningModule around any ``nn.Module`` net."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_quantum._batches import split_batch
from lightning_quantum._hparams import save_plain_hyperparameters
from lightning_quantum._validation import check_fraction, check_positive
from lightning_quantum.fsdp import shard_blocks

__all__ = ["Classifier"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class Classifier(pl.LightningModule):
    """Train ``net`` with cross-entropy and measure top-1 accuracy with torchmetrics.

    Only plain hyperparameters are saved (``num_classes``, ``label_smoothing``), so checkpoints load
    with ``torch.load(weights_only=True)``; the net and the optimizer factory are passed again on load.

    Args:
        net: any module mapping a batch of inputs to logits.
        num_classes: classes for the accuracy metric.
        optimizer: a factory taking the parameters, such as ``functools.partial(torch.optim.AdamW, lr=1e-3)``
            (Hydra: ``_partial_: true``). AdamW with lr 1e-3 when ``None``.
        scheduler: an optional factory taking the optimizer and returning an LR scheduler, stepped per epoch.
        label_smoothing: cross-entropy label smoothing, in [0, 1).

    Example:
        >>> from lightning_quantum.models import Classifier, DigitsMLP
        >>> model = Classifier(DigitsMLP(), num_classes=10)
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"`net` must be a torch.nn.Module, got {type(net).__name__}.")
        check_positive("num_classes", num_classes)
        check_fraction("label_smoothing", label_smoothing)
        save_plain_hyperparameters(self, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer or _default_optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        """Under FSDP2 (Lightning's ``ModelParallelStrategy``), shard the net block by block over the
        data-parallel ranks (:func:`~lightning_quantum.fsdp.shard_blocks`); under any other strategy, nothing."""
        if self.device_mesh is not None:
            shard_blocks(self.net, self.device_mesh["data_parallel"])

    def _shared_step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("Classifier batches need targets: (inputs, targets) or (inputs, targets, index).")
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self._shared_step(batch)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.test_acc(logits, y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
