"""Test-only stand-in for `forde_serve.monitoring.store.StateStore` (the agreed interface of
/work/notes/monitor-interface.md), in memory, until the store branch is merged: the monitor's tests
then also run on the real store (`store_factories` picks up `StateStore` when it is importable).

Never shipped. It keeps the semantics the monitor relies on: one transaction at a time (a lock), its
writes visible only when the block exits without an exception (a failed block leaves nothing), JSON
documents stored as JSON text (so a state that is not JSON-able fails here as it would in SQL),
newest-first reads, and retention of the newest `max_predictions` predictions.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import numpy as np

from forde_serve.monitoring.store import LabelRecord, PredictionRecord


class MemoryStore:
    def __init__(self, max_predictions: int = 100_000):
        self.max_predictions = max_predictions
        self._lock = threading.Lock()
        self._data = {"state": {}, "predictions": {}, "labels": {}}  # dicts keep insertion order
        self.transactions = 0

    @contextmanager
    def transaction(self):
        with self._lock:
            work = {name: dict(table) for name, table in self._data.items()}  # records and JSON text are immutable
            yield _Transaction(work, self.max_predictions)
            self._data = work  # only reached when the block did not raise
            self.transactions += 1

    def dispose(self) -> None:
        pass


class _Transaction:
    def __init__(self, data: dict, max_predictions: int):
        self._data = data
        self._max = max_predictions

    def get_state(self, name: str) -> dict | None:
        text = self._data["state"].get(name)
        return None if text is None else json.loads(text)

    def put_state(self, name: str, value: dict) -> None:
        self._data["state"][name] = json.dumps(value, allow_nan=False)

    def insert_predictions(self, records) -> None:
        predictions = self._data["predictions"]
        for record in records:
            assert isinstance(record, PredictionRecord)
            assert record.id not in predictions, f"duplicate id {record.id}"
            json.dumps([record.set_sizes, record.served], allow_nan=False)
            predictions[record.id] = record
        while len(predictions) > self._max:
            del predictions[next(iter(predictions))]

    def predictions(self, ids) -> dict[str, PredictionRecord]:
        return {i: self._data["predictions"][i] for i in ids if i in self._data["predictions"]}

    def labelled(self, ids) -> set[str]:
        return {i for i in ids if i in self._data["labels"]}

    def insert_labels(self, records) -> None:
        for record in records:
            assert isinstance(record, LabelRecord)
            assert record.id not in self._data["labels"], f"labelled twice: {record.id}"
            json.dumps(record.outcome, allow_nan=False)
            self._data["labels"][record.id] = record

    def recent_predictions(self, n: int) -> list[PredictionRecord]:
        return list(reversed(list(self._data["predictions"].values())))[:n]

    def label_outcomes(self, n: int | None = None) -> list[LabelRecord]:
        labels = list(reversed(list(self._data["labels"].values())))
        return labels if n is None else labels[:n]

    def counts(self) -> dict[str, int]:
        return {"predictions": len(self._data["predictions"]), "labels": len(self._data["labels"])}


def store_factories() -> dict:
    """name -> callable(tmp_path, **kwargs) giving a fresh store (kwargs: max_predictions): the fake always,
    the real SQLite store once merged."""
    factories = {"memory": lambda tmp_path, **kwargs: MemoryStore(**kwargs)}
    try:
        from forde_serve.monitoring.store import StateStore
    except ImportError:
        return factories
    factories["sqlite"] = lambda tmp_path, **kwargs: StateStore(f"sqlite:///{tmp_path / 'state.sqlite3'}", **kwargs)
    return factories


def fake_outputs(probs: np.ndarray, mutual_information: np.ndarray, abstain_threshold: float = 0.7) -> dict:
    """The runtime's outputs that the monitor reads, from probabilities `[N, C]` and MI `[N]`."""
    probs = np.asarray(probs, dtype=np.float32)
    mi = np.asarray(mutual_information, dtype=np.float32)
    return {
        "probs": probs,
        "predicted_class": probs.argmax(1),
        "confidence": probs.max(1),
        "mutual_information": mi,
        "predictive_entropy": (-(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)).astype(np.float32),
        "abstain": mi > abstain_threshold,
    }
