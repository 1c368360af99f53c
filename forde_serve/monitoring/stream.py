"""Offline stream replay: labelled rows fed one request at a time through the same `Monitor` the
service uses (on a fresh store per stream), to measure what it does before anyone relies on it.

- `replay`: one stream; per row the shift statistic, and (with labels) whether the static, Mondrian
  and adaptive sets held the label, the labels fed back right after each row.
- `detection_delays`: rows until the alarm over shuffled orders of each shifted stream.
- `false_alarms`: alarms over shuffled orders of clean rows (exchangeable with the reference).
- `evaluate_streams`: all three from a predictor and labelled streams, as one JSON-able report.

The model runs once per stream (`predictor.predict(x)`, an `EnsembleRuntime` or anything with the
same `predict`), and its outputs are replayed in the chosen orders. Everything returned is plain
JSON-able dicts and lists. `store_factory()` makes each replay's store (an in-memory or temporary
SQLite `StateStore`); seeds fix the orders and the shift test's tie-breaking, so a replay repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from forde_serve.conformal import ConformalCalibration, prediction_sets
from forde_serve.monitoring.monitor import Monitor, MonitorConfig
from forde_serve.reference import MonitorReference

__all__ = ["detection_delays", "evaluate_streams", "false_alarms", "predict_outputs", "replay"]


def predict_outputs(predictor, x: np.ndarray) -> dict[str, np.ndarray]:
    """`predictor.predict(x)` for a stream's raw inputs `[rows, ...]`, as numpy arrays."""
    return {name: np.asarray(value) for name, value in predictor.predict(x).items()}


def _take(outputs: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: value[index] for name, value in outputs.items()}


def _monitor(store_factory, reference, calibration, config, seed) -> Monitor:
    return Monitor(
        store_factory(),
        calibration=calibration,
        reference=reference,
        config=config,
        rng=np.random.default_rng(seed),
    )


def replay(
    outputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    *,
    store_factory: Callable[[], object],
    reference: MonitorReference | None,
    calibration: ConformalCalibration | None,
    config: MonitorConfig | None = None,
    coverage: float = 0.9,
    seed: int = 0,
    stop_at_alarm: bool = False,
) -> dict:
    """Replay the rows of `outputs` (the runtime's, each `[rows, ...]`) in order, one per request.

    With `labels` `[rows]` each row asks for an adaptive set at `coverage` and its label is fed back
    before the next row; returned per row: `covered` (static = plain split conformal, mondrian = the
    calibration's groups, adaptive), `set_size`, the adaptive `alpha`, and over all rows `coverage`,
    `mean_set_size` and `every_class` (share of sets holding every class). Always: `log_statistic`
    per row and `fired_at` (rows until the alarm, None if it never fired). `stop_at_alarm` ends the
    replay at the alarm (labels are then not fed)."""
    rows = len(outputs["probs"])
    monitor = _monitor(store_factory, reference, calibration, config, seed)
    adaptive = labels is not None and monitor.adaptive is not None
    log_statistic, alphas, adaptive_sets = [], [], []
    fired_at = None
    for i in range(rows):
        row = _take(outputs, np.array([i]))
        served = monitor.observe(row, coverage=coverage if adaptive else None, adaptive=adaptive)[0]
        if adaptive:
            adaptive_sets.append(served.adaptive_set)
            alphas.append(served.adaptive_alpha)
            monitor.feedback([(served.id, int(labels[i]))])
        status = monitor.shift_status()
        if status is not None:
            log_statistic.append(status["log_statistic"])
            fired_at = status["fired_at"]
            if stop_at_alarm and fired_at is not None:
                break
    result = {
        "rows": len(log_statistic) if stop_at_alarm else rows,
        "fired_at": fired_at,
        "log_statistic": log_statistic,
    }
    if labels is None or calibration is None:
        return result
    labels = np.asarray(labels)
    sets = {"static": prediction_sets(outputs["probs"], calibration, coverage)}
    if calibration.groups:
        sets["mondrian"] = prediction_sets(
            outputs["probs"], calibration, coverage, group_scores=outputs[calibration.group_score]
        )
    if adaptive:
        sets["adaptive"] = np.stack(adaptive_sets)
        result["alpha"] = alphas
    result["covered"] = {kind: s[np.arange(rows), labels].tolist() for kind, s in sets.items()}
    result["set_size"] = {kind: s.sum(axis=1).tolist() for kind, s in sets.items()}
    result["coverage"] = {kind: float(np.mean(c)) for kind, c in result["covered"].items()}
    result["mean_set_size"] = {kind: float(np.mean(s)) for kind, s in result["set_size"].items()}
    result["every_class"] = {kind: float(s.all(axis=1).mean()) for kind, s in sets.items()}
    return result


def detection_delays(
    streams: Mapping[str, Mapping[str, np.ndarray]],
    *,
    store_factory: Callable[[], object],
    reference: MonitorReference,
    config: MonitorConfig | None = None,
    orders: int = 20,
    seed: int = 0,
) -> dict:
    """Per stream (name -> the runtime's outputs over its rows): rows until the alarm over `orders`
    shuffled orders (label-free). `median_delay` / `max_delay` over the orders that fired (None when
    none did), `fired` of `orders`, and every order's `delays` (None: no alarm within the stream)."""
    out = {}
    for s, (name, outputs) in enumerate(streams.items()):
        delays = []
        for k in range(orders):
            rng = np.random.default_rng([seed, s, k])
            order = rng.permutation(len(outputs["probs"]))
            run = replay(
                _take(outputs, order),
                None,
                store_factory=store_factory,
                reference=reference,
                calibration=None,
                config=config,
                seed=int(rng.integers(2**32)),
                stop_at_alarm=True,
            )
            delays.append(run["fired_at"])
        fired = [d for d in delays if d is not None]
        out[name] = {
            "rows": len(outputs["probs"]),
            "orders": orders,
            "fired": len(fired),
            "median_delay": None if not fired else float(np.median(fired)),
            "max_delay": None if not fired else int(max(fired)),
            "delays": delays,
        }
    return out


def false_alarms(
    outputs: Mapping[str, np.ndarray],
    *,
    store_factory: Callable[[], object],
    reference: MonitorReference,
    config: MonitorConfig | None = None,
    permutations: int = 100,
    seed: int = 0,
) -> dict:
    """Alarms over `permutations` shuffled orders of clean rows (the runtime's `outputs`): `fired`, the
    `rate` and its binomial 95% upper bound (Clopper-Pearson), and the rows at which they fired."""
    fired_at = []
    for k in range(permutations):
        rng = np.random.default_rng([seed, k])
        run = replay(
            _take(outputs, rng.permutation(len(outputs["probs"]))),
            None,
            store_factory=store_factory,
            reference=reference,
            calibration=None,
            config=config,
            seed=int(rng.integers(2**32)),
            stop_at_alarm=True,
        )
        if run["fired_at"] is not None:
            fired_at.append(run["fired_at"])
    return {
        "rows": len(outputs["probs"]),
        "permutations": permutations,
        "fired": len(fired_at),
        "rate": len(fired_at) / permutations,
        "rate_upper_95": _clopper_pearson_upper(len(fired_at), permutations),
        "fired_at": fired_at,
    }


def _clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound for a binomial rate (bisection on the binomial tail)."""
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        tail = sum(math.comb(n, j) * mid**j * (1 - mid) ** (n - j) for j in range(k + 1))
        lo, hi = (mid, hi) if tail > 1 - level else (lo, mid)
    return hi


def evaluate_streams(
    predictor,
    clean: tuple[np.ndarray, np.ndarray],
    shifted: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    store_factory: Callable[[], object],
    reference: MonitorReference,
    calibration: ConformalCalibration,
    config: MonitorConfig | None = None,
    coverage: float = 0.9,
    orders: int = 20,
    permutations: int = 100,
    seed: int = 0,
) -> dict:
    """The stream report: `false_alarms` over `permutations` orders of the `clean` (x, y) rows;
    `detection` (`detection_delays` over `orders` orders) and `coverage` (one `replay` with labels
    fed back, in the stream's own order; `running`: the coverage of the first t rows, per t) for the
    clean rows and each `shifted` stream (name -> (x, y))."""
    clean_outputs = predict_outputs(predictor, clean[0])
    outputs = {"clean": clean_outputs} | {name: predict_outputs(predictor, x) for name, (x, _) in shifted.items()}
    labels = {"clean": clean[1]} | {name: y for name, (_, y) in shifted.items()}
    common = {"store_factory": store_factory, "reference": reference, "config": config}
    report = {
        "false_alarms": false_alarms(clean_outputs, permutations=permutations, seed=seed, **common),
        "detection": detection_delays(outputs, orders=orders, seed=seed, **common),
        "coverage": {},
    }
    for name, out in outputs.items():
        run = replay(out, labels[name], calibration=calibration, coverage=coverage, seed=seed, **common)
        report["coverage"][name] = {key: run[key] for key in ("coverage", "mean_set_size", "every_class")} | {
            "running": {kind: (np.cumsum(c) / np.arange(1, len(c) + 1)).tolist() for kind, c in run["covered"].items()},
            "alpha": run.get("alpha"),
            "log_statistic": run["log_statistic"],
            "fired_at": run["fired_at"],
        }
    return report
