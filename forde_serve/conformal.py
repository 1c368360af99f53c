"""Split conformal prediction sets over (calibrated) ensemble probabilities, in numpy.

A score s(x, c) says how unusual class c is for input x. On n held-out calibration inputs the
threshold for coverage 1 - alpha is the ceil((n + 1)(1 - alpha))-th smallest of the true-class
scores; a new input's set is then (essentially) {c : s(x, c) <= threshold}, and it holds the true
class with probability at least 1 - alpha whenever the calibration and new inputs are exchangeable.

Scores, on `probs` `[N, C]` (classes ranked by decreasing probability, ties by class index):

- `lac` (Sadinle, Lei, Wasserman 2019): 1 - p_c.
- `aps` (Romano, Sesia, Candes 2020, not randomized): the probability mass of the classes ranked
  at or above c.
- `raps` (Angelopoulos, Bates, Malik, Jordan 2021, not randomized): aps + lambda * max(0, rank(c) - k_reg),
  rank 1-based.

The conventions match MAPIE 1.x's split conformal classifier (checked in tests/test_conformal.py),
tolerance included (`TOLERANCE`, MAPIE's EPSILON): a LAC set is {c : 1 - p_c <= t + 1e-8} and may
be empty (no class reaches probability 1 - t); an APS/RAPS set runs down the ranking up to and
including the first class whose score reaches t - 1e-8 (so it is never empty), plus every class
whose probability is within 1e-8 of that last one's (a set never splits tied classes), where a last
class below 1e-8 probability is replaced by the least probable class at or above 1e-8. Every class
whose score is at most t is therefore in the set, unless its probability is below 1e-8: the sets
are valid, and APS/RAPS ones a little conservative. A threshold of +infinity (too few calibration
inputs for the level) puts every class in every set.

MAPIE randomizes the APS/RAPS calibration scores (subtracting u * p_y, u uniform); these are the
published non-randomized scores, so thresholds are reproducible and sets nested across levels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from forde_serve.errors import FordeError

__all__ = [
    "DEFAULT_COVERAGES",
    "LAMBDA_GRID",
    "SCORES",
    "TOLERANCE",
    "ConformalCalibration",
    "ConformalError",
    "calibrate",
    "conformal_threshold",
    "conformity_scores",
    "prediction_sets",
    "set_coverage_and_size",
]

SCORES = ("lac", "aps", "raps")
DEFAULT_COVERAGES = (0.8, 0.9, 0.95, 0.99)
TOLERANCE = 1e-8  # MAPIE's EPSILON: float noise in probabilities and their sums
LAMBDA_GRID = (0.001, 0.01, 0.1, 0.2, 0.5)  # Angelopoulos et al. 2021's grid for lambda
METADATA_VERSION = 1

# RAPS with k_reg or lambda left to the data: this share of the calibration inputs (MAPIE's
# size_raps default) picks them and is then left out of the threshold, so the threshold is
# computed on inputs the score was not tuned on and stays valid. The rows are a fixed
# pseudo-random permutation (seed below), not the first rows: calibration data sorted by class
# would otherwise give a tuning part and a threshold part that are not exchangeable.
_TUNING_SHARE = 0.2
_TUNING_SEED = 20210101
_LEVEL_MATCH = 1e-6  # a requested coverage matches a stored one this close (0.9 vs 0.90000001)
_RANK_SLACK = 1e-9  # (n + 1) * coverage computed in floats: 0.9 * 10 must give rank 9, not 10
_PROBABILITY_SLACK = 1e-5  # float32 softmax outputs may exceed 1 by a few ulps (1.19e-7 each)


class ConformalError(FordeError, ValueError):
    """Probabilities, labels, a coverage level or calibration metadata that cannot be used."""


@dataclass(frozen=True)
class ConformalCalibration:
    """What prediction sets need: the score, its parameters and one threshold per coverage level.

    `thresholds` maps coverage (1 - alpha) to threshold (+inf: every class in every set); it is
    stored as `((coverage, threshold), ...)` sorted by coverage. `n_calibration` inputs set the
    thresholds; `n_tuning` further inputs (RAPS only) chose `k_reg` and `lam`.
    """

    score: str
    thresholds: tuple[tuple[float, float], ...]
    n_calibration: int
    n_classes: int
    k_reg: int | None = None
    lam: float | None = None
    n_tuning: int = 0
    _levels: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pairs = self.thresholds.items() if isinstance(self.thresholds, Mapping) else self.thresholds
        pairs = tuple(sorted((_check_coverage(c), _check_threshold(t)) for c, t in pairs))
        if not pairs:
            raise ConformalError("thresholds: expected at least one coverage level, got none")
        levels = np.array([c for c, _ in pairs])
        if np.any(np.diff(levels) <= _LEVEL_MATCH):
            raise ConformalError(f"thresholds: coverage levels must differ by more than {_LEVEL_MATCH}, got {levels}")
        if self.score not in SCORES:
            raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {self.score!r}")
        _check_count("n_calibration", self.n_calibration, 1)
        _check_count("n_classes", self.n_classes, 2)
        _check_count("n_tuning", self.n_tuning, 0)
        if self.score == "raps":
            _check_score("raps", self.k_reg, self.lam)
            object.__setattr__(self, "lam", float(self.lam))
        elif self.k_reg is not None or self.lam is not None:
            raise ConformalError(f"k_reg and lam belong to the raps score only, got them with {self.score!r}")
        object.__setattr__(self, "thresholds", pairs)
        object.__setattr__(self, "_levels", levels)

    @property
    def coverages(self) -> tuple[float, ...]:
        """The stored coverage levels, ascending."""
        return tuple(c for c, _ in self.thresholds)

    def threshold(self, coverage: float) -> float:
        """The threshold for a stored coverage level (matched to within 1e-6)."""
        return self.thresholds[self._level_index(coverage)][1]

    def _level_index(self, coverage: float) -> int:
        if isinstance(coverage, bool) or not isinstance(coverage, int | float | np.floating):
            raise ConformalError(f"coverage: expected one of {self._level_list()}, got {coverage!r}")
        value = float(coverage)
        index = int(np.argmin(np.abs(self._levels - value)))
        if abs(self._levels[index] - value) > _LEVEL_MATCH:
            raise ConformalError(
                f"coverage: this model is calibrated for {self._level_list()}, got {coverage!r}; ask for one of those"
            )
        return index

    def _level_list(self) -> str:
        return ", ".join(f"{c:g}" for c in self.coverages)

    def to_metadata(self) -> dict:
        """A JSON-able dict (no NaN or infinity: an infinite threshold is stored as null)."""
        return {
            "version": METADATA_VERSION,
            "score": self.score,
            "k_reg": self.k_reg,
            "lambda": self.lam,
            "n_calibration": self.n_calibration,
            "n_tuning": self.n_tuning,
            "n_classes": self.n_classes,
            "thresholds": [{"coverage": c, "threshold": None if math.isinf(t) else t} for c, t in self.thresholds],
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> ConformalCalibration:
        """Read back what `to_metadata` wrote; a missing or malformed field is named."""
        if not isinstance(metadata, dict):
            raise ConformalError(f"conformal metadata: expected a JSON object, got {type(metadata).__name__}")
        if metadata.get("version") != METADATA_VERSION:
            raise ConformalError(
                f"conformal metadata field 'version': this forde_serve reads {METADATA_VERSION}, "
                f"got {metadata.get('version')!r}; upgrade forde-serve or re-export the model"
            )
        rows = metadata.get("thresholds")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ConformalError(f"conformal metadata field 'thresholds': expected a list of objects, got {rows!r}")
        pairs = []
        for row in rows:
            if set(row) != {"coverage", "threshold"}:
                raise ConformalError(
                    f"conformal metadata field 'thresholds': expected rows with coverage and threshold, got {row!r}"
                )
            threshold = math.inf if row["threshold"] is None else row["threshold"]
            pairs.append((row["coverage"], threshold))
        try:
            return cls(
                score=metadata.get("score"),
                thresholds=tuple(pairs),
                n_calibration=metadata.get("n_calibration"),
                n_classes=metadata.get("n_classes"),
                k_reg=metadata.get("k_reg"),
                lam=metadata.get("lambda"),
                n_tuning=metadata.get("n_tuning"),
            )
        except ConformalError as err:
            raise ConformalError(f"conformal metadata: {err}") from None


def conformity_scores(
    probs: np.ndarray, labels: np.ndarray, score: str = "lac", k_reg: int | None = None, lam: float | None = None
) -> np.ndarray:
    """Each input's score `[N]` for its label `[N]` under `score`, from probabilities `[N, C]` (float64).

    lac: 1 - p_y. aps: the total probability of the classes ranked at or above y (ties in
    probability ranked by class index). raps: aps + lam * max(0, rank(y) - k_reg), rank 1-based.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    _check_score(score, k_reg, lam)
    if score == "lac":
        return 1.0 - probs[np.arange(len(labels)), labels]
    order = np.argsort(-probs, axis=1, kind="stable")  # [N, C]: rank -> class
    cumulative = _ranked_scores(np.take_along_axis(probs, order, axis=1), k_reg, lam)
    rank_of_label = np.argmax(order == labels[:, None], axis=1)  # 0-based
    return cumulative[np.arange(len(labels)), rank_of_label]


def conformal_threshold(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest of n calibration `scores`; +inf when that rank exceeds n.

    Equals numpy's quantile at level ceil((n + 1) * coverage) / n with method "lower" (MAPIE's
    rule). The rank is computed as the decimal level means it: 0.9 with n = 9 gives rank 9.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConformalError("scores: expected at least one calibration score, got none")
    if not np.isfinite(scores).all():
        raise ConformalError("scores: expected finite numbers, got NaN or infinity")
    n = scores.size
    rank = math.ceil((n + 1) * _check_coverage(coverage) - _RANK_SLACK)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def calibrate(
    probs: np.ndarray,
    labels: np.ndarray,
    score: str = "lac",
    coverages: Iterable[float] = DEFAULT_COVERAGES,
    k_reg: int | None = None,
    lam: float | None = None,
    tuning_coverage: float = 0.9,
) -> ConformalCalibration:
    """Split conformal calibration on held-out probabilities `[N, C]` and labels `[N]`.

    One threshold per level in `coverages`. For `raps`, a `k_reg` or `lam` left as None is chosen
    as Angelopoulos et al. (2021) do, on a tuning part of the calibration inputs (20%, a fixed
    pseudo-random choice of rows) that is then left out of the thresholds: k_reg is the
    `tuning_coverage` quantile (numpy's "higher" rule) of the true labels' 1-based ranks, and lam
    the value in `LAMBDA_GRID` whose sets at `tuning_coverage`, calibrated and measured on the
    tuning part, are smallest on average (the smaller lam on a tie). One (k_reg, lam) serves every
    level, so the sets of a higher level contain those of a lower one.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs)
    levels = [_check_coverage(c) for c in coverages]
    if score not in SCORES:
        raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if score != "raps" and (k_reg is not None or lam is not None):
        raise ConformalError(f"k_reg and lam belong to the raps score only, got them with {score!r}")
    n_tuning = 0
    if score == "raps" and (k_reg is None or lam is None):
        _check_coverage(tuning_coverage)
        if k_reg is not None:
            _check_count("k_reg", k_reg, 0)
        if lam is not None:
            _check_score("raps", 0, lam)
        n = len(labels)
        n_tuning = math.ceil(_TUNING_SHARE * n)
        if n - n_tuning < 1:
            raise ConformalError(
                f"probs: RAPS picks k_reg and lam on {_TUNING_SHARE:.0%} of the calibration inputs and sets "
                f"the thresholds on the rest, so it needs at least 2 inputs, got {n}; or give k_reg and lam"
            )
        rows = np.random.default_rng(_TUNING_SEED).permutation(n)
        tune, rows = rows[:n_tuning], np.sort(rows[n_tuning:])
        k_reg, lam = _tune_raps(probs[tune], labels[tune], k_reg, lam, tuning_coverage)
        probs, labels = probs[rows], labels[rows]
    scores = conformity_scores(probs, labels, score, k_reg, lam)
    return ConformalCalibration(
        score=score,
        thresholds=tuple((c, conformal_threshold(scores, c)) for c in dict.fromkeys(levels)),
        n_calibration=len(labels),
        n_classes=probs.shape[1],
        k_reg=None if k_reg is None else int(k_reg),
        lam=lam,
        n_tuning=n_tuning,
    )


def prediction_sets(probs: np.ndarray, calibration: ConformalCalibration, coverage: float) -> np.ndarray:
    """Boolean prediction sets `[N, C]` for probabilities `[N, C]` at a stored `coverage` level.

    Vectorized over rows (one sort of `[N, C]`); the module docstring gives the exact rule.
    """
    threshold = calibration.threshold(coverage)
    probs = _check_probs(probs)
    if probs.shape[1] != calibration.n_classes:
        raise ConformalError(
            f"probs: the calibration is for {calibration.n_classes} classes, got {probs.shape[1]} columns"
        )
    return _sets(probs, calibration.score, threshold, calibration.k_reg, calibration.lam)


def set_coverage_and_size(sets: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(share of inputs whose set holds their label, mean number of classes per set) for sets `[N, C]`."""
    sets = np.asarray(sets)
    if sets.ndim != 2 or sets.shape[0] == 0 or sets.dtype != np.bool_:
        raise ConformalError(
            f"sets: expected a boolean array [inputs, classes] with inputs, got {sets.dtype} {sets.shape}"
        )
    labels = _check_labels(labels, sets)
    covered = sets[np.arange(len(labels)), labels]
    return float(covered.mean()), float(sets.sum(axis=1).mean())


def _ranked_scores(sorted_probs: np.ndarray, k_reg: int | None, lam: float | None) -> np.ndarray:
    """APS/RAPS score of every rank `[N, C]` from probabilities sorted in decreasing order."""
    cumulative = np.cumsum(sorted_probs, axis=1)
    if lam:
        ranks = np.arange(1, sorted_probs.shape[1] + 1)
        cumulative += lam * np.maximum(0, ranks - k_reg)
    return cumulative


def _sets(probs: np.ndarray, score: str, threshold: float, k_reg: int | None, lam: float | None) -> np.ndarray:
    if math.isinf(threshold):
        return np.ones(probs.shape, dtype=bool)
    if score == "lac":
        return ((1.0 - probs) - threshold) <= TOLERANCE
    rows = np.arange(len(probs))
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    reached = (_ranked_scores(sorted_probs, k_reg, lam) - threshold) >= -TOLERANCE  # [N, C] by rank
    last = np.argmax(reached, axis=1)  # first rank whose score reaches the threshold
    last_prob = sorted_probs[rows, last]
    # A near-zero last class would make "within 1e-8 of it" take in every class: fall back to the
    # least probable class that is not near zero (MAPIE does the same).
    near_zero = last_prob <= TOLERANCE
    if near_zero.any():
        smallest_real = np.where(probs >= TOLERANCE, probs, np.inf).min(axis=1)
        last_prob = np.where(near_zero, smallest_real, last_prob)
    sets = (probs - last_prob[:, None]) >= -TOLERANCE
    # No rank reaches the threshold: every class scores below it.
    sets[~reached.any(axis=1)] = True
    return sets


def _tune_raps(
    probs: np.ndarray, labels: np.ndarray, k_reg: int | None, lam: float | None, coverage: float
) -> tuple[int, float]:
    if k_reg is None:
        order = np.argsort(-probs, axis=1, kind="stable")
        ranks = np.argmax(order == labels[:, None], axis=1) + 1
        k_reg = int(np.quantile(ranks, coverage, method="higher"))
    if lam is None:
        best_size = math.inf
        for candidate in LAMBDA_GRID:
            threshold = conformal_threshold(conformity_scores(probs, labels, "raps", k_reg, candidate), coverage)
            size = _sets(probs, "raps", threshold, k_reg, candidate).sum(axis=1).mean()
            if size < best_size - TOLERANCE:
                lam, best_size = candidate, size
    return k_reg, float(lam)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ConformalError(
            f"probs: expected an array [inputs, classes] with inputs and 2+ classes, got {probs.shape}"
        )
    if not np.issubdtype(probs.dtype, np.floating):
        raise ConformalError(f"probs: expected floating-point probabilities, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.isfinite(probs).all() or probs.min() < 0.0 or probs.max() > 1.0 + _PROBABILITY_SLACK:
        raise ConformalError("probs: expected probabilities in [0, 1], got NaN, infinity or values outside")
    return probs


def _check_labels(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    inputs, classes = probs.shape
    if labels.shape != (inputs,):
        raise ConformalError(f"labels: expected shape ({inputs},) to match the probabilities, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConformalError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ConformalError(
            f"labels: expected class indices in 0..{classes - 1}, got values from {labels.min()} to {labels.max()}"
        )
    return labels.astype(np.intp)


def _check_score(score: str, k_reg: int | None, lam: float | None) -> None:
    if score not in SCORES:
        raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if score == "raps":
        _check_count("k_reg", k_reg, 0)
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not (math.isfinite(lam) and lam >= 0):
            raise ConformalError(f"lam: RAPS needs a finite number >= 0, got {lam!r}")


def _check_coverage(coverage: float) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, int | float | np.floating):
        raise ConformalError(f"coverage: expected a number strictly between 0 and 1, got {coverage!r}")
    if not 0.0 < coverage < 1.0:
        raise ConformalError(f"coverage: expected a number strictly between 0 and 1, got {coverage!r}")
    return float(coverage)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating) or math.isnan(threshold):
        raise ConformalError(f"threshold: expected a number (or +infinity), got {threshold!r}")
    if threshold == -math.inf:
        raise ConformalError("threshold: expected a number (or +infinity), got -infinity")
    return float(threshold)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConformalError(f"{name}: expected an integer >= {minimum}, got {value!r}")
