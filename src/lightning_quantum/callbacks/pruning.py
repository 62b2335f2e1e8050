"""Gradual pruning during ``fit``: per-step schedules, masks kept outside the model, exact resume, DDP."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as distributed_checkpoint
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_quantum._batches import split_batch
from lightning_quantum._validation import check_choice, check_fraction, check_name_lists, check_optional_step
from lightning_quantum.callbacks._common import is_sanity_checking
from lightning_quantum.pruning.masks import (
    PRUNING_METHODS,
    apply_masks,
    make_pruning_permanent,
    mask_gradients,
    masks_sparsity,
    nm_masks,
    select_parameters,
    sparsity_report,
    structured_masks,
    unstructured_masks,
)
from lightning_quantum.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_quantum.pruning.sharded import is_sharded, shard_like
from lightning_quantum.pruning.slimming import (
    build_dependency_graph,
    coupled_channel_masks,
    declared_channel_layers,
    output_layers,
    record_architecture,
    slim_model,
)
from lightning_quantum.report import ReportContext, ReportExtra

log = logging.getLogger(__name__)

__all__ = ["Pruning"]

_STRUCTURED = {"l1_structured": 1, "l2_structured": 2}
_DEFAULT_START, _DEFAULT_END = 0.1, 0.75


def _parse_nm(nm: str) -> tuple[int, int]:
    try:
        n_text, m_text = str(nm).split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise MisconfigurationException(f"`nm`={nm!r} is not valid. Write it as 'N:M', for example '2:4'.") from None
    if not 0 < n < m:
        raise MisconfigurationException(f"`nm`={nm!r} is not valid. It needs 0 < N < M (N kept of every M).")
    return n, m


#: Where sharded masks sit in a distributed checkpoint, beside the model's keys.
_SHARDED_MASK_PREFIX = "_pruning_masks."


class Pruning(Callback):
    """Prune weights gradually while training, with masks that survive checkpoints and DDP.

    Every optimizer step the removed weights are zeroed again after the step (and, when gradients
    are clipped, their gradients before clipping, so the clip norm counts live weights only): removed
    weights are exactly zero at every step, also with gradient accumulation and skipped AMP steps.
    When the schedule says so, the masks are recomputed from the current weights; a weight once
    removed stays removed. Masks live in
    this callback's state, never in forward hooks: the forward pass does no extra work, the model
    deep-copies and pickles at any time, and the checkpoint holds the masks and the schedule
    position, so a resumed run ends with the same masks and weights as an uninterrupted one.

    Args:
        method: ``"l1_unstructured"`` (single weights), ``"l1_structured"`` / ``"l2_structured"``
            (output channels by norm, with coupled BatchNorm and inputs masked too) or ``"nm"``.
        final_sparsity: the fraction of the chosen weights (or channels) removed at the end, in [0, 1).
            Ignored by ``"nm"``, whose sparsity is ``1 - N/M``.
        initial_sparsity: the fraction at the first update, in [0, 1).
        schedule: ``"cubic"`` (Zhu & Gupta), ``"linear"``, ``"constant"`` or ``"one_shot"``.
        scope: ``"global"`` ranks all chosen weights together, ``"layer"`` prunes each layer to the
            target; structured and N:M pruning always work per layer.
        start_step: first update, in optimizer steps (or epochs with ``unit="epoch"``); 10% of the fit
            when ``None``.
        end_step: last update; 75% of the fit when ``None``, which leaves a quarter for fine-tuning.
        frequency: steps (or epochs) between updates.
        unit: ``"step"`` counts optimizer steps, ``"epoch"`` counts epochs (updates at epoch starts).
        nm: the N:M pattern for ``method="nm"``: N kept of every M consecutive weights.
        module_types: class names of the modules whose ``weight`` is pruned.
        names: ``fnmatch`` patterns of module names to prune. When ``None``: for a structured method, the
            layers the model declares safe to slim (``channel_pruning_layers``, see
            :func:`~lightning_quantum.pruning.slimming.declared_channel_layers`: a BERT student's
            feed-forward hidden units), else every module of ``module_types``.
        ignore: ``fnmatch`` patterns of module names to leave alone.
        slim: structured methods only: remove the pruned channels for real at fit end (Torch-Pruning
            DepGraph), shrinking the coupled layers too.
        log_per_layer: log each layer's sparsity, not only the global one, when masks change.

    Raises:
        MisconfigurationException: for an unknown method, schedule, scope or unit, a sparsity outside
            [0, 1), an N:M pattern with N >= M, an end step before the start step, or ``slim`` with
            an unstructured method; at ``setup``, when nothing matches the module choice.

    Example:
        >>> trainer = L.Trainer(callbacks=[Pruning(final_sparsity=0.9, schedule="cubic")])  # doctest: +SKIP
    """

    def __init__(
        self,
        method: Literal["l1_unstructured", "l1_structured", "l2_structured", "nm"] = "l1_unstructured",
        final_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        schedule: Literal["cubic", "linear", "constant", "one_shot"] = "cubic",
        scope: Literal["global", "layer"] = "global",
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int = 25,
        unit: Literal["step", "epoch"] = "step",
        nm: str = "2:4",
        module_types: Sequence[str] = ("Linear", "Conv1d", "Conv2d", "Conv3d"),
        names: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        slim: bool = False,
        log_per_layer: bool = True,
    ) -> None:
        err = MisconfigurationException
        check_choice("method", method, PRUNING_METHODS, error=err)
        check_fraction("final_sparsity", final_sparsity, error=err)
        check_fraction("initial_sparsity", initial_sparsity, error=err)
        check_choice("schedule", schedule, SCHEDULES, error=err)
        check_choice("scope", scope, ("global", "layer"), error=err)
        check_choice("unit", unit, ("step", "epoch"), error=err)
        self.nm_pattern = _parse_nm(nm)
        check_optional_step("start_step", start_step, error=err)
        check_optional_step("end_step", end_step, error=err)
        if start_step is not None and end_step is not None and end_step < start_step:
            raise err(f"`end_step`={end_step} is before `start_step`={start_step}. It must be >= start_step.")
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise err(f"`frequency`={frequency!r} is not valid. It must be an integer >= 1.")
        if initial_sparsity > final_sparsity:
            raise err(f"`initial_sparsity`={initial_sparsity} is above `final_sparsity`={final_sparsity}.")
        if slim and method not in _STRUCTURED:
            raise err(
                f"`slim`=True needs a structured method, not `method`={method!r}. Choose one of: "
                f"{', '.join(map(repr, _STRUCTURED))}."
            )
        check_name_lists(err, module_types=module_types, names=names, ignore=ignore)
        self.method = method
        self.final_sparsity = final_sparsity
        self.initial_sparsity = initial_sparsity
        self.schedule_kind = schedule
        self.scope = scope
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.unit = unit
        self.nm = nm
        self.module_types = list(module_types)
        self.names = list(names) if names is not None else None
        self.ignore = list(ignore)
        self.slim = slim
        self.log_per_layer = log_per_layer

        self.schedule: SparsitySchedule | None = None
        self.masks: dict[str, Tensor] = {}
        self._sharded_to_load: list[str] = []  # sharded masks named by a checkpoint, read at fit start
        self.current_sparsity = 0.0
        self.history: list[tuple[int, float]] = []
        self.slimmed_architecture: dict[str, Any] | None = None
        self.removed_channels: dict[str, int] = {}
        self._targets: list[str] = []
        self._params: list[Tensor] = []
        self._mask_list: list[Tensor] = []
        self._last_step = -1
        self._graph: Any = None
        self._example_inputs: Any = None

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = self.names
        if names is None and self.method in _STRUCTURED:
            names = declared_channel_layers(pl_module)  # the model knows which channels can go whole
            if names is not None:
                rank_zero_info(f"Structured pruning of the layers {type(pl_module).__name__} declares: {names}.")
        try:
            modules = select_parameters(pl_module, self.module_types, names, self.ignore)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        self._targets = [f"{name}.weight" for name in modules]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule = self._resolve_schedule(trainer)
        self._last_step = trainer.global_step
        self._check_sharding(pl_module)
        self._bind(pl_module)  # masks restored from a checkpoint are applied again here

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy (FSDP2) restores callbacks after on_fit_start: bind what it restored
        if self._sharded_to_load or trainer.strategy.restore_checkpoint_after_setup:
            self._last_step = trainer.global_step
            self._load_sharded_masks(trainer, pl_module)
            self._bind(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example_inputs is None and self.method in _STRUCTURED:
            inputs, _ = split_batch(batch)
            self._example_inputs = inputs[:1] if isinstance(inputs, Tensor) else inputs

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_update(trainer, pl_module, trainer.current_epoch)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # Only clipping reads the gradients of removed weights (the weights are zeroed after the step
        # anyway), so the extra pass is paid only when the clip norm must count live weights alone.
        if self._mask_list and trainer.gradient_clip_val:
            mask_gradients(self._params, self._mask_list)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_sanity_checking(trainer) or trainer.global_step == self._last_step:
            return  # no optimizer step this batch (gradient accumulation)
        self._last_step = trainer.global_step
        if self._mask_list:
            apply_masks(self._params, self._mask_list)
        if self.unit == "step":
            self._maybe_update(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's teardown has moved the model (to the CPU after a GPU fit): the masks follow their weights
        params = dict(pl_module.named_parameters())
        self.masks = {
            name: mask if is_sharded(mask) or name not in params else mask.to(params[name].device)
            for name, mask in self.masks.items()
        }
        if self.slim and self.masks and self.slimmed_architecture is None:
            self._slim(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        sharded = [name for name, mask in self.masks.items() if is_sharded(mask)]
        return {
            "method": self.method,
            # sharded (FSDP2) masks go with the sharded weights instead (on_save_checkpoint); named here
            "masks": {name: mask.detach().cpu() for name, mask in self.masks.items() if name not in sharded},
            "sharded_masks": sharded,
            "current_sparsity": self.current_sparsity,
            "history": [list(h) for h in self.history],
            "slimmed_architecture": self.slimmed_architecture,
            "removed_channels": dict(self.removed_channels),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) != self.method:
            raise MisconfigurationException(
                f"The checkpoint was pruned with `method`={state_dict['method']!r}, this callback uses "
                f"`method`={self.method!r}."
            )
        self.masks = {str(k): v.bool() for k, v in state_dict.get("masks", {}).items()}
        self._sharded_to_load = [str(n) for n in state_dict.get("sharded_masks", [])]
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.slimmed_architecture = state_dict.get("slimmed_architecture")
        self.removed_channels = dict(state_dict.get("removed_channels", {}))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Sharded (FSDP2) masks are saved as the weights are: each rank writes its shards into the
        distributed checkpoint, under ``_pruning_masks.<weight>`` beside the model's keys."""
        for name, mask in self.masks.items():
            if is_sharded(mask):
                checkpoint["state_dict"][f"{_SHARDED_MASK_PREFIX}{name}"] = mask

    def _load_sharded_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read this rank's shards of the masks a distributed checkpoint holds (see ``on_save_checkpoint``)."""
        names, self._sharded_to_load = self._sharded_to_load, []
        if not names:
            return
        path = Path(str(trainer.ckpt_path or ""))
        if not path.is_dir():
            raise MisconfigurationException(
                f"The checkpoint holds sharded (FSDP2) pruning masks, but {str(path)!r} is not the distributed "
                "checkpoint directory they were saved in. Resume with the same ModelParallelStrategy and "
                "`save_distributed_checkpoint=True`."
            )
        params = dict(pl_module.named_parameters())
        template = {
            f"{_SHARDED_MASK_PREFIX}{name}": shard_like(
                torch.ones_like(params[name].to_local(), dtype=torch.bool),  # type: ignore[attr-defined]
                params[name],  # type: ignore[arg-type]
            )
            for name in names
        }
        state = {"state_dict": template}
        distributed_checkpoint.load(state, checkpoint_id=str(path))
        self.masks.update({name: state["state_dict"][f"{_SHARDED_MASK_PREFIX}{name}"] for name in names})

    # -- public helpers ------------------------------------------------------------------------
    def make_permanent(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """A plain ``state_dict`` with the masks applied, loadable into an unpruned copy of the model."""
        return make_pruning_permanent(pl_module, self.masks)

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """Figures for the optimization report: the per-layer table and the sparsity reached."""
        layers = sorted({t.rsplit(".", 1)[0] for t in self._targets})
        table = sparsity_report(context.pl_module, names=layers if self.slimmed_architecture is None else None)
        return {
            "sparsity_table": table,
            "sparsity_curve": [list(h) for h in self.history],
            "pruning": {
                "method": self.method,
                "target_sparsity": self.current_sparsity,
                "sparsity_over_pruned_weights": table[-1]["sparsity"],
                "removed_channels": dict(self.removed_channels),
                "slimmed": self.slimmed_architecture is not None,
                "speed": self._speed_note(),
            },
        }

    def _speed_note(self) -> str:
        """What the chosen kind of sparsity does for inference speed, in one sentence for the report."""
        if self.slimmed_architecture is not None:
            return "channels removed and the layers slimmed: smaller dense layers, so fewer operations at inference"
        if self.method == "nm":
            return "N:M sparsity: faster only where semi-structured sparse kernels run it (2:4 on recent CUDA GPUs)"
        if self.method in _STRUCTURED:
            return "channels zeroed but kept: no faster until slimmed (`slim`=True removes them)"
        return "single weights zeroed: smaller once compressed, no faster on dense CPU or GPU kernels"

    # -- work ----------------------------------------------------------------------------------
    def _total_units(self, trainer: pl.Trainer) -> float:
        if self.unit == "epoch":
            return float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else float("inf")
        return float(trainer.estimated_stepping_batches)

    def _resolve_schedule(self, trainer: pl.Trainer) -> SparsitySchedule:
        total = self._total_units(trainer)
        if (self.start_step is None or self.end_step is None) and total == float("inf"):
            raise MisconfigurationException(
                "The fit has no known length (max_steps and max_epochs are -1): set `start_step` and `end_step`."
            )
        start = self.start_step if self.start_step is not None else int(round(_DEFAULT_START * total))
        end = self.end_step if self.end_step is not None else max(start, int(round(_DEFAULT_END * total)))
        kind = "one_shot" if self.method == "nm" else self.schedule_kind
        schedule = SparsitySchedule(
            kind,
            self.final_sparsity,
            self.initial_sparsity,
            start,
            end if kind != "one_shot" else start,
            self.frequency,
        )
        if schedule.end > total:
            rank_zero_warn(
                f"The pruning schedule ends at {self.unit} {schedule.end} (`end_step`), but this fit runs "
                f"{int(total)} {self.unit}s: it will stop at sparsity {schedule.sparsity_at(int(total)):.3f} instead "
                f"of `final_sparsity`={self.final_sparsity}."
            )
        return schedule

    def _bind(self, pl_module: pl.LightningModule) -> None:
        """Point at the live parameters, move the masks to their device, and apply them."""
        params = dict(pl_module.named_parameters())
        missing = [name for name in self.masks if name not in params]
        if missing:
            raise RuntimeError(f"Pruning masks name parameters this model lacks: {missing[:5]}.")
        names = list(self.masks)
        # masks live on their weight's device (ranking and the next update run there); checkpoints hold CPU copies
        self.masks = {n: self.masks[n].to(params[n].device) for n in names}
        self._params = [params[n] for n in names]
        # Hot path: keep-masks in each weight's dtype, built once per mask change, for one fused multiply.
        self._mask_list = [self.masks[n].to(device=params[n].device, dtype=params[n].dtype) for n in names]
        if self._mask_list:
            apply_masks(self._params, self._mask_list)

    def _check_sharding(self, pl_module: pl.LightningModule) -> None:
        """Under FSDP2 (sharded ``DTensor`` weights) single weights and N:M groups are pruned shard by shard;
        removing channels needs the channel dependencies traced through whole layers, which it cannot."""
        params = dict(pl_module.named_parameters())
        if self.method in _STRUCTURED and any(is_sharded(params[t]) for t in self._targets if t in params):
            raise MisconfigurationException(
                f"`method`={self.method!r} traces channel dependencies through whole layers, which FSDP2's sharded "
                "weights do not allow. Under FSDP2 prune with `method`='l1_unstructured' or 'nm'; to remove "
                "channels, train with DDP, or slim the trained model afterwards with "
                "`lq.optimize(model, 'ultra', prune_method='l2_structured', slim=True)`."
            )

    def _target_for(self, t: int) -> float:
        assert self.schedule is not None
        if self.method == "nm":
            n, m = self.nm_pattern
            return 1.0 - n / m if t >= self.schedule.start else 0.0
        return self.schedule.sparsity_at(t)

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        target = self._target_for(t)
        if target <= self.current_sparsity or self.slimmed_architecture is not None:
            return
        masks = self._compute_masks(pl_module, target)
        if not any(is_sharded(m) for m in masks.values()):  # replicated (DDP): rank zero's masks for all
            masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = {k: v.bool() for k, v in masks.items()}
        self.current_sparsity = target
        self.history.append((t, target))
        self._bind(pl_module)
        self._check_ranks_agree(trainer, pl_module)
        self._log_sparsity(trainer, pl_module)

    def _compute_masks(self, pl_module: pl.LightningModule, target: float) -> dict[str, Tensor]:
        if self.method in _STRUCTURED:
            self._dependency_graph(pl_module)  # first: it may leave the output layers out of the targets
        params = dict(pl_module.named_parameters())
        weights = {name: params[name].detach() for name in self._targets}
        previous = {name: self.masks[name] for name in self._targets if name in self.masks}
        if self.method == "l1_unstructured":
            return unstructured_masks(weights, target, scope=self.scope, previous=previous)
        if self.method == "nm":
            try:
                return nm_masks(weights, *self.nm_pattern)
            except ValueError as error:
                raise MisconfigurationException(str(error)) from error
        channel_masks = structured_masks(weights, target, norm=_STRUCTURED[self.method], previous=previous)  # type: ignore[arg-type]
        return coupled_channel_masks(pl_module, self._dependency_graph(pl_module), channel_masks)

    def _dependency_graph(self, pl_module: pl.LightningModule) -> Any:
        if self._graph is None:
            if self._example_inputs is None:
                raise RuntimeError("Structured pruning needs one training batch to trace the model; none was seen.")
            layers = [t.rsplit(".", 1)[0] for t in self._targets]
            try:
                self._graph = build_dependency_graph(pl_module, self._example_inputs)
                outputs = output_layers(pl_module, self._graph, layers)
            except (ValueError, RuntimeError, KeyError, AttributeError) as error:
                self._graph = None
                raise MisconfigurationException(
                    f"Structured pruning (`method`={self.method!r}) could not trace the channel dependencies of "
                    f"{type(pl_module).__name__} ({type(error).__name__}: {str(error).splitlines()[0][:120]}). "
                    "Prune single weights instead: `method`='l1_unstructured', `slim`=False."
                ) from error
            kept = [t for t in self._targets if t.rsplit(".", 1)[0] not in outputs]
            if outputs and (self.names is not None or not kept):
                raise MisconfigurationException(
                    f"Structured pruning of {outputs} would remove model outputs (their channels feed no other "
                    f"layer). Add them to `ignore`, for example `ignore`={outputs}."
                )
            if outputs:  # chosen by default, not by name: the outputs stay whole, the other layers are pruned
                rank_zero_info(f"Structured pruning leaves the model's output layers {outputs} whole.")
                self._targets = kept
        return self._graph

    def _check_ranks_agree(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1 or any(is_sharded(m) for m in self.masks.values()):
            return  # sharded: each rank holds other weights
        params = dict(pl_module.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in self.masks)
        gathered = trainer.strategy.all_gather(torch.tensor(float(zeros), device=pl_module.device))
        if gathered.numel() > 1 and not bool((gathered == gathered.flatten()[0]).all()):
            raise RuntimeError(f"Ranks disagree on the pruned weights: zero counts per rank {gathered.tolist()}.")

    def _log_sparsity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log.debug("Pruning at %s %d: target sparsity %.4f", self.unit, self.history[-1][0], self.current_sparsity)
        if not trainer.loggers:
            return
        # every rank counts (sharded masks sum over the ranks); rank zero logs
        stats = {"pruning/target_sparsity": self.current_sparsity, "pruning/mask_sparsity": masks_sparsity(self.masks)}
        if self.log_per_layer:
            for name, mask in self.masks.items():
                stats[f"pruning/sparsity/{name.removesuffix('.weight')}"] = 1.0 - float(mask.float().mean())
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)

    def _slim(self, pl_module: pl.LightningModule) -> None:
        channel_masks = {name: self.masks[name] for name in self._targets if name in self.masks}
        self.removed_channels = slim_model(pl_module, self._dependency_graph(pl_module), channel_masks)
        self.slimmed_architecture = record_architecture(pl_module)
        self.masks = {}
        self._params, self._mask_list = [], []
        self._graph = None
        rank_zero_info(f"Slimming removed channels: {self.removed_channels}")
