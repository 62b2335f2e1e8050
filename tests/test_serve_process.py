"""A real lq-serve process: a graceful stop ends its workers and fails the job it ran; a SIGKILL of the
server leaves no worker (nor multiprocessing's resource tracker) behind."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save_file

from lightning_quantum.models import DigitsMLP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, waiting for PID 1 to reap it
    except psutil.NoSuchProcess:
        return True


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _serve_with_a_running_job(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    torch.manual_seed(0)
    net = DigitsMLP(hidden=(64,), dropout=0.0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "digits.safetensors"))
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "lightning_quantum.apps.serve", "--model-root", str(root),
            "--data-dir", str(tmp_path / "service"), "--port", str(port),
        ],
        env={**os.environ, "LQ_SERVE_TOKEN": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def up():
        try:
            return http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(up, 60, "the server")
    model = {"name": "digits", "path": "digits.safetensors", "architecture": "digits_mlp", "options": {"hidden": [64]}}
    assert http.post("/models", json=model).status_code == 201  # the registration worker is up
    job_id = http.post("/optimize/model", json={"model": "digits"}).json()["job_id"]
    _wait_for(lambda: http.get(f"/optimize/jobs/{job_id}").json()["status"] == "running", 30, "the job to start")
    children = psutil.Process(server.pid).children(recursive=True)
    assert len(children) >= 2  # the registration worker and the job worker (and the resource tracker)
    return server, http, job_id, [c.pid for c in children]


def test_a_graceful_stop_ends_the_workers_and_fails_the_running_job(tmp_path):
    server, http, job_id, children = _serve_with_a_running_job(tmp_path)  # one worker busy, one idle
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    _wait_for(lambda: all(_gone(pid) for pid in children), 10, "the workers to end")
    with sqlite3.connect(tmp_path / "service" / "service.sqlite") as db:
        status, error = db.execute("SELECT status, error FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert status == "failed" and "stopped while this job ran" in error


@pytest.mark.slow
def test_a_killed_server_leaves_no_worker_behind(tmp_path):
    server, http, job_id, children = _serve_with_a_running_job(tmp_path)
    server.kill()
    server.wait(timeout=30)
    killed = time.monotonic()
    # a worker polls its parent every 0.5 s once started; one still importing (about 5 s here) exits after
    _wait_for(lambda: all(_gone(pid) for pid in children), 20, "the orphaned workers to exit")
    print(f"orphaned workers exited {time.monotonic() - killed:.1f} s after the server was killed")
    with sqlite3.connect(tmp_path / "service" / "service.sqlite") as db:
        (status,) = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert status == "running"  # cut off: the next start marks it failed (tested in test_serve.py)
