"""HTTP throughput and latency of `/predict`, against a no-op BentoML service with the same schema.

    python benchmarks/bench_http.py [--model exported/digits.onnx] [--seconds 10] [--rounds 2]
    python benchmarks/bench_http.py --suite serving   # monitoring off vs on, 1 vs 2 workers

The load comes from `wrk` (C, one thread: little CPU; `apt-get install wrk`) at 1, 16 and 64
connections, one input per request. Four servers, each started with `bentoml serve` on loopback,
one at a time, in rounds: forde-serve with adaptive batching on and off, and
`benchmarks/noop_service.py` (same request and response schema, no model, no checks) on and off,
which is BentoML's own per-request ceiling here. Prints one JSON object: requests/s, p50 and p99
per configuration and connection count (median over rounds) and the ratios the goals are stated
in (at the most connections). The server and wrk share the machine's cores: ratios, not absolutes.

`--suite serving` times forde-serve (batching on) in three settings instead, interleaved in each
round: monitoring on (the default: every request records its rows in the shared SQLite state) with
1 worker, the same with monitoring off (FORDE_MONITOR=0), and monitoring on with 2 workers; it
reports the monitoring overhead (1 - on/off requests/s) and the 2-worker/1-worker ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {
    "forde": ["forde_serve.app.service:FordeEnsemble"],
    "noop": ["noop_service:NoopEnsemble", "--working-dir", str(ROOT / "benchmarks")],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(service: str, model: Path, settings: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    state = tempfile.mkdtemp(prefix="forde-bench-state-")  # each server starts with an empty state
    env = dict(os.environ) | {"FORDE_MODEL": str(model), "FORDE_STATE_DIR": state} | settings
    command = [sys.executable, "-m", "bentoml", "serve", *SERVICES[service], "--port", str(port), "--host", "127.0.0.1"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit(f"{service} did not become ready")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
# suite -> configuration name -> (service, FORDE_* settings)
SUITES = {
    "noop": {
        "noop batched": ("noop", {"FORDE_BATCHING": "1"}),
        "forde batched": ("forde", {"FORDE_BATCHING": "1"}),
        "noop unbatched": ("noop", {"FORDE_BATCHING": "0"}),
        "forde unbatched": ("forde", {"FORDE_BATCHING": "0"}),
    },
    "serving": {
        "monitoring on": ("forde", {"FORDE_MONITOR": "1", "FORDE_WORKERS": "1"}),
        "monitoring off": ("forde", {"FORDE_MONITOR": "0", "FORDE_WORKERS": "1"}),
        "monitoring on, 2 workers": ("forde", {"FORDE_MONITOR": "1", "FORDE_WORKERS": "2"}),
    },
}


def _wrk(url: str, body: str, connections: int, seconds: int, threads: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n'
        )
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                script.name,
                f"{url}/predict",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * _UNITS[unit]

    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(failed.group(1)) if failed else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "exported" / "digits.onnx")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the four configurations")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (one keeps a core for the server)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="noop", help="which servers to time (above)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    from forde_serve.runtime import EnsembleRuntime

    runtime = EnsembleRuntime(args.model)
    high = 16 if "0 to 16" in runtime.card.input_space else 1
    row = np.random.default_rng(0).uniform(0, high, runtime.card.input_shape).round(3)
    body = json.dumps({"inputs": [{"input": row.tolist()}]})

    configs = SUITES[args.suite]
    samples: dict[tuple[str, int], list[dict]] = {(name, n): [] for name in configs for n in args.connections}
    for _ in range(args.rounds):
        for name, (service, settings) in configs.items():
            process, url = _start(service, args.model.resolve(), settings)
            try:
                _wrk(url, body, max(args.connections), 2, args.threads)  # warm-up: connections, caches
                for connections in args.connections:
                    result = _wrk(url, body, connections, args.seconds, args.threads)
                    samples[(name, connections)].append(result)
                    print(name, connections, result, file=sys.stderr)
            finally:
                _stop(process)
    summary: dict[str, dict[str, dict]] = {}
    for (name, connections), runs in samples.items():
        summary.setdefault(name, {})[str(connections)] = {
            key: round(statistics.median(s[key] for s in runs), 2) for key in runs[0]
        }
    top = str(max(args.connections))
    common = {
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores; server and wrk share them)",
        "model": str(args.model),
        "suite": args.suite,
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "results": summary,
        "goal_connections": int(top),
    }
    if args.suite == "serving":
        on, off, two = (summary[name][top] for name in ("monitoring on", "monitoring off", "monitoring on, 2 workers"))
        ratios = {
            "monitoring_on_over_off_rps": round(on["rps"] / off["rps"], 3),
            "monitoring_overhead": round(1 - on["rps"] / off["rps"], 3),
            "two_workers_over_one_rps": round(two["rps"] / on["rps"], 3),
            "non_2xx": sum(r["non_2xx"] for runs in summary.values() for r in runs.values()),
        }
        print(json.dumps(common | ratios, indent=2))
        return
    noop_best = max((summary["noop batched"][top], summary["noop unbatched"][top]), key=lambda r: r["rps"])
    forde = summary["forde batched"][top]
    print(
        json.dumps(
            common
            | {
                "forde_batched_over_best_noop_rps": round(forde["rps"] / noop_best["rps"], 3),
                "forde_batched_over_unbatched_rps": round(forde["rps"] / summary["forde unbatched"][top]["rps"], 3),
                "forde_batched_p99_over_best_noop_p99": round(forde["p99_ms"] / noop_best["p99_ms"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
