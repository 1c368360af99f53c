"""Split conformal prediction sets: thresholds and sets by hand, the guarantee on a large synthetic
problem, and a cross-check against MAPIE's split conformal classifier on the same probabilities."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from mapie.conformity_scores import APSConformityScore, LACConformityScore
from sklearn.base import BaseEstimator, ClassifierMixin

from forde_serve.conformal import (
    DEFAULT_COVERAGES,
    TOLERANCE,
    ConformalCalibration,
    ConformalError,
    calibrate,
    conformal_threshold,
    conformity_scores,
    prediction_sets,
    set_coverage_and_size,
)
from forde_serve.errors import FordeError


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw(probs, rng):
    """One class per row drawn from that row's probabilities."""
    return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


def _miscalibrated_problem(seed, inputs=20_000, classes=10):
    """Exchangeable (x, y) draws where the model's probabilities are NOT the labels' distribution."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(scale=2.0, size=(inputs, classes))
    labels = _draw(_softmax(truth), rng)
    return _softmax(1.7 * truth + rng.normal(scale=0.7, size=truth.shape)), labels  # overconfident, noisy


def _noisy_tail_problem(seed, inputs=20_000, classes=50):
    """The setting RAPS was made for (Angelopoulos et al. 2021): the true label is the model's top class
    85% of the time, but each input has a long tail of small probabilities whose loudness varies, so
    APS must run far down the tail on every input to cover the few labels that sit there."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(inputs, classes)) * rng.uniform(0.5, 2.0, size=(inputs, 1))
    top = rng.integers(0, classes, size=inputs)
    logits[np.arange(inputs), top] += 4.0
    probs = _softmax(logits)
    return probs, np.where(rng.random(inputs) < 0.85, top, _draw(probs, rng))


def _band(coverage, n_calibration, n_test):
    """4 standard deviations of the test coverage: binomial over the test inputs, plus the spread of the
    calibration quantile (its coverage is Beta distributed with variance about alpha (1 - alpha) / (n + 2))."""
    alpha = 1.0 - coverage
    return 4.0 * math.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / (n_calibration + 2)))


# --- thresholds -----------------------------------------------------------------------------------


def test_threshold_is_the_finite_sample_order_statistic():
    scores = np.array([0.9, 0.2, 0.7, 0.4])  # sorted: 0.2, 0.4, 0.7, 0.9
    assert conformal_threshold(scores, 0.6) == 0.7  # rank ceil(5 * 0.6) = 3
    assert conformal_threshold(scores, 0.8) == 0.9  # rank ceil(5 * 0.8) = 4
    assert conformal_threshold(scores, 0.5) == 0.7  # rank ceil(2.5) = 3
    assert conformal_threshold(scores, 0.81) == math.inf  # rank ceil(4.05) = 5 > 4: no finite threshold
    assert conformal_threshold(np.arange(9.0), 0.9) == 8.0  # ceil(10 * 0.9) = 9, not 10 from float rounding
    assert conformal_threshold(np.arange(9.0), 0.95) == math.inf


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.85, 0.9, 0.95, 0.99, 0.999, 0.7])
def test_threshold_rank_equals_the_exact_decimal_rank(coverage):
    # The rank in exact arithmetic on the decimal level, for every n up to 500 (many hit integers exactly).
    for n in range(1, 501):
        scores = np.arange(n, dtype=float)
        rank = math.ceil((n + 1) * Fraction(str(coverage)))
        expected = math.inf if rank > n else float(rank - 1)
        assert conformal_threshold(scores, coverage) == expected, (n, coverage)


# --- scores and sets by hand --------------------------------------------------------------------------


def test_lac_by_hand():
    calibration_probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1]])
    labels = np.zeros(4, dtype=int)  # scores 1 - p_0: 0.2, 0.4, 0.6, 0.9
    np.testing.assert_allclose(conformity_scores(calibration_probs, labels, "lac"), [0.2, 0.4, 0.6, 0.9])
    cal = calibrate(calibration_probs, labels, "lac", coverages=(0.6, 0.8, 0.9))
    assert cal.threshold(0.6) == pytest.approx(0.6)  # rank 3 of 4
    assert cal.threshold(0.8) == pytest.approx(0.9)  # rank 4 of 4
    assert cal.threshold(0.9) == math.inf  # rank 5 of 4
    test = np.array([[0.6, 0.3, 0.1], [0.2, 0.25, 0.55], [0.35, 0.33, 0.32]])
    # At t = 0.6 a class is in when 1 - p <= 0.6, i.e. p >= 0.4; the last row has none: an empty set.
    np.testing.assert_array_equal(
        prediction_sets(test, cal, 0.6), [[True, False, False], [False, False, True], [False, False, False]]
    )
    # At t = 0.9: p >= 0.1, which the 0.1 of the first row meets to within float rounding (1 - 0.1 = 0.9).
    assert prediction_sets(test, cal, 0.8).all()
    assert prediction_sets(test, cal, 0.9).all()


def test_aps_by_hand():
    calibration_probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array([1, 0, 0, 2])  # mass at or above the label: 0.8, 0.6, 0.9, 0.7
    np.testing.assert_allclose(conformity_scores(calibration_probs, labels, "aps"), [0.8, 0.6, 0.9, 0.7])
    cal = calibrate(calibration_probs, labels, "aps", coverages=(0.6,))
    assert cal.threshold(0.6) == pytest.approx(0.8)  # rank 3 of 4
    test = np.array(
        [
            [0.5, 0.3, 0.2],  # cumulative 0.5, 0.8: the second class reaches 0.8 -> {0, 1}
            [0.45, 0.3, 0.25],  # 0.45, 0.75, 1.0: only the third reaches it -> all
            [0.85, 0.1, 0.05],  # the top class alone passes 0.8 and is kept: never an empty set
            [0.7, 0.15, 0.15],  # 0.7, 0.85: class 1 crosses; class 2 ties with it and comes along
        ]
    )
    expected = [[True, True, False], [True, True, True], [True, False, False], [True, True, True]]
    np.testing.assert_array_equal(prediction_sets(test, cal, 0.6), expected)


def test_aps_ties_are_ranked_by_class_index():
    probs = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4]])
    np.testing.assert_allclose(conformity_scores(probs, np.array([0, 0]), "aps"), [0.4, 1.0])
    np.testing.assert_allclose(conformity_scores(probs, np.array([1, 2]), "aps"), [0.8, 0.8])


def test_raps_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.3, 0.35, 0.35]])
    # k_reg = 1, lambda = 0.1: penalties by rank 0, 0.1, 0.2 on top of the cumulative mass.
    scores = conformity_scores(probs, np.array([1, 2, 0]), "raps", k_reg=1, lam=0.1)
    np.testing.assert_allclose(scores, [0.8 + 0.1, 1.0 + 0.2, 1.0 + 0.2])
    raps = ConformalCalibration("raps", {0.9: 0.75}, n_calibration=10, n_classes=3, k_reg=1, lam=0.1)
    aps = ConformalCalibration("aps", {0.9: 0.75}, n_calibration=10, n_classes=3)
    test = probs[1:]
    # Row [0.5, 0.3, 0.2]: 0.5, 0.9 -> {0, 1} for both. Row [0.3, 0.35, 0.35] ranks 1, 2, 0:
    # RAPS 0.35, 0.8 -> {1, 2}; APS 0.35, 0.7, 1.0 -> all three.
    np.testing.assert_array_equal(prediction_sets(test, raps, 0.9), [[True, True, False], [False, True, True]])
    np.testing.assert_array_equal(prediction_sets(test, aps, 0.9), [[True, True, False], [True, True, True]])


def test_raps_without_penalty_is_aps():
    probs, labels = _miscalibrated_problem(1, inputs=2000)
    raps = calibrate(probs, labels, "raps", k_reg=2, lam=0.0)
    aps = calibrate(probs, labels, "aps")
    assert raps.n_tuning == 0 and [raps.threshold(c) for c in DEFAULT_COVERAGES] == [
        aps.threshold(c) for c in DEFAULT_COVERAGES
    ]
    for c in DEFAULT_COVERAGES:
        np.testing.assert_array_equal(prediction_sets(probs, raps, c), prediction_sets(probs, aps, c))


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_every_class_scoring_at_most_the_threshold_is_in_the_set(score):
    probs, labels = _miscalibrated_problem(2, inputs=3000)
    cal = calibrate(probs[:2000], labels[:2000], score)
    test = probs[2000:]
    classes = test.shape[1]
    per_class = np.stack(
        [conformity_scores(test, np.full(len(test), c), score, cal.k_reg, cal.lam) for c in range(classes)], axis=1
    )
    for coverage in DEFAULT_COVERAGES:
        sets = prediction_sets(test, cal, coverage)
        below = per_class <= cal.threshold(coverage)
        assert (sets | ~below).all(), coverage
        if score == "lac":
            np.testing.assert_array_equal(sets, below)
            continue
        # The first class past the threshold comes along; any other extra class ties with it to within
        # 1e-8 in probability (these draws have no exact ties, but tiny probabilities that close).
        extra = sets & ~below
        past = np.where(below, np.inf, per_class)
        crossing = past.argmin(axis=1)
        extra[np.arange(len(test)), crossing] = False
        crossing_prob = np.broadcast_to(test[np.arange(len(test)), crossing][:, None], test.shape)
        assert (test[extra] >= crossing_prob[extra] - TOLERANCE).all()
        assert extra.sum() < 0.01 * len(test)  # rare
        assert sets[np.arange(len(test)), crossing][np.isfinite(past.min(axis=1))].all()
        assert sets.any(axis=1).all()


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_sets_are_nested_across_levels(score):
    probs, labels = _miscalibrated_problem(3, inputs=3000)
    cal = calibrate(probs[:2000], labels[:2000], score)
    sets = [prediction_sets(probs[2000:], cal, c) for c in cal.coverages]
    for smaller, larger in zip(sets, sets[1:], strict=False):
        assert (larger | ~smaller).all()


# --- the guarantee ------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_coverage_on_a_large_exchangeable_problem(score):
    probs, labels = _miscalibrated_problem(4)
    half = len(labels) // 2
    cal = calibrate(probs[:half], labels[:half], score)
    for coverage in DEFAULT_COVERAGES:
        achieved, size = set_coverage_and_size(prediction_sets(probs[half:], cal, coverage), labels[half:])
        band = _band(coverage, cal.n_calibration, half)
        # In expectation coverage is in [1 - alpha, 1 - alpha + 1 / (n + 1)] when sets are exactly
        # {score <= t} (LAC); APS/RAPS sets also hold the first class past t, so they may cover more.
        assert achieved >= coverage - band, (coverage, achieved, band)
        if score == "lac":
            assert achieved <= coverage + 1 / (cal.n_calibration + 1) + band, (coverage, achieved, band)
        assert 0 < size < probs.shape[1]


def test_raps_sets_are_smaller_than_aps_where_the_tail_is_noisy():
    probs, labels = _noisy_tail_problem(0)
    half = len(labels) // 2
    aps = calibrate(probs[:half], labels[:half], "aps")
    raps = calibrate(probs[:half], labels[:half], "raps")
    assert raps.n_tuning == 2000 and raps.n_calibration == half - 2000
    aps_coverage, aps_size = set_coverage_and_size(prediction_sets(probs[half:], aps, 0.9), labels[half:])
    raps_coverage, raps_size = set_coverage_and_size(prediction_sets(probs[half:], raps, 0.9), labels[half:])
    # Measured with this seed: APS 13.6 classes, RAPS 7.8 (k_reg 7, lambda 0.5), both covering >= 0.9.
    assert raps_size < 0.75 * aps_size, (raps_size, aps_size)
    band = _band(0.9, raps.n_calibration, half)
    assert raps_coverage >= 0.9 - band and aps_coverage >= 0.9 - band


def test_raps_tuning_is_deterministic_and_documented():
    probs, labels = _noisy_tail_problem(1, inputs=3000)
    first, again = calibrate(probs, labels, "raps"), calibrate(probs, labels, "raps")
    assert first == again and first.n_tuning == 600 and first.n_calibration == 2400
    assert first.k_reg >= 1 and first.lam in (0.001, 0.01, 0.1, 0.2, 0.5)
    given = calibrate(probs, labels, "raps", k_reg=first.k_reg, lam=first.lam)
    assert given.n_tuning == 0 and given.n_calibration == 3000


# --- MAPIE --------------------------------------------------------------------------------------------


class _StoredProbabilities(ClassifierMixin, BaseEstimator):
    """A fitted classifier whose input is a row index into fixed probabilities: MAPIE in prefit mode then
    works on exactly the probabilities forde_serve.conformal is given."""

    def __init__(self, probs=None):
        self.probs = probs

    def fit(self, X, y):
        return self

    def __sklearn_is_fitted__(self):
        return True

    @property
    def classes_(self):
        return np.arange(self.probs.shape[1])

    def predict_proba(self, X):
        return self.probs[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


class _NonRandomizedAPS(APSConformityScore):
    """MAPIE's APS always subtracts u * p_y (u uniform) from the calibration scores; without that line
    (MAPIE's own cumulative sum kept) it is the published non-randomized score forde_serve uses."""

    def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):
        scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
        return scores


def _mapie(probs, labels, n, conformity_score, **kwargs):
    rows = np.arange(len(probs))[:, None]
    mapie = SplitConformalClassifier(
        _StoredProbabilities(probs),
        confidence_level=list(DEFAULT_COVERAGES),
        conformity_score=conformity_score,
        prefit=True,
        **kwargs,
    )
    mapie.conformalize(rows[:n], labels[:n])
    _, sets = mapie.predict_set(rows[n:])  # include_last_label=True, MAPIE's default
    return mapie, mapie._mapie_classifier.quantiles_, sets


def _with_ties(probs, rng):
    """Copy some rows' second class onto their third, so sets meet exact ties at their boundary."""
    probs = probs.copy()
    rows = rng.random(len(probs)) < 0.2
    order = np.argsort(-probs, axis=1)
    second, third = order[rows, 1], order[rows, 2]
    r = np.flatnonzero(rows)
    probs[r, third] = probs[r, second]
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("score,mapie_score", [("lac", LACConformityScore), ("aps", _NonRandomizedAPS)])
def test_identical_to_mapie(score, mapie_score):
    rng = np.random.default_rng(5)
    probs, labels = _miscalibrated_problem(5, inputs=3000)
    probs = np.concatenate([probs[:1000], _with_ties(probs[1000:], rng)])  # ties only where sets are made
    _, quantiles, mapie_sets = _mapie(probs, labels, 1000, mapie_score())
    ours = calibrate(probs[:1000], labels[:1000], score)
    for i, coverage in enumerate(DEFAULT_COVERAGES):
        assert ours.threshold(coverage) == quantiles[i]  # bit for bit
        np.testing.assert_array_equal(prediction_sets(probs[1000:], ours, coverage), mapie_sets[:, :, i])


def test_mapie_randomized_aps_threshold_and_sets():
    # Stock MAPIE APS (randomized calibration scores): our quantile of ITS scores is its threshold, and
    # our sets at that threshold are its sets (include_last_label=True).
    probs, labels = _miscalibrated_problem(6, inputs=3000)
    mapie, quantiles, mapie_sets = _mapie(probs, labels, 1000, "aps", random_state=0)
    thresholds = {c: conformal_threshold(mapie.conformity_scores, c) for c in DEFAULT_COVERAGES}
    assert list(thresholds.values()) == list(quantiles)
    cal = ConformalCalibration("aps", thresholds, n_calibration=1000, n_classes=probs.shape[1])
    for i, coverage in enumerate(DEFAULT_COVERAGES):
        np.testing.assert_array_equal(prediction_sets(probs[1000:], cal, coverage), mapie_sets[:, :, i])


# --- metadata and bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_metadata_round_trip_keeps_infinity(score):
    probs, labels = _miscalibrated_problem(7, inputs=60)
    cal = calibrate(probs, labels, score)  # 0.99 needs n >= 99: an infinite threshold
    assert cal.threshold(0.99) == math.inf
    text = json.dumps(cal.to_metadata(), allow_nan=False)
    assert '"threshold": null' in text
    back = ConformalCalibration.from_metadata(json.loads(text))
    assert back == cal and back.threshold(0.99) == math.inf
    assert prediction_sets(probs, back, 0.99).all()


def test_coverage_levels_match_robustly_and_unknown_ones_are_named():
    probs, labels = _miscalibrated_problem(8, inputs=500)
    cal = calibrate(probs, labels, "lac")
    assert cal.coverages == DEFAULT_COVERAGES
    assert cal.threshold(0.90000001) == cal.threshold(0.9) == cal.threshold(np.float32(0.9))
    for bad in (0.85, 0.9001, "0.9", None, True):
        with pytest.raises(ConformalError, match=r"0\.8, 0\.9, 0\.95, 0\.99") as caught:
            prediction_sets(probs, cal, bad)
        assert isinstance(caught.value, FordeError)
    extra = calibrate(probs, labels, "lac", coverages=(*DEFAULT_COVERAGES, 0.85))
    assert extra.coverages == (0.8, 0.85, 0.9, 0.95, 0.99)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"probs": np.zeros((3,))}, r"\[inputs, classes\]"),
        ({"probs": np.zeros((0, 3))}, r"\[inputs, classes\]"),
        ({"probs": np.full((4, 3), np.nan)}, "probabilities in"),
        ({"probs": np.full((4, 3), 1.5)}, "probabilities in"),
        ({"probs": np.zeros((4, 3), dtype=int)}, "floating-point"),
        ({"labels": np.array([0, 1, 3, 0])}, "0..2"),
        ({"labels": np.array([0, 1])}, r"shape \(4,\)"),
        ({"score": "topk"}, "lac, aps, raps"),
        ({"score": "lac", "k_reg": 2}, "raps score only"),
        ({"coverages": (0.9, 1.0)}, "strictly between 0 and 1"),
        ({"coverages": (0.9, 0.9000001)}, "differ by more than"),
        ({"score": "raps", "k_reg": -1}, "k_reg"),
        ({"score": "raps", "k_reg": 1, "lam": math.nan}, "lam"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    args = {"probs": np.full((4, 3), 1 / 3), "labels": np.array([0, 1, 2, 0]), **kwargs}
    with pytest.raises(ConformalError, match=match):
        calibrate(**args)


def test_raps_tuning_needs_two_inputs():
    with pytest.raises(ConformalError, match="at least 2 inputs"):
        calibrate(np.array([[0.7, 0.3]]), np.array([0]), "raps")


def test_sets_refuse_the_wrong_number_of_classes():
    cal = calibrate(np.full((20, 3), 1 / 3), np.arange(20) % 3, "aps")
    with pytest.raises(ConformalError, match="3 classes, got 4"):
        prediction_sets(np.full((2, 4), 0.25), cal, 0.9)


def test_float32_probabilities_a_little_over_one_are_accepted():
    probs = np.array([[1.0000001, 0.0], [0.5, 0.5]], dtype=np.float32)
    cal = calibrate(np.array([[0.9, 0.1], [0.2, 0.8]] * 10), np.array([0, 1] * 10), "lac")
    assert prediction_sets(probs, cal, 0.9)[0, 0]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"version": 2}, "version"),
        ({"score": "bogus"}, "score"),
        ({"thresholds": [{"coverage": 0.9}]}, "thresholds"),
        ({"thresholds": [{"coverage": 1.5, "threshold": 0.3}]}, "coverage"),
        ({"thresholds": [{"coverage": 0.9, "threshold": "x"}]}, "threshold"),
        ({"thresholds": []}, "at least one"),
        ({"n_calibration": 0}, "n_calibration"),
        ({"k_reg": 3}, "raps score only"),
    ],
)
def test_bad_metadata_is_named(change, match):
    metadata = calibrate(np.full((20, 3), 1 / 3), np.arange(20) % 3, "aps").to_metadata() | change
    with pytest.raises(ConformalError, match=match):
        ConformalCalibration.from_metadata(metadata)


def test_set_coverage_and_size_by_hand():
    sets = np.array([[True, False, True], [False, False, False], [True, True, True]])
    assert set_coverage_and_size(sets, np.array([2, 0, 1])) == (pytest.approx(2 / 3), pytest.approx(5 / 3))
    with pytest.raises(ConformalError, match="boolean"):
        set_coverage_and_size(sets.astype(int), np.array([2, 0, 1]))
