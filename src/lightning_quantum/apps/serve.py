"""``lq-serve``: the optimization service (FastAPI) over ``lq.optimize``.

    lq-serve --model-root models --data-dir service --port 8000 [--token-env LQ_TOKEN]

Models are registered from files inside ``--model-root`` (safetensors, or checkpoints read with
``weights_only=True``) with an architecture from a fixed list. Optimization jobs wait in a queue
(``queued``, with their place in it) until one of the job worker processes takes them
(``running``); registration checks and profiles run in a worker of their own, so they never wait
behind jobs. Models, jobs and results live in SQLite under ``--data-dir`` and survive a restart; a
job cut off by a restart or a stop is marked failed with the reason. A worker that dies is replaced
and its job marked failed; workers exit by themselves when the server process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import multiprocessing
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lightning_quantum import __version__
from lightning_quantum._validation import check_choice
from lightning_quantum.apps.serving import (
    DATASETS,
    LANGUAGE_MODEL,
    SERVED_ARCHITECTURES,
    JobStore,
    UnsafePathError,
    exit_with_parent,
    load_registered_model,
    resolve_inside,
    run_optimization_job,
    run_profile,
)
from lightning_quantum.gpu import gpu_status
from lightning_quantum.levels import OptimizationLevel
from lightning_quantum.models.decoding import DECODE_FORMS
from lightning_quantum.optimize import PRUNE_METHODS
from lightning_quantum.weights import WEIGHT_SUFFIXES

# Imported inside the functions that use them: uvicorn (only when the server runs).

log = logging.getLogger(__name__)

_UNPROCESSABLE = 422  # Starlette renamed its constant (…_ENTITY to …_CONTENT); the number is the same


def _one_of(label: str, choices: Sequence[str]) -> Callable[[str], str]:
    """A check that a value is one of ``choices`` (a registry's names); a 422 names the field, the value
    and the choices otherwise."""
    return lambda value: check_choice(label, value, choices)


# The service's choices, spelled by the library's registries (and listed as an enum in the JSON schema).
Architecture = Annotated[
    str,
    AfterValidator(_one_of("architecture", SERVED_ARCHITECTURES)),
    Field(json_schema_extra={"enum": list(SERVED_ARCHITECTURES)}),
]
DecodeLoop = Annotated[
    str, AfterValidator(_one_of("decode", DECODE_FORMS)), Field(json_schema_extra={"enum": list(DECODE_FORMS)})
]
PruneMethod = Annotated[
    str, AfterValidator(_one_of("prune_method", PRUNE_METHODS)), Field(json_schema_extra={"enum": list(PRUNE_METHODS)})
]

Dataset = Literal["digits", "cpython_text"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="letters, digits, _ . -")]


class _Strict(BaseModel):
    # NaN and Infinity parse from JSON as floats; refused here, since a range check lets NaN through
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ArchitectureOptions(_Strict):
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=1, max_length=4, description="digits_mlp: hidden layer widths"
    )
    channels: list[Annotated[int, Field(ge=1, le=512)]] | None = Field(
        None, min_length=3, max_length=3, description="digits_cnn: channels of the three conv blocks"
    )
    width: int | None = Field(None, ge=1, le=4096, description="digits_cnn: width of the hidden linear layer")


class _ModelFields(_Strict):
    name: Name
    path: str = Field(min_length=1, max_length=512, description="a file inside the model root")
    architecture: Architecture
    options: ArchitectureOptions = ArchitectureOptions()
    dataset: Dataset | None = Field(
        None, description="digits for digits_mlp and digits_cnn, cpython_text for causal_lm; null: that one"
    )

    @model_validator(mode="after")
    def _fits_the_architecture(self) -> _ModelFields:
        expected = DATASETS[self.architecture]
        if self.dataset is None:
            self.dataset = cast(Dataset, expected)
        elif self.dataset != expected:
            raise ValueError(
                f"`dataset`={self.dataset!r} does not fit `architecture`={self.architecture!r}: it is measured on "
                f"{expected!r}."
            )
        if self.architecture == LANGUAGE_MODEL and self.options != ArchitectureOptions():
            raise ValueError(
                "`options` must be empty for causal_lm: its sizes are read from the checkpoint's hyperparameters."
            )
        return self


class ModelRegistration(_ModelFields):
    replace: bool = Field(False, description="replace a model registered under the same name (409 otherwise)")


class RegisteredModel(_ModelFields):
    created_at: float


class OptimizationOptions(_Strict):
    max_accuracy_drop: float | None = Field(0.01, ge=0.0, le=1.0, description="roll back a step that drops more")
    calibrate: bool = Field(True, description="static int8 calibrated on the training split; false: dynamic int8")
    calibration_batches: int = Field(8, ge=1, le=64)
    prune_amount: float = Field(0.5, ge=0.0, lt=1.0, description="ultra: share of weights (or channels) removed")
    prune_method: PruneMethod = "l1_unstructured"
    slim: bool = Field(False, description="ultra with a structured method: remove the pruned channels")
    deploy: bool = Field(True, description="measure the inference forms here and ship the fastest within budget")
    keep_slower: bool = Field(False, description="keep compressed numerics even where another form is faster")
    max_size_ratio: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["level"] | None = Field(
        "level",
        description="size budget of the shipped form as a share of the float form's: 'level' (0.3 at "
        "quantum and ultra), a number in (0, 1], or null (size does not count)",
    )
    batch_size: int = Field(64, ge=1, le=1024)
    repeats: int = Field(30, ge=1, le=200)


class ModelOptimizationRequest(_Strict):
    model: Name
    level: OptimizationLevel = OptimizationLevel.QUANTUM
    options: OptimizationOptions = OptimizationOptions()


class JobAccepted(BaseModel):
    job_id: str
    status: str
    queue_position: int | None


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
    queue_position: int | None = Field(None, description="1: the next job to start; null unless queued")
    options: dict[str, Any]
    created_at: float
    started_at: float | None = Field(description="when a worker took the job; null while queued")
    finished_at: float | None
    error: str | None
    result: ModelOptimizationResponse | None


class ProfileRequest(_Strict):
    model: Name
    job_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="profile this job's optimized model")
    batch_size: int = Field(64, ge=1, le=1024)
    repeats: int = Field(20, ge=1, le=200)
    decode: DecodeLoop | None = Field(
        None,
        description="causal_lm only: time decoding through Hugging Face generate (null: this one) or the "
        "compiled static-cache loop the decode gate ships",
    )


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
    decode: str | None = Field(None, description="causal_lm: the decode loop timed")
    decode_tokens_per_s: float | None = Field(None, description="causal_lm: greedy tokens/s at batch 1")
    decode_new_tokens: int | None = None
    perplexity: float | None = Field(None, description="causal_lm: held-out perplexity (up to 8 test batches)")


@dataclass
class ServiceSettings:
    """Where the service reads models and keeps its state, and its limits."""

    model_root: Path
    data_dir: Path
    token: str | None = None
    max_body_bytes: int = 64 * 1024
    workers: int = 1


class WorkerCrashed(RuntimeError):
    """The worker process running a call died (killed, out of memory); a new one replaces it."""


class Worker:
    """One spawned worker process that runs calls one at a time, and is replaced when it dies.

    The process starts at the first call and exits by itself when the server process is gone
    (:func:`~lightning_quantum.apps.serving.exit_with_parent`), so a killed server leaves no worker behind.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                # spawn: a clean interpreter (no forked torch threads or event loop)
                mp_context=multiprocessing.get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            )
        return self._executor

    def pids(self) -> list[int]:
        """The worker's process id (empty before the first call)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    def _exit_codes(self) -> list[int | None]:
        processes = getattr(self._executor, "_processes", None) or {}
        deadline = time.monotonic() + 2.0
        for process in processes.values():
            # The pool can report itself broken a moment before the dead process is reaped, and the
            # pool's own thread joins it too: of two threads in ``waitpid``, one reaps the process and
            # the other returns at once with the exit code still None until the first has stored it
            # (seen in CI under load). Wait until the code is stored, briefly.
            while process.exitcode is None and time.monotonic() < deadline:
                process.join(timeout=0.05)
        return [p.exitcode for p in processes.values()]

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker process.

        Raises:
            WorkerCrashed: when the process died during the call (it is replaced for the next one).
        """
        try:
            future = self._pool().submit(fn, *args)
        except BrokenProcessPool:  # died while idle: a fresh process takes the call
            self._discard()
            future = self._pool().submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            codes = self._exit_codes()
            self._discard()
            raise WorkerCrashed(
                f"the {self.name} worker process died while running this (exit code {codes[0] if codes else '?'}: "
                "killed, or out of memory); a new worker replaces it"
            ) from None

    def _discard(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker process now, whatever it is doing."""
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
        self._discard()


class BodyLimit:
    """Pure ASGI middleware: 413 for a request body over ``max_body_bytes``, declared or streamed (chunked).

    The body is read (up to the limit) before the app sees it, so a chunked upload over the limit
    gets 413 too, not a 400 from a half-read JSON body.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        too_large = JSONResponse({"detail": f"The request body is larger than {limit} bytes."}, status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            size += len(message.get("body", b""))
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# Declared in the OpenAPI schema, so /docs can send the token; checked by `_require_token`.
_BEARER = HTTPBearer(auto_error=False, description="the token in the server's LQ_SERVE_TOKEN (or --token-env)")


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as strings: JSON has no such numbers, and a 422 must still render."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_Job = tuple[str, dict[str, Any], str, dict[str, Any]]  # (job id, model record, level, options)


class _Service:
    """What the routes share: the settings, the store, the workers and the job queue.

    Starting is reentrant: a second server (or test client) over the same app shares the first one's
    queue and workers, and the last one to stop ends them.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.artifacts = settings.data_dir / "artifacts"
        self.artifacts.mkdir(exist_ok=True)
        self.model_root = settings.model_root.resolve(strict=True)
        self.store = JobStore(settings.data_dir / "service.sqlite")
        interrupted = self.store.fail_interrupted()
        if interrupted:
            log.warning("Marked %d job(s) cut off by a restart as failed", interrupted)
        self.job_workers = [Worker(f"job {i}") for i in range(settings.workers)]
        self.quick_worker = Worker("registration and profile")
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._consumers: list[asyncio.Task] = []

    async def start(self) -> None:
        if self._users == 0:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._consumers = [self._loop.create_task(self._take_jobs(worker)) for worker in self.job_workers]
        self._users += 1

    async def stop(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)  # running jobs are marked stopped
        stopped = self.store.fail_interrupted(JobStore.STOPPED_QUEUED, statuses=("queued",))
        if stopped:
            log.warning("Marked %d queued job(s) failed: the service stopped", stopped)
        for worker in (*self.job_workers, self.quick_worker):
            worker.stop()
        self.store.close()

    def enqueue(self, job: _Job) -> None:
        """Put a job on the queue, from whichever event loop serves the request."""
        assert self._loop is not None and self._queue is not None, "the service is not started"
        if self._loop is asyncio.get_running_loop():
            self._queue.put_nowait(job)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, job)

    async def _take_jobs(self, worker: Worker) -> None:
        assert self._queue is not None
        while True:
            job_id, record, level, options = await self._queue.get()
            self.store.start_job(job_id)
            try:
                result = await worker.run(
                    run_optimization_job, str(self.model_root), str(self.artifacts), job_id, record, level, options
                )
            except asyncio.CancelledError:
                self.store.fail_job(job_id, JobStore.STOPPED_RUNNING)
                raise
            except Exception as error:  # the job fails with its reason; the service goes on
                log.warning("Job %s failed: %s: %s", job_id, type(error).__name__, error)
                self.store.fail_job(job_id, f"{type(error).__name__}: {error}")
            else:
                self.store.finish_job(job_id, result)
            finally:
                self._queue.task_done()

    def known_model(self, name: str) -> dict[str, Any]:
        return _found(self.store.model(name), f"No registered model {name!r}. See GET /models.")


def _found(record: dict[str, Any] | None, detail: str) -> dict[str, Any]:
    """``record``, or a 404 with ``detail`` when the store has none."""
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail)
    return record


def _service(request: Request) -> _Service:
    return request.app.state.service  # type: ignore[no-any-return]


Service = Annotated[_Service, Depends(_service)]


async def _require_token(
    service: Service, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
) -> None:
    token = service.settings.token
    if token and (credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode())):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "Missing or wrong bearer token.", headers={"WWW-Authenticate": "Bearer"}
        )


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(error.errors()))}, status_code=422)


#: Routes open to anyone (liveness), and routes behind the bearer token.
public = APIRouter()
router = APIRouter(dependencies=[Depends(_require_token)])


@public.get("/health", tags=["service"])
async def health() -> dict[str, str]:
    """Liveness: 200 while the service runs (no token needed)."""
    return {"status": "ok"}


@router.get("/gpu/status", tags=["service"])
async def gpu() -> dict[str, Any]:
    """``gpu_status()``: ``available: false`` on a machine without a GPU."""
    return await asyncio.to_thread(gpu_status)


@router.post("/models", status_code=201, response_model=RegisteredModel, tags=["models"])
async def register_model(registration: ModelRegistration, service: Service) -> dict[str, Any]:
    """Register a weights file inside the model root; it is loaded once (in a worker) to check it.

    A name already registered answers 409 unless ``replace`` is true.
    """
    record = registration.model_dump(mode="json", exclude={"replace"})
    if not registration.replace and service.store.model(registration.name) is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"A model named {registration.name!r} is registered already; send `replace`: true to replace it.",
        )
    try:
        path = resolve_inside(service.model_root, registration.path)
    except UnsafePathError as error:
        raise HTTPException(_UNPROCESSABLE, f"`path` is refused: {error}") from None
    if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"`path`={registration.path!r} is not a {'/'.join(WEIGHT_SUFFIXES)} file inside the model root.",
        )
    try:
        await service.quick_worker.run(_check_loads, str(service.model_root), record)
    except (ValueError, FileNotFoundError) as error:
        raise HTTPException(_UNPROCESSABLE, str(error)) from None
    except WorkerCrashed as error:
        raise HTTPException(_UNPROCESSABLE, f"`path`={registration.path!r} could not be loaded: {error}") from None
    service.store.add_model(record)
    return service.known_model(registration.name)


@router.get("/models", response_model=list[RegisteredModel], tags=["models"])
async def list_models(service: Service) -> list[dict[str, Any]]:
    return service.store.models()


@router.post("/optimize/model", status_code=202, response_model=JobAccepted, tags=["optimization"])
async def optimize_model(request: ModelOptimizationRequest, service: Service) -> dict[str, Any]:
    """Queue an optimization job; poll ``GET /optimize/jobs/{id}`` for its status and result."""
    record = service.known_model(request.model)
    if record["architecture"] == LANGUAGE_MODEL:
        raise HTTPException(
            _UNPROCESSABLE,
            f"{request.model!r} is a causal_lm: optimization jobs take the digits models. Optimize a language model "
            "with `lq-optimize data=cpython_text model=gpt_cpython checkpoint=<its .ckpt> options.weights=int4`.",
        )
    options = request.options.model_dump()
    level = request.level.value
    job_id = service.store.create_job(request.model, level, options)
    service.enqueue((job_id, record, level, options))
    return {"job_id": job_id, "status": "queued", "queue_position": service.store.queue_position(job_id)}


@router.get("/optimize/jobs/{job_id}", response_model=JobStatus, tags=["optimization"])
async def job_status(job_id: Annotated[str, Field(max_length=64)], service: Service) -> dict[str, Any]:
    return _found(service.store.job(job_id), f"No job {job_id!r}.")


@router.get("/optimization/stats", tags=["optimization"])
async def optimization_stats(service: Service) -> dict[str, Any]:
    """Counts by status, and by level the mean compression ratio, speedup and accuracy degradation."""
    return service.store.stats()


@router.post("/performance/profile", response_model=ProfileResponse, tags=["performance"])
async def profile(request: ProfileRequest, service: Service) -> dict[str, Any]:
    """Latency, throughput and memory of a registered model, or of a finished job's optimized model."""
    record = service.known_model(request.model)
    if request.decode is not None and record["architecture"] != LANGUAGE_MODEL:
        raise HTTPException(
            _UNPROCESSABLE,
            f"`decode`={request.decode!r} is for a causal_lm; {request.model!r} is a {record['architecture']}.",
        )
    if request.job_id is not None:
        job = service.store.job(request.job_id)
        if job is None or job["model"] != request.model:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"No job {request.job_id!r} of {request.model!r}.")
        if job["status"] != "succeeded":
            raise HTTPException(status.HTTP_409_CONFLICT, f"Job {request.job_id!r} is {job['status']}.")
    try:
        return await service.quick_worker.run(
            run_profile,
            str(service.model_root),
            str(service.artifacts),
            record,
            request.job_id,
            request.batch_size,
            request.repeats,
            request.decode,
        )
    except (ValueError, FileNotFoundError) as error:
        raise HTTPException(_UNPROCESSABLE, str(error)) from None
    except WorkerCrashed as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Profiling failed: {error}.") from None


def create_app(settings: ServiceSettings) -> FastAPI:
    """The FastAPI application; state in ``settings.data_dir`` (``service.sqlite``, ``artifacts/``).

    The body limit is ASGI middleware (:class:`BodyLimit`); every route but ``/health`` needs the
    bearer token when ``settings.token`` is set.
    """
    service = _Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="lightning-quantum optimization service",
        version=__version__,
        lifespan=lifespan,
        description="Register trained models, optimize them at a level in a worker process, and profile them.",
    )
    app.state.service = service
    app.state.store = service.store
    app.state.settings = settings
    app.state.workers = {"jobs": service.job_workers, "quick": service.quick_worker}
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.include_router(public)
    app.include_router(router)
    return app


def _check_loads(model_root: str, record: dict[str, Any]) -> bool:
    load_registered_model(model_root, record)
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lq-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-root", required=True, type=Path, help="the only directory models are read from")
    parser.add_argument("--data-dir", default=Path("lq-service"), type=Path, help="SQLite database and artifacts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8000, type=int)
    parser.add_argument("--workers", default=1, type=int, help="worker processes for optimization jobs")
    parser.add_argument("--max-body-bytes", default=64 * 1024, type=int)
    parser.add_argument(
        "--token-env", default="LQ_SERVE_TOKEN", help="environment variable holding the bearer token (unset: no token)"
    )
    parser.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve on a non-loopback --host without a bearer token (anyone who reaches the port can use it)",
    )
    args = parser.parse_args(argv)
    if not args.model_root.is_dir():
        parser.error(f"--model-root {str(args.model_root)!r} is not a directory.")
    if args.workers < 1 or args.max_body_bytes < 1:
        parser.error("--workers and --max-body-bytes must be 1 or more.")
    token = os.environ.get(args.token_env) or None
    if token is None and not _is_loopback(args.host):
        if not args.insecure_no_token:
            parser.error(
                f"refusing to serve on --host {args.host} without a bearer token: anyone who reaches the port could "
                f"register files and start jobs. Set {args.token_env}, or pass --insecure-no-token."
            )
        log.warning("Serving on %s WITHOUT a bearer token (--insecure-no-token)", args.host)
    import uvicorn

    settings = ServiceSettings(
        model_root=args.model_root,
        data_dir=args.data_dir,
        token=token,
        max_body_bytes=args.max_body_bytes,
        workers=args.workers,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
