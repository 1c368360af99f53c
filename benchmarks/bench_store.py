"""What the shared state costs a request: one `StateStore.transaction()` that reads and writes a state
document and inserts 1 or 16 prediction records, from 1 and 2 processes at once.

    python benchmarks/bench_store.py                                   # a temporary SQLite file
    python benchmarks/bench_store.py --url postgresql+psycopg://user@host/db --processes 1 2 4

Prints one JSON object. The database is first filled to the retention limit (`--prefill`, default the
store's 100 000), so every insert also prunes, as in a server that has run for a while. Each process
opens its own store (one engine), runs `--warmup` transactions, waits for the others at a barrier,
then runs `--transactions` timed ones; the cases run in turn, for a warm-up round and then `--rounds`
rounds. Per case (medians over the rounds): the median / p90 / p99 latency of one transaction in
microseconds over all processes, and `transactions_per_s`, all processes' transactions over the wall
time of the slowest. In the same run, for reference, the default model's in-process predict call at
batch 1 and 16 (`predict_us`), the ratio of the transaction to it (`vs_predict`), and the cost of the
Prometheus metrics of a request (`ServiceMetrics.observe_predictions`, multiprocess mode).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy

from forde_serve.monitoring.store import DEFAULT_MAX_PREDICTIONS, PredictionRecord, StateStore

CLASSES = 10
LEVELS = ("0.8", "0.9", "0.95", "0.99")
# A state document the size the monitor keeps: a martingale over a grid of bets, ACI alphas per level.
STATE = {
    "martingale": {"log_values": [0.0] * 20, "seen": 0, "alarm": False},
    "aci": {level: {"alpha": 1 - float(level), "errors": 0, "seen": 0} for level in LEVELS},
}


def _records(prefix: str, count: int, rng: np.random.Generator) -> list[PredictionRecord]:
    probs = rng.dirichlet(np.ones(CLASSES), size=count).astype(np.float32)
    return [
        PredictionRecord(
            id=f"{prefix}-{i}",
            created=time.time(),
            predicted_class=int(p.argmax()),
            confidence=float(p.max()),
            mutual_information=0.05,
            abstain=False,
            probs=p,
            group=1,
            set_sizes=dict.fromkeys(LEVELS, 2),
            served={"alpha": {level: 0.1 for level in LEVELS}},
        )
        for i, p in enumerate(probs)
    ]


def _one_transaction(store: StateStore, records: list[PredictionRecord]) -> None:
    with store.transaction() as tx:
        state = tx.get_state("monitor") or STATE
        state["martingale"]["seen"] += len(records)
        tx.put_state("monitor", state)
        tx.insert_predictions(records)


def _worker(url: str, name: str, records: int, warmup: int, timed: int, barrier, results) -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    store = StateStore(url)
    batches = [_records(f"{name}-{i}", records, rng) for i in range(warmup + timed)]  # built before timing
    for batch in batches[:warmup]:
        _one_transaction(store, batch)
    barrier.wait()
    latencies, start = [], time.perf_counter()
    for batch in batches[warmup:]:
        t0 = time.perf_counter()
        _one_transaction(store, batch)
        latencies.append(time.perf_counter() - t0)
    results.put((latencies, time.perf_counter() - start))
    store.dispose()


def _prefill(url: str, rows: int) -> None:
    """Fill to the retention limit, then tidy up as a server that has run a while would have (PostgreSQL's
    autovacuum would otherwise run during the first timed cases)."""
    store = StateStore(url)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 5000):
        with store.transaction() as tx:
            tx.insert_predictions(_records(f"prefill-{start}", min(5000, rows - start), rng))
    store.dispose()
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("VACUUM ANALYZE")
        elif engine.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()


def _case(url: str, processes: int, records: int, warmup: int, timed: int, round_index: int) -> dict:
    context = multiprocessing.get_context("spawn")  # as BentoML's workers: separate interpreters
    barrier, results = context.Barrier(processes), context.Queue()
    names = [f"r{round_index}-p{processes}-n{records}-w{w}" for w in range(processes)]
    workers = [context.Process(target=_worker, args=(url, n, records, warmup, timed, barrier, results)) for n in names]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0, f"a benchmark process failed ({worker.exitcode})"
    latencies = sorted(t for lat, _ in outcomes for t in lat)
    wall = max(w for _, w in outcomes)
    return {
        "median_us": round(statistics.median(latencies) * 1e6, 1),
        "p90_us": round(latencies[int(0.9 * len(latencies))] * 1e6, 1),
        "p99_us": round(latencies[int(0.99 * len(latencies))] * 1e6, 1),
        "transactions_per_s": round(len(latencies) / wall, 1),
    }


def _predict_us(model: Path, batch: int, rounds: int = 200) -> float | None:
    if not model.exists():
        return None
    from forde_serve.runtime import EnsembleRuntime

    runtime = EnsembleRuntime(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 16, (batch, *runtime.card.input_shape)).astype(np.float32)
    for _ in range(20):
        runtime.predict(x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        runtime.predict(x)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _metrics_us(rows: int, rounds: int = 2000) -> float:
    """observe_predictions for one request of `rows` rows, in multiprocess mode (a fresh interpreter)."""
    code = f"""
import statistics, sys, time
from forde_serve.monitoring.prometheus import ServiceMetrics
metrics = ServiceMetrics(classes={CLASSES})
mi, abstain, sets = [0.05] * {rows}, [False] * {rows}, {{level: [2] * {rows} for level in {LEVELS!r}}}
times = []
for _ in range({rounds}):
    t0 = time.perf_counter()
    metrics.observe_predictions(mi, abstain, sets)
    times.append(time.perf_counter() - t0)
print(statistics.median(times[{rounds} // 10:]) * 1e6)
"""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return round(float(out), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="any SQLAlchemy URL of an EMPTY database (default: a temporary SQLite file)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--records", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--transactions", type=int, default=1000, help="timed transactions per process and case")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--rounds", type=int, default=3, help="each case this many times, interleaved, after a warm-up round; medians"
    )
    parser.add_argument("--prefill", type=int, default=DEFAULT_MAX_PREDICTIONS)
    parser.add_argument("--model", type=Path, default=Path("exported/digits.onnx"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        url = args.url or f"sqlite:///{Path(directory) / 'bench.sqlite3'}"
        _prefill(url, args.prefill)
        cases = [(p, n) for p in args.processes for n in args.records]
        runs: dict = {case: [] for case in cases}
        for round_index in range(args.rounds + 1):  # round 0 is a warm-up round, not reported
            for processes, records in cases:
                result = _case(url, processes, records, args.warmup, args.transactions, round_index)
                if round_index:
                    runs[processes, records].append(result)
    predict = {n: _predict_us(args.model, n) for n in args.records}
    results = []
    for (processes, records), rounds in runs.items():
        row = {"processes": processes, "records": records}
        row |= {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        if predict[records]:
            row["predict_us"] = predict[records]
            row["vs_predict"] = round(row["median_us"] / predict[records], 3)
        results.append(row)
    print(
        json.dumps(
            {
                "backend": sqlalchemy.make_url(url).get_backend_name(),
                "prefill": args.prefill,
                "transactions_per_process": args.transactions,
                "rounds": args.rounds,
                "cases": results,
                "metrics_observe_us": {str(n): _metrics_us(n) for n in args.records},
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version,
                    "sqlalchemy": sqlalchemy.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
