"""Input checks of `forde_serve.conformal` (probabilities, labels, levels, thresholds, metadata rows),
kept apart so the conformal maths reads top to bottom. Each raises `ConformalError` with one sentence
naming the field, what was expected and what came."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from forde_serve.errors import FordeError

__all__ = [
    "GROUP_SCORES",
    "SCORES",
    "ConformalError",
    "check_count",
    "check_coverage",
    "check_group_scores",
    "check_groups",
    "check_kept_scores",
    "check_labels",
    "check_probs",
    "check_score",
    "check_threshold",
    "finite_numbers",
    "metadata_dict",
    "metadata_fields",
    "sorted_pairs",
    "threshold_pairs",
    "threshold_rows",
]

SCORES = ("lac", "aps", "raps")
# Per-row uncertainty outputs of the runtime (forde_serve.contract) that may define Mondrian groups.
GROUP_SCORES = ("mutual_information", "predictive_entropy", "expected_entropy", "vote_disagreement")
_PROBABILITY_SLACK = 1e-5  # float32 softmax outputs may exceed 1 by a few ulps (1.19e-7 each)
_LEVEL_MATCH = 1e-6  # as forde_serve.conformal's: a group's level matches a marginal one this close


class ConformalError(FordeError, ValueError):
    """Probabilities, labels, a coverage level or calibration metadata that cannot be used."""


def check_probs(probs: np.ndarray) -> np.ndarray:
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


def check_labels(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
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


def check_group_scores(group_scores: np.ndarray, inputs: int | None = None) -> np.ndarray:
    """Per-row group scores `[inputs]` (any length when None) as finite float64."""
    values = np.asarray(group_scores)
    if values.ndim != 1 or (inputs is not None and values.shape != (inputs,)):
        expected = "a vector" if inputs is None else f"shape ({inputs},)"
        raise ConformalError(f"group_scores: expected {expected}, one per input, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ConformalError(f"group_scores: expected numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ConformalError("group_scores: expected finite numbers, got NaN or infinity")
    return values


def check_score(score: str, k_reg: int | None, lam: float | None) -> None:
    if score not in SCORES:
        raise ConformalError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if score == "raps":
        check_count("k_reg", k_reg, 0)
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not (math.isfinite(lam) and lam >= 0):
            raise ConformalError(f"lam: RAPS needs a finite number >= 0, got {lam!r}")


def check_coverage(coverage: float) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, int | float | np.floating):
        raise ConformalError(f"coverage: expected a number strictly between 0 and 1, got {coverage!r}")
    if not 0.0 < coverage < 1.0:
        raise ConformalError(f"coverage: expected a number strictly between 0 and 1, got {coverage!r}")
    return float(coverage)


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating) or math.isnan(threshold):
        raise ConformalError(f"threshold: expected a number (or +infinity), got {threshold!r}")
    if threshold == -math.inf:
        raise ConformalError("threshold: expected a number (or +infinity), got -infinity")
    return float(threshold)


def check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConformalError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def threshold_rows(pairs: tuple[tuple[float, float], ...]) -> list[dict]:
    """((coverage, threshold), ...) -> metadata rows; an infinite threshold is stored as null."""
    return [{"coverage": c, "threshold": None if math.isinf(t) else t} for c, t in pairs]


def threshold_pairs(rows: object, field: str) -> tuple[tuple[float, float], ...]:
    """Metadata rows -> ((coverage, threshold), ...), null read as +infinity; the values are checked later."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConformalError(f"conformal metadata field {field!r}: expected a list of objects, got {rows!r}")
    pairs = []
    for row in rows:
        if set(row) != {"coverage", "threshold"}:
            raise ConformalError(
                f"conformal metadata field {field!r}: expected rows with coverage and threshold, got {row!r}"
            )
        pairs.append((row["coverage"], math.inf if row["threshold"] is None else row["threshold"]))
    return tuple(pairs)


def sorted_pairs(pairs, field: str) -> tuple[tuple[float, float], ...]:
    """(coverage, threshold) pairs (or a {coverage: threshold} mapping), checked and sorted by coverage."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    try:
        return tuple(sorted((check_coverage(c), check_threshold(t)) for c, t in items))
    except ConformalError:
        raise
    except (TypeError, ValueError):
        raise ConformalError(f"{field}: expected (coverage, threshold) pairs, got {pairs!r}") from None


def finite_numbers(values, field: str) -> tuple[float, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ConformalError(f"{field}: expected a list of numbers, got {values!r}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer) or not math.isfinite(v):
            raise ConformalError(f"{field}: expected finite numbers, got {v!r}")
    return tuple(float(v) for v in items)


def check_kept_scores(scores, n_calibration: int) -> tuple[float, ...]:
    values = finite_numbers(scores, "scores")
    if len(values) != n_calibration:
        raise ConformalError(f"scores: expected {n_calibration} numbers (one per calibration input), got {len(values)}")
    return values


def check_groups(group_score, edges, rows, thresholds, levels: np.ndarray, n_calibration: int):
    """Mondrian fields of a calibration, checked: (edges, rows, per-group sorted threshold pairs)."""
    if group_score not in GROUP_SCORES:
        raise ConformalError(f"group_score: expected one of {', '.join(GROUP_SCORES)}, got {group_score!r}")
    edges = finite_numbers(edges, "group_edges")
    if not edges or np.any(np.diff(edges) <= 0):
        raise ConformalError(f"group_edges: expected 1 or more ascending numbers, got {list(edges)}")
    groups = len(edges) + 1
    if len(rows) != groups or len(thresholds) != groups:
        raise ConformalError(
            f"group_rows, group_thresholds: expected one entry per group ({groups}), "
            f"got {len(rows)} and {len(thresholds)}"
        )
    for count in rows:
        check_count("group_rows", count, 1)
    if sum(rows) != n_calibration:
        raise ConformalError(
            f"group_rows: expected groups that add up to n_calibration ({n_calibration}), got {list(rows)}"
        )
    per_group = tuple(sorted_pairs(t, "group_thresholds") for t in thresholds)
    for pairs in per_group:
        if len(pairs) != len(levels) or np.any(np.abs(np.array([c for c, _ in pairs]) - levels) > _LEVEL_MATCH):
            raise ConformalError(
                f"group_thresholds: expected each group at the levels {', '.join(f'{c:g}' for c in levels)}, "
                f"got {[c for c, _ in pairs]}"
            )
    return edges, tuple(int(r) for r in rows), per_group


def metadata_fields(metadata: object, version: int) -> dict:
    """`ConformalCalibration.to_metadata()`'s dict -> the constructor's keyword arguments (their
    values are checked by the constructor); a missing or malformed field is named."""
    if not isinstance(metadata, dict):
        raise ConformalError(f"conformal metadata: expected a JSON object, got {type(metadata).__name__}")
    if metadata.get("version") != version:
        raise ConformalError(
            f"conformal metadata field 'version': this forde_serve reads {version}, "
            f"got {metadata.get('version')!r}; upgrade forde-serve or re-export the model"
        )
    fields = {
        "score": metadata.get("score"),
        "thresholds": threshold_pairs(metadata.get("thresholds"), "thresholds"),
        "n_calibration": metadata.get("n_calibration"),
        "n_classes": metadata.get("n_classes"),
        "k_reg": metadata.get("k_reg"),
        "lam": metadata.get("lambda"),
        "n_tuning": metadata.get("n_tuning"),
    }
    scores = metadata.get("scores")
    if scores is not None:
        if not isinstance(scores, list):
            raise ConformalError(f"conformal metadata field 'scores': expected a list of numbers, got {scores!r}")
        fields["scores"] = tuple(scores)
    groups = metadata.get("groups")
    if groups is not None:
        if not isinstance(groups, dict) or set(groups) != {"score", "edges", "rows", "thresholds"}:
            raise ConformalError(
                f"conformal metadata field 'groups': expected an object with score, edges, rows and thresholds, "
                f"got {groups!r}"
            )
        for key in ("edges", "rows", "thresholds"):
            if not isinstance(groups[key], list):
                raise ConformalError(f"conformal metadata field 'groups.{key}': expected a list, got {groups[key]!r}")
        fields |= {
            "group_score": groups["score"],
            "group_edges": tuple(groups["edges"]),
            "group_rows": tuple(groups["rows"]),
            "group_thresholds": tuple(threshold_pairs(r, "groups.thresholds") for r in groups["thresholds"]),
        }
    return fields


def metadata_dict(calibration, version: int) -> dict:
    """A `ConformalCalibration` as its JSON-able metadata (the keys of files written before scores and
    groups, plus "scores" and "groups" only when it has them)."""
    metadata = {
        "version": version,
        "score": calibration.score,
        "k_reg": calibration.k_reg,
        "lambda": calibration.lam,
        "n_calibration": calibration.n_calibration,
        "n_tuning": calibration.n_tuning,
        "n_classes": calibration.n_classes,
        "thresholds": threshold_rows(calibration.thresholds),
    }
    if calibration.scores is not None:
        metadata["scores"] = list(calibration.scores)
    if calibration.group_score is not None:
        metadata["groups"] = {
            "score": calibration.group_score,
            "edges": list(calibration.group_edges),
            "rows": list(calibration.group_rows),
            "thresholds": [threshold_rows(pairs) for pairs in calibration.group_thresholds],
        }
    return metadata
