"""Adaptive conformal inference (Gibbs & Candes, "Adaptive conformal inference under distribution
shift", NeurIPS 2021): prediction sets that keep their long-run coverage when labels come back,
whatever the traffic does.

Per coverage level 1 - alpha the monitor keeps alpha_t. The set served at time t is the split
conformal set at threshold Quantile_{1 - alpha_t} of the calibration conformity scores (the
ceil((n + 1)(1 - alpha_t))-th smallest, as `forde_serve.conformal.conformal_threshold`, so alpha_t
= alpha gives exactly the static set): every class when alpha_t <= 0 (or when that rank exceeds n),
the empty set when alpha_t >= 1. With a Mondrian (grouped) calibration the quantile is that of the
row's own group's scores (one alpha_t per level still): the bound below needs only sets that shrink
as alpha_t grows, all classes at alpha_t <= 0 and none at alpha_t >= 1, which holds group by group,
and the shifted rows start from their group's looser threshold. Measured on digits-C, this reached
the coverage with smaller sets than the marginal quantile (benchmarks/bench_monitoring.py).

When the label of a row arrives, err = 1 if it was outside the set
served for that row (judged with the alpha_t stored with the row at serve time), and

    alpha <- alpha + gamma (alpha_target - err).

Labels arrive late and out of order: the updates are applied in the order the labels ARRIVE, each
judged on the set of its own serve time. For any sequence of labels whatsoever, after T of them
(telescoping the updates),

    (1/T) sum_t err_t - alpha_target = (alpha_1 - alpha_{T+1}) / (gamma T),

and alpha_t stays in [-gamma (1 + d), 1 + gamma (1 + d)], where d is the largest number of labelled
rows that were in flight at once (served, label not yet arrived): a label served at alpha < 1 can
still push alpha up after it has crossed 1, but only the d in flight can. Hence

    |(1/T) sum_t err_t - alpha_target| <= (max(alpha_1, 1 - alpha_1) + gamma (1 + d)) / (gamma T),

which is Gibbs & Candes's bound (max(alpha_1, 1 - alpha_1) + gamma) / (gamma T) when every label
comes back before the next row is served (d = 0). Rows whose labels never arrive do not count.

Forged labels. Each label moves alpha by gamma |alpha_target - err| < gamma, so n forged labels move
every alpha_t by less than n * gamma. The monitor counts a row's label once: the first one stands.

gamma: larger adapts faster and jitters more (a few misses in a row drive alpha_t below 0: every
class). The default 0.01 is the smallest of 0.005 / 0.01 / 0.02 / 0.05 whose lowest coverage over the
22 development streams (digits-C severity 3 and 5, 360 rows each, labels fed back after each row) was
at least 0.875 with the Mondrian calibration: 0.878 (mean 0.888, mean set size 4.4; 0.05 gave 0.894
at size 5.1). With a plain calibration the same rule picks 0.02 (0.886; 0.01 gave 0.872).
(benchmarks/bench_monitoring.py, `adaptive_gamma`.)
"""

from __future__ import annotations

import math

import numpy as np

from forde_serve.conformal import ConformalCalibration, threshold_sets
from forde_serve.errors import FordeError

__all__ = ["DEFAULT_GAMMA", "AdaptiveSets", "AdaptiveStateError", "level_key"]

DEFAULT_GAMMA = 0.01
STATE_VERSION = 1
_RANK_SLACK = 1e-9  # as forde_serve.conformal's: (n + 1)(1 - alpha) computed in floats


class AdaptiveStateError(FordeError, ValueError):
    """An adaptive-conformal setting or stored state that cannot be used (the message says which)."""


def level_key(coverage: float) -> str:
    """A coverage level as the monitor's documents spell it: 0.9 -> "0.9"."""
    return f"{float(coverage):g}"


class AdaptiveSets:
    """Adaptive sets over one calibration, one alpha_t per stored coverage level.

    The state is a JSON-able dict kept by the caller: `start()`, `update(state, level, covered)`.
    """

    def __init__(self, calibration: ConformalCalibration, gamma: float = DEFAULT_GAMMA):
        if calibration.scores is None:
            raise AdaptiveStateError(
                "calibration: adaptive sets re-threshold the calibration conformity scores, and this model "
                "file's conformal metadata has none (exported before they were kept); re-export the model"
            )
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 < gamma <= 1.0:
            raise AdaptiveStateError(f"gamma: expected a step size in (0, 1], got {gamma!r}")
        self.calibration = calibration
        self.gamma = float(gamma)
        self.levels = {level_key(c): c for c in calibration.coverages}
        scores = np.array(calibration.scores)
        self._sorted = [np.sort(scores)]  # [the marginal scores] or one sorted array per group
        if calibration.groups:
            self._sorted = [np.sort(part) for part in np.split(scores, np.cumsum(calibration.group_rows)[:-1])]

    def start(self) -> dict:
        """Every alpha_t at its target 1 - coverage, no labels yet."""
        return {
            "version": STATE_VERSION,
            "gamma": self.gamma,
            "levels": {key: {"alpha": 1.0 - c, "labels": 0, "errors": 0} for key, c in self.levels.items()},
        }

    def alphas(self, state: dict) -> dict[str, float]:
        """The current alpha_t of every level."""
        self.check_state(state)
        return {key: float(state["levels"][key]["alpha"]) for key in self.levels}

    def threshold(self, alpha: float, group: int | None = None) -> float:
        """The score threshold at alpha_t (of Mondrian `group`'s scores when the calibration is grouped):
        +inf (every class) for alpha_t <= 0, -inf (the empty set) for alpha_t >= 1, else the
        ceil((n + 1)(1 - alpha_t))-th smallest of the n calibration scores."""
        if alpha <= 0.0:
            return math.inf
        if alpha >= 1.0:
            return -math.inf
        scores = self._sorted[self._group(group)]
        n = len(scores)
        rank = math.ceil((n + 1) * (1.0 - alpha) - _RANK_SLACK)
        if rank > n:
            return math.inf
        if rank < 1:
            return -math.inf
        return float(scores[rank - 1])

    def sets(self, probs: np.ndarray, alpha: float, groups: np.ndarray | None = None) -> np.ndarray:
        """The adaptive sets `[N, C]` (bool) of probabilities `[N, C]` at alpha_t; `groups` `[N]`: the
        rows' Mondrian groups, needed when the calibration is grouped."""
        rows = np.shape(probs)[0]
        if self.calibration.groups:
            if groups is None or np.shape(groups) != (rows,):
                raise AdaptiveStateError(
                    f"groups: a grouped calibration needs each row's group ({rows}), got {groups!r}"
                )
            by_group = np.array([self.threshold(alpha, g) for g in range(self.calibration.groups)])
            thresholds = by_group[np.asarray(groups, dtype=np.int64)]
        else:
            thresholds = np.full(rows, self.threshold(alpha))
        empty = thresholds == -math.inf
        sets = threshold_sets(probs, self.calibration, np.where(empty, 0.0, thresholds))
        sets[empty] = False
        return sets

    def _group(self, group: int | None) -> int:
        if not self.calibration.groups:
            if group is not None:
                raise AdaptiveStateError(f"group: this calibration has no Mondrian groups, got {group!r}")
            return 0
        if isinstance(group, bool) or not isinstance(group, int | np.integer) or not 0 <= group < len(self._sorted):
            raise AdaptiveStateError(f"group: expected a group index in 0..{len(self._sorted) - 1}, got {group!r}")
        return int(group)

    def update(self, state: dict, level: str, covered: bool) -> dict:
        """The state after one label at `level` ("0.9") whose served set did (not) hold it; `state` is
        not modified."""
        self.check_state(state)
        if level not in self.levels:
            raise AdaptiveStateError(f"level: expected one of {', '.join(self.levels)}, got {level!r}")
        entry = dict(state["levels"][level])
        err = 0.0 if covered else 1.0
        entry["alpha"] = float(entry["alpha"]) + self.gamma * ((1.0 - self.levels[level]) - err)
        entry["labels"] = int(entry["labels"]) + 1
        entry["errors"] = int(entry["errors"]) + int(err)
        return {**state, "levels": {**state["levels"], level: entry}}

    def summary(self, state: dict) -> dict:
        """Per level: alpha_t, its score thresholds (one per Mondrian group, or one; None when the sets
        hold every class or none, which `every_class` / `empty` say), the labels judged and the
        adaptive sets' realized coverage."""
        self.check_state(state)
        out = {}
        for key in self.levels:
            entry = state["levels"][key]
            groups = range(self.calibration.groups) if self.calibration.groups else [None]
            thresholds = [self.threshold(entry["alpha"], g) for g in groups]
            out[key] = {
                "alpha": entry["alpha"],
                "thresholds": [t if math.isfinite(t) else None for t in thresholds],
                "every_class": [t == math.inf for t in thresholds],
                "empty": [t == -math.inf for t in thresholds],
                "labels": entry["labels"],
                "coverage": None if not entry["labels"] else 1.0 - entry["errors"] / entry["labels"],
            }
        return out

    def check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise AdaptiveStateError(f"adaptive state: expected version {STATE_VERSION}, got {got!r}")
        levels = state.get("levels")
        if not isinstance(levels, dict) or set(levels) != set(self.levels):
            raise AdaptiveStateError(
                f"adaptive state: expected the levels {', '.join(self.levels)}, got {sorted(levels or ())}"
            )
