"""What the optimization service needs, without any web framework: safe paths, the SQLite store, the jobs.

``lightning_quantum.apps.serve`` puts FastAPI in front of this. Everything a job does runs in a worker
process through :func:`run_optimization_job` and :func:`run_profile`; the store keeps models, jobs and
their results in SQLite, so they survive a restart.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import torch

from lightning_quantum._batches import split_batch
from lightning_quantum.benchmark import benchmark_model
from lightning_quantum.data import DigitsDataModule, TextLMDataModule
from lightning_quantum.models.causal_lm import decode_tokens_per_second, evaluate_perplexity, load_causal_lm
from lightning_quantum.models.decoding import DECODE_FORMS, decoder_form
from lightning_quantum.models.nets import ARCHITECTURES, build_architecture, digits_architecture_of
from lightning_quantum.optimize import load_optimized, optimize_and_save
from lightning_quantum.weights import read_checkpoint, state_mismatch

__all__ = [
    "DATASETS",
    "LANGUAGE_MODEL",
    "SERVED_ARCHITECTURES",
    "JobStore",
    "UnsafePathError",
    "load_registered_model",
    "resolve_inside",
    "run_optimization_job",
    "run_profile",
    "exit_with_parent",
]


class UnsafePathError(ValueError):
    """A path that does not stay inside the directory it must stay in."""


def resolve_inside(root: str | Path, relative: str) -> Path:
    """``root / relative`` resolved, or :class:`UnsafePathError` when it would leave ``root``.

    Refused: absolute paths, ``..`` segments, NUL bytes, URL schemes (``file://``, ``http://``),
    backslashes, and anything that resolves outside ``root`` once symlinks are followed (a link
    leading out, or a sibling such as ``root_evil`` that shares the root's name as a prefix:
    ``Path.is_relative_to`` compares whole components, not strings).
    """
    if not isinstance(relative, str) or not relative:
        raise UnsafePathError("The path is empty.")
    if "\x00" in relative:
        raise UnsafePathError("The path contains a NUL byte.")
    if "://" in relative or relative.split(":", 1)[0].lower() in ("file", "http", "https", "ftp", "data"):
        raise UnsafePathError(f"The path {relative!r} is a URL; give a path relative to the model root.")
    if "\\" in relative:
        raise UnsafePathError(f"The path {relative!r} contains a backslash.")
    candidate = Path(relative)
    if candidate.is_absolute():
        raise UnsafePathError(f"The path {relative!r} is absolute; give a path relative to the model root.")
    if ".." in candidate.parts:
        raise UnsafePathError(f"The path {relative!r} goes up with '..'.")
    base = Path(root).resolve(strict=True)
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base):
        raise UnsafePathError(f"The path {relative!r} leads outside the model root.")
    return resolved


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Make this (worker) process exit once ``parent_pid`` is no longer its parent.

    A process pool's initializer: when the server dies, even by SIGKILL, its workers are re-parented
    (to PID 1 or a subreaper) and would live on, each holding a model and a few hundred MB. A daemon
    thread polls ``os.getppid()`` and ends the worker within ``interval`` seconds of that.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


#: The language model the service takes: a Lightning checkpoint of a ``CausalLM`` (its sizes are saved in it).
LANGUAGE_MODEL = "causal_lm"
SERVED_ARCHITECTURES = (*ARCHITECTURES, LANGUAGE_MODEL)
#: The dataset each architecture is measured on.
DATASETS = {**dict.fromkeys(ARCHITECTURES, "digits"), LANGUAGE_MODEL: "cpython_text"}
#: The settings of a language model's DataModule read from its checkpoint: plain values only, each
#: checked by ``TextLMDataModule``; anything else in the file (a tokenizer directory, say) is ignored.
_LM_DATA_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "context": int,
    "vocab_size": int,
    "val_fraction": float,
    "test_fraction": float,
    "seed": int,
    "max_documents": (int, type(None)),
    "sources": (list, tuple),
}


def load_registered_model(model_root: str | Path, record: dict[str, Any]) -> Any:
    """Build the model a record names and load its weights: safetensors, or ``torch.load(weights_only=True)``.

    Raises:
        UnsafePathError: when the record's path leaves the model root.
        ValueError: for a file that is not weights only (a pickle with code is refused), or weights
            that do not fit the architecture.
    """
    path = resolve_inside(model_root, record["path"])
    if record["architecture"] == LANGUAGE_MODEL:
        return load_causal_lm(path, shown=record["path"])
    checkpoint = read_checkpoint(path, argument="path", shown=record["path"])
    model = build_architecture(record["architecture"], record.get("options") or {})
    state = checkpoint["state_dict"]
    state = {k.removeprefix("net."): v for k, v in state.items()}  # a Classifier's checkpoint
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch is not None:
        found = digits_architecture_of(state)
        hint = f" The file holds a {found[0]} with options {found[1]}." if found else ""
        raise ValueError(
            f"The weights in {record['path']!r} do not fit `{record['architecture']}` with options "
            f"{record.get('options') or {}}: {mismatch}.{hint}"
        )
    model.load_state_dict(state)
    return model.eval()


def _digits_data(record: dict[str, Any], batch_size: int = 64) -> DigitsDataModule:
    """The digits, laid out as the record's architecture takes them (8x8 images for the CNN)."""
    return DigitsDataModule(batch_size=batch_size, layout="image" if record["architecture"] == "digits_cnn" else "flat")


def lm_data(model_root: str | Path, record: dict[str, Any], batch_size: int) -> TextLMDataModule:
    """The CPython text a registered language model was trained on, cut as its checkpoint says (the
    whitelisted plain settings of ``datamodule_hyper_parameters``; the package's own tokenizer cache).

    Raises:
        ValueError: for a checkpoint without those settings, or with a value of the wrong type (named).
    """
    path = resolve_inside(model_root, record["path"])
    saved = read_checkpoint(path, argument="path", shown=record["path"]).get("datamodule_hyper_parameters")
    if not isinstance(saved, dict):
        raise ValueError(
            f"{record['path']!r} holds no DataModule settings: give the checkpoint of an lq-train run of "
            "experiment=gpt_cpython (its TextLMDataModule's settings are saved in it)."
        )
    settings: dict[str, Any] = {}
    for key, kinds in _LM_DATA_SETTINGS.items():
        if key not in saved:
            continue
        value: Any = saved[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{record['path']!r}: the saved DataModule setting `{key}`={value!r} is not valid.")
        settings[key] = list(cast(list[str], value)) if key == "sources" else value
    return TextLMDataModule(batch_size=batch_size, **settings)


def run_optimization_job(
    model_root: str, artifacts_dir: str, job_id: str, record: dict[str, Any], level: str, options: dict[str, Any]
) -> dict[str, Any]:
    """Optimize a registered model (in a worker process) and write its artifact; return the response data.

    Raises:
        ValueError: for a language model (``lq-optimize`` optimizes one).
    """
    if record["architecture"] == LANGUAGE_MODEL:
        raise ValueError(f"{record['name']!r} is a causal_lm: optimization jobs take the digits models.")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_registered_model(model_root, record)
    data = _digits_data(record, int(options.get("batch_size", 64)))
    result, paths = optimize_and_save(model, level, data, Path(artifacts_dir) / job_id, **options)
    report = result.report
    return {
        "job_id": job_id,
        "model": record["name"],
        "level": level,
        "compression_ratio": report.compression_ratio,
        "speedup": report.speedup,
        "original_model_size_mb": report.original_model_size_mb,
        "optimized_model_size_mb": report.optimized_model_size_mb,
        "inference_latency_ms": report.inference_latency_ms,
        "accuracy_before": result.before.accuracy,
        "accuracy_after": result.after.accuracy,
        "accuracy_degradation": report.accuracy_degradation,
        "sparsity": report.sparsity,
        "optimization_duration_seconds": report.optimization_duration_seconds,
        "steps": [
            {
                "name": s.name,
                "kept": s.kept,
                "accuracy": s.accuracy,
                "accuracy_drop": s.accuracy_drop,
                "reason": s.reason,
            }
            for s in result.steps
        ],
        "artifact": str(paths["model"].relative_to(Path(artifacts_dir))),
        "report": json.loads(json.dumps(report.to_dict(), default=str)),
    }


def run_profile(
    model_root: str,
    artifacts_dir: str,
    record: dict[str, Any],
    job_id: str | None,
    batch_size: int,
    repeats: int,
    decode: str | None = None,
) -> dict[str, Any]:
    """Benchmark a registered model, or the optimized artifact of one of its finished jobs (worker process).

    For a language model: the forward pass over ``batch_size`` held-out blocks (prefill), and the
    decode speed at batch 1 through ``decode`` (greedy, 64 new tokens after a 16-token held-out prompt,
    fewer when the context is shorter), with its held-out perplexity over up to 8 batches.
    """
    if record["architecture"] == LANGUAGE_MODEL:
        return _profile_lm(model_root, record, batch_size, repeats, decode or "generate")
    model = load_registered_model(model_root, record)
    if job_id is not None:
        model = load_optimized(model, resolve_inside(artifacts_dir, job_id))
    data = _digits_data(record, batch_size)
    data.setup("test")
    inputs = split_batch(next(iter(data.test_dataloader())))[0]
    while inputs.shape[0] < batch_size:  # the timed batch has exactly batch_size samples
        inputs = torch.cat([inputs, inputs])
    return _profile_figures(record, job_id, batch_size, model, inputs[:batch_size], repeats)


def _profile_figures(
    record: dict[str, Any], job_id: str | None, batch_size: int, model: Any, inputs: Any, repeats: int
) -> dict[str, Any]:
    metrics = benchmark_model(model, inputs, repeats=repeats, warmup=3)
    return {
        "model": record["name"],
        "job_id": job_id,
        "batch_size": batch_size,
        "latency_ms_p50": metrics.inference_latency_ms,
        "latency_ms_p95": metrics.inference_latency_p95_ms,
        "throughput_per_s": metrics.requests_per_second,
        "memory_mb": metrics.memory_consumption_mb,
        "size_mb": metrics.model_size_mb,
        "device": metrics.device,
    }


def _profile_lm(model_root: str, record: dict[str, Any], batch_size: int, repeats: int, decode: str) -> dict[str, Any]:
    if decode not in DECODE_FORMS:
        raise ValueError(f"`decode`={decode!r} is not valid. Choose one of: {', '.join(map(repr, DECODE_FORMS))}.")
    model = load_registered_model(model_root, record)
    data = lm_data(model_root, record, batch_size)
    data.setup("test")
    blocks = next(iter(data.test_dataloader()))
    while blocks.shape[0] < batch_size:  # the timed batch has exactly batch_size blocks
        blocks = torch.cat([blocks, blocks])
    prompt_length = min(16, model.context // 2)
    new_tokens = min(64, model.context - prompt_length)
    decoder = decoder_form(model, decode)
    return {
        **_profile_figures(record, None, batch_size, model, blocks[:batch_size], repeats),
        "decode": decode,
        "decode_tokens_per_s": decode_tokens_per_second(decoder, blocks[:1, :prompt_length], new_tokens=new_tokens),
        "decode_new_tokens": new_tokens,
        "perplexity": evaluate_perplexity(model, data.test_dataloader(), max_batches=8),
    }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, path TEXT NOT NULL, architecture TEXT NOT NULL, options TEXT NOT NULL,
    dataset TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, level TEXT NOT NULL, options TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    error TEXT, result TEXT
);
"""


class JobStore:
    """Models, jobs and their results in one SQLite file (thread-safe; one connection, serialized)."""

    INTERRUPTED = "the service stopped before this job finished (it was restarted); submit it again"
    STOPPED_RUNNING = "the service was stopped while this job ran; submit it again"
    STOPPED_QUEUED = "the service was stopped before this job started; submit it again"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, self._db:
            return self._db.execute(sql, args).fetchall()

    # models
    def add_model(self, record: dict[str, Any]) -> None:
        self._execute(
            "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
            (
                record["name"],
                record["path"],
                record["architecture"],
                json.dumps(record.get("options") or {}),
                record.get("dataset", "digits"),
                time.time(),
            ),
        )

    def model(self, name: str) -> dict[str, Any] | None:
        rows = self._execute("SELECT * FROM models WHERE name = ?", (name,))
        return self._model_dict(rows[0]) if rows else None

    def models(self) -> list[dict[str, Any]]:
        return [self._model_dict(r) for r in self._execute("SELECT * FROM models ORDER BY name")]

    @staticmethod
    def _model_dict(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        out["options"] = json.loads(out["options"])
        return out

    # jobs
    def create_job(self, model: str, level: str, options: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        self._execute(
            "INSERT INTO jobs (id, model, level, options, status, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
            (job_id, model, level, json.dumps(options), time.time()),
        )
        return job_id

    def start_job(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET status = 'running', started_at = ? WHERE id = ?", (time.time(), job_id))

    def finish_job(self, job_id: str, result: dict[str, Any]) -> None:
        self._execute(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?, result = ? WHERE id = ?",
            (time.time(), json.dumps(result), job_id),
        )

    def fail_job(self, job_id: str, error: str) -> None:
        self._execute(
            "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?", (time.time(), error, job_id)
        )

    def fail_interrupted(self, reason: str | None = None, statuses: tuple[str, ...] = ("queued", "running")) -> int:
        """Mark the jobs in ``statuses`` as failed with ``reason`` (a restart's by default); return how many."""
        marks = ", ".join("?" for _ in statuses)
        rows = self._execute(f"SELECT id FROM jobs WHERE status IN ({marks})", statuses)
        for row in rows:
            self.fail_job(row["id"], reason or self.INTERRUPTED)
        return len(rows)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next queued job to start, 2 for the one after it, ...; ``None`` unless the job is queued."""
        rows = self._execute(
            "SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND rowid <= "
            "(SELECT rowid FROM jobs WHERE id = ? AND status = 'queued')",
            (job_id,),
        )
        return int(rows[0]["n"]) or None

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        out = dict(rows[0])
        out["options"] = json.loads(out["options"])
        out["result"] = json.loads(out["result"]) if out["result"] else None
        out["queue_position"] = self.queue_position(job_id) if out["status"] == "queued" else None
        return out

    def stats(self) -> dict[str, Any]:
        """Counts by status, and by level the means over succeeded jobs of compression, speedup, degradation."""
        counts = {r["status"]: r["n"] for r in self._execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
        by_level: dict[str, dict[str, Any]] = {}
        for row in self._execute("SELECT level, status, result FROM jobs"):
            entry = by_level.setdefault(row["level"], {"jobs": 0, "succeeded": 0, "failed": 0, "_r": []})
            entry["jobs"] += 1
            if row["status"] in ("succeeded", "failed"):
                entry[row["status"]] += 1
            if row["status"] == "succeeded" and row["result"]:
                entry["_r"].append(json.loads(row["result"]))
        for entry in by_level.values():
            results = entry.pop("_r")
            for key, field in (
                ("mean_compression_ratio", "compression_ratio"),
                ("mean_speedup", "speedup"),
                ("mean_accuracy_degradation", "accuracy_degradation"),
            ):
                values = [r[field] for r in results if r.get(field) is not None]
                entry[key] = sum(values) / len(values) if values else None
        return {
            "jobs": sum(counts.values()),
            "by_status": {s: counts.get(s, 0) for s in ("queued", "running", "succeeded", "failed")},
            "by_level": by_level,
        }
