"""One definition per concept: every other spelling of the levels, the pruning methods, the
architectures and the version is derived from it, and this test checks each spelling against it."""

import importlib.metadata
import re
import typing
from pathlib import Path

import pytest
from fastapi import FastAPI

import lightning_quantum as lq
from lightning_quantum.apps import optimize as optimize_app
from lightning_quantum.apps.serve import ServiceSettings, create_app
from lightning_quantum.apps.serving import DATASETS, LANGUAGE_MODEL
from lightning_quantum.callbacks import Pruning
from lightning_quantum.levels import LEVELS, OptimizationLevel
from lightning_quantum.models import ARCHITECTURES
from lightning_quantum.models.decoding import DECODE_FORMS
from lightning_quantum.optimize import OPTIMIZE_LEVELS, PRUNE_METHODS
from lightning_quantum.pruning.masks import PRUNING_METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("registries")
    (root / "models").mkdir()
    app = create_app(ServiceSettings(model_root=root / "models", data_dir=root / "data"))
    assert isinstance(app, FastAPI)  # the limits are middleware, not a wrapper around the app
    return app, app.openapi()["components"]["schemas"]


def test_the_version_is_the_package_metadata(schema):
    app, _ = schema
    declared = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert lq.__version__ == importlib.metadata.version("lightning-quantum") == declared
    assert app.version == lq.__version__


def test_the_levels_are_spelled_by_optimization_level(schema):
    names = tuple(level.value for level in OptimizationLevel)
    assert OPTIMIZE_LEVELS == names
    assert tuple(d.level.value for d in LEVELS) == names
    assert sorted(p.stem for p in (ROOT / "conf" / "level").glob("*.yaml")) == sorted(names)
    _, schemas = schema
    assert tuple(schemas["OptimizationLevel"]["enum"]) == names
    assert lq.optimize.__annotations__["level"] == "str | OptimizationLevel"


def test_the_pruning_methods_are_spelled_by_the_registry(schema):
    hints = typing.get_type_hints(Pruning.__init__)
    assert typing.get_args(hints["method"]) == tuple(PRUNING_METHODS)  # the callback's Literal, for type checkers
    assert PRUNE_METHODS == tuple(m for m in PRUNING_METHODS if m != "nm")
    _, schemas = schema
    assert tuple(schemas["OptimizationOptions"]["properties"]["prune_method"]["enum"]) == PRUNE_METHODS


def test_the_architectures_are_spelled_by_the_registry(schema):
    _, schemas = schema
    # the service takes the digits architectures and a causal LM checkpoint (its sizes read from the file)
    assert schemas["ModelRegistration"]["properties"]["architecture"]["enum"] == [*ARCHITECTURES, LANGUAGE_MODEL]
    assert set(DATASETS) == {*ARCHITECTURES, LANGUAGE_MODEL}
    decode = schemas["ProfileRequest"]["properties"]["decode"]["anyOf"][0]["enum"]
    assert tuple(decode) == DECODE_FORMS
    assert set(optimize_app._MODEL_OVERRIDES) == set(ARCHITECTURES)
    assert all((ROOT / "conf" / "model" / f"{name}.yaml").is_file() for name in ARCHITECTURES)


def test_the_service_names_the_choices_of_a_bad_name(schema, tmp_path):
    from fastapi.testclient import TestClient

    app, _ = schema
    body = {"model": "x", "options": {"prune_method": "random"}}
    with TestClient(app) as client:
        response = client.post("/optimize/model", json=body)
    assert response.status_code == 422
    message = str(response.json()["detail"])
    assert "`prune_method`='random' is not valid. Choose one of: 'l1_unstructured', 'l1_structured'" in message


def test_every_public_name_still_resolves():
    import lightning_quantum.callbacks as callbacks

    for package in (lq, callbacks):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert not missing, (package.__name__, missing)
