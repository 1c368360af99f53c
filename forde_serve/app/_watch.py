"""The service's watch over its own traffic, one per worker process: the monitor over the state store
every worker shares (shift alarm, prediction ids, labels, adaptive sets) and the Prometheus metrics.

Built inside the worker (the service's `__init__`), never at import: BentoML starts each worker as a
new process with its Prometheus directory set, and metric objects made before that are lost (BentoML
issue 5056). A failing store is the server's fault, not the caller's: a 503 naming the store.
"""

from __future__ import annotations

import hashlib
from http import HTTPStatus
from pathlib import Path

import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument

from forde_serve.monitoring.monitor import FeedbackError, FeedbackResult, Monitor, MonitorConfig, MonitorError
from forde_serve.monitoring.prometheus import ServiceMetrics
from forde_serve.monitoring.store import StateStore, StateStoreError
from forde_serve.runtime import EnsembleRuntime

__all__ = ["Watch", "adaptive_refusal", "model_key"]


def model_key(path: Path) -> str:
    """The state store's name for a model: the first 16 hex digits of its predict file's sha256, so a
    re-exported file starts with its own state and every worker of one file shares one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def adaptive_refusal(runtime: EnsembleRuntime, monitoring: bool) -> str | None:
    """Why rows of this service may not ask for adaptive sets (None: they may)."""
    conformal = runtime.card.conformal
    if not monitoring:
        return "this server keeps no state (FORDE_MONITOR=0), so it has no labels to adapt with"
    if conformal is None:
        return "this model file has no conformal thresholds"
    if not conformal.scores:
        return (
            "this model file's calibration keeps no conformity scores (it was exported before adaptive sets); "
            "re-export it with a current `forde export`"
        )
    return None


class Watch:
    """The monitor and the metrics of one worker process."""

    def __init__(self, runtime: EnsembleRuntime, config: MonitorConfig, key: str) -> None:
        card = runtime.card
        self.metrics = ServiceMetrics(classes=len(card.class_names))
        try:
            store = StateStore.from_environment(key)
        except StateStoreError as err:  # a start that cannot keep its state must not pretend to
            raise RuntimeError(f"the state store cannot be opened: {err}") from None
        self.monitor = Monitor(
            store,
            calibration=card.conformal,
            reference=card.choices.reference,
            config=config,
            rng=np.random.default_rng(),
        )
        # /metrics starts empty with every `bentoml serve`; the alarm's state is the store's
        shift = self._stored(self.monitor.shift_status)
        if shift is not None:
            self.metrics.observe_shift(shift["statistic"], shift["alarm"])

    def observe(
        self,
        out: dict[str, np.ndarray],
        coverages: list[float | None],
        adaptives: list[bool],
        inputs: np.ndarray,
    ) -> list:
        """Record the rows of `out` (one entry per row) and count them; returns the monitor's `ServedRow`s."""
        rows = self._stored(lambda: self.monitor.observe(out, coverages, adaptives, inputs))
        self.metrics.observe_predictions(out["mutual_information"], out["abstain"])
        if self.monitor.last_shift is not None:
            self.metrics.observe_shift(self.monitor.last_shift["statistic"], self.monitor.last_shift["alarm"])
        return rows

    def feedback(self, items: list[tuple[str, int]]) -> FeedbackResult:
        try:
            result = self._stored(lambda: self.monitor.feedback(items))
        except FeedbackError as err:
            raise InvalidArgument(str(err)) from None
        self.metrics.observe_feedback(len(result.stored))
        for level, methods in (result.coverage or {}).items():
            for method, share in methods.items():
                if share is not None:
                    self.metrics.set_realized_coverage(level, share, method)
        return result

    def snapshot(self) -> dict:
        return self._stored(self.monitor.snapshot)

    def reset(self) -> None:
        try:
            shift = self._stored(self.monitor.reset)
        except MonitorError as err:
            raise InvalidArgument(str(err)) from None
        self.metrics.observe_shift(shift["statistic"], shift["alarm"])

    @staticmethod
    def _stored(call):
        try:
            return call()
        except StateStoreError as err:
            raise BentoMLException(
                f"state: the server's state store failed ({err}); nothing of this request was kept, retry later",
                error_code=HTTPStatus.SERVICE_UNAVAILABLE,
            ) from None
