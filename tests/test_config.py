"""Every config group composes, and every node in it instantiates."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_quantum.apps._config import config_dir

CONF = Path(config_dir())


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(tmp_path, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def _instantiate_all(cfg: DictConfig):
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c and "_target_" in c]
    trainer_cfg = dict(cfg.trainer)
    trainer_cfg["precision"] = "32-true"
    return dm, model, callbacks, loggers, trainer_cfg


def test_default_config(tmp_path):
    cfg = _compose(tmp_path)
    dm, model, callbacks, loggers, trainer_cfg = _instantiate_all(cfg)
    assert isinstance(dm, pl.LightningDataModule) and isinstance(model, pl.LightningModule)
    assert cfg.level == "basic"
    assert {type(c).__name__ for c in callbacks} >= {"OptimizationReport", "MemoryMonitor", "RichProgressBar"}
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    trainer = instantiate(DictConfig(trainer_cfg), callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize(
    ("group", "option"),
    [
        (g, o)
        for g in ("data", "model", "trainer", "callbacks", "logger", "level", "experiment", "debug")
        for o in _options(g)
    ],
)
def test_each_group_option_composes_and_instantiates(tmp_path, group, option, lm_teacher_checkpoint):
    needs_teacher = option == "gpt_cpython_ultra"  # a trained teacher is the one thing no config can default
    extra = [f"model.teacher.checkpoint={lm_teacher_checkpoint}"] if needs_teacher else []
    cfg = _compose(tmp_path, [f"{group}={option}", *extra])
    _instantiate_all(cfg)


@pytest.fixture(scope="module")
def lm_teacher_checkpoint(tmp_path_factory):
    """A small 6-layer CausalLM checkpoint, as a fit writes one (sizes in ``hyper_parameters``)."""
    import torch

    from lightning_quantum.models import CausalLM

    model = CausalLM(vocab_size=4096, hidden_size=32, num_layers=6, num_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_the_lm_ultra_teacher_is_loaded_from_its_checkpoint_and_the_student_from_its_layers(
    tmp_path, lm_teacher_checkpoint
):
    import torch

    from lightning_quantum.models import load_causal_lm

    cfg = _compose(tmp_path, ["experiment=gpt_cpython_ultra", f"model.teacher.checkpoint={lm_teacher_checkpoint}"])
    module = instantiate(cfg.model)
    teacher = load_causal_lm(lm_teacher_checkpoint)
    assert module.student.hparams["num_layers"] == 3 and teacher.hparams["num_layers"] == 6
    for i, t in enumerate([0, 3, 5]):
        assert torch.equal(
            module.student.model.model.layers[i].mlp.up_proj.weight, teacher.model.model.layers[t].mlp.up_proj.weight
        )
    with pytest.raises(ValueError, match="holds no CausalLM hyperparameters"):
        torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
        load_causal_lm(tmp_path / "plain.ckpt")
    with pytest.raises(FileNotFoundError):
        load_causal_lm(tmp_path / "missing.ckpt")


def test_ultra_picks_the_distillation_model_unless_the_shell_names_one(tmp_path):
    assert _compose(tmp_path, ["level=ultra"]).model._target_.endswith("DistillationModule")
    assert _compose(tmp_path, ["level=ultra", "model=digits_mlp"]).model._target_.endswith("Classifier")


def test_every_callback_argument_is_overridable(tmp_path):
    cfg = _compose(
        tmp_path,
        [
            "level=advanced",
            "callbacks.report.batch_size=32",
            "callbacks.grad_scaler_monitor.max_skip_rate=0.2",
            "callbacks.activation_checkpointing.block_types=[MLPBlock]",
            "callbacks.memory_monitor.log_every_n_steps=5",
        ],
    )
    assert cfg.trainer.precision == "auto"
    report = instantiate(cfg.callbacks.report)
    assert report.batch_size == 32 and report.level == "advanced"
    assert instantiate(cfg.callbacks.grad_scaler_monitor).max_skip_rate == 0.2
    assert instantiate(cfg.callbacks.activation_checkpointing).block_types == ["MLPBlock"]


def test_experiment_switches_to_cnn(tmp_path):
    cfg = _compose(tmp_path, ["experiment=digits_cnn"])
    _, model, *_ = _instantiate_all(cfg)
    assert type(model.net).__name__ == "DigitsCNN" and cfg.data.layout == "image"


def test_hydra_is_only_imported_by_apps():
    src = CONF.parent / "src" / "lightning_quantum"
    if not src.is_dir():
        pytest.skip("installed from a wheel")
    offenders = [
        p
        for p in src.rglob("*.py")
        if "apps" not in p.parts
        and any(
            line.lstrip().startswith(
                ("import hydra", "from hydra", "import omegaconf", "from omegaconf", "import fastapi", "from fastapi")
            )
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
