"""Uncertainty measures and evaluation metrics, in numpy.

One implementation for every caller (training, the exported runtime, evaluation
reports), so that a number means the same thing everywhere.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ECE_BINS",
    "abstention_threshold",
    "auroc",
    "classification_metrics",
    "expected_calibration_error",
    "gradient_cosine_distance",
    "reliability_bins",
    "risk_coverage",
    "uncertainty",
    "validation_abstention",
]

ECE_BINS = 15
_TINY = 1e-12


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats over the last axis."""
    return -np.sum(probs * np.log(np.clip(probs, _TINY, None)), axis=-1)


def uncertainty(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Ensemble uncertainty from member probabilities `[batch, members, classes]`.

    Returns `[batch]` arrays: `predictive_entropy` (total), `expected_entropy`
    (aleatoric), `mutual_information` (epistemic = total - aleatoric) and
    `vote_disagreement` (fraction of members whose top class differs from the
    ensemble's top class).
    """
    probs = member_probs.mean(axis=1)
    predictive = _entropy(probs)
    expected = _entropy(member_probs).mean(axis=1)
    votes = member_probs.argmax(axis=-1)
    disagreement = (votes != probs.argmax(axis=-1)[:, None]).mean(axis=1)
    return {
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": np.maximum(predictive - expected, 0.0),
        "vote_disagreement": disagreement,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over the reliability diagram's bins: sum over bins of (share of inputs) x |accuracy - confidence|.

    `probs` is `[batch, classes]`; the bins are `reliability_bins`', so the number and the figure agree.
    """
    reliability = reliability_bins(probs, labels, bins)
    used = reliability["count"] > 0
    share = reliability["count"][used] / len(labels)
    return float(np.sum(share * np.abs(reliability["accuracy"][used] - reliability["confidence"][used])))


def gradient_cosine_distance(input_gradients: np.ndarray) -> float:
    """Mean over inputs and member pairs i < j of 1 - cos(g_i, g_j).

    `input_gradients` is `[batch, members, ...]` (each member's gradient for one
    class per input); this is the paper's measure of input-gradient diversity.
    """
    batch, members = input_gradients.shape[:2]
    if members < 2:
        raise ValueError(f"gradient_cosine_distance needs at least 2 members, got {members}")
    flat = input_gradients.reshape(batch, members, -1).astype(np.float64)
    unit = flat / np.sqrt(np.sum(flat**2, axis=-1, keepdims=True) + _TINY)
    cosine = np.einsum("bid,bjd->bij", unit, unit)
    upper = np.triu_indices(members, k=1)
    return float(np.mean(1.0 - cosine[:, upper[0], upper[1]]))


def classification_metrics(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL, ECE, Brier and mean mutual information of the ensemble.

    `member_probs` is `[batch, members, classes]`, `labels` is `[batch]` ints.
    """
    probs = member_probs.mean(axis=1)
    rows = np.arange(len(labels))
    onehot = np.zeros_like(probs)
    onehot[rows, labels] = 1.0
    return {
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
        "nll": float(-np.mean(np.log(np.clip(probs[rows, labels], _TINY, None)))),
        "ece": expected_calibration_error(probs, labels),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "mutual_information": float(np.mean(uncertainty(member_probs)["mutual_information"])),
    }


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: `count`, `confidence` (mean) and `accuracy` `[bins]` (NaN where empty).

    Bin b holds confidences in (b / bins, (b + 1) / bins]; a confidence is never below 1 / classes > 0.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bin_index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(bin_index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "count": count,
            "confidence": np.bincount(bin_index, confidence, bins) / count,
            "accuracy": np.bincount(bin_index, correct.astype(float), bins) / count,
        }


def risk_coverage(uncertainty_score: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray | float]:
    """Selective prediction: accept the k most certain inputs, k = 1..N.

    Returns `coverage` and `risk` (error rate among the accepted) `[N]`, and `aurc`, the area
    under the risk-coverage curve (mean risk over k; lower is better). Ties in the score are
    broken by input order, so the curve is deterministic.
    """
    order = np.argsort(uncertainty_score, kind="stable")
    errors = np.cumsum(~correct[order])
    accepted = np.arange(1, len(order) + 1)
    risk = errors / accepted
    return {"coverage": accepted / len(order), "risk": risk, "aurc": float(risk.mean())}


def abstention_threshold(mutual_information: np.ndarray, correct: np.ndarray, target_risk: float) -> dict[str, float]:
    """The largest mutual-information threshold whose accepted inputs (MI <= threshold) have an
    error rate at most `target_risk`; returns threshold, coverage and the achieved risk.

    When no threshold reaches the target, the threshold sits below every input (abstain on all).
    """
    order = np.argsort(mutual_information, kind="stable")
    mi, errors = mutual_information[order], 1.0 - correct[order].astype(np.float64)
    risk = np.cumsum(errors) / np.arange(1, len(mi) + 1)
    # Only cut between distinct MI values: a threshold accepts all inputs with equal MI.
    last_of_value = np.append(mi[1:] != mi[:-1], True)
    ok = np.flatnonzero((risk <= target_risk) & last_of_value)
    if len(ok) == 0:
        return {"threshold": float(np.nextafter(mi[0], -np.inf)), "coverage": 0.0, "risk": 0.0}
    k = ok[-1]
    return {"threshold": float(mi[k]), "coverage": float((k + 1) / len(mi)), "risk": float(risk[k])}


def validation_abstention(member_probs: np.ndarray, labels: np.ndarray, target_risk: float) -> dict[str, float]:
    """`abstention_threshold` chosen on a validation split: member probabilities `[N, M, C]`, labels `[N]`."""
    correct = member_probs.mean(1).argmax(1) == labels
    return abstention_threshold(uncertainty(member_probs)["mutual_information"], correct, target_risk)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out-of-distribution inputs (higher score) from
    in-distribution ones: P(out > in) + P(out == in) / 2 (the Mann-Whitney statistic)."""
    scores = np.concatenate([in_scores, out_scores])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = ((last - counts + 1 + last) / 2)[inverse]  # 1-based, ties share their mean rank
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))
