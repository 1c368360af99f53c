"""How differently the members of an ensemble predict: the loss-landscape diagnostics on predictions
(Fort, Hu, Lakshminarayanan 2019, "Deep ensembles: a loss landscape perspective"), in numpy.

Every function takes member probabilities `[N, M, C]` (N inputs, M members, C classes), so a run
folder measured through PyTorch and an exported file measured through the serving runtime give the
same numbers. The weight-space measure (cosine similarity of flattened weights) needs the weights and
lives on the training side (`training.diversity`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from forde_serve.metrics import classification_metrics

__all__ = [
    "MAX_SUBSETS",
    "by_ensemble_size",
    "diversity_block",
    "mean_pairwise_js_divergence",
    "normalized_disagreement",
    "pairwise_disagreement",
]

MAX_SUBSETS = 100  # member subsets averaged per ensemble size; sizes with more are sampled (seeded)
_TINY = 1e-12


def pairwise_disagreement(member_probs: np.ndarray) -> np.ndarray:
    """`[M, M]`: for members i, j the fraction of inputs whose top classes differ (symmetric, zero diagonal)."""
    votes = member_probs.argmax(axis=-1)  # [N, M]
    return (votes[:, :, None] != votes[:, None, :]).mean(axis=0)


def normalized_disagreement(disagreement: np.ndarray, accuracy: float) -> float | None:
    """Mean pairwise disagreement (off the diagonal) / (1 - accuracy): the diversity-accuracy plane's
    vertical axis (Fort et al. 2019, section 4). None with one member or a perfect accuracy."""
    members = len(disagreement)
    if members < 2 or accuracy >= 1.0:
        return None
    mean = float(disagreement.sum() / (members * (members - 1)))
    return mean / (1.0 - accuracy)


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -np.sum(probs * np.log(np.clip(probs, _TINY, None)), axis=-1)


def mean_pairwise_js_divergence(member_probs: np.ndarray) -> float | None:
    """Mean over inputs and member pairs i < j of the Jensen-Shannon divergence between the two
    members' predictive distributions, in nats (0: identical; at most ln 2). None with one member."""
    members = member_probs.shape[1]
    if members < 2:
        return None
    entropies = _entropy(member_probs)  # [N, M]
    pairs = list(itertools.combinations(range(members), 2))
    total = 0.0
    for i, j in pairs:  # pair by pair: [N, C] at a time, whatever N and C
        mixture = 0.5 * (member_probs[:, i] + member_probs[:, j])
        total += float(np.mean(_entropy(mixture) - 0.5 * (entropies[:, i] + entropies[:, j])))
    return max(total / len(pairs), 0.0)


def _subsets(members: int, size: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    if math.comb(members, size) <= MAX_SUBSETS:
        return list(itertools.combinations(range(members), size))
    return [tuple(sorted(rng.choice(members, size, replace=False))) for _ in range(MAX_SUBSETS)]


def by_ensemble_size(member_probs: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    """Accuracy and NLL of the ensemble of k members, k = 1..M, each the mean over member subsets of
    size k (all of them, or MAX_SUBSETS drawn at random where there are more). The last entry is the
    whole ensemble's."""
    members = member_probs.shape[1]
    rng = np.random.default_rng(seed)
    accuracy, nll = [], []
    for size in range(1, members + 1):
        scores = [classification_metrics(member_probs[:, list(s)], labels) for s in _subsets(members, size, rng)]
        accuracy.append(float(np.mean([s["accuracy"] for s in scores])))
        nll.append(float(np.mean([s["nll"] for s in scores])))
    return {"accuracy": accuracy, "nll": nll}


def diversity_block(
    member_probs: np.ndarray, labels: np.ndarray, js_corrupted: float | None = None, seed: int = 0
) -> dict:
    """The `diversity` block of an evaluation's metrics.json, from the clean split's member
    probabilities `[N, M, C]` and labels `[N]`; `js_corrupted`: the mean pairwise JS divergence over
    the corrupted sets (None: none were measured)."""
    disagreement = pairwise_disagreement(member_probs)
    accuracy = float(np.mean(member_probs.mean(axis=1).argmax(axis=1) == labels))
    sizes = by_ensemble_size(member_probs, labels, seed)
    members = member_probs.shape[1]
    return {
        "pairwise_disagreement": disagreement.tolist(),
        "mean_disagreement": float(disagreement.sum() / (members * (members - 1))) if members > 1 else None,
        "normalized_disagreement": normalized_disagreement(disagreement, accuracy),
        "accuracy_by_size": sizes["accuracy"],
        "nll_by_size": sizes["nll"],
        "by_size": f"the mean over member subsets of each size (at most {MAX_SUBSETS}, drawn with seed {seed})",
        "js_divergence": {"clean": mean_pairwise_js_divergence(member_probs), "corrupted": js_corrupted},
    }
