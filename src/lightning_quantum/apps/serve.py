"""``lq-serve``: the optimization service (FastAPI) over ``lq.optimize``.

    lq-serve --model-root models --data-dir service --port 8000 [--token-env LQ_TOKEN]

Models are registered from files inside ``--model-root`` (safetensors, or checkpoints read with
``weights_only=True``) with an architecture from a fixed list; optimization jobs and profiles run in
a worker process, so the event loop never blocks; models, jobs and results live in SQLite under
``--data-dir`` and survive a restart (a job cut off by one is marked failed, with the reason).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lightning_quantum.gpu import gpu_status
from lightning_quantum.serving import (
    MODEL_SUFFIXES,
    JobStore,
    UnsafePathError,
    load_registered_model,
    resolve_inside,
    run_optimization_job,
    run_profile,
)

log = logging.getLogger(__name__)


class Level(str, Enum):
    BASIC = "basic"
    ADVANCED = "advanced"
    QUANTUM = "quantum"
    ULTRA = "ultra"


class Architecture(str, Enum):
    DIGITS_MLP = "digits_mlp"
    DIGITS_CNN = "digits_cnn"


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="letters, digits, _ . -")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchitectureOptions(_Strict):
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=1, max_length=4, description="digits_mlp: hidden layer widths"
    )
    channels: list[Annotated[int, Field(ge=1, le=512)]] | None = Field(
        None, min_length=3, max_length=3, description="digits_cnn: channels of the three conv blocks"
    )
    width: int | None = Field(None, ge=1, le=4096, description="digits_cnn: width of the hidden linear layer")


class ModelRegistration(_Strict):
    name: Name
    path: str = Field(min_length=1, max_length=512, description="a file inside the model root")
    architecture: Architecture
    options: ArchitectureOptions = ArchitectureOptions()
    dataset: Literal["digits"] = "digits"


class RegisteredModel(ModelRegistration):
    created_at: float


class OptimizationOptions(_Strict):
    max_accuracy_drop: float | None = Field(0.01, ge=0.0, le=1.0, description="roll back a step that drops more")
    calibrate: bool = Field(True, description="static int8 calibrated on the training split; false: dynamic int8")
    calibration_batches: int = Field(8, ge=1, le=64)
    prune_amount: float = Field(0.5, ge=0.0, lt=1.0, description="ultra: share of weights (or channels) removed")
    prune_method: Literal["l1_unstructured", "l1_structured", "l2_structured"] = "l1_unstructured"
    slim: bool = Field(False, description="ultra with a structured method: remove the pruned channels")
    batch_size: int = Field(64, ge=1, le=1024)
    repeats: int = Field(30, ge=1, le=200)


class ModelOptimizationRequest(_Strict):
    model: Name
    level: Level = Level.QUANTUM
    options: OptimizationOptions = OptimizationOptions()


class JobAccepted(BaseModel):
    job_id: str
    status: str


class StepResult(BaseModel):
    name: str
    kept: bool
    accuracy: float | None
    accuracy_drop: float | None
    reason: str | None


class ModelOptimizationResponse(BaseModel):
    job_id: str
    model: str
    level: str
    compression_ratio: float
    speedup: float
    original_model_size_mb: float
    optimized_model_size_mb: float
    inference_latency_ms: float
    accuracy_before: float | None
    accuracy_after: float | None
    accuracy_degradation: float | None
    sparsity: float
    optimization_duration_seconds: float
    steps: list[StepResult]
    artifact: str
    report: dict[str, Any]


class JobStatus(BaseModel):
    id: str
    model: str
    level: str
    status: Literal["queued", "running", "succeeded", "failed"]
    options: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: ModelOptimizationResponse | None


class ProfileRequest(_Strict):
    model: Name
    job_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="profile this job's optimized model")
    batch_size: int = Field(64, ge=1, le=1024)
    repeats: int = Field(20, ge=1, le=200)


class ProfileResponse(BaseModel):
    model: str
    job_id: str | None
    batch_size: int
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_per_s: float
    memory_mb: float
    size_mb: float
    device: str


@dataclass
class ServiceSettings:
    """Where the service reads models and keeps its state, and its limits."""

    model_root: Path
    data_dir: Path
    token: str | None = None
    max_body_bytes: int = 64 * 1024
    workers: int = 1


class _Limits:
    """Pure ASGI middleware: the bearer token on every route but ``/health``, and the body size cap."""

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = self.settings.token
        if token and scope.get("path") != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(value.encode(), token.encode()):
                response = JSONResponse(
                    {"detail": "Missing or wrong bearer token."},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        limit = self.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = JSONResponse({"detail": f"The request body is larger than {limit} bytes."}, status_code=413)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        seen = 0

        async def capped_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, capped_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI application; state in ``settings.data_dir`` (``service.sqlite``, ``artifacts/``)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    artifacts = settings.data_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    model_root = settings.model_root.resolve(strict=True)
    store = JobStore(settings.data_dir / "service.sqlite")
    interrupted = store.fail_interrupted()
    if interrupted:
        log.warning("Marked %d job(s) cut off by a restart as failed", interrupted)
    tasks: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # spawn: a clean interpreter per worker (no forked torch threads or event loop)
        pool = ProcessPoolExecutor(max_workers=settings.workers, mp_context=multiprocessing.get_context("spawn"))
        app.state.pool = pool
        try:
            yield
        finally:
            for task in list(tasks):
                task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            store.close()

    app = FastAPI(
        title="lightning-quantum optimization service",
        version="0.1.0",
        lifespan=lifespan,
        description="Register trained models, optimize them at a level in a worker process, and profile them.",
    )
    app.state.store = store
    app.state.settings = settings

    async def in_worker(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(app.state.pool, fn, *args)

    def found(record: dict[str, Any] | None, detail: str) -> dict[str, Any]:
        """``record``, or a 404 with ``detail`` when the store has none."""
        if record is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail)
        return record

    def known_model(name: str) -> dict[str, Any]:
        return found(store.model(name), f"No registered model {name!r}. See GET /models.")

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, str]:
        """Liveness: 200 while the service runs (no token needed)."""
        return {"status": "ok"}

    @app.get("/gpu/status", tags=["service"])
    async def gpu() -> dict[str, Any]:
        """``gpu_status()``: ``available: false`` on a machine without a GPU."""
        return await asyncio.to_thread(gpu_status)

    @app.post("/models", status_code=201, response_model=RegisteredModel, tags=["models"])
    async def register_model(registration: ModelRegistration) -> dict[str, Any]:
        """Register a weights file inside the model root; it is loaded once (in the worker) to check it."""
        record = registration.model_dump(mode="json")
        try:
            path = resolve_inside(model_root, registration.path)
        except UnsafePathError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"`path` is refused: {error}") from None
        if path.suffix not in MODEL_SUFFIXES or not path.is_file():
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"`path`={registration.path!r} is not a {'/'.join(MODEL_SUFFIXES)} file inside the model root.",
            )
        try:
            await in_worker(_check_loads, str(model_root), record)
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(error)) from None
        store.add_model(record)
        return known_model(registration.name)

    @app.get("/models", response_model=list[RegisteredModel], tags=["models"])
    async def list_models() -> list[dict[str, Any]]:
        return store.models()

    @app.post("/optimize/model", status_code=202, response_model=JobAccepted, tags=["optimization"])
    async def optimize_model(request: ModelOptimizationRequest) -> dict[str, str]:
        """Start an optimization job; poll ``GET /optimize/jobs/{id}`` for its status and result."""
        record = known_model(request.model)
        options = request.options.model_dump()
        level = request.level.value
        job_id = store.create_job(request.model, level, options)

        async def run_job() -> None:
            store.start_job(job_id)
            try:
                result = await in_worker(
                    run_optimization_job, str(model_root), str(artifacts), job_id, record, level, options
                )
            except asyncio.CancelledError:
                store.fail_job(job_id, JobStore.INTERRUPTED)
                raise
            except Exception as error:  # the job fails with its reason; the service goes on
                log.exception("Job %s failed", job_id)
                store.fail_job(job_id, f"{type(error).__name__}: {error}")
            else:
                store.finish_job(job_id, result)

        task = asyncio.create_task(run_job())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {"job_id": job_id, "status": "queued"}

    @app.get("/optimize/jobs/{job_id}", response_model=JobStatus, tags=["optimization"])
    async def job_status(job_id: Annotated[str, Field(max_length=64)]) -> dict[str, Any]:
        return found(store.job(job_id), f"No job {job_id!r}.")

    @app.get("/optimization/stats", tags=["optimization"])
    async def optimization_stats() -> dict[str, Any]:
        """Counts by status, and by level the mean compression ratio, speedup and accuracy degradation."""
        return store.stats()

    @app.post("/performance/profile", response_model=ProfileResponse, tags=["performance"])
    async def profile(request: ProfileRequest) -> dict[str, Any]:
        """Latency, throughput and memory of a registered model, or of a finished job's optimized model."""
        record = known_model(request.model)
        if request.job_id is not None:
            job = store.job(request.job_id)
            if job is None or job["model"] != request.model:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"No job {request.job_id!r} of {request.model!r}.")
            if job["status"] != "succeeded":
                raise HTTPException(status.HTTP_409_CONFLICT, f"Job {request.job_id!r} is {job['status']}.")
        try:
            return await in_worker(
                run_profile,
                str(model_root),
                str(artifacts),
                record,
                request.job_id,
                request.batch_size,
                request.repeats,
            )
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(error)) from None

    return _Limits(app, settings)  # type: ignore[return-value]


def _check_loads(model_root: str, record: dict[str, Any]) -> bool:
    load_registered_model(model_root, record)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lq-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-root", required=True, type=Path, help="the only directory models are read from")
    parser.add_argument("--data-dir", default=Path("lq-service"), type=Path, help="SQLite database and artifacts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8000, type=int)
    parser.add_argument("--workers", default=1, type=int, help="worker processes for jobs and profiles")
    parser.add_argument("--max-body-bytes", default=64 * 1024, type=int)
    parser.add_argument(
        "--token-env", default="LQ_SERVE_TOKEN", help="environment variable holding the bearer token (unset: no token)"
    )
    args = parser.parse_args(argv)
    if not args.model_root.is_dir():
        parser.error(f"--model-root {str(args.model_root)!r} is not a directory.")
    if args.workers < 1 or args.max_body_bytes < 1:
        parser.error("--workers and --max-body-bytes must be 1 or more.")
    import uvicorn

    settings = ServiceSettings(
        model_root=args.model_root,
        data_dir=args.data_dir,
        token=os.environ.get(args.token_env) or None,
        max_body_bytes=args.max_body_bytes,
        workers=args.workers,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
