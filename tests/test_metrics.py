"""The numpy maths every number comes from: uncertainty, calibration, selective prediction, OOD."""

import numpy as np
import pytest

from forde_serve.metrics import (
    abstention_threshold,
    auroc,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    risk_coverage,
    uncertainty,
    validation_abstention,
)


def test_uncertainty_decomposition_by_hand():
    # Two members, two classes. Input 0: both say [1, 0] (certain, no disagreement). Input 1: one says
    # [1, 0], the other [0, 1]: the mean [0.5, 0.5] has entropy ln 2, each member 0, so all of it is
    # epistemic; half the members vote against the ensemble's top class (argmax of a tie: class 0).
    member_probs = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    got = uncertainty(member_probs)
    np.testing.assert_allclose(got["predictive_entropy"], [0.0, np.log(2)], atol=1e-9)
    np.testing.assert_allclose(got["expected_entropy"], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(got["mutual_information"], [0.0, np.log(2)], atol=1e-9)
    np.testing.assert_allclose(got["vote_disagreement"], [0.0, 0.5])
    # Both members unsure in the same way: all aleatoric, nothing epistemic.
    same = uncertainty(np.array([[[0.5, 0.5], [0.5, 0.5]]]))
    assert same["expected_entropy"][0] == pytest.approx(np.log(2)) and same["mutual_information"][0] == 0.0


def test_ece_by_hand():
    # Confidences 0.9, 0.9 (one right) land in bin (13/15, 14/15]; 0.6 (right) in (8/15, 9/15].
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    # (2/3) |0.5 - 0.9| + (1/3) |1 - 0.6|
    assert expected_calibration_error(probs, labels) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.4)
    bins = reliability_bins(probs, labels)
    assert bins["count"].sum() == 3 and bins["count"][13] == 2 and bins["count"][8] == 1
    assert bins["accuracy"][13] == 0.5 and bins["confidence"][8] == pytest.approx(0.6)
    assert np.isnan(bins["accuracy"][0])  # empty bins are NaN, not 0


def test_classification_metrics_by_hand():
    member_probs = np.array([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.1, 0.9]]])  # means [0.7, 0.3], [0.2, 0.8]
    got = classification_metrics(member_probs, np.array([0, 0]))
    assert got["accuracy"] == 0.5
    assert got["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.2)) / 2)
    assert got["brier"] == pytest.approx(((0.3**2 + 0.3**2) + (0.8**2 + 0.8**2)) / 2)


def test_selective_prediction_and_auroc_by_hand():
    # Most certain first: scores 0.1 (right), 0.2 (right), 0.5 (wrong): risks 0, 0, 1/3.
    curve = risk_coverage(np.array([0.1, 0.5, 0.2]), np.array([True, False, True]))
    np.testing.assert_allclose(curve["coverage"], [1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve["risk"], [0, 0, 1 / 3])
    assert curve["aurc"] == pytest.approx(1 / 9)
    assert auroc(np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert auroc(np.array([3.0, 4.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(0.5)  # ties count half


def test_abstention_threshold_by_hand():
    mi = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    correct = np.array([True, True, False, True, False])
    # accept MI <= 0.2: 0 errors / 2; <= 0.4: 1 / 4 = 25 %; <= 0.5: 2 / 5
    assert abstention_threshold(mi, correct, 0.0) == {"threshold": 0.2, "coverage": 0.4, "risk": 0.0}
    assert abstention_threshold(mi, correct, 0.25) == {"threshold": 0.4, "coverage": 0.8, "risk": 0.25}
    assert abstention_threshold(mi, correct, 0.5)["coverage"] == 1.0
    none = abstention_threshold(mi, ~np.ones(5, bool), 0.1)
    assert none["coverage"] == 0.0 and none["threshold"] < 0.1
    # equal MI values are accepted together or not at all
    tied = abstention_threshold(np.array([0.1, 0.1, 0.2]), np.array([True, False, True]), 0.0)
    assert tied["coverage"] == 0.0


def test_validation_abstention_uses_the_ensembles_prediction_and_mutual_information():
    # Input 0: members agree on class 0 (MI 0, right); input 1: members disagree (MI > 0), ensemble wrong.
    member_probs = np.array([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.2, 0.8]]])
    got = validation_abstention(member_probs, np.array([0, 1]), target_risk=0.0)
    assert got["coverage"] == 0.5 and got["threshold"] == pytest.approx(0.0, abs=1e-12)
