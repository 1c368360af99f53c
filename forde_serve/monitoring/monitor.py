"""The monitor: one object that the HTTP service (several worker processes) and the offline stream
replay both use, over the state store every worker shares.

- `observe(outputs, coverage, adaptive)`: one request's rows, in ONE store transaction: the shift
  test steps over the rows in order, each row is stored (what its label will need later, including
  the adaptive alphas at serve time), and rows that ask for `adaptive` sets get them. Returns one
  `ServedRow` (its id, ...) per row.
- `feedback(items)`: labels by id, in one transaction: each stored once (a repeated id is reported as
  a duplicate and the first label stands), judged against the sets of its serve time, and the
  adaptive alphas updated in arrival order. An unknown id or a label that is not a class refuses
  the whole request (nothing is stored) with a `FeedbackError` naming the item.
- `snapshot()`: the /monitor document. `shift`: the alarm (`martingale`). `window`: over the newest
  `MonitorConfig.window` stored rows, the estimated accuracy (the mean calibrated confidence, as
  NannyML's CBPE: right only while the calibration holds, an over-estimate under shift, so shown
  beside the alarm, never instead of it), mean mutual information, abstain rate, mean set size per
  level. `feedback`: labels stored, realized accuracy, realized coverage per level of the static and
  adaptive sets, and the adaptive alphas and thresholds now.
- `reset()`: re-arm the shift test (M = 1 against the reference again). Labels and alphas stay.

State documents: "martingale", "adaptive", "feedback" (`store.Transaction.get_state`). A stored
document that does not fit this monitor's settings (another betting, other levels) is re-armed from
scratch, with a warning in the log.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from forde_serve.conformal import ConformalCalibration, prediction_sets, threshold_sets
from forde_serve.errors import FordeError
from forde_serve.monitoring.adaptive import DEFAULT_GAMMA, AdaptiveSets, AdaptiveStateError, level_key
from forde_serve.monitoring.martingale import (
    DEFAULT_DELTA,
    ConformalMartingale,
    MartingaleConfig,
    MartingaleStateError,
)
from forde_serve.monitoring.records import LabelRecord, PredictionRecord
from forde_serve.reference import MonitorReference

__all__ = ["FeedbackError", "FeedbackResult", "Monitor", "MonitorConfig", "MonitorError", "ServedRow"]

log = logging.getLogger(__name__)

MARTINGALE, ADAPTIVE, FEEDBACK = "martingale", "adaptive", "feedback"  # state document names
_FEEDBACK_VERSION = 1
_NO_SIZES: dict[str, int] = {}  # records share it (read-only): see _record
_NEEDED = ("probs", "predicted_class", "confidence", "mutual_information", "abstain")


class MonitorError(FordeError, ValueError):
    """A request the monitor cannot serve as asked (a coverage level, adaptive sets, its settings)."""


class FeedbackError(MonitorError):
    """A label that cannot be stored: an unknown id or a label that is not a class (the item is named)."""


@dataclass(frozen=True)
class MonitorConfig:
    """The monitor's settings, checked once."""

    delta: float = DEFAULT_DELTA  # the shift alarm's false-alarm probability bound (alarm at M >= 1/delta)
    betting: str = "mixture"  # the shift test's betting: mixture | power | jumper
    window: int = 200  # newest stored rows the window estimates average over
    gamma: float = DEFAULT_GAMMA  # adaptive conformal step size
    keep_inputs: bool = False  # store each row's raw input (float32 bytes) with its prediction

    def __post_init__(self) -> None:
        MartingaleConfig(self.betting, self.delta)  # raises on a bad betting or delta
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise MonitorError(f"window: expected an integer >= 1 (rows), got {self.window!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int | float) or not 0.0 < self.gamma <= 1.0:
            raise MonitorError(f"gamma: expected a step size in (0, 1], got {self.gamma!r}")


@dataclass(frozen=True, eq=False)
class ServedRow:
    """What the monitor adds to one served row."""

    id: str  # give it back with the label (POST /feedback)
    group: int | None  # the row's Mondrian group (None: the calibration has none)
    adaptive_set: np.ndarray | None  # [classes] bool: the adaptive set at the row's coverage, when asked
    adaptive_alpha: float | None  # the alpha_t that set was computed at


@dataclass(frozen=True)
class FeedbackResult:
    stored: tuple[str, ...]  # ids whose label was stored now, in the order given
    duplicates: tuple[str, ...]  # ids already labelled (before, or earlier in the same request): ignored
    labels: int = 0  # labels stored in all, after this request
    coverage: dict | None = None  # level -> {"static": share, "adaptive": share}, over those labels


class Monitor:
    """Shift test, adaptive sets and feedback over one store (see the module docstring).

    `reference` None: no shift test (a model file without a validation reference); `calibration`
    None: no sets; a calibration without conformity scores: no adaptive sets. `rng` draws the shift
    test's tie-breaking uniforms (seed it for reproducible offline replays); `clock` gives unix seconds.
    """

    def __init__(
        self,
        store,
        *,
        calibration: ConformalCalibration | None = None,
        reference: MonitorReference | None = None,
        config: MonitorConfig | None = None,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.config = config or MonitorConfig()
        self.last_shift: dict | None = None  # the shift test's summary after this process's latest observe()
        self.calibration = calibration
        self.test = (
            None
            if reference is None
            else ConformalMartingale(reference, MartingaleConfig(self.config.betting, self.config.delta))
        )
        self.adaptive = (
            AdaptiveSets(calibration, self.config.gamma)
            if calibration is not None and calibration.scores is not None
            else None
        )
        self.levels = () if calibration is None else tuple(level_key(c) for c in calibration.coverages)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.clock = clock

    # --- serving ------------------------------------------------------------------------------------

    def observe(
        self,
        outputs: Mapping[str, np.ndarray],
        coverage: float | None | Sequence[float | None] = None,
        adaptive: bool | Sequence[bool] = False,
        inputs: np.ndarray | None = None,
    ) -> list[ServedRow]:
        """Record one request's rows (the runtime's `outputs`, each `[rows, ...]`) in one transaction.

        `coverage` and `adaptive` are per row (or one value for all): a row with `adaptive` gets the
        adaptive set at its `coverage`. `inputs` `[rows, ...]` are stored only with `keep_inputs`."""
        probs, rows = self._outputs(outputs)
        coverages = _per_row(coverage, rows, "coverage")
        adaptives = [bool(a) for a in _per_row(adaptive, rows, "adaptive")]
        for i, (c, a) in enumerate(zip(coverages, adaptives, strict=True)):
            self._check_request(i, c, a)
        groups = self._groups(outputs, rows)
        now = self.clock()
        with self.store.transaction() as tx:
            if self.test is not None:
                state = self._state(tx, MARTINGALE, self.test.start, self.test.check_state)
                state, _ = self.test.update(state, outputs[self.test.reference.score], self.rng)
                tx.put_state(MARTINGALE, state)
                self.last_shift = self.test.summary(state)
            alphas = {}
            if self.adaptive is not None:
                alphas = self.adaptive.alphas(self._state(tx, ADAPTIVE, self.adaptive.start, self.adaptive.check_state))
            served, records = [], []
            # rows served alike share one document, which the store then encodes once per request
            documents: dict[tuple, dict] = {}
            for i, id in enumerate(_new_ids(rows)):
                adaptive_set = alpha = None
                if adaptives[i]:
                    alpha = alphas[level_key(coverages[i])]
                    adaptive_set = self.adaptive.sets(
                        probs[i : i + 1], alpha, None if groups is None else groups[i : i + 1]
                    )[0]
                row = ServedRow(id, None if groups is None else int(groups[i]), adaptive_set, alpha)
                served.append(row)
                key = (coverages[i], row.adaptive_set is not None)
                document = documents.setdefault(key, {"alpha": alphas, "coverage": key[0], "adaptive": key[1]})
                records.append(self._record(row, outputs, probs, i, now, document, inputs))
            tx.insert_predictions(records)
        return served

    def feedback(self, items: Sequence[tuple[str, int]]) -> FeedbackResult:
        """Store labels `[(id, label), ...]` in one transaction (see the module docstring)."""
        items = list(items)
        for i, item in enumerate(items):
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise FeedbackError(f"items[{i}]: expected an (id, label) pair, got {item!r}")
            if not isinstance(item[0], str) or not item[0]:
                raise FeedbackError(f"items[{i}].id: expected a non-empty string, got {item[0]!r}")
            if isinstance(item[1], bool) or not isinstance(item[1], int | np.integer):
                raise FeedbackError(
                    f"items[{i}].label: expected a class index (int) for id {item[0]!r}, got {item[1]!r}"
                )
        ids = list(dict.fromkeys(item[0] for item in items))
        now = self.clock()
        with self.store.transaction() as tx:
            labelled = set(tx.labelled(ids))  # a repeat is a duplicate even once its prediction is pruned
            predictions = tx.predictions([id for id in ids if id not in labelled])
            for i, (id, label) in enumerate(items):
                if id in labelled:
                    continue
                if id not in predictions:
                    raise FeedbackError(
                        f"items[{i}].id: expected the id of a stored prediction, got {id!r} (unknown, or dropped "
                        "by the store's retention)"
                    )
                classes = len(predictions[id].probs)
                if not 0 <= label < classes:
                    raise FeedbackError(
                        f"items[{i}].label: expected a class index in 0..{classes - 1} for id {id!r}, got {label}"
                    )
            adaptive_state = None
            if self.adaptive is not None:
                adaptive_state = self._state(tx, ADAPTIVE, self.adaptive.start, self.adaptive.check_state)
            totals = self._state(tx, FEEDBACK, self._feedback_start, self._check_feedback)
            stored, duplicates, records = [], [], []
            for id, label in items:
                if id in labelled:
                    duplicates.append(id)
                    continue
                labelled.add(id)
                outcome = self._outcome(predictions[id], int(label))
                for key, covered in outcome["covered"].items():
                    if "adaptive" in covered:
                        adaptive_state = self.adaptive.update(adaptive_state, key, covered["adaptive"])
                totals = _add_outcome(totals, outcome)
                records.append(LabelRecord(id=id, label=int(label), received=now, outcome=outcome))
                stored.append(id)
            if records:
                tx.insert_labels(records)
                tx.put_state(FEEDBACK, totals)
                if adaptive_state is not None:
                    tx.put_state(ADAPTIVE, adaptive_state)
        adaptive = None if adaptive_state is None else self.adaptive.summary(adaptive_state)
        return FeedbackResult(tuple(stored), tuple(duplicates), totals["labels"], self._coverage(totals, adaptive))

    def snapshot(self) -> dict:
        """The /monitor document (JSON-able; see the module docstring)."""
        with self.store.transaction() as tx:
            martingale = (
                None if self.test is None else self._state(tx, MARTINGALE, self.test.start, self.test.check_state)
            )
            adaptive = None
            if self.adaptive is not None:
                adaptive = self._state(tx, ADAPTIVE, self.adaptive.start, self.adaptive.check_state)
            totals = self._state(tx, FEEDBACK, self._feedback_start, self._check_feedback)
            recent = tx.recent_predictions(self.config.window)
            counts = tx.counts()
        adaptive = None if adaptive is None else self.adaptive.summary(adaptive)
        coverage = self._coverage(totals, adaptive)
        return {
            "shift": None if self.test is None else self.test.summary(martingale),
            "window": self._window(recent),
            "feedback": {
                "labels": totals["labels"],
                "accuracy": _share(totals["correct"], totals["labels"]),
                "coverage": coverage,
                "adaptive": adaptive,
            },
            "stored": counts,
        }

    def shift_status(self) -> dict | None:
        """The shift part of `snapshot()` alone (one read; None without a reference)."""
        if self.test is None:
            return None
        with self.store.transaction() as tx:
            return self.test.summary(self._state(tx, MARTINGALE, self.test.start, self.test.check_state))

    def reset(self) -> dict:
        """Re-arm the shift test; returns its summary (M = 1, no rows, no alarm)."""
        if self.test is None:
            raise MonitorError(
                "reset: this model file has no validation reference, so there is no shift test to re-arm"
            )
        state = self.test.start()
        with self.store.transaction() as tx:
            tx.put_state(MARTINGALE, state)
        return self.test.summary(state)

    # --- helpers ------------------------------------------------------------------------------------

    def _coverage(self, totals: dict, adaptive: dict | None) -> dict:
        """Realized coverage per level of the static sets (and the adaptive ones) over the labels so far."""
        coverage = {key: {"static": _share(totals["covered"][key], totals["labels"])} for key in self.levels}
        if adaptive is not None:
            for key in self.levels:
                coverage[key]["adaptive"] = adaptive[key]["coverage"]
        return coverage

    def _outputs(self, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
        needed = list(_NEEDED)
        if self.test is not None:
            needed.append(self.test.reference.score)
        if self.calibration is not None and self.calibration.groups:
            needed.append(self.calibration.group_score)
        missing = [name for name in needed if name not in outputs]
        if missing:
            raise MonitorError(f"outputs: expected the runtime's {', '.join(needed)}, missing {', '.join(missing)}")
        probs = np.asarray(outputs["probs"], dtype=np.float32)
        rows = len(probs)
        if probs.ndim != 2 or rows == 0 or any(len(outputs[name]) != rows for name in needed):
            raise MonitorError(f"outputs: expected {', '.join(needed)} with one entry per row, got {probs.shape} probs")
        return probs, rows

    def _check_request(self, row: int, coverage: float | None, adaptive: bool) -> None:
        if coverage is not None:
            if self.calibration is None:
                raise MonitorError(f"row {row}: coverage asked for, but this model file has no conformal calibration")
            self.calibration.threshold(coverage)  # raises ConformalError naming the stored levels
        if adaptive:
            if coverage is None:
                raise MonitorError(f"row {row}: adaptive sets need a coverage level, got none")
            if self.adaptive is None:
                raise MonitorError(
                    f"row {row}: adaptive sets need the calibration's conformity scores, which this model file "
                    "does not hold (exported before they were kept); re-export it"
                )

    def _groups(self, outputs: Mapping[str, np.ndarray], rows: int) -> np.ndarray | None:
        if self.calibration is None or not self.calibration.groups:
            return None
        return self.calibration.group_of(np.asarray(outputs[self.calibration.group_score]).reshape(rows))

    def _static_sets(self, probs: np.ndarray, key: str, groups: np.ndarray | None) -> np.ndarray:
        coverage = float(key)
        if groups is None:
            return prediction_sets(probs, self.calibration, coverage)
        thresholds = np.array([self.calibration.threshold(coverage, g) for g in range(self.calibration.groups)])
        return threshold_sets(probs, self.calibration, thresholds[groups])

    def _record(self, row, outputs, probs, i, now, served, inputs) -> PredictionRecord:
        kept = None
        if self.config.keep_inputs and inputs is not None:
            kept = np.ascontiguousarray(np.asarray(inputs[i], dtype="<f4")).tobytes()
        return PredictionRecord(
            id=row.id,
            created=now,
            predicted_class=int(outputs["predicted_class"][i]),
            confidence=float(outputs["confidence"][i]),
            mutual_information=float(outputs["mutual_information"][i]),
            abstain=bool(outputs["abstain"][i]),
            probs=probs[i],
            group=row.group,
            # the static sets' sizes are worked out from probs and group when /monitor asks (window estimates),
            # not on every request
            set_sizes=_NO_SIZES,
            served=served,
            input=kept,
        )

    def _outcome(self, record: PredictionRecord, label: int) -> dict:
        """Was the label the prediction, and in each level's static and adaptive set of its serve time."""
        probs = np.asarray(record.probs, dtype=np.float32)[None]
        covered = {}
        group = None if record.group is None else np.array([record.group])
        for key in self.levels:
            entry = {"static": bool(self._static_sets(probs, key, group)[0, label])}
            alpha = record.served.get("alpha", {}).get(key)
            if self.adaptive is not None and alpha is not None:
                entry["adaptive"] = bool(self.adaptive.sets(probs, float(alpha), group)[0, label])
            covered[key] = entry
        return {"correct": record.predicted_class == label, "covered": covered}

    def _window(self, recent: list[PredictionRecord]) -> dict:
        if not recent:
            empty = dict.fromkeys(("estimated_accuracy", "mean_mutual_information", "abstain_rate"))
            return {"rows": 0, **empty, "mean_set_size": dict.fromkeys(self.levels)}
        return {
            "rows": len(recent),
            "estimated_accuracy": float(np.mean([r.confidence for r in recent])),
            "mean_mutual_information": float(np.mean([r.mutual_information for r in recent])),
            "abstain_rate": float(np.mean([r.abstain for r in recent])),
            "mean_set_size": self._mean_set_sizes(recent),
        }

    def _mean_set_sizes(self, recent: list[PredictionRecord]) -> dict[str, float | None]:
        """Mean size of the static set at each level over `recent` rows, from their stored probabilities."""
        if self.calibration is None:
            return dict.fromkeys(self.levels)
        probs = np.stack([np.asarray(r.probs, dtype=np.float32) for r in recent])
        groups = None
        if self.calibration.groups:
            groups = np.array([0 if r.group is None else r.group for r in recent])
        return {key: float(self._static_sets(probs, key, groups).sum(axis=1).mean()) for key in self.levels}

    def _feedback_start(self) -> dict:
        """Label totals since the monitor started: labels, correct predictions, and per level the labels
        inside the static set (the adaptive sets' own totals are in the adaptive state)."""
        return {"version": _FEEDBACK_VERSION, "labels": 0, "correct": 0, "covered": dict.fromkeys(self.levels, 0)}

    def _check_feedback(self, state: dict) -> None:
        if state.get("version") != _FEEDBACK_VERSION or set(state.get("covered", ())) != set(self.levels):
            raise MonitorError(f"feedback state: expected version {_FEEDBACK_VERSION} at levels {self.levels}")

    @staticmethod
    def _state(tx, name: str, start: Callable[[], dict], check: Callable[[dict], None]) -> dict:
        state = tx.get_state(name)
        if state is None:
            return start()
        try:
            check(state)
        except (MartingaleStateError, AdaptiveStateError, MonitorError) as err:
            log.warning("state %r does not fit this monitor (%s): starting it afresh", name, err)
            return start()
        return state


def _new_ids(rows: int) -> list[str]:
    """`rows` new prediction ids, 32 hex digits each: the time in nanoseconds (one step per row), then 64
    random bits. Unique across workers and replicas by the random part; time-ordered, so the stored ids'
    unique index grows at its end instead of at random places (a uuid4 key dirtied about one index page
    per row; the commit wrote them all)."""
    start = time.time_ns()
    return [f"{start + i:016x}{secrets.token_hex(8)}" for i in range(rows)]


def _per_row(value, rows: int, name: str) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        return [value] * rows
    if len(value) != rows:
        raise MonitorError(f"{name}: expected one value per row ({rows}), got {len(value)}")
    return [None if v is None else (v.item() if isinstance(v, np.generic) else v) for v in value]


def _add_outcome(totals: dict, outcome: dict) -> dict:
    covered = {key: count + int(outcome["covered"][key]["static"]) for key, count in totals["covered"].items()}
    correct = totals["correct"] + int(outcome["correct"])
    return {**totals, "labels": totals["labels"] + 1, "correct": correct, "covered": covered}


def _share(count: int, total: int) -> float | None:
    return None if not total else count / total


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None
