"""Group-conditional (Mondrian) split conformal sets: per-group thresholds by hand, per-group coverage
on a large synthetic problem where plain sets fail the uncertain group, and metadata that still reads
(and serves bit for bit) what was written before groups and kept scores existed."""

import json
import math

import numpy as np
import onnx
import pytest

from forde_serve.conformal import (
    MIN_TOP_ROWS,
    ConformalCalibration,
    ConformalError,
    calibrate,
    conformal_threshold,
    conformity_scores,
    prediction_sets,
    threshold_sets,
)
from forde_serve.runtime import EnsembleRuntime

from helpers import MODEL


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _heteroscedastic(seed, inputs, classes=10):
    """Half the inputs easy, half hard, and the model equally confident on both: the hard half's labels
    are often not its top class. The uncertainty score u (known at prediction time) tells them apart."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(inputs, classes))
    probs = _softmax(logits)
    hard = rng.random(inputs) < 0.5
    truth = np.where(hard[:, None], _softmax(logits / 4.0), probs)
    labels = (np.cumsum(truth, 1) > rng.random((inputs, 1))).argmax(1)
    u = np.where(hard, 1.0, 0.0) + rng.uniform(0, 0.9, inputs)  # hard inputs score higher
    return probs, labels, u, hard


def test_per_group_thresholds_are_each_groups_order_statistic():
    probs, labels, u, _ = _heteroscedastic(0, 300)
    cal = calibrate(probs, labels, group_scores=u, groups=3)
    edges = np.quantile(u, [1 / 3, 2 / 3])
    assert cal.groups == 3 and cal.group_edges == tuple(edges) and sum(cal.group_rows) == 300
    member = np.searchsorted(edges, u, side="right")
    scores = conformity_scores(probs, labels)
    for g in range(3):
        assert cal.group_rows[g] == (member == g).sum() == 100
        for coverage in cal.coverages:
            assert cal.threshold(coverage, g) == conformal_threshold(scores[member == g], coverage)
    for coverage in cal.coverages:  # the marginal thresholds are unchanged by grouping
        assert cal.threshold(coverage) == calibrate(probs, labels).threshold(coverage)
    np.testing.assert_array_equal(cal.group_of(u), member)
    # kept scores are group by group, each group's in calibration order
    np.testing.assert_array_equal(np.array(cal.scores), np.concatenate([scores[member == g] for g in range(3)]))


def test_sets_take_each_rows_group_threshold():
    probs, labels, u, _ = _heteroscedastic(1, 400)
    cal = calibrate(probs, labels, group_scores=u, groups=4)
    new_probs, _, new_u, _ = _heteroscedastic(2, 50)
    sets = prediction_sets(new_probs, cal, 0.9, group_scores=new_u)
    groups = cal.group_of(new_u)
    for i in range(50):
        expected = threshold_sets(new_probs[i : i + 1], cal, cal.threshold(0.9, int(groups[i])))[0]
        np.testing.assert_array_equal(sets[i], expected)
    # without group scores (or on an ungrouped calibration) the marginal sets, bit for bit
    plain = calibrate(probs, labels)
    np.testing.assert_array_equal(prediction_sets(new_probs, cal, 0.9), prediction_sets(new_probs, plain, 0.9))
    np.testing.assert_array_equal(
        prediction_sets(new_probs, plain, 0.9, group_scores=new_u), prediction_sets(new_probs, plain, 0.9)
    )


def test_each_group_keeps_its_coverage_where_plain_sets_fail_the_hard_one():
    probs, labels, u, hard = _heteroscedastic(3, 24_000)
    calibration, test = slice(0, 4000), slice(4000, None)
    cal = calibrate(probs[calibration], labels[calibration], group_scores=u[calibration], groups=4)
    plain = calibrate(probs[calibration], labels[calibration])
    rows = np.arange(20_000)
    for coverage in (0.8, 0.9, 0.95):
        mondrian = prediction_sets(probs[test], cal, coverage, group_scores=u[test])[rows, labels[test]]
        marginal = prediction_sets(probs[test], plain, coverage)[rows, labels[test]]
        groups = cal.group_of(u[test])
        band = 4 * math.sqrt(coverage * (1 - coverage) * (1 / 5000 + 1 / 1000))  # test + calibration spread
        for g in range(4):
            assert mondrian[groups == g].mean() >= coverage - band, (coverage, g)
        assert marginal[hard[test]].mean() < coverage - 0.05  # the point: plain sets under-cover the hard half
        assert abs(mondrian.mean() - coverage) <= band and abs(marginal.mean() - coverage) <= band


def test_default_groups_halve_toward_the_most_uncertain():
    probs, labels, u, _ = _heteroscedastic(4, 180)
    assert MIN_TOP_ROWS == 20
    cal = calibrate(probs, labels, group_scores=u)
    assert cal.group_rows == (90, 45, 22, 23)  # quantiles 1/2, 3/4, 7/8: the top group keeps >= 20 rows
    np.testing.assert_allclose(cal.group_edges, np.quantile(u, [0.5, 0.75, 0.875]))
    assert calibrate(probs[:39], labels[:39], group_scores=u[:39]).groups == 0  # 39 / 2 < 20: not grouped
    assert calibrate(probs[:40], labels[:40], group_scores=u[:40]).group_rows == (20, 20)
    assert calibrate(probs, labels, group_scores=u, groups=5).group_rows == (36,) * 5  # equal groups on request


def test_metadata_round_trip_with_groups_and_scores():
    probs, labels, u, _ = _heteroscedastic(5, 120)
    for score in ("lac", "aps", "raps"):
        cal = calibrate(probs, labels, score, group_scores=u, groups=2, group_score="predictive_entropy")
        # 0.99 needs 99 rows per group, which 60 are not: that level takes the marginal threshold everywhere
        for group in (0, 1):
            assert cal.threshold(0.99, group) == max(cal.threshold(0.99), cal.threshold(0.95, group))
        assert score == "raps" or cal.threshold(0.99) < math.inf  # raps calibrates on 96 of the 120 rows
        assert cal.threshold(0.9, 0) != cal.threshold(0.9, 1)
        text = json.dumps(cal.to_metadata(), allow_nan=False)
        back = ConformalCalibration.from_metadata(json.loads(text))
        assert back == cal and back.group_score == "predictive_entropy"
        np.testing.assert_array_equal(
            prediction_sets(probs, back, 0.9, group_scores=u), prediction_sets(probs, cal, 0.9, group_scores=u)
        )


OLD_KEYS = {"version", "score", "k_reg", "lambda", "n_calibration", "n_tuning", "n_classes", "thresholds"}


def test_files_written_before_groups_and_scores_read_and_serve_the_same(tmp_path):
    """A copy of the committed file with its conformal metadata as files had it before groups and
    scores (the keys of OLD_KEYS only) and no shift reference: it opens and serves plain LAC sets."""
    model = onnx.load(str(MODEL))
    for prop in model.metadata_props:
        if prop.key == "forde.conformal":
            prop.value = json.dumps({k: v for k, v in json.loads(prop.value).items() if k in OLD_KEYS})
    kept = [prop for prop in model.metadata_props if prop.key != "forde.shift_reference"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    runtime = EnsembleRuntime(tmp_path / "old.onnx")
    old = runtime.card.conformal
    assert old.scores is None and old.groups == 0 and runtime.card.choices.reference is None
    assert set(old.to_metadata()) == OLD_KEYS
    assert ConformalCalibration.from_metadata(old.to_metadata()) == old
    # its sets are still the LAC rule of the module docstring, {c : 1 - p_c <= t + 1e-8}
    x = np.random.default_rng(0).uniform(0, 16, (64, 1, 8, 8)).astype(np.float32)
    probs = runtime.predict(x)["probs"]
    for coverage in old.coverages:
        by_hand = (1.0 - probs.astype(np.float64)) - old.threshold(coverage) <= 1e-8
        np.testing.assert_array_equal(prediction_sets(probs, old, coverage), by_hand)
        np.testing.assert_array_equal(runtime.predict(x, coverage=coverage)["prediction_set"], by_hand)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"groups": 0}, "groups"),
        ({"groups": 61}, "at most one group per calibration input"),
        ({"group_score": "confidence"}, "group_score"),
        ({"group_scores": np.zeros(60), "groups": 3}, "too many equal values"),
        ({"group_scores": np.full(60, np.nan)}, "finite"),
        ({"group_scores": np.zeros(59)}, r"shape \(60,\)"),
    ],
)
def test_bad_grouping_is_refused(kwargs, match):
    probs, labels, u, _ = _heteroscedastic(6, 60)
    args = {"group_scores": u, "groups": 2} | kwargs
    with pytest.raises(ConformalError, match=match):
        calibrate(probs, labels, **args)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"scores": "x"}, "'scores'"),
        ({"scores": [0.1]}, "scores: expected 60 numbers"),
        ({"groups": {"score": "mutual_information"}}, "'groups'"),
        ({"groups.edges": [0.5, 0.4]}, "group_edges"),
        ({"groups.rows": [30, 29]}, "add up to n_calibration"),
        ({"groups.score": "logits"}, "group_score"),
        ({"groups.thresholds": [[{"coverage": 0.9, "threshold": 0.1}]]}, "one entry per group"),
    ],
)
def test_bad_group_metadata_is_named(change, match):
    probs, labels, u, _ = _heteroscedastic(7, 60)
    metadata = calibrate(probs, labels, group_scores=u, groups=2).to_metadata()
    for key, value in change.items():
        if key.startswith("groups."):
            metadata["groups"][key.split(".")[1]] = value
        else:
            metadata[key] = value
    with pytest.raises(ConformalError, match=match):
        ConformalCalibration.from_metadata(metadata)


def test_threshold_sets_checks_its_thresholds():
    probs, labels, _, _ = _heteroscedastic(8, 30)
    cal = calibrate(probs, labels)
    assert threshold_sets(probs, cal, math.inf).all()
    per_row = np.where(np.arange(30) % 2 == 0, math.inf, 0.0)
    sets = threshold_sets(probs, cal, per_row)
    assert sets[::2].all() and not sets[1::2].all()
    with pytest.raises(ConformalError, match="-infinity"):
        threshold_sets(probs, cal, -math.inf)
    with pytest.raises(ConformalError, match="one per input"):
        threshold_sets(probs, cal, np.zeros(3))
