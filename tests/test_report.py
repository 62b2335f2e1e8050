import json

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quantum.benchmark import OptimizationPerformanceMetrics
from lightning_quantum.callbacks import OptimizationReport
from lightning_quantum.report import REPORT_FIELDS, build_report, render_markdown, render_rich_table, write_report


def _metrics(**kw):
    base = dict(
        model_size_mb=4.0,
        model_size_bytes=4 * 2**20,
        num_parameters=10**6,
        inference_latency_ms=2.0,
        inference_latency_p95_ms=2.5,
        requests_per_second=32000.0,
        memory_consumption_mb=5.0,
        accuracy=0.98,
        sparsity=0.0,
        precision="32-true",
        device="cpu",
        batch_size=64,
        num_threads=2,
        repeats=50,
    )
    base.update(kw)
    return OptimizationPerformanceMetrics(**base)


def test_report_figures_by_hand():
    report = build_report(
        _metrics(),
        _metrics(
            model_size_mb=1.0,
            model_size_bytes=2**20,
            inference_latency_ms=0.5,
            accuracy=0.97,
            sparsity=0.5,
            precision="bf16-mixed",
        ),
        optimization_duration_seconds=12.0,
        train_step_time_ms={"baseline": 4.0, "optimized": 5.0},
        level="advanced",
    )
    assert report.compression_ratio == 4.0
    assert report.speedup == 4.0
    assert report.accuracy_degradation == pytest.approx(0.01)
    assert report.train_step_time_ratio == 1.25
    assert report.precision == "bf16-mixed" and report.sparsity == 0.5


def test_write_keeps_earlier_reports(tmp_path):
    report = build_report(_metrics(), _metrics(), optimization_duration_seconds=1.0)
    first = write_report(report, tmp_path)
    first_text = first["json"].read_text()
    report2 = build_report(_metrics(), _metrics(accuracy=0.5), optimization_duration_seconds=2.0)
    write_report(report2, tmp_path)
    kept = sorted(p for p in tmp_path.glob("report.*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first_text
    assert len(list(tmp_path.glob("report.*.md"))) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["accuracy"] == 0.5
    assert set(REPORT_FIELDS) <= set(data)


def test_markdown_and_rich_rendering():
    report = build_report(
        _metrics(),
        _metrics(model_size_mb=2.0, model_size_bytes=2 * 2**20),
        optimization_duration_seconds=1.0,
        level="basic",
    )
    md = render_markdown(report)
    assert md.startswith("# Optimization report (basic)")
    assert "| size (MB) | 4.0000 | 2.0000 | 2.00x smaller |" in md
    table = render_rich_table(report)
    assert table.row_count == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -1}, r"`batch_size`=-1 is not valid"),
        ({"eval_split": "train"}, r"`eval_split`='train' is not valid. Choose one of: 'test', 'val'"),
        ({"repeats": 0}, r"`repeats`=0 is not valid"),
        ({"reference_accuracy": 97.0}, r"`reference_accuracy`=97.0 is not valid. It must lie in \[0, 1\]"),
        ({"stem": "a/b"}, r"`stem`='a/b' is not valid"),
    ],
)
def test_report_callback_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        OptimizationReport(**kwargs)


def test_baseline_snapshot_is_the_plain_model(tmp_path, digits):
    import lightning.pytorch as pl
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from lightning_quantum.callbacks import ActivationCheckpointing
    from lightning_quantum.models import Classifier, DigitsMLP
    from tests.conftest import trainer_kwargs

    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, train_step_repeats=2, print_table=False)
    model = Classifier(DigitsMLP(hidden=(16,), dropout=0.0))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ActivationCheckpointing(), report]))
    trainer.fit(model, digits)
    assert not any(isinstance(m, CheckpointWrapper) for m in report._baseline.modules())
    assert report.report is not None and report.paths["json"].exists()
    assert report.report.extra["fit_step_time_ms_median"] > 0


@pytest.mark.gpu_stand_in
def test_bf16_true_run_reports_and_times_training_steps(tmp_path, tiny_classifier, digits):
    """The training-step comparison casts the batch as the precision plugin does (bf16-true needs it)."""
    import lightning.pytorch as pl

    from lightning_quantum.callbacks import OptimizationReport
    from tests.conftest import trainer_kwargs

    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, train_step_repeats=2, print_table=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-true", callbacks=[report]))
    trainer.fit(tiny_classifier, digits)
    assert report.report.precision == "bf16-true" and report.report.train_step_time_ms["optimized"] > 0


@pytest.mark.gpu_stand_in
def test_a_model_cast_before_fit_has_its_baseline_measured_in_its_dtype(tmp_path, tiny_classifier, digits):
    """The qlora_gpu experiment casts the model to bf16 before fit (bitsandbytes computes in it): its
    fit-start baseline has bf16 weights and is fed bf16 inputs, in the benchmark and in the training-step
    comparison. On the first GPU run the benchmark got float32 ones ("mat1 and mat2 must have the same
    dtype"), on the second the training step."""
    import lightning.pytorch as pl
    import torch

    from lightning_quantum.callbacks import OptimizationReport
    from lightning_quantum.callbacks.report import weights_precision
    from tests.conftest import trainer_kwargs

    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, train_step_repeats=2, print_table=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-true", callbacks=[report]))
    trainer.fit(tiny_classifier.to(torch.bfloat16), digits)
    assert weights_precision(report._baseline) == "bf16-true" and report.report.accuracy is not None
    assert report.report.train_step_time_ms["baseline"] > 0
    assert weights_precision(torch.nn.Linear(2, 2)) == weights_precision(torch.nn.ReLU()) == "32-true"


def test_the_report_names_the_training_device_when_it_measured_on_another():
    """A GPU fit is measured on the CPU (Lightning moves the model there before on_fit_end): the
    report's device line says both."""
    from lightning_quantum.report import measured_on, render_html

    report = build_report(_metrics(), _metrics(), optimization_duration_seconds=1.0, extra={"training_device": "cuda"})
    assert measured_on(report) == "cpu (trained on cuda)"
    assert "Device: cpu (trained on cuda)." in render_markdown(report) and "trained on cuda" in render_html(report)
    same = build_report(_metrics(), _metrics(), optimization_duration_seconds=1.0, extra={"training_device": "cpu"})
    assert measured_on(same) == "cpu"


def test_a_slower_or_larger_model_is_never_called_faster_or_smaller():
    """0.32x as fast reads "3.12x slower" (1 / 0.32), never "0.32x faster"."""
    from lightning_quantum.report import ratio_words

    report = build_report(
        _metrics(),
        _metrics(inference_latency_ms=6.25, model_size_mb=8.0, model_size_bytes=8 * 2**20),
        optimization_duration_seconds=1.0,
    )
    assert report.speedup == pytest.approx(0.32)
    md = render_markdown(report)
    assert "3.12x slower" in md and "2.00x larger" in md and "faster" not in md and "smaller" not in md
    assert ratio_words(1.0, "faster", "slower") == "1.00x faster"
    assert ratio_words(float("nan"), "faster", "slower") == ratio_words(0.0, "faster", "slower") == "n/a"


def test_every_report_contributor_has_the_one_signature():
    """Callbacks and the DistillationModule add to the report through ReportContributor.report_extra(context)."""
    import inspect

    import lightning_quantum.callbacks as callbacks
    from lightning_quantum.distillation import DistillationModule
    from lightning_quantum.report import ReportContributor, ReportExtra

    classes = [c for c in vars(callbacks).values() if inspect.isclass(c) and hasattr(c, "report_extra")]
    classes.append(DistillationModule)
    assert len(classes) >= 7, classes
    for cls in classes:
        assert list(inspect.signature(cls.report_extra).parameters) == ["self", "context"], cls
        assert issubclass(cls, ReportContributor), cls
        assert inspect.get_annotations(cls.report_extra)["return"] in ("ReportExtra", ReportExtra), cls


def test_a_callback_with_the_old_report_extra_signature_still_contributes(tmp_path, tiny_classifier, digits):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from tests.conftest import trainer_kwargs

    class Old(Callback):
        def report_extra(self, pl_module):
            return {"old": type(pl_module).__name__}

    report = OptimizationReport(output_dir=tmp_path, repeats=2, warmup=1, print_table=False, compare_train_step=False)
    with pytest.deprecated_call(match=r"Old.report_extra\(pl_module\) is the old signature"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Old(), report])).fit(tiny_classifier, digits)
    assert report.report.extra["old"] == "Classifier"
