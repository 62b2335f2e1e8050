"""Bad input and injected faults, tried as a new and a hostile user would: how many are handled cleanly.

    python benchmarks/robustness_probe.py            # about 3 minutes; results/robustness_probe.json

A case is *handled* when the user gets a clear answer and loses nothing: an error that names the
argument, file or field (a 4xx from the service, exit status 2 and one line from a CLI), or, for a
fault, the documented outcome (a checkpoint and exit 143/130, a job failed with its reason, no worker
left behind). Anything else, a 500, a traceback, an input silently accepted, a hang, counts as not
handled, with what happened.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import lightning_quantum as lq
from lightning_quantum.apps.serve import ServiceSettings, create_app
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.distillation import DistillationModule
from lightning_quantum.models import DigitsCNN, DigitsMLP
from lightning_quantum.pruning import rebuild_architecture, record_architecture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.test_validation
RESULTS = Path(__file__).with_name("results") / "robustness_probe.json"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
cases: list[dict[str, Any]] = []


def record(group: str, name: str, handled: bool, outcome: str) -> None:
    cases.append({"group": group, "case": name, "handled": bool(handled), "outcome": outcome[:300]})
    print(f"{'ok ' if handled else 'NOT'} {group:9} {name}: {outcome[:140]}")


def expect_error(group: str, name: str, call: Callable[[], Any], named: str) -> None:
    """Handled: an exception whose message names ``named``."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the probe reports whatever happens
        message = f"{type(error).__name__}: {error}"
        record(group, name, named in str(error), message)
    else:
        record(group, name, False, "accepted without an error")


def library_cases() -> None:
    from tests.test_validation import FLOAT_ARGUMENTS  # every float argument of the public API, listed once

    for name, call in FLOAT_ARGUMENTS.items():
        argument = name.split(".")[-1]
        for value in (float("nan"), float("inf"), float("-inf")):
            expect_error("library", f"{name}={value}", lambda c=call, v=value: c(v), f"`{argument}`=")
    mlp = lambda: DigitsMLP(hidden=(8,))  # noqa: E731
    x = torch.randn(2, 64)
    expect_error("library", "optimize level='turbo'", lambda: lq.optimize(mlp(), "turbo", example_inputs=x), "`level`")
    expect_error("library", "recipe level='mega'", lambda: lq.recipe("mega"), "`level`")
    forged = record_architecture(DigitsCNN())
    forged["classifier.1"]["tensors"]["weight"] = [1 << 20, 1 << 20]
    expect_error(
        "library",
        "slimmed record asking for 4 TB",
        lambda: rebuild_architecture(DigitsCNN(), forged),
        "classifier.1.weight",
    )
    forged = record_architecture(DigitsCNN())
    forged["classifier.1"]["attrs"]["forward"] = 1
    expect_error(
        "library", "slimmed record setting forward", lambda: rebuild_architecture(DigitsCNN(), forged), "forward"
    )
    student = DistillationModule(DigitsMLP(hidden=(8,), num_classes=5), DigitsMLP(hidden=(8,)), num_classes=10)
    trainer = __import__("lightning.pytorch", fromlist=["Trainer"]).Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    expect_error(
        "library",
        "student with 5 classes, num_classes=10",
        lambda: trainer.fit(student, DigitsDataModule()),
        "`num_classes`=10",
    )


def _digits_file(root: Path, name: str = "digits.safetensors") -> Path:
    torch.manual_seed(0)
    net = DigitsMLP(hidden=(64,), dropout=0.0)
    path = root / name
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def service_cases(tmp: Path) -> None:
    root = tmp / "models"
    root.mkdir()
    good = _digits_file(root)
    (root / "cut.safetensors").write_bytes(good.read_bytes()[:100])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.safetensors").write_bytes(os.urandom(2048))
    (root / "code.ckpt").write_bytes(pickle.dumps({"state_dict": eval}))  # noqa: S301 - the refused payload
    model = {"name": "digits", "path": "digits.safetensors", "architecture": "digits_mlp", "options": {"hidden": [64]}}
    app = create_app(ServiceSettings(model_root=root, data_dir=tmp / "service", token="t", max_body_bytes=4096))
    auth = {"Authorization": "Bearer t"}
    with TestClient(app) as client:

        def post(path: str, body: Any = None, raw: str | None = None, headers: dict | None = None) -> Any:
            headers = {**auth, **(headers or {})}
            if raw is not None:
                return client.post(path, content=raw, headers={**headers, "content-type": "application/json"})
            return client.post(path, json=body, headers=headers)

        def check(name: str, response: Any, codes: tuple[int, ...], named: str | None = None) -> None:
            ok = response.status_code in codes and (named is None or named in response.text)
            record("service", name, ok, f"{response.status_code} {response.text}")

        check("register", post("/models", model), (201,))
        check("register again (same name)", post("/models", model), (409,), "replace")
        for file in ("cut", "empty", "garbage"):
            check(
                f"register {file}.safetensors",
                post("/models", {**model, "name": file, "path": f"{file}.safetensors"}),
                (422,),
                f"{file}.safetensors",
            )
        check(
            "register a pickle with code",
            post("/models", {**model, "name": "code", "path": "code.ckpt"}),
            (422,),
            "weights-only",
        )
        check(
            "register the wrong width",
            post("/models", {**model, "name": "w", "options": {"hidden": [128]}}),
            (422,),
            "digits_mlp",
        )
        for path in (
            "../x.safetensors",
            "/etc/passwd",
            "a\x00b.safetensors",
            "file:///etc/passwd",
            "..\\\\x",
            "http://h/x",
        ):
            check(f"path {path!r}", post("/models", {**model, "name": "p", "path": path}), (422,), "refused")
        bodies = {
            "/optimize/model": '{"model": "digits", "options": {"max_accuracy_drop": X}}',
            "/performance/profile": '{"model": "digits", "batch_size": X}',
            "/models": '{"name": "n", "path": "digits.safetensors", "architecture": "digits_mlp", '
            '"options": {"hidden": [X]}}',
        }
        for path, body in bodies.items():
            for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
                check(f"{path} with {literal}", post(path, raw=body.replace("X", literal)), (422,))
        for body in (
            {"model": "digits", "level": "turbo"},
            {"model": "digits", "target": "os.system"},
            {"model": "x" * 100},
        ):
            check(f"optimize {json.dumps(body)[:40]}", post("/optimize/model", body), (422,))
        check("optimize an unknown model", post("/optimize/model", {"model": "nope"}), (404,), "nope")
        check("no token", client.get("/models"), (401,))
        check("wrong token", client.get("/models", headers={"Authorization": "Bearer x"}), (401,))
        check("declared body too large", post("/optimize/model", raw="{" + " " * 5000 + "}"), (413,))

        def chunks() -> Any:
            yield b'{"model": "digits", '
            for _ in range(100):
                yield b" " * 64
            yield b"}"

        check("chunked body too large", client.post("/optimize/model", content=chunks(), headers=auth), (413,))
        check("unknown job", client.get("/optimize/jobs/" + "0" * 32, headers=auth), (404,))
        good.write_bytes(good.read_bytes()[:200])  # truncated after registration
        check(
            "profile a file truncated after registration",
            post("/performance/profile", {"model": "digits", "repeats": 2}),
            (422,),
            "digits.safetensors",
        )


def _train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_quantum.apps.train", *args, f"hydra.run.dir={cwd / 'run'}"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def cli_cases(tmp: Path) -> None:
    def one_line(name: str, out: subprocess.CompletedProcess, named: str) -> None:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        ok = out.returncode == 2 and named in last and "Traceback" not in out.stderr
        record("cli", name, ok, f"rc {out.returncode}: {last}")

    (tmp / "w.safetensors").write_bytes(b"")
    one_line("lq-train trainer.max_epochs=-1", _train_cli(["trainer.max_epochs=-1"], tmp), "max_epochs")
    one_line(
        "lq-train trainer.gradient_clip_val=nan",
        _train_cli(["trainer.gradient_clip_val=nan"], tmp),
        "gradient_clip_val",
    )
    one_line("lq-train ckpt_path=<safetensors>", _train_cli([f"ckpt_path={tmp / 'w.safetensors'}"], tmp), "lq-optimize")
    one_line("lq-train ckpt_path=<missing>", _train_cli([f"ckpt_path={tmp / 'no.ckpt'}"], tmp), "no.ckpt")
    cut = tmp / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    out = subprocess.run(
        [sys.executable, "-m", "lightning_quantum.apps.optimize", f"checkpoint={cut}", f"hydra.run.dir={tmp / 'opt'}"],
        cwd=tmp, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    one_line("lq-optimize checkpoint=<truncated>", out, "cut.safetensors")


def fault_cases(tmp: Path) -> None:
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        run = tmp / f"sig{int(signum)}"
        run.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-m", "lightning_quantum.apps.train", "trainer.max_epochs=500", "callbacks.report=null",
             "logger=none", f"hydra.run.dir={run / 'run'}"],
            cwd=run, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(25)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        checkpoint = run / "run" / "checkpoints" / "interrupted.ckpt"
        ok = process.returncode == code and checkpoint.is_file() and "Resume with: lq-train" in err
        record(
            "fault", f"{signum.name} mid-fit", ok, f"rc {process.returncode}, {checkpoint.name} {checkpoint.is_file()}"
        )
        last = torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        stopped = torch.load(checkpoint, weights_only=True)["global_step"] if checkpoint.is_file() else -1
        record(
            "fault",
            f"{signum.name}: last.ckpt at the last epoch end",
            stopped - 20 < last["global_step"] <= stopped,
            f"last {last['global_step']}, interrupted at {stopped}",
        )
    root = tmp / "serve_models"
    root.mkdir()
    _digits_file(root)
    port = 18765
    server = subprocess.Popen(
        [sys.executable, "-m", "lightning_quantum.apps.serve", "--model-root", str(root),
         "--data-dir", str(tmp / "sv"), "--port", str(port)],
        env={**ENV, "LQ_SERVE_TOKEN": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    import httpx
    import psutil

    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    for _ in range(300):
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    model = {"name": "digits", "path": "digits.safetensors", "architecture": "digits_mlp", "options": {"hidden": [64]}}
    http.post("/models", json=model)
    jobs = [http.post("/optimize/model", json={"model": "digits"}).json()["job_id"] for _ in range(2)]
    time.sleep(1.0)
    statuses = [http.get(f"/optimize/jobs/{j}").json() for j in jobs]
    record(
        "fault",
        "two jobs, one worker",
        [s["status"] for s in statuses] == ["running", "queued"],
        str([s["status"] for s in statuses]),
    )
    workers = psutil.Process(server.pid).children(recursive=True)
    job_worker = [w for w in workers if "spawn_main" in " ".join(w.cmdline())][-1]
    job_worker.kill()
    for _ in range(300):
        first = http.get(f"/optimize/jobs/{jobs[0]}").json()
        if first["status"] == "failed":
            break
        time.sleep(0.2)
    record("fault", "worker killed mid-job", "died" in (first["error"] or ""), first["error"] or first["status"])
    for _ in range(600):
        second = http.get(f"/optimize/jobs/{jobs[1]}").json()
        if second["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    record("fault", "the next job after a worker died", second["status"] == "succeeded", second["status"])
    http.post("/optimize/model", json={"model": "digits"})
    time.sleep(1.0)
    children = psutil.Process(server.pid).children(recursive=True)
    server.kill()
    killed = time.monotonic()
    while time.monotonic() - killed < 20 and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.1)
    left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    record(
        "fault",
        "server SIGKILLed",
        not left,
        f"{len(children)} children, {len(left)} left after {time.monotonic() - killed:.1f} s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["library", "service", "cli", "fault"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for group, run in (
            ("library", lambda t: library_cases()),
            ("service", service_cases),
            ("cli", cli_cases),
            ("fault", fault_cases),
        ):
            if group not in args.skip:
                directory = Path(tmp) / group
                directory.mkdir()
                run(directory)
    handled = sum(c["handled"] for c in cases)
    summary = {"tried": len(cases), "handled": handled, "not_handled": [c for c in cases if not c["handled"]]}
    print(f"{len(cases)} cases tried, {handled} handled")
    RESULTS.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
