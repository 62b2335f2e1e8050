"""Write the final model at fit end: safetensors weights and a ``torch.export`` program."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_quantum._batches import split_batch
from lightning_quantum.callbacks._common import (
    check_whole_model_available,
    detached_copy,
    find_callback,
    output_dir,
    whole_module,
)
from lightning_quantum.callbacks.deployment import DeploymentGate
from lightning_quantum.quantization.export import export_program, export_torchscript, save_program, save_safetensors
from lightning_quantum.report import ReportContext, ReportExtra, keep_existing

log = logging.getLogger(__name__)

__all__ = ["ModelExport"]

_FORMATS = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".ts"}


def _positional(example: Any, fmt: str) -> tuple[Any, ...]:
    if isinstance(example, dict):
        raise MisconfigurationException(f"`formats` entry {fmt!r} needs positional inputs; this model takes keywords.")
    return example


def _gate_program(trainer: pl.Trainer) -> Path | torch.export.ExportedProgram | None:
    """What a DeploymentGate that ran before traced of the model as trained: the ``.pt2`` it shipped when the
    shipped form has the trained model's own numerics, else the program of that form compiled, which it
    timed (in memory); ``None`` when it traced neither (a cached ranking spared that form, or a GPU model)."""
    gate = find_callback(trainer, DeploymentGate)
    if gate is None or gate.decision is None:
        return None
    trained = gate.decision.trained_form
    if "program" in gate.paths and gate.decision.form in (trained, trained.replace("eager", "compiled")):
        return gate.paths["program"]
    return gate.trained_program


def _write_program(program: Path | torch.export.ExportedProgram, path: Path) -> Path:
    if isinstance(program, Path):
        return Path(shutil.copyfile(program, path))
    save_program(program, path)
    return path


class ModelExport(Callback):
    """At fit end, on rank zero, save the final model (quantized or not) in the chosen formats.

    ``safetensors`` holds the weights (torchao quantized weights in torchao's allow-listed layout;
    reload with :func:`~lightning_quantum.quantization.load_safetensors` into a fresh model);
    ``pt2`` is a ``torch.export`` program of the model's forward with a dynamic batch dimension
    (reload with :func:`~lightning_quantum.quantization.load_program`, no model code needed);
    ``torchscript`` is a legacy trace, for float models only. Earlier files are kept, renamed.
    Put it after the callbacks that convert the model and before ``OptimizationReport``.

    Args:
        formats: any of ``"safetensors"``, ``"pt2"``, ``"torchscript"``.
        output_dir: where the files go; the trainer's ``log_dir`` (or ``default_root_dir``) if ``None``.
        stem: file name stem.

    Example:
        >>> trainer = L.Trainer(callbacks=[ModelExport(formats=["safetensors", "pt2"])])  # doctest: +SKIP
    """

    def __init__(
        self, formats: Sequence[str] = ("safetensors", "pt2"), output_dir: str | Path | None = None, stem: str = "model"
    ) -> None:
        if isinstance(formats, str) or not formats:
            raise MisconfigurationException(f"`formats`={formats!r} is not valid. Give a list of: {list(_FORMATS)}.")
        for fmt in formats:
            if fmt not in _FORMATS:
                raise MisconfigurationException(
                    f"`formats` entry {fmt!r} is not valid. Choose from: {', '.join(map(repr, _FORMATS))}."
                )
        if not stem or "/" in stem:
            raise MisconfigurationException(f"`stem`={stem!r} is not valid. Give a plain file name without '/'.")
        self.formats = list(formats)
        self.output_dir = output_dir
        self.stem = stem
        self.paths: dict[str, Path] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_whole_model_available(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = output_dir(trainer, self.output_dir)  # every rank: collectives under FSDP2
        whole = whole_module(trainer)  # under FSDP2: gathered whole on rank zero
        if not trainer.is_global_zero or whole is None:
            return
        source: Any = getattr(trainer, "datamodule", None) or whole
        inputs, _ = split_batch(next(iter(source.test_dataloader())))
        # Programs are traced on a CPU copy, with CPU inputs (tuples and dicts too): a program traced on
        # a GPU loads only where that GPU is. (torch.export also leaves weak references on the parameters
        # it traced, which later stop `module.to(device)` from swapping quantized weights: a copy keeps
        # the model clean.)
        example: Any = move_data_to_device(inputs, "cpu")
        if not isinstance(example, dict):  # dicts are keyword inputs (a Hugging Face encoder)
            example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
        traced = _gate_program(trainer)
        writers = {
            "safetensors": lambda p: save_safetensors(whole, p),  # tensors are written from the CPU
            # the DeploymentGate's program of this very model, when it traced one: the same export, not done twice
            "pt2": lambda p: (
                _write_program(traced, p)
                if traced is not None
                else export_program(detached_copy(whole).cpu(), example, p)
            ),
            "torchscript": lambda p: export_torchscript(
                detached_copy(whole).cpu(), _positional(example, "torchscript"), p
            ),
        }
        for fmt in self.formats:
            path = out / f"{self.stem}{_FORMATS[fmt]}"
            out.mkdir(parents=True, exist_ok=True)
            keep_existing(path)
            self.paths[fmt] = writers[fmt](path)
        rank_zero_info(f"Exported the model: {', '.join(str(p) for p in self.paths.values())}")

    def report_extra(self, context: ReportContext) -> ReportExtra:
        return {"exported": {fmt: {"path": str(p), "bytes": p.stat().st_size} for fmt, p in self.paths.items()}}
