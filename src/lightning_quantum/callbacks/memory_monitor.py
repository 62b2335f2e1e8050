"""Log memory every N training steps: the CUDA allocator and NVML on a GPU, process RSS on CPU."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_quantum._validation import check_positive
from lightning_quantum.callbacks._common import is_sanity_checking
from lightning_quantum.gpu import memory_stats, nvml_index

# Imported inside the functions that use them: pynvml (optional: NVIDIA GPUs only).

log = logging.getLogger(__name__)

__all__ = ["MemoryMonitor"]


class MemoryMonitor(Callback):
    """Log ``memory/*`` figures every ``log_every_n_steps`` training batches, and keep their peaks.

    On CUDA: ``memory/cuda_allocated_mb``, ``memory/cuda_peak_allocated_mb``,
    ``memory/cuda_reserved_mb`` and, through nvidia-ml-py, ``memory/gpu_used_mb`` and
    ``memory/gpu_total_mb``. Everywhere: ``memory/rss_mb`` (the process resident set).
    ``peak_mb`` holds the highest value of each figure seen so far and survives resume.

    Args:
        log_every_n_steps: how often to read and log, in training batches.
        use_nvml: read device memory through NVML on CUDA; turned off with a log line when NVML
            cannot start.

    Example:
        >>> trainer = L.Trainer(callbacks=[MemoryMonitor(log_every_n_steps=50)])  # doctest: +SKIP
    """

    def __init__(self, log_every_n_steps: int = 50, use_nvml: bool = True) -> None:
        check_positive("log_every_n_steps", log_every_n_steps, error=MisconfigurationException)
        if not isinstance(log_every_n_steps, int):
            raise MisconfigurationException(f"`log_every_n_steps`={log_every_n_steps!r} must be an integer.")
        self.log_every_n_steps = log_every_n_steps
        self.use_nvml = use_nvml
        self.peak_mb: dict[str, float] = {}
        self._nvml_index: int | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.use_nvml or pl_module.device.type != "cuda" or self._nvml_index is not None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # ImportError or any NVMLError: NVML is optional here
            log.info("MemoryMonitor: NVML unavailable (%s); logging torch.cuda figures only", err)
            return
        cuda_index = pl_module.device.index if pl_module.device.index is not None else torch.cuda.current_device()
        try:
            self._nvml_index = nvml_index(int(cuda_index))  # NVML ignores CUDA_VISIBLE_DEVICES
        except (pynvml.NVMLError, ValueError) as err:
            log.info("MemoryMonitor: no NVML device for cuda:%s (%s); logging torch.cuda figures only", cuda_index, err)
            self._nvml_index = -1  # initialized: `_shutdown_nvml` releases it
            self._shutdown_nvml()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown_nvml()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown_nvml()  # Lightning does not call `teardown` when fit raises

    def _shutdown_nvml(self) -> None:
        if self._nvml_index is None:
            return
        import pynvml

        self._nvml_index = None
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            log.debug("nvmlShutdown: %s", err)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_sanity_checking(trainer) or batch_idx % self.log_every_n_steps:
            return
        self._log_memory(pl_module)

    def _log_memory(self, pl_module: pl.LightningModule) -> None:
        stats = memory_stats(pl_module.device, nvml_device_index=self._nvml_index)
        for key, value in stats.items():
            self.peak_mb[key] = max(self.peak_mb.get(key, 0.0), value)
        pl_module.log_dict(stats, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"peak_mb": dict(self.peak_mb)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peak_mb = {str(k): float(v) for k, v in state_dict.get("peak_mb", {}).items()}
