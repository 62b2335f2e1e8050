"""``lq-optimize``: optimize a trained model with no training run (Hydra app around ``lq.optimize``).

    lq-optimize checkpoint=outputs/train/basic/<run>/checkpoints/last.ckpt level=quantum
    lq-optimize checkpoint=model.safetensors model=digits_cnn level=ultra options.slim=true \\
        options.prune_method=l2_structured

It builds the model from the model config, loads the checkpoint (a Lightning ``.ckpt`` with
``torch.load(weights_only=True)``, or ``.safetensors``), optimizes the network inside it at the
level, measuring each step on the DataModule's test split, and writes the optimized model,
``optimized.json``, ``report.json`` and ``report.md`` into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from lightning_quantum.apps._config import config_dir, refuse_non_finite, report_user_errors
from lightning_quantum.apps.train import instantiate
from lightning_quantum.models import digits_architecture_of
from lightning_quantum.optimize import OptimizationResult, optimize_and_save
from lightning_quantum.pruning.slimming import rebuild_architecture, slimmed_architecture
from lightning_quantum.report import render_rich_table
from lightning_quantum.weights import read_checkpoint, state_mismatch

log = logging.getLogger(__name__)


def inference_network(module: nn.Module) -> nn.Module:
    """The network a LightningModule runs for inference: ``net`` (Classifier), ``student``, or itself."""
    for name in ("net", "student"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


#: How lq-optimize builds each bundled digits net from the shell (the model config and its net's arguments)
_MODEL_OVERRIDES = {
    "digits_mlp": lambda o: f"model=digits_mlp model.net.hidden={o['hidden']}",
    "digits_cnn": lambda o: f"model=digits_cnn model.net.channels={o['channels']} model.net.hidden={o['hidden']}",
}


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a Lightning checkpoint (``weights_only=True``; slimmed ones too) or safetensors into ``module``.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: for another suffix, a checkpoint that is not plain tensors (a pickle with code
            is refused by ``weights_only=True`` and reported as such), a corrupt file, or weights
            that do not fit ``module`` (saying which bundled architecture they do fit, if any).
    """
    checkpoint = read_checkpoint(path)
    state = checkpoint["state_dict"]
    record = slimmed_architecture(checkpoint)
    if record is not None:
        rebuild_architecture(module, record, state)
    # exported safetensors of a LightningModule carry its keys ("net.*"); weights of the bare network do not
    target = module if any(k in module.state_dict() for k in state) else inference_network(module)
    mismatch = state_mismatch(target.state_dict(), state)
    if mismatch is not None:
        found = digits_architecture_of(state)
        hint = ""
        if found is not None:
            name, options = found
            hint = f" The file holds a {name} with {options}: try `{_MODEL_OVERRIDES[name](options)}`."
        raise ValueError(
            f"`checkpoint`={str(path)!r} does not fit the model config ({type(inference_network(module)).__name__}): "
            f"{mismatch}.{hint}"
        )
    target.load_state_dict(state)
    return module


def run(cfg: DictConfig) -> OptimizationResult:
    """Optimize as the config says; write the artifact and reports into ``paths.output_dir``.

    Raises:
        ValueError: for a NaN or infinite number in the config, an option out of range, or a
            checkpoint that cannot be read or does not fit the model config.
        FileNotFoundError: when ``checkpoint`` is not a file.
    """
    refuse_non_finite(cfg)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    assert isinstance(model_cfg, dict)
    for key in ("optimizer", "scheduler"):  # nothing trains: skip them (they may refer to the trainer config)
        if key in model_cfg:
            model_cfg[key] = None
    module = instantiate(OmegaConf.create(model_cfg))
    load_weights(module, cfg.checkpoint)
    network = inference_network(module).eval()
    options: dict[str, Any] = dict(OmegaConf.to_container(cfg.options, resolve=True))  # type: ignore[arg-type]
    result, paths = optimize_and_save(network, cfg.level, instantiate(cfg.data), cfg.paths.output_dir, **options)
    Console().print(render_rich_table(result.report))
    for step in result.steps:
        log.info("step %-8s %s %s", step.name, "kept" if step.kept else "not kept", step.reason or "")
    log.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="optimize")
def main(cfg: DictConfig) -> float | None:
    with report_user_errors("lq-optimize"):
        result = run(cfg)
    return result.report.compression_ratio


if __name__ == "__main__":
    main()
