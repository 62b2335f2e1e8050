"""``lq-train``: the Hydra training app.

    lq-train level=advanced trainer.max_epochs=3 callbacks.report.batch_size=64
    lq-train -m level=basic,advanced
    python -m lightning_quantum.apps.train experiment=digits_cnn debug=fdr

It builds the DataModule, model, callbacks, loggers and Trainer from the config with
``hydra.utils.instantiate``, resolves ``trainer.precision=auto``, fits, tests the final weights
and returns the metrics. The level config adds the level's callbacks; see ``conf/level/``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lightning_quantum.apps._config import config_dir
from lightning_quantum.levels import CALLBACKS, recipe
from lightning_quantum.precision import resolve_precision

log = logging.getLogger(__name__)


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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as the config says; return the trainer's metrics as floats.

    Raises:
        ValueError: for a level that is unknown or not built yet, or an unknown precision.
    """
    recipe(cfg.level)  # fails early, naming the valid levels, for an unknown or unbuilt level
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    trainer_cfg = cfg.trainer
    decision = resolve_precision(trainer_cfg.precision, accelerator=str(trainer_cfg.get("accelerator", "auto")))
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
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("Final metrics: %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
