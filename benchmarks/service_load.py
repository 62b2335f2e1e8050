"""A bounded load test of lq-serve on loopback: 200 concurrent GET /health and /gpu/status requests.

    python benchmarks/service_load.py        # writes benchmarks/results/service_load.json

The service runs in its own process (``lq-serve`` as a user starts it); the client sends all 200
requests at once from one asyncio event loop (httpx), five rounds, and reports the latency
percentiles of each round and the errors (any status but 200, or a failed connection).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "service_load.json"
CONCURRENT, ROUNDS = 200, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _round(base: str) -> tuple[list[float], int]:
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def one(path: str) -> tuple[int, float]:
            started = time.perf_counter()
            try:
                code = (await http.get(path)).status_code
            except httpx.HTTPError:
                code = 0
            return code, (time.perf_counter() - started) * 1000

        results = await asyncio.gather(*(one(p) for p in ["/health", "/gpu/status"] * (CONCURRENT // 2)))
    return [ms for _, ms in results], sum(code != 200 for code, _ in results)


def main() -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_quantum.apps.serve",
                "--model-root",
                f"{tmp}/models",
                "--data-dir",
                f"{tmp}/state",
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            rounds = []
            for _ in range(ROUNDS):
                latencies, errors = asyncio.run(_round(base))
                latencies.sort()
                rounds.append(
                    {
                        "p50_ms": statistics.median(latencies),
                        "p95_ms": latencies[int(0.95 * len(latencies)) - 1],
                        "max_ms": latencies[-1],
                        "errors": errors,
                    }
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "benchmark": f"{CONCURRENT} concurrent GET /health and /gpu/status on loopback, {ROUNDS} rounds",
        "command": "python benchmarks/service_load.py",
        "rounds": rounds,
        "median_p95_ms": statistics.median(r["p95_ms"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for r in rounds:
        print(f"p50 {r['p50_ms']:.1f} ms  p95 {r['p95_ms']:.1f} ms  max {r['max_ms']:.1f} ms  errors {r['errors']}")


if __name__ == "__main__":
    main()
