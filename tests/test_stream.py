"""The held-out shifts (every registered one tested), and the offline stream replay through the same
Monitor the service uses: on a synthetic predictor (fast, exact expectations) and on the committed
model with the bundled digits."""

import json
import math

import numpy as np
import pytest
from monitor_fakes import MemoryStore, fake_outputs

from forde_serve.conformal import calibrate, prediction_sets
from forde_serve.corruptions import CORRUPTIONS, HELD_OUT_SHIFTS, SEVERITIES, corrupt, shift
from forde_serve.monitoring.monitor import MonitorConfig
from forde_serve.monitoring.stream import (
    _clopper_pearson_upper,
    detection_delays,
    evaluate_streams,
    false_alarms,
    replay,
)
from forde_serve.reference import MonitorReference


@pytest.mark.parametrize("name", sorted(HELD_OUT_SHIFTS))
def test_every_held_out_shift_is_deterministic_in_range_and_new(digits, name):
    x = digits[0][:50]
    out = shift(x, name)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 16.0
    np.testing.assert_array_equal(out, shift(x, name))  # same seed, same picture
    assert np.abs(out - x).mean() > 0.5  # a real change
    for corruption in CORRUPTIONS:  # not one of digits-C's
        for severity in SEVERITIES:
            assert not np.allclose(out, corrupt(x, corruption, severity), atol=1e-3), (corruption, severity)


def test_held_out_shifts_by_hand():
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 3, 3] = 16.0
    thick = shift(x, "thicken")[0, 0]
    assert thick[2:4, 2:4].tolist() == [[16.0, 16.0], [16.0, 16.0]] and thick.sum() == 64.0
    assert shift(np.full((1, 1, 8, 8), 8.0, np.float32), "gamma")[0, 0, 0, 0] == 4.0  # (1/2)^2 * 16
    zoomed = shift(np.ones((1, 1, 8, 8), np.float32) * 16, "zoom_out")[0, 0]
    assert zoomed[0].max() == 0.0 and zoomed[3:5, 3:5].min() == 16.0  # the picture shrinks; background around
    sheared = shift(x, "shear")[0, 0]
    assert sheared.sum() == pytest.approx(16.0) and sheared[3].sum() == pytest.approx(16.0)  # rows slide sideways
    with pytest.raises(ValueError, match="shear, zoom_out, thicken, gamma"):
        shift(x, "blur")


def _pool(seed, rows, shifted=False, classes=4):
    """Outputs `[rows]` and labels: calibrated (labels drawn from the probabilities), or shifted (larger
    MI, and half the labels moved to the next class: the model is confidently wrong)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(rows, classes))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (np.cumsum(probs, 1) > rng.random((rows, 1))).argmax(1)
    if shifted:
        labels = np.where(rng.random(rows) < 0.5, (labels + 1) % classes, labels)
    return fake_outputs(probs, rng.exponential(0.6 if shifted else 0.2, rows)), labels


@pytest.fixture
def synthetic():
    validation, labels = _pool(0, 200)
    calibration = calibrate(validation["probs"], labels)
    return calibration, MonitorReference.from_scores(validation["mutual_information"])


def _replaying(reference, calibration):
    return {"store_factory": MemoryStore, "reference": reference, "calibration": calibration,
            "config": MonitorConfig(gamma=0.05)}  # fmt: skip


def _aci_bound(gamma, rows, alpha=0.1):
    return (max(alpha, 1 - alpha) + gamma) / (gamma * rows)  # Gibbs & Candes, labels back before the next row


def test_replay_of_a_clean_stream_keeps_coverage_and_does_not_fire(synthetic):
    calibration, reference = synthetic
    outputs, labels = _pool(1, 1000)
    config = MonitorConfig(gamma=0.05)
    run = replay(
        outputs, labels, store_factory=MemoryStore, reference=reference, calibration=calibration, config=config
    )
    assert run["fired_at"] is None and len(run["log_statistic"]) == 1000
    static = prediction_sets(outputs["probs"], calibration, 0.9)[np.arange(1000), labels]
    assert run["covered"]["static"] == static.tolist()
    assert abs(run["coverage"]["adaptive"] - 0.9) <= _aci_bound(0.05, 1000)
    assert json.loads(json.dumps(run, allow_nan=False)) == run


def test_replay_of_a_shifted_stream_fires_and_adaptive_sets_recover_coverage(synthetic):
    calibration, reference = synthetic
    outputs, labels = _pool(2, 1000, shifted=True)
    config = MonitorConfig(gamma=0.05)
    run = replay(
        outputs, labels, store_factory=MemoryStore, reference=reference, calibration=calibration, config=config
    )
    assert run["fired_at"] is not None and run["fired_at"] < 30
    assert run["log_statistic"][run["fired_at"] - 1] >= math.log(100) > run["log_statistic"][run["fired_at"] - 2]
    assert run["coverage"]["static"] < 0.75
    assert abs(run["coverage"]["adaptive"] - 0.9) <= _aci_bound(0.05, 1000)
    assert len(run["alpha"]) == 1000 and run["alpha"][0] == pytest.approx(0.1)


def test_detection_delays_and_false_alarms_over_shuffled_orders(synthetic):
    _, reference = synthetic
    streams = {"clean": _pool(3, 150)[0], "shifted": _pool(4, 150, shifted=True)[0]}
    delays = detection_delays(streams, store_factory=MemoryStore, reference=reference, orders=4, seed=3)
    assert delays["shifted"]["fired"] == 4 and delays["shifted"]["max_delay"] < 40
    assert delays["shifted"]["median_delay"] == float(np.median(delays["shifted"]["delays"]))
    assert delays["clean"]["fired"] == 0 and delays["clean"]["median_delay"] is None
    again = detection_delays(streams, store_factory=MemoryStore, reference=reference, orders=4, seed=3)
    assert again == delays  # seeded: a replay repeats
    alarms = false_alarms(streams["clean"], store_factory=MemoryStore, reference=reference, permutations=10)
    assert alarms["fired"] == 0 and alarms["rate_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 10))


def test_clopper_pearson_upper_bound_by_hand():
    assert _clopper_pearson_upper(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-9)  # 0.0295
    # k = 1 of 100: the p with P(X <= 1) = 0.05
    p = _clopper_pearson_upper(1, 100)
    assert (1 - p) ** 100 + 100 * p * (1 - p) ** 99 == pytest.approx(0.05, abs=1e-9)
    assert _clopper_pearson_upper(5, 5) == 1.0


def test_evaluate_streams_on_the_committed_model(digits, runtime):
    # Not the project's split (that needs torch): the first 300 bundled digits as validation, the next
    # 120 as the clean stream, and one held-out shift of them.
    images, labels = digits
    validation = runtime.predict(images[:300])
    calibration = calibrate(
        validation["probs"],
        labels[:300],
        group_scores=validation["predictive_entropy"],
        group_score="predictive_entropy",
    )
    reference = MonitorReference.from_scores(validation["mutual_information"])
    clean = (images[300:420], labels[300:420])
    report = evaluate_streams(
        runtime, clean, {"zoom_out": (shift(clean[0], "zoom_out"), clean[1])},
        store_factory=MemoryStore, reference=reference, calibration=calibration, orders=2, permutations=3,
    )  # fmt: skip
    assert report["false_alarms"]["permutations"] == 3 and report["false_alarms"]["rows"] == 120
    assert report["detection"]["zoom_out"]["fired"] == 2 and report["detection"]["zoom_out"]["max_delay"] < 30
    coverage = report["coverage"]
    assert set(coverage) == {"clean", "zoom_out"}
    assert set(coverage["zoom_out"]["coverage"]) == {"static", "mondrian", "adaptive"}
    assert coverage["zoom_out"]["coverage"]["mondrian"] > coverage["zoom_out"]["coverage"]["static"]
    assert len(coverage["clean"]["running"]["adaptive"]) == 120
    assert coverage["clean"]["running"]["static"][-1] == pytest.approx(coverage["clean"]["coverage"]["static"])
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_figures_of_a_replay(synthetic, tmp_path):
    from forde_serve.monitoring.figures import coverage_figure, martingale_figure, save_png

    calibration, reference = synthetic
    clean, shifted = _pool(5, 120)[0], _pool(6, 120, shifted=True)
    run = replay(*shifted, **_replaying(reference, calibration))
    paths = {"clean": replay(clean, None, **_replaying(reference, calibration))["log_statistic"],
             "shifted": run["log_statistic"]}  # fmt: skip
    figure = martingale_figure(paths, threshold=100.0)
    axis = figure.axes[0]
    assert [line.get_label() for line in axis.lines if not line.get_label().startswith("_")] == [
        "clean", "shifted", "alarm (M = 100)"]  # fmt: skip
    assert len(axis.lines) == 4  # two paths, the shifted one's alarm dot, the alarm line
    running = {kind: (np.cumsum(c) / np.arange(1, 121)).tolist() for kind, c in run["covered"].items()}
    figure = coverage_figure(running, target=0.9)
    assert len(figure.axes[0].lines) == 3
    path = save_png(figure, tmp_path / "coverage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
