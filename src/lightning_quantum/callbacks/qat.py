"""Quantization-aware training on torchao: prepare, train with fake quantization, convert at fit end."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_quantum._modules import meta_copy
from lightning_quantum._validation import check_choice, check_name_lists, check_optional_step, check_positive_int
from lightning_quantum.callbacks._common import find_callback, inference_copy, output_dir, whole_module
from lightning_quantum.callbacks.pruning import Pruning
from lightning_quantum.fsdp import FSDP2Strategy
from lightning_quantum.quantization.export import save_safetensors
from lightning_quantum.quantization.qat import (
    convert_qat,
    dequantize_linears,
    freeze_ranges_from_state,
    freeze_weight_ranges,
    is_converted,
    prepare_qat,
    refresh_weight_ranges,
    set_fake_quant_enabled,
)
from lightning_quantum.quantization.schemes import QAT_SCHEMES
from lightning_quantum.report import ReportContext, ReportExtra

log = logging.getLogger(__name__)

__all__ = ["QuantizationAwareTraining"]

Phase = Literal["float", "prepared", "converted"]


class QuantizationAwareTraining(Callback):
    """Train with torchao fake quantization, then convert to a really quantized model.

    ``setup("fit")`` swaps the chosen ``nn.Linear`` layers for torchao ``FakeQuantizedLinear``
    (through ``QATConfig(step="prepare")``, a module swap: ``forward`` is never patched), with the
    fake quantizers off until ``start_step`` (or ``start_epoch``). At fit end the model is converted
    with ``QATConfig(step="convert")`` unless ``convert_on_fit_end=False``; the converted outputs match
    the fake-quantized ones. The phase is part of the checkpoint; prepared layers keep the plain
    layers' state_dict keys, so checkpoints load with ``weights_only=True`` into plain or prepared
    models. ``fit`` can run twice (a converted model is dequantized and prepared again), and
    ``trainer.test(ckpt_path=...)`` with a checkpoint written during QAT loads into the converted
    model (which is prepared again to take the float weights).

    Args:
        scheme: ``"int8_dynamic_int8_weight"`` (int8 per-token activations, int8 per-channel weights;
            the CPU default), ``"int8_dynamic_int4_weight"`` (int4 weights in groups) or
            ``"int4_weight_only"``.
        group_size: weights per scale for the int4 schemes; must divide each layer's input features.
        start_step: optimizer step at which fake quantization begins; ``None`` starts half-way through
            the fit (float training first, then QAT fine-tuning).
        start_epoch: epoch at which it begins instead, when given.
        start_after_pruning: begin when the :class:`~lightning_quantum.callbacks.Pruning` callback of the
            same Trainer reaches its final sparsity (the end of its schedule, in steps), so QAT
            fine-tunes the pruned weights; ``start_step`` and ``start_epoch`` must then be ``None``.
        freeze_ranges_step: optimizer step after which the weights' fake-quant ranges (scales, zero
            points) stop following the weights and stay fixed; conversion then uses those ranges. The
            ranges are fixed at the first step >= ``freeze_ranges_step`` with fake quantization on, so
            ``0`` fixes them when fake quantization begins, wherever ``start_step``, ``start_epoch`` or
            ``start_after_pruning`` put that. ``None`` keeps them dynamic to the end.
        refresh_ranges_every: once the ranges are fixed, compute them again from the weights every this
            many optimizer steps, and keep them fixed in between (conversion uses the last ones): the grids
            follow weights that grow or shrink, while the weights train against fixed grids between
            refreshes. ``None`` keeps the first fixed ranges to the end. Needs ``freeze_ranges_step``.
        convert_on_fit_end: convert to the real quantized model when fit ends.
        names: ``fnmatch`` patterns of the linear layers (and tables) to quantize; all when ``None``.
        ignore: ``fnmatch`` patterns of layers to keep in full precision (the classifier head, say).
        embeddings: also train ``nn.Embedding`` tables with int8 fake quantization (one scale per row) and
            convert them to int8 tables: in all-MiniLM-L6-v2 the word embeddings are half the
            parameters. ``False`` leaves the tables in float.

    Raises:
        MisconfigurationException: for an unknown scheme, a bad group size or start; at ``setup``, a group
            size that does not divide a layer, or a model with nothing to quantize.

    Example:
        >>> trainer = L.Trainer(callbacks=[QuantizationAwareTraining(start_step=100)])  # doctest: +SKIP
    """

    def __init__(
        self,
        scheme: Literal["int8_dynamic_int8_weight", "int8_dynamic_int4_weight", "int4_weight_only"] = (
            "int8_dynamic_int8_weight"
        ),
        group_size: int = 32,
        start_step: int | None = 0,
        start_epoch: int | None = None,
        start_after_pruning: bool = False,
        freeze_ranges_step: int | None = None,
        refresh_ranges_every: int | None = None,
        convert_on_fit_end: bool = True,
        names: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        embeddings: bool = True,
    ) -> None:
        err = MisconfigurationException
        check_choice("scheme", scheme, QAT_SCHEMES, error=err)
        if not isinstance(embeddings, bool):
            raise err(f"`embeddings`={embeddings!r} is not valid. It must be True or False.")
        check_positive_int("group_size", group_size, error=err)
        for label, value in (
            ("start_step", start_step),
            ("start_epoch", start_epoch),
            ("freeze_ranges_step", freeze_ranges_step),
        ):
            check_optional_step(label, value, error=err)
        check_name_lists(err, names=names, ignore=ignore)
        if refresh_ranges_every is not None:
            check_positive_int("refresh_ranges_every", refresh_ranges_every, error=err)
            if freeze_ranges_step is None:
                raise err(
                    f"`refresh_ranges_every`={refresh_ranges_every} refreshes fixed ranges; set `freeze_ranges_step` "
                    "(0: fix them when fake quantization begins), or `refresh_ranges_every`=None."
                )
        if start_after_pruning and (start_step is not None or start_epoch is not None):
            raise err(
                f"`start_after_pruning`=True takes its start from the Pruning callback; set `start_step`=None and "
                f"`start_epoch`=None (got {start_step} and {start_epoch})."
            )
        self.start_after_pruning = start_after_pruning
        self.scheme = scheme
        self.group_size = group_size
        self.start_step = start_step
        self.start_epoch = start_epoch
        self.freeze_ranges_step = freeze_ranges_step
        self.refresh_ranges_every = refresh_ranges_every
        self.convert_on_fit_end = convert_on_fit_end
        self.names = list(names) if names is not None else None
        self.ignore = list(ignore)
        self.embeddings = embeddings
        self.phase: Phase = "float"
        self.fake_quant_enabled = False
        self.ranges_frozen = False
        #: the optimizer step at which the ranges were fixed (refreshes count from it)
        self.ranges_frozen_step: int | None = None
        self.layers: list[str] = []
        self._resolved_start = 0
        #: a copy of the model with the float weights QAT trained, taken just before conversion
        self.float_model: torch.nn.Module | None = None
        #: under FSDP2, the converted model, whole, on rank zero (the trained module stays sharded)
        self.converted_model: torch.nn.Module | None = None
        #: under FSDP2, where rank zero wrote it (``qat_converted.safetensors``)
        self.converted_path: Path | None = None
        self._skeleton: torch.nn.Module | None = None  # the model's structure on the meta device
        self._sharded = False  # under a ModelParallelStrategy (FSDP2)

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._prepare(pl_module)
            # FSDP2 shards the model after setup (configure_model), so QAT prepares first, as torchao
            # documents. FSDP2Strategy keeps the model's structure to gather it whole at fit end; under
            # another ModelParallelStrategy this callback keeps it (on the meta device: no memory).
            self._sharded = isinstance(trainer.strategy, ModelParallelStrategy)
            if self._sharded and not isinstance(trainer.strategy, FSDP2Strategy):
                self._skeleton = meta_copy(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_after_pruning:
            self._resolved_start = self._pruning_end(trainer)
        elif self.start_step is None and self.start_epoch is None:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise MisconfigurationException("`start_step`=None needs a fit of known length; set `start_step`.")
            self._resolved_start = int(total) // 2
        self._set_enabled(pl_module, self._should_be_enabled(trainer))  # after a resume too

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.fake_quant_enabled and self._should_be_enabled(trainer):
            self._set_enabled(pl_module, True)
            rank_zero_info(f"QAT: fake quantization on at step {trainer.global_step} ({self.scheme})")
        if (
            self.freeze_ranges_step is not None
            and not self.ranges_frozen
            and self.fake_quant_enabled
            and trainer.global_step >= self.freeze_ranges_step
        ):
            frozen = freeze_weight_ranges(pl_module)
            self.ranges_frozen, self.ranges_frozen_step = True, trainer.global_step
            rank_zero_info(f"QAT: weight ranges of {frozen} layers frozen at step {trainer.global_step}")
        elif self._refresh_due(trainer):
            refreshed = refresh_weight_ranges(pl_module)
            log.debug("QAT: weight ranges of %d layers refreshed at step %d", refreshed, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert_on_fit_end and self.phase == "prepared" and self._sharded:
            self._convert_sharded(trainer, pl_module)
        elif self.convert_on_fit_end and self.phase == "prepared":
            # The float weights before conversion: the DeploymentGate's float form, the report's reference.
            self.float_model = inference_copy(pl_module)
            self._set_enabled(pl_module, True)
            convert_qat(pl_module, self.scheme, group_size=self.group_size)
            self.phase = "converted"
            self._watch_for_float_checkpoints(pl_module)
            rank_zero_info(f"QAT: converted {len(self.layers)} layers to {self.scheme}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "fake_quant_enabled": self.fake_quant_enabled,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "layers": list(self.layers),
            "embeddings": self.embeddings,
            "ranges_frozen": self.ranges_frozen,
            "ranges_frozen_step": self.ranges_frozen_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        scheme = state_dict.get("scheme", self.scheme)
        embeddings = state_dict.get("embeddings", self.embeddings)
        if embeddings != self.embeddings:
            raise MisconfigurationException(
                f"The checkpoint was trained with `embeddings`={embeddings}; this callback has "
                f"`embeddings`={self.embeddings}. Set it to {embeddings} to resume."
            )
        if scheme != self.scheme or state_dict.get("group_size", self.group_size) != self.group_size:
            raise MisconfigurationException(
                f"The checkpoint was trained with `scheme`={scheme!r}, `group_size`={state_dict.get('group_size')}; "
                f"this callback has `scheme`={self.scheme!r}, `group_size`={self.group_size}."
            )
        self.fake_quant_enabled = bool(state_dict.get("fake_quant_enabled", False))
        self.ranges_frozen = bool(state_dict.get("ranges_frozen", False))
        self.ranges_frozen_step = state_dict.get("ranges_frozen_step")

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """Figures for the optimization report."""
        return {
            "quantization": {
                "scheme": self.scheme,
                "group_size": self.group_size,
                "phase": self.phase,
                "layers": len(self.layers),
            }
        }

    # -- work ----------------------------------------------------------------------------------
    @staticmethod
    def _pruning_end(trainer: pl.Trainer) -> int:
        """The optimizer step at which the Trainer's Pruning callback reaches its final sparsity."""
        pruning = find_callback(trainer, Pruning)
        if pruning is None:
            raise MisconfigurationException("`start_after_pruning`=True needs a Pruning callback in the Trainer.")
        schedule = pruning.schedule
        if schedule is None:
            raise MisconfigurationException(
                "The Pruning callback has no schedule yet: put it before QuantizationAwareTraining in `callbacks`."
            )
        if pruning.unit == "step":
            return int(schedule.end)
        per_epoch = max(1, int(trainer.estimated_stepping_batches) // max(1, int(trainer.max_epochs or 1)))
        return int(schedule.end) * per_epoch

    def _convert_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2: the trained weights gathered whole on rank zero (every rank takes part) are converted
        there and written as safetensors. The trained module stays sharded and fake-quantized; the
        callbacks after this one (the gate, the report, the export) see the converted whole model."""
        self._set_enabled(pl_module, True)
        out = output_dir(trainer, None) / "qat_converted.safetensors"
        model = whole_module(trainer, self._skeleton)
        if model is not None:
            set_fake_quant_enabled(model, True)
            self.float_model = inference_copy(model)
            convert_qat(model, self.scheme, group_size=self.group_size)
            self.converted_model = model.eval()
            self.converted_path = save_safetensors(model, out)
            rank_zero_info(f"QAT: converted {len(self.layers)} layers to {self.scheme}, whole on rank zero: {out}")
        self._skeleton = None
        self.phase = "converted"

    def _refresh_due(self, trainer: pl.Trainer) -> bool:
        """Whether this step recomputes the fixed ranges: every ``refresh_ranges_every`` steps after the
        freeze, while fake quantization is on (a checkpoint from before this option refreshes from its
        resume step)."""
        if self.refresh_ranges_every is None or not self.ranges_frozen or not self.fake_quant_enabled:
            return False
        if self.ranges_frozen_step is None:
            self.ranges_frozen_step = trainer.global_step
        elapsed = trainer.global_step - self.ranges_frozen_step
        return elapsed > 0 and elapsed % self.refresh_ranges_every == 0

    def _should_be_enabled(self, trainer: pl.Trainer) -> bool:
        if self.start_epoch is not None:
            return trainer.current_epoch >= self.start_epoch
        start = self.start_step if self.start_step is not None else self._resolved_start
        return trainer.global_step >= start

    def _set_enabled(self, pl_module: pl.LightningModule, enabled: bool) -> None:
        set_fake_quant_enabled(pl_module, enabled)
        self.fake_quant_enabled = enabled

    def _watch_for_float_checkpoints(self, pl_module: pl.LightningModule) -> None:
        """Let a checkpoint written during QAT (float weights) load into the converted model.

        ``trainer.test(ckpt_path=...)`` loads the weights after every callback hook has run, so the
        converted model is prepared again by a ``load_state_dict`` pre-hook on the root module, which
        torch runs before it loads any child: it sees float weights where the model has quantized
        ones, dequantizes and prepares the layers, and the loading goes on into fake-quantized
        layers, which compute what the converted ones did.
        """

        def reprepare_for_float_weights(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            weights = [state_dict.get(f"{prefix}{layer}.weight") for layer in self.layers]
            if any(type(w) is torch.Tensor for w in weights) and is_converted(module):
                log.info("QAT: loading float QAT weights; preparing the converted layers again")
                self._prepare(module)
                freeze_ranges_from_state(module, state_dict, prefix)

        self._remove_load_hook()
        self._load_hook = pl_module._register_load_state_dict_pre_hook(reprepare_for_float_weights, with_module=True)

    def _watch_for_frozen_ranges(self, pl_module: pl.LightningModule) -> None:
        """Let a checkpoint written after the ranges were frozen load into a freshly prepared model.

        Its frozen scales are parameters the fresh layers do not have yet; a ``load_state_dict``
        pre-hook on the root module (run before any child loads) freezes those layers with them.
        """

        def freeze_for_frozen_checkpoint(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            freeze_ranges_from_state(module, state_dict, prefix)

        self._remove_load_hook()
        self._load_hook = pl_module._register_load_state_dict_pre_hook(freeze_for_frozen_checkpoint, with_module=True)

    def _remove_load_hook(self) -> None:
        handle = getattr(self, "_load_hook", None)
        if handle is not None:
            handle.remove()
            self._load_hook = None

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        self._remove_load_hook()
        if is_converted(pl_module):
            dequantize_linears(pl_module)  # fit again, or load float QAT weights into a converted model
        try:
            self.layers = prepare_qat(
                pl_module,
                self.scheme,
                group_size=self.group_size,
                names=self.names,
                ignore=self.ignore,
                embeddings=self.embeddings,
            )
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self.phase = "prepared"
        self._set_enabled(pl_module, self.fake_quant_enabled)
        self._watch_for_frozen_ranges(pl_module)
