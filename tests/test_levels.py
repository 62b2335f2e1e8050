import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lightning_quantum as lq
from lightning_quantum.callbacks import (
    GradScalerMonitor,
    MemoryMonitor,
    OptimizationReport,
)
from lightning_quantum.levels import CALLBACKS, LEVELS, OptimizationLevel, render_level_yaml

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("definition", LEVELS, ids=lambda d: d.level.value)
def test_level_yaml_is_generated_from_python(definition):
    on_disk = (CONF / "level" / f"{definition.level.value}.yaml").read_text()
    assert on_disk == render_level_yaml(definition.level), "run `make conf` to regenerate conf/level"


_OUR_CALLBACKS = CALLBACKS


@pytest.mark.parametrize("name", sorted(_OUR_CALLBACKS))
def test_callback_yaml_lists_every_argument_with_python_defaults(name):
    cls = _OUR_CALLBACKS[name]
    cfg = yaml.safe_load((CONF / "callbacks" / f"{name}.yaml").read_text())[name]
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    assert set(cfg) - {"_target_"} == set(params)
    for key, param in params.items():
        value = cfg[key]
        if isinstance(value, str) and value.startswith("${"):
            continue  # interpolated from paths, set by the app
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        assert value == default, f"{name}.{key}: yaml {value!r} != python {default!r}"


def test_levels_are_cumulative():
    basic = lq.recipe("basic")
    advanced = lq.recipe(lq.OptimizationLevel.ADVANCED)
    assert set(basic.callbacks) <= set(advanced.callbacks)
    assert basic.trainer["gradient_clip_val"] == advanced.trainer["gradient_clip_val"] == 1.0
    assert basic.trainer["precision"] == "32-true"
    assert advanced.trainer["precision"] == "auto"
    assert list(advanced.callbacks)[-1] == "report"  # measures after every other callback
    assert advanced.callbacks["report"]["level"] == "advanced"


def test_trainer_kwargs_builds_callbacks_and_resolves_precision():
    kwargs = lq.recipe("advanced").trainer_kwargs()
    assert kwargs["precision"] in {"bf16-mixed", "16-mixed", "32-true"}
    types = [type(c) for c in kwargs["callbacks"]]
    assert MemoryMonitor in types and GradScalerMonitor in types and types[-1] is OptimizationReport


def test_overrides_merge_drop_and_set():
    r = lq.recipe(
        "advanced", report={"batch_size": 8}, activation_checkpointing=False, precision="32-true", max_epochs=3
    )
    assert r.callbacks["report"]["batch_size"] == 8
    assert "activation_checkpointing" not in r.callbacks
    assert r.trainer["precision"] == "32-true" and r.trainer["max_epochs"] == 3
    assert r.build_callbacks()[-1].batch_size == 8


def test_unknown_level_names_argument_and_choices():
    with pytest.raises(
        ValueError, match=r"`level`='mega' is not valid\. Choose one of: 'basic', 'advanced', 'quantum', 'ultra'"
    ):
        lq.recipe("mega")


def test_ultra_prunes_then_quantizes_from_the_final_sparsity_on():
    r = lq.recipe("ultra")
    names = list(r.callbacks)
    assert names.index("pruning") < names.index("qat") < names.index("export") < names.index("report")
    assert r.callbacks["qat"] == {"start_step": None, "start_after_pruning": True}
    assert r.callbacks["pruning"]["final_sparsity"] == 0.5
    callbacks = r.build_callbacks()
    assert [type(c).__name__ for c in callbacks][4:6] == ["Pruning", "QuantizationAwareTraining"]


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="`distillation` is not a callback of the recipe nor a Trainer argument"):
        lq.recipe("basic", distillation={"temperature": 2.0})
    with pytest.raises(ValueError, match="`report`=3 is not valid"):
        lq.recipe("basic", report=3)


def test_level_parse_is_case_insensitive():
    assert OptimizationLevel.parse("ADVANCED") is OptimizationLevel.ADVANCED


def test_recipe_does_not_import_hydra():
    code = (
        "import sys, lightning_quantum as lq; kw = lq.recipe('advanced').trainer_kwargs(); "
        "assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules, 'hydra imported'; print(kw['precision'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"bf16-mixed", "16-mixed", "32-true"}


def test_level_yaml_quotes_what_omegaconf_would_misread():
    """`nm: 2:4` unquoted is the YAML 1.1 sexagesimal integer 124; `1e3` is a float to OmegaConf."""
    import dataclasses

    from omegaconf import OmegaConf

    from lightning_quantum.levels import _render_definition

    ultra = next(d for d in LEVELS if d.level is OptimizationLevel.ULTRA)
    changed = dataclasses.replace(ultra, callbacks={"pruning": {"method": "nm", "nm": "2:4", "names": ["1e3"]}})
    cfg = OmegaConf.create(_render_definition(changed))
    assert cfg.callbacks.pruning.nm == "2:4" and list(cfg.callbacks.pruning.names) == ["1e3"]
    assert cfg.trainer.precision == "auto" and cfg.defaults[-1] == "_self_"
    assert {"override /model": "ultra_digits"} in OmegaConf.to_container(cfg.defaults)
