"""The service's Prometheus metrics, written with prometheus_client so that BentoML's /metrics merges
every worker's values.

How BentoML 1.4 (checked in 1.4.40's source) serves them: `bentoml serve` empties (or creates)
`$BENTOML_HOME/prometheus_multiproc_dir` when it starts (`bentoml.serving.ensure_prometheus_dir`) and
starts each worker as a NEW process (circus runs `python -m _bentoml_impl.worker.service`, no fork) with
`PROMETHEUS_MULTIPROC_DIR` set to it in the worker's environment (`_bentoml_impl.server.serving.serve_http`).
Each worker's prometheus_client then keeps its values in mmap files `<type>_<pid>.db` there, and
whichever worker answers /metrics merges all files (`PrometheusClient.generate_latest`:
`MultiProcessCollector` over a fresh registry), so registering metrics in a registry is not needed and
the default registry is never read. prometheus_client picks single- or multi-process values when it is
first imported (BentoML issue 5056: metric objects made in a process that imported it before the variable
was set never reach the files), so `ServiceMetrics` imports it and creates its metrics when constructed:
build it in the service's `__init__`, which runs inside each worker, never at module level.

Aggregation across workers: counters and histograms are summed. The gauges describe state all workers
share (the shift test and realized coverage live in the state database, and each worker sets them after
its own transaction), so they use `mostrecent`: /metrics shows the value the latest writer set, whichever
worker it was (`max` would keep an alarm raised after a re-arm; `all` would show one stale series per pid).
With several replicas each serves its own /metrics: sum counters over instances and take the latest (or
max) of the gauges in PromQL. Values start from zero whenever `bentoml serve` restarts (it empties the
directory); set the gauges from the stored state when a worker starts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["MUTUAL_INFORMATION_BUCKETS", "ServiceMetrics", "set_size_buckets"]

logger = logging.getLogger(__name__)

# Mutual information in nats lies in [0, min(ln members, ln classes)]: ln 10 = 2.30, ln 64 = 4.16.
# A 1-2-5 series resolves both the near-zero agreement of clean inputs and the disagreement of strange ones.
MUTUAL_INFORMATION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_METHODS = ("static", "adaptive")


def set_size_buckets(classes: int) -> tuple[float, ...]:
    """Upper bounds for prediction-set sizes (whole classes): every size from 0 (an empty set) to 10,
    then a 1-2-5 series up to `classes` (which always has its own bucket)."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes: expected a positive integer, got {classes!r}")
    bounds = set(range(min(classes, 10) + 1)) | {classes}
    step = 20
    while step < classes:
        bounds.add(step)
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2  # 20, 50, 100, 200, 500, ...
    return tuple(float(b) for b in sorted(bounds))


def _multiprocess_directory() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when set, after making sure prometheus_client writes into it."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not directory:
        return None
    if not os.path.isdir(directory):
        raise ValueError(f"PROMETHEUS_MULTIPROC_DIR: expected an existing directory, got {directory!r}")
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # Imported before the variable was set (BentoML issue 5056): values would stay in this process.
        # Metrics choose their value class when created, so ours (created below) go to the files.
        logger.warning(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; forde metrics are switched "
            "to multiprocess files, metrics created earlier in this process stay out of /metrics"
        )
        values.ValueClass = values.get_value_class()
    return directory


class ServiceMetrics:
    """The forde_* metrics of one worker process. Multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set
    (under `bentoml serve`): values go to that directory and are registered nowhere; otherwise they
    live in this object's own `registry` (so building several in one process never collides)."""

    def __init__(self, classes: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_directory = _multiprocess_directory()
        self.registry = None if self.multiprocess_directory else CollectorRegistry()
        shared = {"registry": self.registry}
        self.predictions = Counter("forde_predictions", "Rows answered by the prediction endpoints.", **shared)
        self.abstentions = Counter(
            "forde_abstentions",
            "Rows answered with abstain = true (uncertainty above the model's threshold).",
            **shared,
        )
        self.mutual_information = Histogram(
            "forde_mutual_information_nats",
            "Mutual information (epistemic uncertainty, nats) of each answered row.",
            buckets=MUTUAL_INFORMATION_BUCKETS,
            **shared,
        )
        self.set_size = Histogram(
            "forde_prediction_set_size",
            "Classes in each served conformal prediction set, by coverage level.",
            ["level"],
            buckets=set_size_buckets(classes),
            **shared,
        )
        self.feedback = Counter("forde_feedback", "Labels stored for served predictions.", **shared)
        most_recent = {"multiprocess_mode": "mostrecent", **shared}
        self.shift_statistic = Gauge(
            "forde_shift_statistic",
            "The label-free shift test's statistic (conformal test martingale; alarm at 1/delta).",
            **most_recent,
        )
        self.shift_alarm = Gauge("forde_shift_alarm", "1 while the shift alarm is raised, else 0.", **most_recent)
        self.realized_coverage = Gauge(
            "forde_realized_coverage",
            "Fraction of labelled rows whose true class was in the set served (static or adaptive), by level.",
            ["level", "method"],
            **most_recent,
        )

    def observe_predictions(
        self,
        mutual_information: Iterable[float],
        abstain: Iterable[bool],
        set_sizes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Count answered rows (`[rows]` mutual information and abstain flags) and their set sizes
        (coverage level as str -> `[rows]` sizes). Non-finite uncertainties are counted, not observed."""
        rows = 0
        for value in mutual_information:
            rows += 1
            if math.isfinite(value):
                self.mutual_information.observe(float(value))
        self.predictions.inc(rows)
        abstained = sum(bool(flag) for flag in abstain)
        if abstained:
            self.abstentions.inc(abstained)
        for level, sizes in (set_sizes or {}).items():
            child = self.set_size.labels(level=str(level))
            for size in sizes:
                child.observe(int(size))

    def observe_set_sizes(self, set_sizes: Mapping[str, Sequence[int]]) -> None:
        """Sizes of the prediction sets answered, per coverage level (as str)."""
        for level, sizes in set_sizes.items():
            child = self.set_size.labels(level=str(level))
            for size in sizes:
                child.observe(int(size))

    def observe_shift(self, statistic: float, alarm: bool) -> None:
        """The shift test's state after the latest transaction (shared by every worker)."""
        self.shift_statistic.set(float(statistic))
        self.shift_alarm.set(1.0 if alarm else 0.0)

    def observe_feedback(self, stored: int) -> None:
        """`stored` more labels committed."""
        if stored:
            self.feedback.inc(stored)

    def set_realized_coverage(self, level: str, coverage: float, method: str = "static") -> None:
        """Realized coverage of the `method` sets ("static" or "adaptive") at `level`, over the labels so far."""
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
        self.realized_coverage.labels(level=str(level), method=method).set(float(coverage))

    def exposition(self) -> bytes:
        """The text exposition /metrics would serve for these metrics: every process's values merged in
        multiprocess mode (BentoML's /metrics does the same, with its own metrics), else this registry's."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.registry is not None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_directory)
        return generate_latest(merged)
