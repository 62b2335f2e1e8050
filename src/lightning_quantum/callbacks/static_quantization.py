"""Static int8 calibration from the DataModule at the end of ``fit`` (PT2E, torchao)."""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_quantum._modules import replace_module
from lightning_quantum._validation import check_choice, check_positive
from lightning_quantum.quantization.static import CPUOnly, quantize_static_int8
from lightning_quantum.report import ReportContext, ReportExtra

log = logging.getLogger(__name__)

__all__ = ["StaticQuantization"]

_LOADERS = {"train": "train_dataloader", "val": "val_dataloader"}


class StaticQuantization(Callback):
    """At fit end, calibrate the model's ``submodule`` on DataModule batches and swap in its static int8 form.

    The submodule (``net`` in :class:`~lightning_quantum.models.Classifier`) is exported with
    ``torch.export``, prepared with torchao's ``X86InductorQuantizer``, calibrated on ``num_batches``
    batches of the DataModule's ``split`` loader and converted; the float submodule is kept, so a
    second ``fit`` trains it again. Validate, test and predict after ``fit`` run the int8 graph.
    Put it before ``OptimizationReport``, which then measures the int8 model.

    Args:
        num_batches: calibration batches.
        split: ``"train"`` or ``"val"``: the loader to calibrate on.
        submodule: attribute path of the module to quantize (``""`` for the LightningModule's own
            forward is not supported: a LightningModule cannot be replaced by a graph).

    Raises:
        MisconfigurationException: for bad arguments; at fit end, when the loader is empty, an
            observer saw no data, or the submodule is missing.

    Example:
        >>> trainer = L.Trainer(callbacks=[StaticQuantization(num_batches=16)])  # doctest: +SKIP
    """

    def __init__(self, num_batches: int = 8, split: Literal["train", "val"] = "train", submodule: str = "net") -> None:
        err = MisconfigurationException
        check_positive("num_batches", num_batches, error=err)
        if not isinstance(num_batches, int):
            raise err(f"`num_batches`={num_batches!r} must be an integer.")
        check_choice("split", split, _LOADERS, error=err)
        if not submodule:
            raise err("`submodule`='' is not valid. Name the attribute that holds the network, for example 'net'.")
        self.num_batches = num_batches
        self.split = split
        self.submodule = submodule
        self.float_module: nn.Module | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.float_module is not None:
            self._swap(pl_module, self.float_module)  # fit again: train the float network
            self.float_module = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run and self.num_batches > 1:  # type: ignore[attr-defined]
            log.info("StaticQuantization: fast_dev_run, calibrating on 1 batch")
        source = getattr(trainer, "datamodule", None) or pl_module
        loader = getattr(source, _LOADERS[self.split])()
        float_module = self._get(pl_module)
        batches = 1 if trainer.fast_dev_run else self.num_batches  # type: ignore[attr-defined]
        try:
            quantized = quantize_static_int8(float_module, loader, max_batches=batches)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self.float_module = float_module
        # The X86 int8 graph runs on the CPU; on a GPU run the module around it keeps its device, and
        # the graph is called with its inputs copied to the CPU.
        self._swap(pl_module, quantized if pl_module.device.type == "cpu" else CPUOnly(quantized))
        rank_zero_info(
            f"Static int8: `{self.submodule}` calibrated on {batches} {self.split} batches"
            + ("" if pl_module.device.type == "cpu" else f" (a CPU model: it runs on the CPU, not {pl_module.device})")
        )

    def report_extra(self, context: ReportContext) -> ReportExtra:
        return {
            "static_quantization": {
                "submodule": self.submodule,
                "num_batches": self.num_batches,
                "split": self.split,
                "converted": self.float_module is not None,
            }
        }

    def _get(self, pl_module: pl.LightningModule) -> nn.Module:
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise MisconfigurationException(
                f"`submodule`={self.submodule!r} is not a submodule of {type(pl_module).__name__}."
            ) from None

    def _swap(self, pl_module: pl.LightningModule, new: nn.Module) -> None:
        replace_module(pl_module, self.submodule, new)
