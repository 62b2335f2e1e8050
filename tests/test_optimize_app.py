"""lq-optimize on a checkpoint written by lq-train; checkpoints that hold code are refused."""

import json
import pickle

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_quantum.apps._config import config_dir
from lightning_quantum.apps.optimize import run
from lightning_quantum.apps.train import train


def _compose(name, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = _compose(
        "train",
        f"paths.output_dir={out}",
        "level=basic",
        "trainer.max_epochs=5",
        "logger=none",
        "callbacks.report=null",
        "callbacks.deployment=null",
        "callbacks.rich_progress_bar=null",
        "model.net.hidden=[128]",
    )
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def _optimize(out, checkpoint, *overrides):
    cfg = _compose(
        "optimize",
        f"paths.output_dir={out}",
        f"checkpoint={checkpoint}",
        "model.net.hidden=[128]",
        "options.repeats=3",
        *overrides,
    )
    return run(cfg)


def test_quantum_on_a_trained_checkpoint_writes_a_smaller_model_and_its_report(tmp_path, checkpoint):
    # static int8 rounds differently on other CPUs' kernels: the budget matches the check below
    result = _optimize(tmp_path, checkpoint, "level=quantum", "options.max_accuracy_drop=0.03", "options.deploy=false")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["level"] == "quantum" and report["compression_ratio"] > 3.0
    assert report["accuracy_degradation"] is not None and abs(report["accuracy_degradation"]) < 0.03
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "report.md").is_file()
    assert json.loads((tmp_path / "optimized.json").read_text())["steps"][0]["detail"]["kind"] == "static"
    assert result.applied == ["int8"]


def test_ultra_without_an_accuracy_budget_prunes_and_quantizes_to_nf4(tmp_path, checkpoint):
    result = _optimize(
        tmp_path,
        checkpoint,
        "level=ultra",
        "options.prune_amount=0.5",
        "options.max_accuracy_drop=null",
        "options.deploy=false",
    )
    assert result.applied == ["prune", "nf4"] and result.report.sparsity >= 0.5
    assert (tmp_path / "model.safetensors").is_file()


class _WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}))
    with pytest.raises(ValueError, match=r"could not be read as weights only"):
        _optimize(tmp_path / "out", evil)
    assert not marker.exists()


def test_missing_or_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`checkpoint`=.*nope.ckpt' is not a file"):
        _optimize(tmp_path, tmp_path / "nope.ckpt")
    wrong = tmp_path / "model.onnx"
    wrong.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"Give a .ckpt \(Lightning\) or .safetensors file"):
        _optimize(tmp_path, wrong)


def test_a_checkpoint_of_another_architecture_says_what_it_holds(tmp_path, checkpoint):
    cfg = _compose("optimize", f"paths.output_dir={tmp_path}", f"checkpoint={checkpoint}", "options.repeats=3")
    with pytest.raises(ValueError) as caught:
        run(cfg)  # the config's default DigitsMLP is 512-512; the checkpoint is 128 wide
    message = str(caught.value)
    assert "does not fit the model config (DigitsMLP)" in message and "of another shape" in message
    assert "try `model=digits_mlp model.net.hidden=[128]`" in message
    assert "_checkpoint_wrapped_module" not in message and len(message) < 600


def test_corrupt_or_nan_input_is_one_line_on_the_command_line(tmp_path, checkpoint):
    import os
    import subprocess
    import sys

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_quantum.apps.optimize",
            f"checkpoint={truncated}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lq-optimize: error: ") and "Traceback" not in out.stderr
    assert "cut.safetensors' is not a readable safetensors file" in last
    cfg = _compose(
        "optimize", f"paths.output_dir={tmp_path}", f"checkpoint={checkpoint}", "options.max_accuracy_drop=nan"
    )
    with pytest.raises(ValueError, match=r"`options.max_accuracy_drop`=nan is not valid: give a finite number"):
        run(cfg)


def test_nan_accuracy_budget_is_refused_not_ignored():
    import lightning_quantum as lq
    from lightning_quantum.models import DigitsMLP

    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`max_accuracy_drop`=(nan|inf) is not valid. It must be a finite number"):
            lq.optimize(DigitsMLP(), "ultra", example_inputs=__import__("torch").randn(2, 64), max_accuracy_drop=value)
