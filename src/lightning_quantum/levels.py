"""The optimization levels, defined once.

Each level names the callbacks it adds and the ``Trainer`` settings it changes; levels are
cumulative. :func:`recipe` turns a level into callbacks and trainer arguments for people who do
not use Hydra, and :func:`write_level_configs` (``make conf``) writes the Hydra
files ``conf/level/<level>.yaml`` from the same definitions (a test checks the two agree). The
arguments of each callback are its Python defaults, which ``conf/callbacks/<name>.yaml`` lists.

Example:
    >>> import lightning_quantum as lq
    >>> r = lq.recipe("advanced", report={"batch_size": 128})
    >>> sorted(r.callbacks)
    ['activation_checkpointing', 'deployment', 'grad_scaler_monitor', 'memory_monitor', 'random_state', 'report']
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_quantum.callbacks import (
    ActivationCheckpointing,
    DeploymentGate,
    GradScalerMonitor,
    MemoryMonitor,
    ModelExport,
    OptimizationReport,
    Pruning,
    QuantizationAwareTraining,
    RandomStateCheckpoint,
    StaticQuantization,
)
from lightning_quantum.precision import PrecisionDecision, resolve_precision

log = logging.getLogger(__name__)

__all__ = [
    "OptimizationLevel",
    "LevelDefinition",
    "deployment_numerics",
    "deployment_setting",
    "level_definition",
    "LEVELS",
    "CALLBACKS",
    "Recipe",
    "recipe",
    "render_level_yaml",
    "write_level_configs",
]


class OptimizationLevel(str, Enum):
    """The four levels, each adding to the one before it."""

    BASIC = "basic"
    ADVANCED = "advanced"
    QUANTUM = "quantum"
    ULTRA = "ultra"

    @classmethod
    def parse(cls, value: str | OptimizationLevel) -> OptimizationLevel:
        """The level named by ``value`` (case-insensitive), or a ``ValueError`` listing the levels."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"`level`={value!r} is not valid. Choose one of: {choices}.") from None


#: The callbacks a level can add, by the name used in recipes and under ``callbacks.`` in Hydra.
#: Their order is the order they run in: compression before export, the report last, so that it
#: measures after every other callback's ``on_fit_end``.
CALLBACKS: dict[str, type[Callback]] = {
    "random_state": RandomStateCheckpoint,
    "memory_monitor": MemoryMonitor,
    "grad_scaler_monitor": GradScalerMonitor,
    "activation_checkpointing": ActivationCheckpointing,
    "pruning": Pruning,
    "qat": QuantizationAwareTraining,
    "static_quantization": StaticQuantization,
    "deployment": DeploymentGate,
    "export": ModelExport,
    "report": OptimizationReport,
}


@dataclass(frozen=True)
class LevelDefinition:
    """What one level adds on top of the previous one.

    Attributes:
        level: the level.
        adds: one line on what it adds, for people.
        callbacks: callbacks added here, by name, with the arguments that differ from their defaults.
        trainer: ``Trainer`` arguments set here (``precision="auto"`` is resolved by :func:`resolve_precision`).
        model: the Hydra model config the level picks (``conf/model/<model>.yaml``), unless the user
            names one (``model=...`` wins); ``None`` keeps the app's default.
        post_training: what :func:`~lightning_quantum.optimize.optimize` does at this level to a model
            already trained (these steps are the level's own, not the ones below it): each entry is a
            step, or alternatives tried in order until one is kept. QUANTUM trains with int8 QAT, and
            after training quantizes to int8 statically (calibrated) or dynamically instead.
    """

    level: OptimizationLevel
    adds: str
    callbacks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    trainer: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    post_training: tuple[tuple[str, ...], ...] = ()


LEVELS: tuple[LevelDefinition, ...] = (
    LevelDefinition(
        OptimizationLevel.BASIC,
        adds=(
            "baseline snapshot, benchmark and report, memory monitor, gradient clipping, generator state in "
            "checkpoints (exact resume), a deployment gate that ships the faster of eager and compiled"
        ),
        callbacks={"random_state": {}, "memory_monitor": {}, "deployment": {"numerics": ["float"]}, "report": {}},
        trainer={"precision": "32-true", "gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"},
    ),
    LevelDefinition(
        OptimizationLevel.ADVANCED,
        adds=(
            "mixed precision (bf16, or fp16 with GradScaler), grad-scaler monitor, activation checkpointing, bf16 "
            "forms at the deployment gate"
        ),
        callbacks={
            "grad_scaler_monitor": {},
            "activation_checkpointing": {},
            "deployment": {"numerics": ["float", "bf16"]},
        },
        trainer={"precision": "auto"},
        post_training=(("bf16",),),
    ),
    LevelDefinition(
        OptimizationLevel.QUANTUM,
        adds=(
            "quantization-aware training to int8 (torchao), int8 forms at the deployment gate (the fastest form "
            "within the accuracy budget and 0.3x the float model's size that beats float eager ships), export to "
            "safetensors and torch.export"
        ),
        callbacks={
            "qat": {"start_step": None},
            "deployment": {"numerics": ["float", "bf16", "int8"], "max_size_ratio": 0.3},
            "export": {},
        },
        post_training=(("int8",),),
    ),
    LevelDefinition(
        OptimizationLevel.ULTRA,
        adds=(
            "knowledge distillation from a teacher (the model config's), gradual structured pruning of the student's "
            "hidden units with the pruned units removed at the end (unstructured zeros would buy no speed on dense "
            "kernels), QAT from the final sparsity on, int8 export"
        ),
        callbacks={
            "pruning": {"method": "l2_structured", "final_sparsity": 0.5, "slim": True},
            "qat": {"start_step": None, "start_after_pruning": True},
        },
        model="ultra_digits",
        post_training=(("prune",), ("nf4", "int8")),  # NF4 weights; int8 when NF4 is rolled back or cannot run
    ),
)
_BY_LEVEL = {d.level: d for d in LEVELS}


def level_definition(level: str | OptimizationLevel) -> LevelDefinition:
    """The definition of ``level`` (a name in any case, or the enum)."""
    return _BY_LEVEL[OptimizationLevel.parse(level)]


def deployment_numerics(level: str | OptimizationLevel) -> list[str]:
    """The numerics the deployment gate tries at ``level``: its own and the levels' below it."""
    return list(deployment_setting(level, "numerics"))


def deployment_setting(level: str | OptimizationLevel, name: str) -> Any:
    """The deployment gate's argument ``name`` at ``level`` (set there or at a level below), ``None`` when unset."""
    return copy.deepcopy(_cumulative(OptimizationLevel.parse(level))[0]["deployment"].get(name))


def _cumulative(
    level: OptimizationLevel, replacement: LevelDefinition | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The callbacks and trainer settings of ``level`` and every level below it.

    ``replacement`` stands in for ``level``'s own definition (to render a changed one).
    """
    definition = replacement or _BY_LEVEL[level]
    callbacks: dict[str, dict[str, Any]] = {}
    trainer: dict[str, Any] = {}
    for d in LEVELS:
        if d.level == level:
            d = definition
        for name, kwargs in d.callbacks.items():
            callbacks.setdefault(name, {}).update(copy.deepcopy(dict(kwargs)))
        trainer.update(d.trainer)
        if d.level == level:
            break
    callbacks["report"]["level"] = level.value
    ordered = {name: callbacks[name] for name in CALLBACKS if name in callbacks}
    return ordered, trainer


def _trainer_arguments() -> set[str]:
    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


@dataclass
class Recipe:
    """Callbacks and ``Trainer`` arguments for one level.

    Attributes:
        level: the level.
        callbacks: callback name to the keyword arguments it will be built with.
        trainer: ``Trainer`` keyword arguments; ``precision`` may be ``"auto"``.
    """

    level: OptimizationLevel
    callbacks: dict[str, dict[str, Any]]
    trainer: dict[str, Any]

    def build_callbacks(self) -> list[Callback]:
        """Fresh callback objects, in the order they must run."""
        return [CALLBACKS[name](**kwargs) for name, kwargs in self.callbacks.items()]

    def precision_decision(self) -> PrecisionDecision:
        """The precision ``trainer_kwargs`` will use, with the reason."""
        return resolve_precision(
            self.trainer.get("precision", "32-true"),
            accelerator=str(self.trainer.get("accelerator", "auto")),
            devices=self.trainer.get("devices"),
        )

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lightning.Trainer``: callbacks, a resolved precision and the rest."""
        decision = self.precision_decision()
        log.info("precision=%r resolved to %r: %s", self.trainer.get("precision"), decision.precision, decision.reason)
        return {**self.trainer, "precision": decision.precision, "callbacks": self.build_callbacks()}


def recipe(level: str | OptimizationLevel = "basic", **overrides: Any) -> Recipe:
    """The callbacks and trainer settings of ``level``, with ``overrides`` applied.

    Args:
        level: ``"basic"``, ``"advanced"``, ``"quantum"`` or ``"ultra"`` (or an :class:`OptimizationLevel`).
        **overrides: ``<callback name>={...}`` merges arguments into that callback (``False`` or
            ``None`` drops it); any ``Trainer`` argument (``precision="32-true"``, ``max_epochs=5``)
            sets it.

    Raises:
        ValueError: for an unknown level, a level that is not built yet, an unknown override, or
            callback arguments that are not a mapping.

    Example:
        >>> import lightning as L, lightning_quantum as lq
        >>> trainer = L.Trainer(**lq.recipe("basic", max_epochs=1).trainer_kwargs())  # doctest: +SKIP
    """
    parsed = OptimizationLevel.parse(level)
    callbacks, trainer = _cumulative(parsed)
    trainer_args = _trainer_arguments()
    for key, value in overrides.items():
        if key in CALLBACKS:
            if value is False or value is None:
                callbacks.pop(key, None)
            elif isinstance(value, Mapping):
                callbacks.setdefault(key, {}).update(value)
                callbacks = {name: callbacks[name] for name in CALLBACKS if name in callbacks}
            else:
                raise ValueError(
                    f"`{key}`={value!r} is not valid. Give a dict of {CALLBACKS[key].__name__} arguments, or False."
                )
        elif key in trainer_args:
            if key == "callbacks":
                raise ValueError("`callbacks` cannot be overridden as a whole; override each callback by name.")
            trainer[key] = value
        else:
            raise ValueError(
                f"`{key}` is not a callback of the recipe nor a Trainer argument. Callbacks: "
                f"{', '.join(CALLBACKS)}; Trainer arguments: see lightning.Trainer."
            )
    return Recipe(level=parsed, callbacks=callbacks, trainer=trainer)


def render_level_yaml(level: str | OptimizationLevel) -> str:
    """The Hydra file ``conf/level/<level>.yaml`` for ``level``, generated from :data:`LEVELS`."""
    return _render_definition(_BY_LEVEL[OptimizationLevel.parse(level)])


class _LevelDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that Hydra's loader (OmegaConf) would read as a number.

    PyYAML already quotes what YAML 1.1 reads as another type (``"2:4"`` is the sexagesimal integer
    124, ``"yes"`` a boolean); OmegaConf also reads ``1e3`` as a float, so its float pattern is added.
    """


_LevelDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(  # OmegaConf's own float resolver (omegaconf/_utils.py, get_yaml_loader)
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _to_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_LevelDumper, sort_keys=False, default_flow_style=False)


def _render_definition(definition: LevelDefinition) -> str:
    name = definition.level.value
    lines = [
        "# @package _global_",
        "# Generated from lightning_quantum/levels.py by `make conf`. Do not edit by hand:",
        "# change the Python definition and regenerate (tests/test_levels.py checks they agree).",
        f"# {name}: {definition.adds}.",
    ]
    callbacks, trainer = _cumulative(definition.level, definition)
    defaults: list[Any] = [f"/callbacks/{callback}" for callback in callbacks]
    if definition.model:  # Hydra wants overrides after the other entries; `model=...` from the shell still wins
        defaults.append({"override /model": definition.model})
    defaults.append("_self_")
    body = {
        "level": name,
        "trainer": trainer,
        "callbacks": {callback: kwargs for callback, kwargs in callbacks.items() if kwargs},
    }
    return "\n".join(lines) + "\n" + _to_yaml({"defaults": defaults}) + "\n" + _to_yaml(body)


def write_level_configs(directory: str | Path) -> list[Path]:
    """Write ``<directory>/<level>.yaml`` for every level; return the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for definition in LEVELS:
        path = out / f"{definition.level.value}.yaml"
        path.write_text(render_level_yaml(definition.level))
        paths.append(path)
    return paths
