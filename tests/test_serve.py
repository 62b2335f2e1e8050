"""lq-serve: an end-to-end job on digits, persistence, security, schemathesis and a loopback load test."""

import asyncio
import json
import os
import pickle
import statistics
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from lightning_quantum.apps.serve import ServiceSettings, create_app
from lightning_quantum.apps.serving import JobStore, UnsafePathError, resolve_inside
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import DigitsMLP

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = DigitsMLP(hidden=(64,), dropout=0.0)
    dm = DigitsDataModule(batch_size=64)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(3):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "digits.safetensors"))
    return root


MODEL = {"name": "digits", "path": "digits.safetensors", "architecture": "digits_mlp", "options": {"hidden": [64]}}


def _client(model_root, data_dir, **kwargs):
    return TestClient(create_app(ServiceSettings(model_root=model_root, data_dir=data_dir, **kwargs)))


def _wait(client, job_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/optimize/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_end_to_end_job_persists_across_a_restart(model_root, tmp_path):
    data = tmp_path / "service"
    with _client(model_root, data) as client:
        assert client.post("/models", json=MODEL).status_code == 201
        body = {"model": "digits", "level": "quantum", "options": {"deploy": False}}  # the steps, not timing
        accepted = client.post("/optimize/model", json=body)
        assert accepted.status_code == 202
        job = _wait(client, accepted.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        result = job["result"]
        assert result["compression_ratio"] > 3.0 and abs(result["accuracy_degradation"]) <= 0.01
        assert result["steps"][0]["name"] == "int8" and result["report"]["level"] == "quantum"
        assert (data / "artifacts" / result["artifact"]).is_file()
        stats = client.get("/optimization/stats").json()
        assert stats["by_status"]["succeeded"] == 1
        assert stats["by_level"]["quantum"]["mean_compression_ratio"] == pytest.approx(result["compression_ratio"])
        for body in ({"model": "digits", "repeats": 3}, {"model": "digits", "job_id": job["id"], "repeats": 3}):
            profile = client.post("/performance/profile", json=body)
            assert profile.status_code == 200, profile.text
            assert profile.json()["latency_ms_p50"] > 0 and profile.json()["throughput_per_s"] > 0
    with _client(model_root, data) as client:  # a restart: the same database
        again = client.get(f"/optimize/jobs/{job['id']}").json()
        assert again["status"] == "succeeded" and again["result"] == result
        assert [m["name"] for m in client.get("/models").json()] == ["digits"]


def test_a_job_cut_off_by_a_restart_is_marked_failed(model_root, tmp_path):
    data = tmp_path / "service"
    data.mkdir()
    store = JobStore(data / "service.sqlite")
    job_id = store.create_job("digits", "quantum", {})
    store.start_job(job_id)
    store.close()
    with _client(model_root, data) as client:
        job = client.get(f"/optimize/jobs/{job_id}").json()
    assert job["status"] == "failed" and "restarted" in job["error"]


class _WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(model_root, tmp_path):
    marker = tmp_path / "pwned"
    (model_root / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _WritesMarker(marker)}))
    with _client(model_root, tmp_path / "service") as client:
        response = client.post("/models", json={**MODEL, "name": "evil", "path": "evil.ckpt"})
    assert response.status_code == 422 and "not a weights-only file" in response.json()["detail"]
    assert not marker.exists()


def test_paths_that_leave_the_model_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.safetensors").write_bytes(b"")
    evil = tmp_path / "root_evil"
    evil.mkdir()
    (evil / "m.safetensors").write_bytes(b"")
    (root / "link.safetensors").symlink_to(evil / "m.safetensors")
    assert resolve_inside(root, "ok.safetensors") == (root / "ok.safetensors").resolve()
    for bad in (
        "../root_evil/m.safetensors",
        "sub/../../root_evil/m.safetensors",
        str(evil / "m.safetensors"),
        "/etc/passwd",
        "link.safetensors",
        "ok.safetensors\x00.txt",
        "file:///etc/passwd",
        "http://example.com/m.safetensors",
        "..\\root_evil\\m.safetensors",
    ):
        with pytest.raises(UnsafePathError):
            resolve_inside(root, bad)


def test_path_traversal_through_the_api_is_422(model_root, tmp_path):
    with _client(model_root, tmp_path / "service") as client:
        for path in ("../x.safetensors", "/etc/passwd", "a\x00b", "file:///etc/passwd"):
            response = client.post("/models", json={**MODEL, "name": "x", "path": path})
            assert response.status_code == 422, (path, response.text)
            assert "refused" in response.json()["detail"]
        assert client.post("/models", json={**MODEL, "path": "missing.safetensors"}).status_code == 404


def test_validation_unknown_ids_token_and_body_cap(model_root, tmp_path):
    with _client(model_root, tmp_path / "service", token=TOKEN, max_body_bytes=2048) as client:
        assert client.get("/health").status_code == 200  # no token needed
        assert client.get("/gpu/status").status_code == 401
        wrong = client.get("/gpu/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        gpu = client.get("/gpu/status", headers=auth)
        assert gpu.status_code == 200 and gpu.json()["available"] is (torch.cuda.is_available())
        assert client.get("/openapi.json", headers=auth).status_code == 200
        assert client.get("/optimize/jobs/" + "0" * 32, headers=auth).status_code == 404
        unknown = client.post("/optimize/model", json={"model": "nope"}, headers=auth)
        assert unknown.status_code == 404 and "No registered model 'nope'" in unknown.json()["detail"]
        for body in (
            {"model": "digits", "level": "turbo"},
            {"model": "digits", "options": {"prune_amount": 1.5}},
            {"model": "digits", "options": {"max_size_ratio": 0}},
            {"model": "digits", "options": {"max_size_ratio": "small"}},
            {"model": "digits", "target": "os.system"},
            {"model": "../digits"},
        ):
            assert client.post("/optimize/model", json=body, headers=auth).status_code == 422, body
        big = client.post("/optimize/model", content=b"{" + b" " * 4096 + b"}", headers=auth)
        assert big.status_code == 413


def test_schemathesis_finds_no_server_error(model_root, tmp_path):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app = create_app(ServiceSettings(model_root=model_root, data_dir=tmp_path / "service"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    failures: list[str] = []
    calls = 0
    non_finite = 0
    with TestClient(app) as client:  # runs the lifespan (the worker pool) around the calls

        def run(operation):
            @settings(
                max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
            )
            @given(case=operation.as_strategy())
            def check(case):
                nonlocal calls, non_finite
                calls += 1
                try:
                    case.call_and_validate(checks=[not_a_server_error])
                except Exception as error:
                    failures.append(f"{operation.label}: {error}")
                # the same body with every number made NaN or infinite, which JSON parsers accept
                mutated, count = _non_finite(case.body)
                if count:
                    non_finite += 1
                    response = client.request(
                        case.method,
                        case.formatted_path,
                        content=json.dumps(mutated),
                        headers={"content-type": "application/json"},
                    )
                    if response.status_code >= 500:
                        failures.append(
                            f"{operation.label} with non-finite numbers: {response.status_code} {response.text}"
                        )

            check()

        for operation in operations:
            run(operation)
    print(
        f"schemathesis: {calls} calls over {len(operations)} operations, {non_finite} more with non-finite numbers, "
        f"{len(failures)} with a server error"
    )
    assert len(operations) >= 8 and calls > 50 and non_finite > 10 and not failures, failures[:3]


def _non_finite(body, _cycle=(float("nan"), float("inf"), float("-inf"))):
    """``body`` with each number replaced by NaN, inf or -inf in turn, and how many were replaced."""
    count = 0

    def walk(value):
        nonlocal count
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            count += 1
            return _cycle[count % 3]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(body), count


def test_200_concurrent_requests_on_loopback(model_root, tmp_path):
    import httpx
    import uvicorn

    app = create_app(ServiceSettings(model_root=model_root, data_dir=tmp_path / "service"))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    async def load():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:

            async def one(path):
                started = time.perf_counter()
                response = await http.get(path)
                return response.status_code, (time.perf_counter() - started) * 1000

            return await asyncio.gather(*(one(p) for p in ["/health", "/gpu/status"] * 100))

    try:
        results = asyncio.run(load())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    codes = [code for code, _ in results]
    latencies = sorted(ms for _, ms in results)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"200 concurrent GETs: p50 {statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms")
    assert codes.count(200) == 200
    assert p95 < float(os.environ.get("LQ_LOAD_P95_MS", "5000"))


def test_corrupt_files_are_422_naming_the_file(model_root, tmp_path):
    from safetensors.torch import save_file

    cut = model_root / "cut.safetensors"
    cut.write_bytes((model_root / "digits.safetensors").read_bytes()[:100])
    later = model_root / "later.safetensors"
    save_file({k: v.contiguous() for k, v in DigitsMLP(hidden=(64,)).state_dict().items()}, str(later))
    with _client(model_root, tmp_path / "service") as client:
        response = client.post("/models", json={**MODEL, "name": "cut", "path": "cut.safetensors"})
        assert response.status_code == 422 and "'cut.safetensors' is not a readable safetensors file" in response.text
        assert client.post("/models", json={**MODEL, "name": "later", "path": "later.safetensors"}).status_code == 201
        later.write_bytes(later.read_bytes()[:100])  # truncated after registration
        response = client.post("/performance/profile", json={"model": "later", "repeats": 2})
        assert response.status_code == 422 and "'later.safetensors' is not a readable safetensors file" in response.text
        wrong = client.post("/models", json={**MODEL, "name": "wide", "options": {"hidden": [128]}})
        assert wrong.status_code == 422 and "holds a digits_mlp with options {'hidden': [64]" in wrong.text


def test_non_finite_numbers_are_422_with_a_json_body(model_root, tmp_path):
    with _client(model_root, tmp_path / "service") as client:
        for literal in ("NaN", "Infinity", "-Infinity"):
            body = '{"model": "digits", "options": {"max_accuracy_drop": X, "prune_amount": X}}'.replace("X", literal)
            response = client.post("/optimize/model", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 422, response.text
            errors = response.json()["detail"]  # renders: the non-finite inputs are shown as strings
            assert {e["loc"][-1] for e in errors} == {"max_accuracy_drop", "prune_amount"}
            assert all("finite number" in e["msg"] for e in errors) and errors[0]["input"] in ("nan", "inf", "-inf")


def test_reregistering_a_name_is_409_unless_replace(model_root, tmp_path):
    with _client(model_root, tmp_path / "service") as client:
        assert client.post("/models", json=MODEL).status_code == 201
        again = client.post("/models", json=MODEL)
        assert again.status_code == 409 and "`replace`: true" in again.json()["detail"]
        assert client.post("/models", json={**MODEL, "replace": True}).status_code == 201


def test_chunked_body_over_the_limit_is_413_and_the_app_is_a_fastapi_app(model_root, tmp_path):
    from fastapi import FastAPI

    app = create_app(ServiceSettings(model_root=model_root, data_dir=tmp_path / "service", max_body_bytes=1024))
    assert isinstance(app, FastAPI)

    def chunks():
        yield b'{"model": "digits", "level": "quantum", "options": {'
        for _ in range(64):
            yield b" " * 64
        yield b"}}"

    with TestClient(app) as client:
        response = client.post("/optimize/model", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in response.request.headers}  # really chunked
        assert response.status_code == 413


def test_bearer_scheme_is_declared_for_the_docs(model_root, tmp_path):
    with _client(model_root, tmp_path / "service", token=TOKEN) as client:
        schema = client.get("/openapi.json").json()  # public, so /docs can load and send the token
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert schema["paths"]["/models"]["post"]["security"] == [{"HTTPBearer": []}]
        assert "security" not in schema["paths"]["/health"]["get"]
        assert client.get("/docs").status_code == 200


def test_no_token_on_a_public_host_refuses_to_start(model_root, capsys, monkeypatch):
    from lightning_quantum.apps.serve import main

    monkeypatch.delenv("LQ_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--model-root", str(model_root), "--host", "0.0.0.0"])
    assert stopped.value.code == 2
    assert "refusing to serve on --host 0.0.0.0 without a bearer token" in capsys.readouterr().err


def _gate(monkeypatch, tmp_path):
    import lightning_quantum.apps.serve as serve
    from tests.serve_helpers import gated_optimization_job

    gate = tmp_path / "gate"
    monkeypatch.setenv("LQ_TEST_GATE", str(gate))  # the spawned job worker inherits it
    monkeypatch.setattr(serve, "run_optimization_job", gated_optimization_job)
    return gate


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_jobs_are_queued_until_a_worker_takes_them_and_profiles_do_not_wait(model_root, tmp_path, monkeypatch):
    gate = _gate(monkeypatch, tmp_path)
    with _client(model_root, tmp_path / "service") as client:
        assert client.post("/models", json=MODEL).status_code == 201
        body = {"model": "digits", "level": "quantum", "options": {"repeats": 2, "deploy": False}}
        ids = [client.post("/optimize/model", json=body).json()["job_id"] for _ in range(3)]
        _wait_for(lambda: list(tmp_path.glob("started-*")))  # the first job is in the worker, held at the gate
        jobs = [client.get(f"/optimize/jobs/{i}").json() for i in ids]
        assert [j["status"] for j in jobs] == ["running", "queued", "queued"]
        assert [j["queue_position"] for j in jobs] == [None, 1, 2]
        assert jobs[0]["started_at"] >= jobs[0]["created_at"] and jobs[1]["started_at"] is None
        stats = client.get("/optimization/stats").json()["by_status"]
        assert stats["running"] == 1 and stats["queued"] == 2
        # a profile does not wait behind the queue: it answers while every job is held
        profile = client.post("/performance/profile", json={"model": "digits", "repeats": 2})
        assert profile.status_code == 200
        assert [client.get(f"/optimize/jobs/{i}").json()["status"] for i in ids] == ["running", "queued", "queued"]
        gate.write_text("open")
        done = [_wait(client, i) for i in ids]
        assert [j["status"] for j in done] == ["succeeded"] * 3
        assert done[1]["started_at"] >= done[0]["finished_at"]


@pytest.mark.slow
def test_a_worker_killed_mid_job_fails_that_job_and_is_replaced(model_root, tmp_path, monkeypatch):
    import signal

    gate = _gate(monkeypatch, tmp_path)
    app = create_app(ServiceSettings(model_root=model_root, data_dir=tmp_path / "service"))
    with TestClient(app) as client:
        assert client.post("/models", json=MODEL).status_code == 201
        body = {"model": "digits", "level": "quantum", "options": {"repeats": 2, "deploy": False}}
        first, second = (client.post("/optimize/model", json=body).json()["job_id"] for _ in range(2))
        _wait_for(lambda: list(tmp_path.glob("started-*")))
        (pid,) = app.state.workers["jobs"][0].pids()
        os.kill(pid, signal.SIGKILL)
        failed = _wait(client, first)
        assert failed["status"] == "failed" and "worker process died while running this" in failed["error"]
        assert "exit code -9" in failed["error"]
        gate.write_text("open")
        assert _wait(client, second)["status"] == "succeeded"  # a new worker took the queue on
        assert app.state.workers["jobs"][0].pids() != [pid]
        assert client.post("/models", json={**MODEL, "name": "again"}).status_code == 201


def test_a_causal_lm_is_registered_and_profiled_with_its_decode_speed(model_root, tmp_path):
    """A CausalLM checkpoint of an lq-train run: registered (its sizes and data settings read from the
    file), profiled (prefill at the batch size, decode at batch 1, held-out perplexity); the pairings
    and the jobs it does not take are 422 naming why."""
    import lightning.pytorch as pl

    from lightning_quantum.data import TextLMDataModule
    from lightning_quantum.models import CausalLM
    from tests.conftest import trainer_kwargs

    root = tmp_path / "models"
    root.mkdir()
    (root / "digits.safetensors").write_bytes((model_root / "digits.safetensors").read_bytes())
    data = TextLMDataModule(batch_size=4, context=32, vocab_size=512, sources=["topics"])
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "context": 32}
    torch.manual_seed(0)
    model = CausalLM(**data.tokenizer_config(), **sizes)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, max_epochs=-1))
    trainer.fit(model, data)
    trainer.save_checkpoint(root / "lm.ckpt")
    lm = {"name": "lm", "path": "lm.ckpt", "architecture": "causal_lm"}
    with _client(root, tmp_path / "service") as client:
        registered = client.post("/models", json=lm)
        assert registered.status_code == 201 and registered.json()["dataset"] == "cpython_text", registered.text
        profile = client.post("/performance/profile", json={"model": "lm", "batch_size": 4, "repeats": 2})
        body = profile.json()
        assert profile.status_code == 200, body
        assert body["decode"] == "generate" and body["decode_tokens_per_s"] > 0 and body["decode_new_tokens"] == 16
        assert 1.0 < body["perplexity"] < 512 and body["latency_ms_p50"] > 0 and body["size_mb"] > 0
        refused = {
            "dataset": client.post("/models", json={**lm, "name": "lm2", "dataset": "digits"}),
            "options": client.post("/models", json={**lm, "name": "lm3", "options": {"hidden": [8]}}),
            "job": client.post("/optimize/model", json={"model": "lm"}),
        }
        assert all(r.status_code == 422 for r in refused.values()), {k: r.text for k, r in refused.items()}
        assert "does not fit `architecture`='causal_lm'" in refused["dataset"].text
        assert "sizes are read from the checkpoint" in refused["options"].text
        assert "optimization jobs take the digits models" in refused["job"].text
        assert client.post("/models", json=MODEL).status_code == 201
        digits_decode = client.post("/performance/profile", json={"model": "digits", "decode": "generate"})
        assert digits_decode.status_code == 422 and "is for a causal_lm" in digits_decode.text
