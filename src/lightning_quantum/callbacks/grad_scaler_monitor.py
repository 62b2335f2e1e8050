"""Watch the AMP gradient scaler: the loss scale, and how many optimizer steps it skipped."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_quantum._validation import check_fraction, check_non_negative, check_positive
from lightning_quantum.callbacks._common import is_sanity_checking
from lightning_quantum.report import ReportContext, ReportExtra

log = logging.getLogger(__name__)

__all__ = ["GradScalerMonitor", "find_grad_scaler", "gradients_are_finite"]


def find_grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The ``GradScaler`` of the trainer's precision plugin, or ``None`` (bf16, fp32)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def gradients_are_finite(optimizer: Optimizer) -> bool:
    """Whether every gradient the optimizer will apply is finite, checked with one device sync."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class GradScalerMonitor(Callback):
    """Log the loss scale and count skipped optimizer steps.

    With a ``GradScaler`` (``precision="16-mixed"``), a step is skipped when the scaler found an inf
    or NaN gradient; the scaler then lowers its scale, which is how the skip is detected (the same
    test Hugging Face Accelerate uses). Without a scaler (bf16, fp32) nothing would skip the step, so
    the monitor counts steps whose gradients were not finite and, with ``skip_nonfinite_steps``,
    skips them as a scaler would: their gradients are dropped before the optimizer runs, so a NaN
    loss never reaches the weights (nor pruning masks or QAT ranges computed from them).

    Logged every ``log_every_n_steps`` optimizer steps: ``grad_scaler/scale``,
    ``grad_scaler/skipped_steps``, ``grad_scaler/skip_rate`` (and ``grad_scaler/nonfinite_steps``).
    A scaler starts at a high scale and skips steps until it has found one that does not overflow:
    those first skips are its calibration, counted in ``calibration_skips`` and left out of the skip
    rate that the warning judges. The counters are part of the checkpoint, so they survive resume.

    Args:
        log_every_n_steps: how often to log, in optimizer steps; the trainer's ``log_every_n_steps`` when
            ``None``. (Logging every step cost 1.5 ms a step on a DigitsMLP fit here, 29% of the step:
            Lightning's logging, not the counting, which is done every step whatever this says.)
        max_skip_rate: warn once when the fraction of skipped (or non-finite) steps exceeds this.
        min_steps: do not judge the skip rate before this many optimizer steps; early skips are how
            the scaler finds its scale.
        check_unscaled_gradients: without a scaler, check the gradients for inf/NaN each step.
        skip_nonfinite_steps: without a scaler, skip a step whose gradients are not finite (counted in
            ``nonfinite_steps``); needs ``check_unscaled_gradients``.

    Example:
        >>> trainer = L.Trainer(precision="16-mixed", callbacks=[GradScalerMonitor()])  # doctest: +SKIP
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        max_skip_rate: float = 0.05,
        min_steps: int = 20,
        check_unscaled_gradients: bool = True,
        skip_nonfinite_steps: bool = True,
    ) -> None:
        if log_every_n_steps is not None:
            check_positive("log_every_n_steps", log_every_n_steps, error=MisconfigurationException)
            if not isinstance(log_every_n_steps, int):
                raise MisconfigurationException(f"`log_every_n_steps`={log_every_n_steps!r} must be an integer.")
        check_fraction("max_skip_rate", max_skip_rate, error=MisconfigurationException)
        check_non_negative("min_steps", min_steps, error=MisconfigurationException)
        self.log_every_n_steps = log_every_n_steps
        self.max_skip_rate = max_skip_rate
        self.min_steps = min_steps
        self.check_unscaled_gradients = check_unscaled_gradients
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.scale_history: list[tuple[int, float]] = []
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.calibration_skips = 0
        self._calibrated = False
        self.warned = False
        self.last_scale: float | None = None
        self._scale_before_step: float | None = None
        self._step_pending = False

    @property
    def skip_rate(self) -> float:
        """Skipped and non-finite steps over the optimizer steps, the scaler's calibration left out."""
        steps = self.optimizer_steps - self.calibration_skips
        bad = self.skipped_steps - self.calibration_skips + self.nonfinite_steps
        return bad / steps if steps > 0 else 0.0

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if is_sanity_checking(trainer):
            return
        self._record_before_step(trainer, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step_pending:
            return
        self._record_after_step(trainer, pl_module)

    def _record_before_step(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        scaler = find_grad_scaler(trainer)
        self._step_pending = True
        if scaler is not None and scaler.is_enabled():
            self._scale_before_step = float(scaler.get_scale())
            return
        self._scale_before_step = None
        if self.check_unscaled_gradients and not gradients_are_finite(optimizer):
            self.nonfinite_steps += 1
            if self.skip_nonfinite_steps:  # as a GradScaler would: the optimizer sees no gradient this step
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None
                rank_zero_warn(f"Non-finite gradients at step {trainer.global_step}: the optimizer step is skipped.")

    def _record_after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_pending = False
        self.optimizer_steps += 1
        scaler = find_grad_scaler(trainer)
        if self._scale_before_step is not None and scaler is not None:
            scale = float(scaler.get_scale())
            # GradScaler.update only ever lowers the scale when the step found inf/NaN and was skipped.
            if scale < self._scale_before_step:
                self.skipped_steps += 1
                if not self._calibrated:  # no step has passed yet: the scaler is still finding its scale
                    self.calibration_skips += 1
            else:
                self._calibrated = True
            if self.last_scale != scale:
                self.scale_history.append((trainer.global_step, scale))
            self.last_scale = scale
        every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))  # set by Lightning at init
        if self.optimizer_steps % every == 0:
            metrics = {
                "grad_scaler/skipped_steps": float(self.skipped_steps),
                "grad_scaler/nonfinite_steps": float(self.nonfinite_steps),
                "grad_scaler/skip_rate": self.skip_rate,
            }
            if self.last_scale is not None:
                metrics["grad_scaler/scale"] = self.last_scale
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._warn_if_skipping_too_often()

    def _warn_if_skipping_too_often(self) -> None:
        if self.warned or self.optimizer_steps < max(self.min_steps, 1) or self.skip_rate <= self.max_skip_rate:
            return
        self.warned = True
        rank_zero_warn(
            f"{self.skipped_steps} skipped and {self.nonfinite_steps} non-finite optimizer steps out of "
            f"{self.optimizer_steps} ({self.skip_rate:.1%}), above `max_skip_rate`={self.max_skip_rate}. "
            "The loss or gradients overflow: lower the learning rate, clip gradients, or use bf16."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "calibration_skips": self.calibration_skips,
            "calibrated": self._calibrated,
            "warned": self.warned,
            "last_scale": self.last_scale,
            "scale_history": [list(h) for h in self.scale_history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.calibration_skips = int(state_dict.get("calibration_skips", 0))
        self._calibrated = bool(state_dict.get("calibrated", self.optimizer_steps > self.skipped_steps))
        self.warned = bool(state_dict.get("warned", False))
        self.last_scale = state_dict.get("last_scale")
        self.scale_history = [(int(s), float(v)) for s, v in state_dict.get("scale_history", [])]

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """The counters, and the loss-scale curve (drawn in the report) when a scaler ran."""
        extra: ReportExtra = {
            "grad_scaler": {
                "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self.skipped_steps,
                "nonfinite_steps": self.nonfinite_steps,
                "calibration_skips": self.calibration_skips,
                "last_scale": self.last_scale,
            }
        }
        if self.scale_history:
            extra["loss_scale_curve"] = [list(h) for h in self.scale_history]
        return extra
