"""The split-conformal quantile and the Mondrian (group-conditional) thresholds built on it; the
rules are written out in `forde_serve.conformal`'s docstring, which re-exports `conformal_threshold`."""

from __future__ import annotations

import math

import numpy as np

from forde_serve._conformal_checks import GROUP_SCORES, ConformalError, check_count, check_coverage

__all__ = ["MIN_TOP_ROWS", "RANK_SLACK", "conformal_threshold", "mondrian_groups"]

MIN_TOP_ROWS = 20  # the dyadic default's most uncertain group keeps at least this many calibration rows
RANK_SLACK = 1e-9  # (n + 1) * coverage computed in floats: 0.9 * 10 must give rank 9, not 10


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
    rank = math.ceil((n + 1) * check_coverage(coverage) - RANK_SLACK)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def mondrian_groups(
    scores: np.ndarray, group_scores: np.ndarray, groups: int | None, group_score: str, levels: tuple[float, ...]
) -> dict:
    """Mondrian fields of a ConformalCalibration for calibration `scores` `[N]` and the inputs' `group_scores`
    `[N]` (empty: one group, i.e. not grouped); `groups` None: the dyadic default (forde_serve.conformal)."""
    n = len(scores)
    if groups is None:  # dyadic: the most uncertain half, then quarter, then eighth... each its own group
        quantiles = []
        while n * (1 - (quantiles[-1] if quantiles else 0.0)) / 2 >= MIN_TOP_ROWS:
            quantiles.append(1 - (1 - (quantiles[-1] if quantiles else 0.0)) / 2)
        groups = len(quantiles) + 1
    else:
        check_count("groups", groups, 1)
        quantiles = list(np.arange(1, groups) / groups)
    if groups > n:
        raise ConformalError(f"groups: expected at most one group per calibration input ({n}), got {groups}")
    if group_score not in GROUP_SCORES:
        raise ConformalError(f"group_score: expected one of {', '.join(GROUP_SCORES)}, got {group_score!r}")
    if groups == 1:
        return {}
    edges = np.quantile(group_scores, quantiles)
    member = np.searchsorted(edges, group_scores, side="right")
    rows = np.bincount(member, minlength=groups)
    if np.any(np.diff(edges) <= 0) or rows.min() == 0:
        raise ConformalError(
            f"group_scores: too many equal values to split {n} inputs into {groups} groups "
            f"(rows per group {rows.tolist()}); ask for fewer groups"
        )
    per_group = [[conformal_threshold(scores[member == g], c) for c in levels] for g in range(groups)]
    for j, c in enumerate(levels):
        if any(math.isinf(thresholds[j]) for thresholds in per_group):
            # A group too small for this level would put every class in every set of its inputs, the
            # confident ones included: at this level each group takes the marginal threshold, or its
            # own threshold of a lower level where that is higher, so sets stay nested across levels
            # and contain the plain split-conformal sets (whose marginal guarantee they keep).
            marginal = conformal_threshold(scores, c)
            for thresholds in per_group:
                lower = [t for level, t in zip(levels, thresholds, strict=True) if level < c and math.isfinite(t)]
                thresholds[j] = max([marginal, *lower])
    return {
        "group_score": group_score,
        "group_edges": tuple(float(e) for e in edges),
        "group_rows": tuple(int(r) for r in rows),
        "group_thresholds": tuple(tuple(zip(levels, thresholds, strict=True)) for thresholds in per_group),
    }
