"""The diversity measures on predictions (`forde_serve.diversity`), against their definitions and scipy."""

import itertools

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from forde_serve.diversity import (
    MAX_SUBSETS,
    by_ensemble_size,
    diversity_block,
    mean_pairwise_js_divergence,
    normalized_disagreement,
    pairwise_disagreement,
)
from forde_serve.metrics import classification_metrics


def _member_probs(n=40, members=4, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, members, classes)) * 2
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True), rng.integers(0, classes, n)


def test_pairwise_disagreement_counts_differing_top_classes():
    # 3 inputs, 3 members: member 0 votes 0,0,0; member 1 votes 0,1,0; member 2 votes 1,1,1
    votes = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 1]])
    probs = np.eye(2)[votes]  # [N, M, C] one-hot
    expected = np.array([[0, 1 / 3, 1], [1 / 3, 0, 2 / 3], [1, 2 / 3, 0]])
    np.testing.assert_allclose(pairwise_disagreement(probs), expected)
    d = pairwise_disagreement(_member_probs()[0])
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)


def test_normalized_disagreement_is_mean_off_diagonal_over_error():
    d = np.array([[0, 0.2, 0.4], [0.2, 0, 0.3], [0.4, 0.3, 0]])
    assert normalized_disagreement(d, 0.8) == pytest.approx(0.3 / 0.2)
    assert normalized_disagreement(d, 1.0) is None and normalized_disagreement(np.zeros((1, 1)), 0.5) is None


def test_js_divergence_matches_scipy():
    probs, _ = _member_probs()
    want = np.mean(
        [
            jensenshannon(probs[n, i], probs[n, j]) ** 2  # scipy returns the distance, its square root, in nats
            for n in range(len(probs))
            for i, j in itertools.combinations(range(4), 2)
        ]
    )
    assert mean_pairwise_js_divergence(probs) == pytest.approx(want, rel=1e-9)
    same = np.repeat(probs[:, :1], 3, axis=1)
    assert mean_pairwise_js_divergence(same) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_js_divergence(probs[:, :1]) is None


def test_by_size_averages_subsets_and_ends_at_the_ensemble():
    probs, labels = _member_probs()
    sizes = by_ensemble_size(probs, labels)
    whole = classification_metrics(probs, labels)
    assert len(sizes["accuracy"]) == 4
    assert sizes["accuracy"][-1] == whole["accuracy"] and sizes["nll"][-1] == pytest.approx(whole["nll"])
    singles = [classification_metrics(probs[:, [m]], labels)["accuracy"] for m in range(4)]
    assert sizes["accuracy"][0] == pytest.approx(np.mean(singles))
    # more subsets than MAX_SUBSETS: a seeded sample of them
    many, labels = _member_probs(n=20, members=12)
    assert by_ensemble_size(many, labels, seed=1) == by_ensemble_size(many, labels, seed=1)
    assert MAX_SUBSETS < 924  # C(12, 6), so the sampled path ran


def test_the_block_holds_every_measure():
    probs, labels = _member_probs()
    block = diversity_block(probs, labels, js_corrupted=0.5)
    assert np.asarray(block["pairwise_disagreement"]).shape == (4, 4)
    assert block["js_divergence"]["corrupted"] == 0.5 and block["js_divergence"]["clean"] > 0
    accuracy = classification_metrics(probs, labels)["accuracy"]
    assert block["normalized_disagreement"] == pytest.approx(block["mean_disagreement"] / (1 - accuracy))
    assert len(block["accuracy_by_size"]) == len(block["nll_by_size"]) == 4
