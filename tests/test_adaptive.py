"""Adaptive conformal inference: thresholds at the edges, the update rule, Gibbs & Candes's long-run
bound (and its delayed-label form) on sequences chosen to be hard, and what forged labels can do."""

import json
import math

import numpy as np
import pytest

from forde_serve.conformal import ConformalCalibration, calibrate, conformal_threshold, prediction_sets
from forde_serve.monitoring.adaptive import AdaptiveSets, AdaptiveStateError, level_key


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _problem(seed, inputs, classes=5, flatten=1.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(inputs, classes))
    labels = (np.cumsum(_softmax(logits), 1) > rng.random((inputs, 1))).argmax(1)
    return _softmax(logits / flatten), labels


@pytest.fixture
def calibration():
    probs, labels = _problem(0, 200)
    return calibrate(probs, labels)


def test_threshold_at_the_edges_and_at_the_target(calibration):
    aci = AdaptiveSets(calibration, gamma=0.05)
    scores = np.array(calibration.scores)
    assert aci.threshold(0.0) == math.inf and aci.threshold(-0.3) == math.inf
    assert aci.threshold(1.0) == -math.inf and aci.threshold(1.7) == -math.inf
    assert aci.threshold(0.001) == math.inf  # rank ceil(201 * 0.999) = 201 > 200
    assert aci.threshold(0.999) == scores.min()  # rank 1
    for coverage in calibration.coverages:
        assert aci.threshold(1 - coverage) == calibration.threshold(coverage) == conformal_threshold(scores, coverage)
        probs, _ = _problem(1, 50)
        np.testing.assert_array_equal(aci.sets(probs, 1 - coverage), prediction_sets(probs, calibration, coverage))
    probs, _ = _problem(2, 7)
    assert aci.sets(probs, -0.01).all() and not aci.sets(probs, 1.0).any()


def test_update_by_hand_and_state_is_json(calibration):
    aci = AdaptiveSets(calibration, gamma=0.1)
    state = aci.start()
    assert aci.alphas(state)["0.9"] == pytest.approx(0.1)
    after_miss = aci.update(state, "0.9", covered=False)
    assert aci.alphas(after_miss)["0.9"] == pytest.approx(0.1 + 0.1 * (0.1 - 1))
    after_hit = aci.update(after_miss, "0.9", covered=True)
    assert aci.alphas(after_hit)["0.9"] == pytest.approx(0.01 + 0.1 * 0.1)
    assert aci.alphas(after_hit)["0.8"] == pytest.approx(0.2)  # other levels untouched
    assert aci.alphas(state)["0.9"] == pytest.approx(0.1)  # the old state is not modified
    summary = aci.summary(after_hit)["0.9"]
    assert summary["labels"] == 2 and summary["coverage"] == 0.5
    assert json.loads(json.dumps(after_hit, allow_nan=False)) == after_hit
    assert level_key(0.9) == "0.9" and level_key(np.float32(0.95)) == "0.95"


def _bound(alpha_1, gamma, in_flight, labels):
    return (max(alpha_1, 1 - alpha_1) + gamma * (1 + in_flight)) / (gamma * labels)


@pytest.mark.parametrize("gamma", [0.005, 0.05, 0.3])
def test_long_run_bound_holds_at_every_t_on_a_hard_sequence(calibration, gamma):
    # Traffic alternating between calibrated stretches and stretches where the labels are drawn
    # against the model (the least likely class): the error rate still tracks alpha within the bound.
    aci = AdaptiveSets(calibration, gamma=gamma)
    probs, labels = _problem(3, 3000, flatten=1.5)
    adversarial = (np.arange(3000) // 250) % 2 == 1
    labels = np.where(adversarial, probs.argmin(1), labels)
    state, errors, alphas = aci.start(), [], []
    for t in range(len(labels)):
        alpha = aci.alphas(state)["0.9"]
        covered = bool(aci.sets(probs[t : t + 1], alpha)[0, labels[t]])
        state = aci.update(state, "0.9", covered)
        errors.append(not covered)
        alphas.append(alpha)
    running = np.cumsum(errors) / np.arange(1, len(errors) + 1)
    assert np.all(np.abs(running - 0.1) <= _bound(0.1, gamma, 0, np.arange(1, len(errors) + 1)) + 1e-12)
    assert -gamma <= min(alphas) and max(alphas) <= 1 + gamma
    assert abs(running[-1] - 0.1) < 0.03 or gamma == 0.005  # the bound is ~0.06 at gamma 0.005


def test_late_out_of_order_labels_keep_the_delayed_bound(calibration):
    # Each label comes back 0 to 30 rows after its prediction, in arrival order; judged on the set of
    # its serve time (alpha stored then). d = the most labelled rows in flight at once.
    gamma = 0.05
    aci = AdaptiveSets(calibration, gamma=gamma)
    rng = np.random.default_rng(4)
    probs, labels = _problem(5, 2000, flatten=2.0)  # flatter than calibration: a shift
    arrival = np.arange(2000) + rng.integers(0, 31, 2000)
    state, served_alpha, errors, alphas, in_flight = aci.start(), {}, [], [], 0
    order = iter(np.argsort(arrival, kind="stable"))
    pending = next(order, None)
    for t in range(2000 + 31):
        if t < 2000:
            served_alpha[t] = aci.alphas(state)["0.9"]
        while pending is not None and arrival[pending] <= t:
            covered = bool(aci.sets(probs[pending : pending + 1], served_alpha[pending])[0, labels[pending]])
            state = aci.update(state, "0.9", covered)
            errors.append(not covered)
            alphas.append(aci.alphas(state)["0.9"])
            pending = next(order, None)
        in_flight = max(in_flight, len(served_alpha) - len(errors))
    assert len(errors) == 2000 and in_flight <= 31
    running = np.cumsum(errors) / np.arange(1, 2001)
    assert np.all(np.abs(running - 0.1) <= _bound(0.1, gamma, in_flight, np.arange(1, 2001)) + 1e-12)
    assert -gamma * (1 + in_flight) <= min(alphas) and max(alphas) <= 1 + gamma * (1 + in_flight)


def test_forged_labels_move_alpha_by_at_most_n_gamma(calibration):
    aci = AdaptiveSets(calibration, gamma=0.02)
    state = aci.start()
    for n in range(1, 41):
        state = aci.update(state, "0.95", covered=False)  # forged: every set "missed"
        assert 0.05 - aci.alphas(state)["0.95"] <= n * 0.02 + 1e-12


def test_grouped_calibration_uses_each_groups_own_scores():
    probs, labels = _problem(6, 300)
    entropy = -(probs * np.log(probs)).sum(1)
    grouped = calibrate(probs, labels, group_scores=entropy, group_score="predictive_entropy", groups=3)
    aci = AdaptiveSets(grouped, gamma=0.05)
    parts = np.split(np.array(grouped.scores), np.cumsum(grouped.group_rows)[:-1])
    for g, part in enumerate(parts):
        for coverage in grouped.coverages:
            assert (
                aci.threshold(1 - coverage, g) == conformal_threshold(part, coverage) == grouped.threshold(coverage, g)
            )
    new, _ = _problem(7, 40)
    groups = grouped.group_of(-(new * np.log(new)).sum(1))
    np.testing.assert_array_equal(
        aci.sets(new, 0.1, groups), prediction_sets(new, grouped, 0.9, group_scores=-(new * np.log(new)).sum(1))
    )
    with pytest.raises(AdaptiveStateError, match="each row's group"):
        aci.sets(new, 0.1)
    assert len(aci.summary(aci.start())["0.9"]["thresholds"]) == 3


def test_bad_settings_and_states_are_named(calibration):
    legacy = ConformalCalibration("lac", calibration.thresholds, calibration.n_calibration, 5)  # no scores kept
    with pytest.raises(AdaptiveStateError, match="re-export"):
        AdaptiveSets(legacy)
    with pytest.raises(AdaptiveStateError, match="gamma"):
        AdaptiveSets(calibration, gamma=0)
    aci = AdaptiveSets(calibration)
    with pytest.raises(AdaptiveStateError, match="0.8, 0.9, 0.95, 0.99"):
        aci.update(aci.start(), "0.85", True)
    with pytest.raises(AdaptiveStateError, match="version"):
        aci.alphas({"version": 7})
    with pytest.raises(AdaptiveStateError, match="levels"):
        aci.alphas({"version": 1, "levels": {"0.9": {}}})
