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

Group-conditional (Mondrian) sets (Vovk, Gammerman, Shafer, "Algorithmic learning in a random world",
ch. 4): `calibrate(..., group_scores=u)` splits the calibration inputs into k groups at the quantiles
j/k of an uncertainty u(x) known at prediction time (a runtime output, `GROUP_SCORES`) and fits one
threshold per group and level on that group's rows. A new input gets its group's threshold, so inputs
the model is unsure of get the looser threshold of the calibration inputs like them. Within a group
the calibration rows and the new input are exchangeable: each group keeps P(y in set | group) >= 1 -
alpha, and the marginal guarantee follows (up to the edges being the calibration rows' own
quantiles, checked in tests/test_mondrian.py; edges fixed from other data make it exact). A group of n_g
rows covers, given its rows, Beta(r, n_g + 1 - r) with r = ceil((n_g + 1)(1 - alpha)); at 0.9 its 5%
quantile is 0.835 for 36 rows, 0.833 for 60, 0.862 for 180 (not monotone: 30 rows give 0.805).

The default groups are dyadic: the validation quantiles 1/2, 3/4, 7/8, ... of u split the rows into
the less uncertain half, the next quarter, the next eighth..., halving while the most uncertain
group keeps at least `MIN_TOP_ROWS` (20) rows (180 rows: 90, 45, 22, 23). Resolution goes where the
uncertainty is high, which is where shifted inputs land: on digits-C of the validation split (the
selection data; the test split and the held-out shifts were not used to choose), 90% coverage at
severity 3 / 5 rose from 0.730 / 0.409 with 5 equal groups of 36 to 0.865 / 0.722, with clean sets
still about one class (benchmarks/bench_monitoring.py has the held-out and test-split figures).
A level some group has too few rows for (at 0.99 a group needs 99: ceil((n_g + 1)(1 - alpha)) <= n_g)
is not grouped: every group takes the marginal threshold there (or its own threshold of a lower level
where that is higher, so sets stay nested), sets that contain the plain split-conformal ones and keep
their marginal guarantee, rather than sets of every class for the confident inputs of that group.
`groups=k` asks for k equal groups instead. The calibration also keeps its conformity scores
(`ConformalCalibration.scores`) for adaptive conformal inference (forde_serve.monitoring.adaptive).
Metadata without groups or scores (files written before them) reads back and gives the same sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from forde_serve._conformal_checks import (
    GROUP_SCORES,
    SCORES,
    ConformalError,
    check_count,
    check_coverage,
    check_group_scores,
    check_groups,
    check_kept_scores,
    check_labels,
    check_probs,
    check_score,
    metadata_dict,
    metadata_fields,
    sorted_pairs,
)
from forde_serve._conformal_split import MIN_TOP_ROWS, RANK_SLACK, conformal_threshold, mondrian_groups

__all__ = [
    "DEFAULT_COVERAGES",
    "GROUP_SCORES",
    "LAMBDA_GRID",
    "MIN_TOP_ROWS",
    "SCORES",
    "TOLERANCE",
    "ConformalCalibration",
    "ConformalError",
    "calibrate",
    "conformal_threshold",
    "conformity_scores",
    "prediction_sets",
    "set_coverage_and_size",
    "threshold_sets",
]

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


@dataclass(frozen=True)
class ConformalCalibration:
    """What prediction sets need: the score, its parameters and one threshold per coverage level.

    `thresholds` maps coverage (1 - alpha) to threshold (+inf: every class in every set); it is
    stored as `((coverage, threshold), ...)` sorted by coverage. `n_calibration` inputs set the
    thresholds; `n_tuning` further inputs (RAPS only) chose `k_reg` and `lam`. `scores`: the
    `n_calibration` conformity scores themselves (None in files written before they were kept),
    in calibration order, or group by group (`group_rows[0]` of group 0 first, ...) when grouped.

    Mondrian groups (None / empty: not grouped): `group_score` names the runtime output that assigns
    a group, `group_edges` are the k - 1 ascending edges (group j holds edges[j-1] <= u < edges[j]),
    `group_rows` the calibration rows of each group and `group_thresholds` each group's
    `((coverage, threshold), ...)` at the same levels as `thresholds` (which stay the marginal ones).
    """

    score: str
    thresholds: tuple[tuple[float, float], ...]
    n_calibration: int
    n_classes: int
    k_reg: int | None = None
    lam: float | None = None
    n_tuning: int = 0
    scores: tuple[float, ...] | None = None
    group_score: str | None = None
    group_edges: tuple[float, ...] = ()
    group_rows: tuple[int, ...] = ()
    group_thresholds: tuple[tuple[tuple[float, float], ...], ...] = ()
    _levels: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pairs = sorted_pairs(self.thresholds, "thresholds")
        if not pairs:
            raise ConformalError("thresholds: expected at least one coverage level, got none")
        levels = np.array([c for c, _ in pairs])
        if np.any(np.diff(levels) <= _LEVEL_MATCH):
            raise ConformalError(f"thresholds: coverage levels must differ by more than {_LEVEL_MATCH}, got {levels}")
        if self.score not in SCORES:
            raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {self.score!r}")
        check_count("n_calibration", self.n_calibration, 1)
        check_count("n_classes", self.n_classes, 2)
        check_count("n_tuning", self.n_tuning, 0)
        if self.score == "raps":
            check_score("raps", self.k_reg, self.lam)
            object.__setattr__(self, "lam", float(self.lam))
        elif self.k_reg is not None or self.lam is not None:
            raise ConformalError(f"k_reg and lam belong to the raps score only, got them with {self.score!r}")
        object.__setattr__(self, "thresholds", pairs)
        object.__setattr__(self, "_levels", levels)
        if self.scores is not None:
            object.__setattr__(self, "scores", check_kept_scores(self.scores, self.n_calibration))
        if self.group_score is not None or self.group_edges or self.group_rows or self.group_thresholds:
            edges, rows, per_group = check_groups(
                self.group_score, self.group_edges, self.group_rows, self.group_thresholds, levels, self.n_calibration
            )
            object.__setattr__(self, "group_edges", edges)
            object.__setattr__(self, "group_rows", rows)
            object.__setattr__(self, "group_thresholds", per_group)

    @property
    def coverages(self) -> tuple[float, ...]:
        """The stored coverage levels, ascending."""
        return tuple(c for c, _ in self.thresholds)

    @property
    def groups(self) -> int:
        """Mondrian groups (0: not grouped)."""
        return len(self.group_rows)

    def threshold(self, coverage: float, group: int | None = None) -> float:
        """The threshold for a stored coverage level (matched to within 1e-6): the marginal one, or
        that of Mondrian group `group` (0-based)."""
        index = self._level_index(coverage)
        if group is None:
            return self.thresholds[index][1]
        if isinstance(group, bool) or not isinstance(group, int | np.integer) or not 0 <= group < self.groups:
            raise ConformalError(f"group: expected a group index in 0..{self.groups - 1}, got {group!r}")
        return self.group_thresholds[int(group)][index][1]

    @staticmethod
    def min_group_rows(coverage: float) -> int:
        """The fewest calibration rows with a finite threshold at `coverage`: ceil((n + 1) c) <= n."""
        return math.ceil(coverage / (1 - coverage) - RANK_SLACK)

    def group_of(self, group_scores: np.ndarray) -> np.ndarray:
        """Mondrian group `[N]` (int) of inputs whose `group_score` output is `group_scores` `[N]`."""
        if not self.groups:
            raise ConformalError("group_scores: this calibration has no Mondrian groups")
        values = check_group_scores(group_scores)
        return np.searchsorted(np.array(self.group_edges), values, side="right")

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
        return ", ".join(f"{c:g}" for c in self._levels)

    def to_metadata(self) -> dict:
        """A JSON-able dict (no NaN or infinity: an infinite threshold is stored as null). Without scores
        and groups it is exactly what files written before them hold."""
        return metadata_dict(self, METADATA_VERSION)

    @classmethod
    def from_metadata(cls, metadata: dict) -> ConformalCalibration:
        """Read back what `to_metadata` wrote; a missing or malformed field is named."""
        fields = metadata_fields(metadata, METADATA_VERSION)
        try:
            return cls(**fields)
        except (ConformalError, TypeError) as err:
            raise ConformalError(f"conformal metadata: {err}") from None


def conformity_scores(
    probs: np.ndarray, labels: np.ndarray, score: str = "lac", k_reg: int | None = None, lam: float | None = None
) -> np.ndarray:
    """Each input's score `[N]` for its label `[N]` under `score`, from probabilities `[N, C]` (float64).

    lac: 1 - p_y. aps: the total probability of the classes ranked at or above y (ties in
    probability ranked by class index). raps: aps + lam * max(0, rank(y) - k_reg), rank 1-based.
    """
    probs = check_probs(probs)
    labels = check_labels(labels, probs)
    check_score(score, k_reg, lam)
    if score == "lac":
        return 1.0 - probs[np.arange(len(labels)), labels]
    order = np.argsort(-probs, axis=1, kind="stable")  # [N, C]: rank -> class
    cumulative = _ranked_scores(np.take_along_axis(probs, order, axis=1), k_reg, lam)
    rank_of_label = np.argmax(order == labels[:, None], axis=1)  # 0-based
    return cumulative[np.arange(len(labels)), rank_of_label]


def calibrate(
    probs: np.ndarray,
    labels: np.ndarray,
    score: str = "lac",
    coverages: Iterable[float] = DEFAULT_COVERAGES,
    k_reg: int | None = None,
    lam: float | None = None,
    tuning_coverage: float = 0.9,
    group_scores: np.ndarray | None = None,
    groups: int | None = None,
    group_score: str = "mutual_information",
) -> ConformalCalibration:
    """Split conformal calibration on held-out probabilities `[N, C]` and labels `[N]`.

    One threshold per level in `coverages`. For `raps`, a `k_reg` or `lam` left as None is chosen
    as Angelopoulos et al. (2021) do, on a tuning part of the calibration inputs (20%, a fixed
    pseudo-random choice of rows) that is then left out of the thresholds: k_reg is the
    `tuning_coverage` quantile (numpy's "higher" rule) of the true labels' 1-based ranks, and lam
    the value in `LAMBDA_GRID` whose sets at `tuning_coverage`, calibrated and measured on the
    tuning part, are smallest on average (the smaller lam on a tie). One (k_reg, lam) serves every
    level, so the sets of a higher level contain those of a lower one.

    With `group_scores` `[N]` (the runtime output `group_score` of the same inputs), also Mondrian
    thresholds: `groups` equal groups at the quantiles j / groups of those scores, or (None) the dyadic
    groups of the module docstring; one group is the plain calibration. The conformity scores are kept.
    """
    probs = check_probs(probs)
    labels = check_labels(labels, probs)
    levels = [check_coverage(c) for c in coverages]
    if score not in SCORES:
        raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if score != "raps" and (k_reg is not None or lam is not None):
        raise ConformalError(f"k_reg and lam belong to the raps score only, got them with {score!r}")
    if group_scores is not None:
        group_scores = check_group_scores(group_scores, len(labels))
    n_tuning = 0
    if score == "raps" and (k_reg is None or lam is None):
        check_coverage(tuning_coverage)
        if k_reg is not None:
            check_count("k_reg", k_reg, 0)
        if lam is not None:
            check_score("raps", 0, lam)
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
        group_scores = None if group_scores is None else group_scores[rows]
    scores = conformity_scores(probs, labels, score, k_reg, lam)
    levels = tuple(dict.fromkeys(levels))
    grouped = {} if group_scores is None else mondrian_groups(scores, group_scores, groups, group_score, levels)
    if grouped:  # kept group by group, so adaptive sets can re-threshold each group's own scores
        member = np.searchsorted(np.array(grouped["group_edges"]), group_scores, side="right")
        scores = scores[np.argsort(member, kind="stable")]
    return ConformalCalibration(
        score=score,
        thresholds=tuple((c, conformal_threshold(scores, c)) for c in levels),
        n_calibration=len(labels),
        n_classes=probs.shape[1],
        k_reg=None if k_reg is None else int(k_reg),
        lam=lam,
        n_tuning=n_tuning,
        scores=tuple(float(s) for s in scores),
        **grouped,
    )


def prediction_sets(
    probs: np.ndarray, calibration: ConformalCalibration, coverage: float, group_scores: np.ndarray | None = None
) -> np.ndarray:
    """Boolean prediction sets `[N, C]` for probabilities `[N, C]` at a stored `coverage` level.

    With a grouped (Mondrian) calibration and `group_scores` `[N]` (the inputs' `group_score`
    output), each input gets its group's threshold; otherwise the marginal threshold (a calibration
    without groups ignores `group_scores`). Vectorized over rows; the module docstring gives the rule.
    """
    threshold = calibration.threshold(coverage)
    probs = _check_columns(probs, calibration)
    if calibration.groups and group_scores is not None:
        group = calibration.group_of(check_group_scores(group_scores, len(probs)))
        index = calibration._level_index(coverage)
        per_group = np.array([pairs[index][1] for pairs in calibration.group_thresholds])
        return _sets(probs, calibration.score, per_group[group], calibration.k_reg, calibration.lam)
    return _sets(probs, calibration.score, threshold, calibration.k_reg, calibration.lam)


def threshold_sets(probs: np.ndarray, calibration: ConformalCalibration, thresholds: float | np.ndarray) -> np.ndarray:
    """Boolean sets `[N, C]` of probabilities `[N, C]` under `calibration`'s score at any threshold:
    one number, or one per input `[N]` (+inf: every class). For thresholds that are not stored ones,
    e.g. adaptive conformal inference's."""
    probs = _check_columns(probs, calibration)
    values = np.asarray(thresholds, dtype=np.float64)
    if values.ndim not in (0, 1) or (values.ndim == 1 and values.shape != (len(probs),)) or np.isnan(values).any():
        raise ConformalError(f"thresholds: expected a number or one per input ({len(probs)}), got {thresholds!r}")
    if (values == -math.inf).any():
        raise ConformalError("thresholds: expected numbers or +infinity, got -infinity")
    return _sets(
        probs, calibration.score, float(values) if values.ndim == 0 else values, calibration.k_reg, calibration.lam
    )


def set_coverage_and_size(sets: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(share of inputs whose set holds their label, mean number of classes per set) for sets `[N, C]`."""
    sets = np.asarray(sets)
    if sets.ndim != 2 or sets.shape[0] == 0 or sets.dtype != np.bool_:
        raise ConformalError(
            f"sets: expected a boolean array [inputs, classes] with inputs, got {sets.dtype} {sets.shape}"
        )
    labels = check_labels(labels, sets)
    covered = sets[np.arange(len(labels)), labels]
    return float(covered.mean()), float(sets.sum(axis=1).mean())


def _ranked_scores(sorted_probs: np.ndarray, k_reg: int | None, lam: float | None) -> np.ndarray:
    """APS/RAPS score of every rank `[N, C]` from probabilities sorted in decreasing order."""
    cumulative = np.cumsum(sorted_probs, axis=1)
    if lam:
        ranks = np.arange(1, sorted_probs.shape[1] + 1)
        cumulative += lam * np.maximum(0, ranks - k_reg)
    return cumulative


def _sets(
    probs: np.ndarray, score: str, threshold: float | np.ndarray, k_reg: int | None, lam: float | None
) -> np.ndarray:
    """Sets `[N, C]` at one threshold (a float) or one per row (`[N]`; +inf: every class)."""
    if np.ndim(threshold) == 1:
        every = np.isinf(threshold)
        threshold = np.where(every, 0.0, threshold)[:, None]  # those rows are overwritten below
    elif math.isinf(threshold):
        return np.ones(probs.shape, dtype=bool)
    else:
        every = None
    if score == "lac":
        sets = ((1.0 - probs) - threshold) <= TOLERANCE
    else:
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
    if every is not None:
        sets[every] = True
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


def _check_columns(probs: np.ndarray, calibration: ConformalCalibration) -> np.ndarray:
    probs = check_probs(probs)
    if probs.shape[1] != calibration.n_classes:
        raise ConformalError(
            f"probs: the calibration is for {calibration.n_classes} classes, got {probs.shape[1]} columns"
        )
    return probs
