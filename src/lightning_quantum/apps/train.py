"""``lq-train``: the Hydra training app.

    lq-train level=advanced trainer.max_epochs=3 callbacks.report.batch_size=64
    lq-train -m level=basic,advanced
    python -m lightning_quantum.apps.train experiment=digits_cnn debug=fdr

It builds the DataModule, model, callbacks, loggers and Trainer from the config with
``hydra.utils.instantiate``, resolves ``trainer.precision=auto``, fits, tests the final weights
and returns the metrics. The level config adds the level's callbacks; see ``conf/level/``.

A run stopped by Ctrl-C (SIGINT) or by SIGTERM (a scheduler, ``kill``) finishes the batch it is
in, writes ``checkpoints/interrupted.ckpt``, prints the command that resumes it and exits with
130 or 143. Bad input ends in one line on stderr and exit status 2 (``HYDRA_FULL_ERROR=1``
shows the traceback).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lightning_quantum.apps._config import config_dir, refuse_non_finite, report_user_errors, tell
from lightning_quantum.levels import CALLBACKS, recipe
from lightning_quantum.precision import resolve_precision

log = logging.getLogger(__name__)

# ckpt_path values Lightning resolves itself rather than reading a file
_LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class TrainingInterrupted(Exception):
    """The fit was stopped by a signal; the state at the interrupt is in ``checkpoint``.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        exit_code: 128 + the signal number, as a shell reports a process ended by it (130, 143).
        checkpoint: the checkpoint to resume from (``None`` if none was written).
        epoch: the epoch the run was in.
        global_step: optimizer steps taken.
    """

    def __init__(self, signum: int, checkpoint: str | None, epoch: int, global_step: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.global_step = global_step
        super().__init__(
            f"stopped by {self.signal_name} in epoch {epoch} after {global_step} optimizer steps; "
            + (f"its state is in {checkpoint}" if checkpoint else "no checkpoint was written")
        )


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own argument errors through unwrapped.

    Hydra wraps any error raised while building an object; a ``ValueError``, ``FileNotFoundError``
    or Lightning ``MisconfigurationException`` already names the argument and the valid choices, so
    the user gets that one directly.
    """
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, MisconfigurationException)):
            raise cause from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a ``callbacks`` or ``logger`` group that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def match_bitsandbytes_dtype(model: Any, plugins: list[Any]) -> None:
    """Give the layers a bitsandbytes plugin leaves in place its compute dtype.

    Lightning's ``BitsandbytesPrecision`` swaps the ``Linear`` layers for 4-bit (or 8-bit) ones that
    compute in its dtype and return activations in it, and leaves every other layer as built, the
    ``ignore_modules`` (the trainable head) included: a float32 head would then get bfloat16
    activations. Its ``init_module`` context would build the model in that dtype, but it refuses
    ``ignore_modules``; so the model is cast here, before the plugin converts it.
    """
    for plugin in plugins:
        if type(plugin).__name__ == "BitsandbytesPrecision":
            model.to(plugin.dtype)


def _check_stopping(trainer_cfg: DictConfig) -> None:
    """Refuse ``max_epochs=-1`` (train until killed) unless ``max_steps`` or ``max_time`` bounds the fit."""
    if (
        trainer_cfg.get("max_epochs") == -1
        and (trainer_cfg.get("max_steps") or -1) < 0
        and not trainer_cfg.get("max_time")
    ):
        raise ValueError(
            "`trainer.max_epochs`=-1 trains until the process is killed. Give a number of epochs, or bound the "
            "fit with `trainer.max_steps` or `trainer.max_time` (e.g. trainer.max_time=00:02:00:00)."
        )


def _check_ckpt_path(ckpt_path: Any) -> None:
    """``ckpt_path`` must be a Lightning checkpoint file, a distributed (FSDP2) checkpoint directory, or one
    of Lightning's keywords such as ``last``."""
    if ckpt_path is None or str(ckpt_path) in _LIGHTNING_CKPT_KEYWORDS:
        return
    path = Path(str(ckpt_path))
    if path.suffix == ".safetensors":
        raise ValueError(
            f"`ckpt_path`={str(ckpt_path)!r} is a safetensors file: weights only, without the optimizer, loop "
            f"and callback state that resuming needs. To optimize these weights, use `lq-optimize "
            f"checkpoint={ckpt_path}`; to resume training, give a Lightning .ckpt (checkpoints/last.ckpt)."
        )
    if path.is_dir() and (path / "meta.pt").is_file():  # a distributed checkpoint, as FSDP2 writes it
        return
    if not path.is_file():
        raise FileNotFoundError(
            f"`ckpt_path`={str(ckpt_path)!r} is neither a checkpoint file nor a distributed checkpoint directory."
        )


@contextmanager
def _ctrl_c_finishes_the_batch() -> Iterator[list[int]]:
    """While fitting, a first Ctrl-C stops the fit as SIGTERM does: after the current batch, so the
    checkpoint holds a whole step and a resume repeats nothing. A second Ctrl-C stops at once.

    Yields the signals received (empty unless Ctrl-C was pressed). Outside the main thread, where
    handlers cannot be set, Ctrl-C keeps Python's behaviour.
    """
    received: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # Lightning's handler is not set yet
            raise KeyboardInterrupt
        received.append(signum)
        tell("lq-train: Ctrl-C: finishing this batch and writing a checkpoint (Ctrl-C again stops at once)")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops a fit on SIGTERM after the batch it is in

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_signal(trainer: pl.Trainer, exit_: SystemExit | None, ctrl_c: list[int]) -> int | None:
    """The signal that stopped the fit, or ``None`` for any other exit.

    Lightning turns SIGTERM into ``SIGTERMException`` after the current batch, and a Ctrl-C it
    catches itself (the second one) into ``sys.exit(1)`` while handling ``KeyboardInterrupt``.
    """
    if ctrl_c or (exit_ is not None and isinstance(exit_.__context__, KeyboardInterrupt)):
        return signal.SIGINT
    if trainer.received_sigterm:
        return signal.SIGTERM
    return None


def _interrupt_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint written at the interrupt (``save_on_exception``), else ``last.ckpt``, if any."""
    written = [
        Path(callback.format_checkpoint_name({}))
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_on_exception
    ]
    written += [Path(c.last_model_path) for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]  # type: ignore[attr-defined]
    return next((str(path) for path in written if path.is_file()), None)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as the config says; return the trainer's metrics as floats.

    Raises:
        ValueError: for a level that is unknown or not built yet, an unknown precision, a NaN or
            infinite number anywhere in the config, ``trainer.max_epochs=-1`` with nothing else to
            stop the fit, or a ``ckpt_path`` that is a safetensors file.
        FileNotFoundError: for a ``ckpt_path`` that is neither a file nor a distributed checkpoint.
        TrainingInterrupted: when SIGINT or SIGTERM stopped the fit (after writing the checkpoint).
    """
    refuse_non_finite(cfg)
    recipe(cfg.level)  # fails early, naming the valid levels, for an unknown or unbuilt level
    _check_stopping(cfg.trainer)
    _check_ckpt_path(cfg.get("ckpt_path"))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    trainer_cfg = cfg.trainer
    decision = resolve_precision(
        trainer_cfg.precision,
        accelerator=str(trainer_cfg.get("accelerator", "auto")),
        devices=OmegaConf.to_container(trainer_cfg.devices)
        if OmegaConf.is_list(trainer_cfg.get("devices"))
        else trainer_cfg.get("devices"),
    )
    log.info("precision=%s resolved to %s: %s", trainer_cfg.precision, decision.precision, decision.reason)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    # Our callbacks run in the order the level registry gives (compression, then export, then the
    # report), wherever the config groups put them; others keep their place ahead of ours.
    order = {cls: i for i, cls in enumerate(CALLBACKS.values())}
    callbacks.sort(key=lambda cb: order.get(type(cb), -1))
    loggers = _instantiate_group(cfg.get("logger"))
    plugins = [instantiate(p) for p in trainer_cfg.get("plugins") or []]
    # A precision plugin (bitsandbytes 4-bit, say) sets the precision itself; Lightning refuses both.
    precision = None if any(isinstance(p, Precision) for p in plugins) else decision.precision
    match_bitsandbytes_dtype(model, plugins)
    trainer: pl.Trainer = instantiate(
        trainer_cfg, precision=precision, plugins=plugins or None, callbacks=callbacks, logger=loggers or False
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]

    # weights_only=True: a checkpoint is data, never code (Lightning would unpickle anything otherwise).
    if cfg.get("compile"):
        # Module.compile() compiles the forward in place: state_dict keys and hooks stay as they are,
        # and training_step (with its self.log calls) runs eagerly around the compiled forward.
        model.compile()
    with _ctrl_c_finishes_the_batch() as ctrl_c:
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        except SystemExit as exit_:
            signum = _interrupt_signal(trainer, exit_, ctrl_c)
            if signum is None:
                raise
            raise TrainingInterrupted(
                signum, _interrupt_checkpoint(trainer), trainer.current_epoch, trainer.global_step
            ) from None
    signum = _interrupt_signal(trainer, None, ctrl_c)
    if signum is not None:  # arrived after the last batch (in the report, say): the fit is complete
        raise TrainingInterrupted(signum, _interrupt_checkpoint(trainer), trainer.current_epoch, trainer.global_step)
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("Final metrics: %s", metrics)
    return metrics


def resume_command(checkpoint: str) -> str:
    """The ``lq-train`` command line of this run, with ``ckpt_path`` set to ``checkpoint``."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].lstrip("+~") == "ckpt_path"]
    return " ".join(["lq-train", *overrides, f"ckpt_path={checkpoint}"])


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with report_user_errors("lq-train"):
        try:
            metrics = train(cfg)
        except TrainingInterrupted as stop:
            how = f" Resume with: {resume_command(stop.checkpoint)}" if stop.checkpoint else ""
            tell(f"lq-train: {stop}.{how}")
            raise SystemExit(stop.exit_code) from None
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
