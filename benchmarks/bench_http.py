"""HTTP throughput and latency of the service, adaptive batching on and off, vs in-process.

    python benchmarks/bench_http.py [--model exported/digits.onnx] [--seconds 6]

Starts `bentoml serve` (loopback only) once with adaptive batching and once without, and
for 1, 16 and 64 concurrent clients (asyncio + httpx, one input per request) measures
requests per second and p50/p99 latency over a bounded window. In-process throughput is
`EnsembleRuntime.predict` on the same inputs, one input per call. Prints one JSON object.
The load generator shares the machine's cores with the server: ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from forde_serve.runtime import EnsembleRuntime

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 16, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ) | {"FORDE_MODEL": str(model), "FORDE_BATCHING": "1" if batching else "0"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "forde_serve.app.service:FordeEnsemble",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit("bentoml serve did not become ready")


async def _load(url: str, bodies: list[dict], clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    failures = 0
    deadline = 0.0
    counter = iter(range(max_requests))

    async def client(client_http: httpx.AsyncClient) -> None:
        nonlocal failures
        for n in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                response = await client_http.post(f"{url}/predict", json=bodies[n % len(bodies)])
            except httpx.TransportError:  # counted, reported, never hidden
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client_http:
        for body in bodies[:clients]:  # warm-up: open the connections
            await client_http.post(f"{url}/predict", json=body)
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(client_http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "rps": round(len(ms) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(ms),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "exported" / "digits.onnx")
    parser.add_argument("--seconds", type=float, default=6.0, help="measurement window per setting")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap per setting")
    args = parser.parse_args()

    runtime = EnsembleRuntime(args.model)
    rng = np.random.default_rng(0)
    inputs = rng.uniform(
        0, 16 if "0 to 16" in runtime.card.input_space else 1, (256, *runtime.card.input_shape)
    ).astype(np.float32)
    bodies = [{"inputs": [{"input": x.tolist()}]} for x in inputs]

    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds / 2:
        runtime.predict(inputs[calls % len(inputs)][None])
        calls += 1
    in_process_rps = calls / (time.perf_counter() - started)

    results = []
    for batching in (True, False):
        process, url = _start(args.model.resolve(), batching)
        try:
            for clients in CLIENTS:
                row = asyncio.run(_load(url, bodies, clients, args.seconds, args.max_requests))
                results.append({"clients": clients, "batching": batching, **row})
                print(results[-1], file=sys.stderr)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    at64 = {r["batching"]: r["rps"] for r in results if r["clients"] == 64}
    print(
        json.dumps(
            {
                "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores; server and load generator share them)",
                "model": str(args.model),
                "results": results,
                "in_process_rps": round(in_process_rps, 1),
                "batching_over_no_batching_at_64": round(at64[True] / at64[False], 2),
                "http_at_64_over_in_process": round(at64[True] / in_process_rps, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
