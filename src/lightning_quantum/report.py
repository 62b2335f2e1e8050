"""The optimization report: baseline against optimized, as data, JSON, Markdown and a rich table.

The field names are the ones users look for: ``original_model_size_mb``,
``optimized_model_size_mb``, ``compression_ratio``, ``inference_latency_ms`` (p50, with
``inference_latency_p95_ms`` beside it), ``requests_per_second``, ``memory_consumption_mb``,
``accuracy``, ``accuracy_degradation``, ``optimization_duration_seconds``, ``sparsity``,
``precision`` and ``device``. Measuring happens in :mod:`lightning_quantum.benchmark`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable

from rich.console import Group
from rich.table import Table
from torch import nn

from lightning_quantum.benchmark import OptimizationPerformanceMetrics
from lightning_quantum.charts import curves_chart, levels_chart, sparsity_chart

log = logging.getLogger(__name__)

__all__ = [
    "OptimizationReportData",
    "ReportContext",
    "ReportContributor",
    "ReportExtra",
    "build_report",
    "keep_existing",
    "write_report",
    "render_markdown",
    "render_rich_table",
]

REPORT_FIELDS = (
    "original_model_size_mb",
    "optimized_model_size_mb",
    "compression_ratio",
    "inference_latency_ms",
    "inference_latency_p95_ms",
    "requests_per_second",
    "memory_consumption_mb",
    "accuracy",
    "accuracy_degradation",
    "optimization_duration_seconds",
    "sparsity",
    "precision",
    "device",
)


class StudentVsTeacher(TypedDict, total=False):
    size_ratio: float  # student over teacher
    speedup: float  # teacher latency over student latency
    accuracy_difference: float | None  # student minus teacher
    agreement: float | None  # without labels: top-1 agreement, or mean cosine (``agreement_kind``)
    agreement_kind: str


class DistillationFigures(TypedDict):
    teacher_size_mb: float
    student_size_mb: float
    teacher_parameters: int
    student_parameters: int
    teacher_time_share: float | None
    cache: Any  # the cache setting, or "off: <why>"
    cache_hit_rate: float | None
    teacher_precision: str


class PruningFigures(TypedDict):
    method: str
    target_sparsity: float
    sparsity_over_pruned_weights: float
    removed_channels: dict[str, int]
    slimmed: bool
    speed: str


class QuantizationFigures(TypedDict):
    scheme: str
    group_size: int
    phase: str
    layers: int


class StaticQuantizationFigures(TypedDict):
    submodule: str | None
    num_batches: int
    split: str
    converted: bool


class GradScalerFigures(TypedDict):
    optimizer_steps: int
    skipped_steps: int
    nonfinite_steps: int
    calibration_skips: int
    last_scale: float | None


class ExportedFile(TypedDict):
    path: str
    bytes: int


class ReportExtra(TypedDict, total=False):
    """The sections of :attr:`OptimizationReportData.extra`, each written by one contributor."""

    # the OptimizationReport callback
    fast_dev_run: bool
    training_device: str  # where the fit ran; the figures are measured where on_fit_end has the model (the CPU)
    global_step: int
    fit_step_time_ms_median: float | None  # wall time of a training batch inside the fit
    optimized_compiled: dict[str, Any]  # OptimizationPerformanceMetrics.to_dict() of the compiled model
    # a DistillationModule
    teacher: dict[str, Any]  # OptimizationPerformanceMetrics.to_dict() of the teacher
    student_vs_teacher: StudentVsTeacher
    distillation: DistillationFigures
    # a CausalLM
    language_model: list[dict[str, Any]]  # figure, value: perplexity, decode tokens/s, prefill ms
    samples: list[dict[str, str]]  # prompt, continuation: greedy continuations of held-out prompts
    # the callbacks
    pruning: PruningFigures
    sparsity_table: list[dict[str, Any]]  # per layer, the last row the total
    sparsity_curve: list[list[float]]  # [step, sparsity]
    quantization: QuantizationFigures
    static_quantization: StaticQuantizationFigures
    grad_scaler: GradScalerFigures
    loss_scale_curve: list[list[float]]  # [step, scale]
    deployment: dict[str, Any]  # DeploymentDecision.to_dict(), with the files written
    decoding: list[dict[str, Any]]  # a language model's decode gate: one row per decode form
    exported: dict[str, ExportedFile]  # by format
    # lq.optimize
    steps: list[dict[str, Any]]
    post_training: bool


@dataclass
class ReportContext:
    """What a contributor to the report may use.

    Attributes:
        trainer: the ``Trainer`` of the fit.
        pl_module: the LightningModule as it is measured (the optimized model).
        optimized: the optimized model's figures.
        eval_loader: the loader the report measures accuracy on.
        measure: ``measure(module, precision)`` measures another model (a teacher) with the report's
            settings (batch size, threads, repeats) on ``eval_loader``.
        eval_split: the split ``eval_loader`` reads (``"test"`` or ``"val"``).
        baseline: the model as the fit found it (the report's baseline), when there is one.
        float_model: the float weights just before quantization-aware training converted the model,
            when it did.
    """

    trainer: Any
    pl_module: Any
    optimized: OptimizationPerformanceMetrics
    eval_loader: Any
    measure: Callable[[nn.Module, str], OptimizationPerformanceMetrics]
    eval_split: str = "test"
    baseline: nn.Module | None = None
    float_model: nn.Module | None = None


@runtime_checkable
class ReportContributor(Protocol):
    """A callback or LightningModule that adds sections to the optimization report."""

    def report_extra(self, context: ReportContext) -> ReportExtra:
        """The sections to add, from :class:`ReportExtra`'s keys."""
        ...


@dataclass
class OptimizationReportData:
    """Baseline against optimized model, with the headline figures flattened for quick reading.

    ``accuracy_degradation`` is ``reference_accuracy - accuracy`` (positive means worse), where the
    reference is named by ``accuracy_reference``. ``train_step_time_ratio`` is the optimized
    configuration's training step time over the baseline's (fp32, no callbacks), measured side by
    side in the same process.
    """

    original_model_size_mb: float
    optimized_model_size_mb: float
    compression_ratio: float
    inference_latency_ms: float
    inference_latency_p95_ms: float
    requests_per_second: float
    memory_consumption_mb: float
    accuracy: float | None
    accuracy_degradation: float | None
    optimization_duration_seconds: float
    sparsity: float
    precision: str
    device: str
    speedup: float
    reference_accuracy: float | None
    accuracy_reference: str
    baseline: dict[str, Any]
    optimized: dict[str, Any]
    train_step_time_ms: dict[str, float] | None = None
    train_step_time_ratio: float | None = None
    level: str | None = None
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    extra: ReportExtra = field(default_factory=lambda: ReportExtra())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(
    baseline: OptimizationPerformanceMetrics,
    optimized: OptimizationPerformanceMetrics,
    *,
    optimization_duration_seconds: float,
    reference_accuracy: float | None = None,
    accuracy_reference: str = "baseline",
    train_step_time_ms: dict[str, float] | None = None,
    level: str | None = None,
    extra: ReportExtra | None = None,
    baseline_is_reference: bool = True,
) -> OptimizationReportData:
    """Combine two measurements into the report.

    Args:
        baseline: the model before optimization.
        optimized: the model after it.
        optimization_duration_seconds: wall time of the optimization (the ``fit``, or the transform).
        reference_accuracy: the accuracy to measure degradation against; ``baseline.accuracy`` when ``None``.
        accuracy_reference: a word on where ``reference_accuracy`` came from, shown in the report.
        train_step_time_ms: ``{"baseline": ms, "optimized": ms}`` median training step times.
        level: the optimization level, when one was used.
        extra: anything else to keep with the report (for example the per-layer sparsity table).
        baseline_is_reference: without ``reference_accuracy``, measure degradation against the
            baseline's accuracy; ``False`` leaves it unmeasured (a baseline at chance level).
    """
    reference = reference_accuracy
    if reference is None and baseline_is_reference:
        reference = baseline.accuracy
    degradation = reference - optimized.accuracy if reference is not None and optimized.accuracy is not None else None
    ratio = None
    if train_step_time_ms is not None:
        ratio = train_step_time_ms["optimized"] / train_step_time_ms["baseline"]
    return OptimizationReportData(
        original_model_size_mb=baseline.model_size_mb,
        optimized_model_size_mb=optimized.model_size_mb,
        compression_ratio=baseline.model_size_bytes / optimized.model_size_bytes,
        inference_latency_ms=optimized.inference_latency_ms,
        inference_latency_p95_ms=optimized.inference_latency_p95_ms,
        requests_per_second=optimized.requests_per_second,
        memory_consumption_mb=optimized.memory_consumption_mb,
        accuracy=optimized.accuracy,
        accuracy_degradation=degradation,
        optimization_duration_seconds=optimization_duration_seconds,
        sparsity=optimized.sparsity,
        precision=optimized.precision,
        device=optimized.device,
        speedup=baseline.inference_latency_ms / optimized.inference_latency_ms,
        reference_accuracy=reference,
        accuracy_reference=accuracy_reference,
        baseline=baseline.to_dict(),
        optimized=optimized.to_dict(),
        train_step_time_ms=train_step_time_ms,
        train_step_time_ratio=ratio,
        level=level,
        extra=ReportExtra(**(extra or {})),
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def ratio_words(ratio: float, more: str, less: str) -> str:
    """A ratio in words that never reads backwards: 3.2 -> "3.20x faster", 0.32 -> "3.13x slower".

    ``ratio`` is baseline over optimized (time or size); at or above 1 the optimized model is ``more``
    (faster, smaller), below 1 it is ``less`` by the inverse ratio. A ratio that is not a finite
    positive number reads "n/a".
    """
    if not (ratio > 0 and ratio != float("inf")):
        return "n/a"
    return f"{ratio:.2f}x {more}" if ratio >= 1 else f"{1 / ratio:.2f}x {less}"


def _rows(report: OptimizationReportData) -> list[tuple[str, str, str, str]]:
    """(figure, baseline, optimized, change) rows shared by the Markdown and rich renderings."""
    b, o = report.baseline, report.optimized
    step = report.train_step_time_ms or {}
    acc_change = "n/a" if report.accuracy_degradation is None else f"{-report.accuracy_degradation:+.4f}"
    return [
        (
            "size (MB)",
            _fmt(b["model_size_mb"]),
            _fmt(o["model_size_mb"]),
            ratio_words(report.compression_ratio, "smaller", "larger"),
        ),
        ("parameters", str(b["num_parameters"]), str(o["num_parameters"]), ""),
        (
            f"latency p50 (ms, batch {o['batch_size']}, {o['num_threads']} threads)",
            _fmt(b["inference_latency_ms"]),
            _fmt(o["inference_latency_ms"]),
            ratio_words(report.speedup, "faster", "slower"),
        ),
        ("latency p95 (ms)", _fmt(b["inference_latency_p95_ms"]), _fmt(o["inference_latency_p95_ms"]), ""),
        ("throughput (samples/s)", _fmt(b["requests_per_second"]), _fmt(o["requests_per_second"]), ""),
        ("memory (MB)", _fmt(b["memory_consumption_mb"]), _fmt(o["memory_consumption_mb"]), ""),
        ("accuracy", _fmt(b["accuracy"]), _fmt(o["accuracy"]), acc_change),
        ("sparsity", _fmt(b["sparsity"]), _fmt(o["sparsity"]), ""),
        ("precision", b["precision"], o["precision"], ""),
        (
            "train step (ms)",
            _fmt(step.get("baseline")),
            _fmt(step.get("optimized")),
            "" if report.train_step_time_ratio is None else f"{report.train_step_time_ratio:.2f}x baseline",
        ),
    ]


def _teacher_rows(report: OptimizationReportData) -> list[tuple[str, str, str, str]]:
    """(figure, teacher, student, ratio) rows when a distillation teacher was measured beside the student."""
    t, o = report.extra.get("teacher"), report.optimized
    if not isinstance(t, dict):
        return []
    versus = report.extra.get("student_vs_teacher") or {}
    accuracy = versus.get("accuracy_difference")
    return [
        ("size (MB)", _fmt(t["model_size_mb"]), _fmt(o["model_size_mb"]), f"{versus.get('size_ratio', 0):.2f}x"),
        ("parameters", str(t["num_parameters"]), str(o["num_parameters"]), ""),
        (
            "latency p50 (ms)",
            _fmt(t["inference_latency_ms"]),
            _fmt(o["inference_latency_ms"]),
            ratio_words(versus.get("speedup", 0), "faster", "slower"),
        ),
        ("accuracy", _fmt(t["accuracy"]), _fmt(o["accuracy"]), "n/a" if accuracy is None else f"{accuracy:+.4f}"),
    ] + (
        [(f"agreement with the teacher ({versus.get('agreement_kind')})", "1", _fmt(versus["agreement"]), "")]
        if versus.get("agreement") is not None
        else []
    )


DEPLOYMENT_HEADERS = ("form", "p50 ms", "p95 ms", "accuracy", "cosine", "build s", "MB", "verdict")


def _deployment(report: OptimizationReportData) -> tuple[str, list[tuple[str, ...]]]:
    """(the decision in words, one row per candidate form) when a DeploymentGate chose the shipped form."""
    record = report.extra.get("deployment")
    if not isinstance(record, dict):
        return "", []
    winner: dict[str, Any] = next((c for c in record["candidates"] if c["form"] == record["form"]), {})
    build = sum(float(c.get("build_seconds") or 0.0) for c in record["candidates"])
    measured = sum(bool(c.get("measured", True)) for c in record["candidates"])
    which = f"all {measured}" if measured == len(record["candidates"]) else f"the {measured} measured"
    words = (
        f"{record['reason']}\n\n"  # the cost on a line of its own
        f"Compile time of the shipped form: {winner.get('build_seconds', 0.0):.1f} s; building (compiling, "
        f"exporting) {which} forms: {build:.1f} s, of the gate's "
        f"{record['gate_seconds']:.1f} s at batch {record['batch_size']}."
    )
    rows: list[tuple[str, ...]] = [
        (
            str(c["form"]),
            _fmt(c["latency_p50_ms"]),
            _fmt(c["latency_p95_ms"]),
            _fmt(c["accuracy"]),
            _fmt(c["cosine_to_trained"]),
            f"{c['build_seconds']:.2f}" if c.get("measured", True) else "n/a",
            _fmt(None if c["size_bytes"] is None else c["size_bytes"] / 2**20),
            ("SHIPPED; " if c["form"] == record["form"] else "") + c["note"],
        )
        for c in record["candidates"]
    ]
    return words, rows


def measured_on(report: OptimizationReportData) -> str:
    """The device the figures were measured on, and the one the model trained on where that differs: a
    Lightning fit moves the model to the CPU before ``on_fit_end``, where the report measures it."""
    trained = report.extra.get("training_device")
    if trained and report.device.split(":")[0] != str(trained).split(":")[0]:
        return f"{report.device} (trained on {trained})"
    return report.device


def render_markdown(report: OptimizationReportData, charts: dict[str, str] | None = None) -> str:
    """The report as a Markdown document; ``charts`` (title to relative PNG path) are embedded."""
    title = f"# Optimization report{f' ({report.level})' if report.level else ''}"
    lines = [
        title,
        "",
        f"Device: {measured_on(report)}. Optimization took {report.optimization_duration_seconds:.1f} s. "
        f"Accuracy change is against {report.accuracy_reference} "
        f"(reference accuracy {_fmt(report.reference_accuracy)}).",
        "",
        "| figure | baseline | optimized | change |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(report)]
    teacher = _teacher_rows(report)
    if teacher:
        lines += [
            "",
            "## Student vs teacher",
            "",
            "| figure | teacher | student | student vs teacher |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in teacher]
    words, candidates = _deployment(report)
    if candidates:
        lines += ["", "## Deployment", "", words, "", "| " + " | ".join(DEPLOYMENT_HEADERS) + " |"]
        lines += ["|" + "---|" * len(DEPLOYMENT_HEADERS)] + ["| " + " | ".join(row) + " |" for row in candidates]
    for name, table in report.extra.items():
        if isinstance(table, list) and table and isinstance(table[0], dict):
            headers = list(table[0])
            lines += ["", f"## {name}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_fmt(row.get(h)) for h in headers) + " |" for row in table]
    if charts:
        lines += ["", "## Charts", ""]
        lines += [f"![{title}]({path})" for title, path in charts.items()]
    return "\n".join(lines) + "\n"


def render_html(report: OptimizationReportData, charts: dict[str, str] | None = None) -> str:
    """The report as a standalone HTML page (tables, and the charts as ``<img>`` of relative PNG paths)."""

    def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
        head = "".join(f"<th>{escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    title = f"Optimization report{f' ({report.level})' if report.level else ''}"
    parts = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Device: {escape(measured_on(report))}. Optimization took {report.optimization_duration_seconds:.1f} s. "
        f"Accuracy change is against {escape(report.accuracy_reference)}.</p>",
        table(("figure", "baseline", "optimized", "change"), _rows(report)),  # type: ignore[arg-type]
    ]
    teacher = _teacher_rows(report)
    if teacher:
        parts += ["<h2>Student vs teacher</h2>", table(("figure", "teacher", "student", "student vs teacher"), teacher)]  # type: ignore[arg-type]
    words, candidates = _deployment(report)
    if candidates:
        paragraphs = "".join(f"<p>{escape(p)}</p>" for p in words.split("\n\n"))
        parts += ["<h2>Deployment</h2>", paragraphs, table(DEPLOYMENT_HEADERS, candidates)]
    for title_, path in (charts or {}).items():
        parts.append(f"<h2>{escape(title_)}</h2><img src='{escape(path)}' alt='{escape(title_)}'>")
    for name, rows in report.extra.items():
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            headers = tuple(rows[0])
            parts += [
                f"<h2>{escape(name)}</h2>",
                table(headers, [tuple(_fmt(r.get(h)) for h in headers) for r in rows]),
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_charts(report: OptimizationReportData, directory: Path, stem: str) -> dict[str, Path]:
    """Draw the report's charts into ``directory``: what the report has data for.

    Per-layer sparsity (a pruning run), the sparsity and loss-scale curves over training, and accuracy
    against size and latency for the baseline, the optimized model and a distillation teacher.
    """
    charts: dict[str, Path] = {}
    extra = report.extra
    if isinstance(extra.get("sparsity_table"), list) and extra["sparsity_table"]:
        charts["Per-layer sparsity"] = sparsity_chart(extra["sparsity_table"], directory / f"{stem}_sparsity.png")
    curves = {
        "target sparsity": [tuple(point) for point in extra.get("sparsity_curve") or []],
        "loss scale": [tuple(point) for point in extra.get("loss_scale_curve") or []],
    }
    if any(curves.values()):
        charts["Training curves"] = curves_chart(curves, directory / f"{stem}_curves.png")  # type: ignore[arg-type]
    points = {"baseline": report.baseline, "optimized": report.optimized}
    if isinstance(extra.get("teacher"), dict):
        points["teacher"] = extra["teacher"]
    points = {k: v for k, v in points.items() if v.get("accuracy") is not None}
    if points:
        levels = {
            k: {
                "test_accuracy": v["accuracy"],
                "size_mb": v["model_size_mb"],
                "latency_p50_ms": v["inference_latency_ms"],
            }
            for k, v in points.items()
        }
        charts["Accuracy against size and latency"] = levels_chart(levels, directory / f"{stem}_tradeoff.png")
    return charts


def render_rich_table(report: OptimizationReportData) -> Any:
    """The report as a ``rich.table.Table`` for the console."""
    table = Table(title=f"Optimization report{f' ({report.level})' if report.level else ''} on {measured_on(report)}")
    for header, justify in (("figure", "left"), ("baseline", "right"), ("optimized", "right"), ("change", "right")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in _rows(report):
        table.add_row(*row)

    parts: list[Any] = [table]
    teacher = _teacher_rows(report)
    if teacher:
        versus = Table(title="Student vs teacher")
        for header in ("figure", "teacher", "student", "student vs teacher"):
            versus.add_column(header, justify="left" if header == "figure" else "right")
        for row in teacher:
            versus.add_row(*row)
        parts.append(versus)
    words, candidates = _deployment(report)
    if candidates:
        forms = Table(title="Deployment: the candidate forms", caption=words)
        for header in DEPLOYMENT_HEADERS:
            forms.add_column(header, justify="left" if header in ("form", "verdict") else "right")
        for candidate in candidates:
            forms.add_row(*candidate)
        parts.append(forms)
    return parts[0] if len(parts) == 1 else Group(*parts)


def keep_existing(path: Path) -> None:
    """Move an earlier file at ``path`` aside (``name.<mtime>.ext``) so nothing the user had is lost."""
    if not path.exists():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    path.rename(target)
    log.info("Kept the earlier %s as %s", path.name, target.name)


def write_report(report: OptimizationReportData, directory: str | Path, *, stem: str = "report") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>.html`` and the charts (``charts/<stem>_*.png``).

    Earlier files are kept, renamed.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "html": out / f"{stem}.html"}
    chart_dir = out / "charts"
    for path in [*paths.values(), *chart_dir.glob(f"{stem}_*.png")]:
        keep_existing(path)
    charts = render_charts(report, chart_dir, stem)
    relative = {title: str(path.relative_to(out)) for title, path in charts.items()}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")
    paths["md"].write_text(render_markdown(report, relative))
    paths["html"].write_text(render_html(report, relative))
    paths.update({f"chart:{title}": path for title, path in charts.items()})
    return paths
