"""Temperature scaling of an ensemble: values by hand, recovery of a known temperature, bad input."""

import json
import math

import numpy as np
import pytest

from forde_serve.calibration import CalibrationError, TemperatureFit, ensemble_nll, ensemble_probs, fit_temperature
from forde_serve.errors import FordeError
from forde_serve.metrics import classification_metrics


def _synthetic(temperature: float, inputs: int = 16_000, members: int = 2, classes: int = 10, seed: int = 0):
    """Member logits `[N, M, C]` and labels drawn from the ensemble's own probabilities at `temperature`.

    Members share a per-input logit vector plus member noise, so they disagree a little, as an
    ensemble's members do; the labels come from exactly the model family being fitted.
    """
    rng = np.random.default_rng(seed)
    shared = rng.normal(scale=3.0, size=(inputs, 1, classes))
    logits = shared + rng.normal(scale=1.0, size=(inputs, members, classes))
    probs = ensemble_probs(logits, temperature)
    labels = (probs.cumsum(axis=1) > rng.random((inputs, 1))).argmax(axis=1)
    return logits, labels


def _standard_error(logits, labels, temperature):
    """The MLE's standard error from the observed information: 1 / sqrt(d^2 (N * NLL) / dT^2) at the fit."""
    h = 1e-3 * temperature
    total = [len(labels) * ensemble_nll(logits, labels, temperature + k * h) for k in (-1, 0, 1)]
    curvature = (total[0] - 2 * total[1] + total[2]) / h**2
    return 1.0 / math.sqrt(curvature)


def test_ensemble_probs_by_hand():
    # Member 1: logits [0, ln 3] -> softmax [1/4, 3/4]; member 2: [0, 0] -> [1/2, 1/2]; mean [3/8, 5/8].
    logits = np.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    np.testing.assert_allclose(ensemble_probs(logits), [[3 / 8, 5 / 8]], rtol=1e-12)
    # At T = 2 member 1 becomes [0, ln(3)/2] -> [1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)].
    s = math.sqrt(3.0)
    expected = [[(1 / (1 + s) + 0.5) / 2, (s / (1 + s) + 0.5) / 2]]
    np.testing.assert_allclose(ensemble_probs(logits, 2.0), expected, rtol=1e-12)
    # The NLL of label 1 at T = 1 is -ln(5/8).
    assert ensemble_nll(logits, np.array([1])) == pytest.approx(-math.log(5 / 8), rel=1e-12)


def test_ensemble_probs_is_stable_for_large_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]]])
    probs = ensemble_probs(logits, 0.05)  # logits / T = 20 000
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]], atol=1e-12)
    assert math.isfinite(ensemble_nll(logits, np.array([2]), 0.05))  # log p underflows; the NLL does not


def test_nll_matches_the_metrics_module_at_t_1():
    logits, labels = _synthetic(1.0, inputs=500)
    member_probs = np.exp(logits - logits.max(-1, keepdims=True))
    member_probs /= member_probs.sum(-1, keepdims=True)
    assert ensemble_nll(logits, labels) == pytest.approx(classification_metrics(member_probs, labels)["nll"], rel=1e-9)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_recovers_a_known_temperature(true_temperature):
    logits, labels = _synthetic(true_temperature)
    fit = fit_temperature(logits, labels)
    error = _standard_error(logits, labels, fit.temperature)
    # The MLE is asymptotically normal: 4 standard errors fail a correct fit about once in 16 000 runs.
    # The error is about 1% of T at N = 16 000, so the check is also tight enough to catch a wrong fit.
    assert error < 0.03 * true_temperature
    assert abs(fit.temperature - true_temperature) < 4 * error, (fit, error)
    assert fit.nll_after <= fit.nll_before


def test_the_fit_is_the_minimum_it_reports():
    logits, labels = _synthetic(1.7, inputs=3000, seed=1)
    fit = fit_temperature(logits, labels)
    assert fit.nll_after == pytest.approx(ensemble_nll(logits, labels, fit.temperature), rel=1e-12)
    # Neighbours at a relative 1e-3 are no better (the search brackets log T to 1e-7).
    for factor in (0.999, 1.001):
        assert ensemble_nll(logits, labels, fit.temperature * factor) >= fit.nll_after
    probs = ensemble_probs(logits, fit.temperature)
    assert fit.ece_after == pytest.approx(classification_metrics(probs[:, None, :], labels)["ece"], rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_nll_after_never_exceeds_nll_before(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=rng.uniform(0.1, 5.0), size=(200, 3, 5))
    labels = rng.integers(0, 5, size=200)  # labels unrelated to the logits: the best T is large
    fit = fit_temperature(logits, labels)
    assert fit.nll_after <= fit.nll_before


def test_bounds_are_respected():
    logits, labels = _synthetic(50.0, inputs=3000)
    assert fit_temperature(logits, labels).temperature == pytest.approx(20.0, rel=1e-12)
    logits, labels = _synthetic(4.0, inputs=3000)
    assert fit_temperature(logits, labels, bounds=(0.5, 2.0)).temperature == pytest.approx(2.0, rel=1e-12)
    # Labels that always follow the top logit: sharper is always better, down to the lower bound.
    logits = np.random.default_rng(0).normal(size=(300, 2, 4))
    labels = logits.mean(1).argmax(1)
    logits[:, :, :] += 5.0 * np.eye(4)[labels][:, None, :]
    assert fit_temperature(logits, labels, bounds=(0.25, 4.0)).temperature == pytest.approx(0.25, rel=1e-12)


def test_metadata_round_trip():
    logits, labels = _synthetic(1.3, inputs=2000)
    fit = fit_temperature(logits, labels)
    text = json.dumps(fit.to_metadata(), allow_nan=False)
    assert TemperatureFit.from_metadata(json.loads(text)) == fit


@pytest.mark.parametrize(
    "metadata,field",
    [
        ([], "JSON object"),
        ({"temperature": 1.0}, "nll_before"),
        ({"temperature": "1", "nll_before": 1, "nll_after": 1, "ece_before": 0, "ece_after": 0}, "temperature"),
        ({"temperature": -1.0, "nll_before": 1, "nll_after": 1, "ece_before": 0, "ece_after": 0}, "temperature"),
    ],
)
def test_bad_metadata_is_named(metadata, field):
    with pytest.raises(CalibrationError, match=field):
        TemperatureFit.from_metadata(metadata)


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (np.zeros((4, 3)), np.zeros(4, int), r"\[inputs, members, classes\]"),
        (np.zeros((0, 2, 3)), np.zeros(0, int), "at least one input"),
        (np.zeros((4, 2, 1)), np.zeros(4, int), "at least 2 classes"),
        (np.full((4, 2, 3), np.nan), np.zeros(4, int), "finite"),
        (np.zeros((4, 2, 3)), np.zeros(5, int), r"shape \(4,\)"),
        (np.zeros((4, 2, 3)), np.array([0, 1, 2, 3]), "0..2"),
        (np.zeros((4, 2, 3)), np.array([0, 1, -1, 2]), "0..2"),
        (np.zeros((4, 2, 3)), np.zeros(4), "integer"),
    ],
)
def test_bad_input_is_refused(logits, labels, match):
    with pytest.raises(CalibrationError, match=match) as caught:
        fit_temperature(logits, labels)
    assert isinstance(caught.value, FordeError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, "2"])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(CalibrationError, match="temperature"):
        ensemble_probs(np.zeros((1, 1, 2)), temperature)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0, math.inf), (1.0,), "ab"])
def test_bad_bounds_are_refused(bounds):
    with pytest.raises(CalibrationError, match="bounds"):
        fit_temperature(np.zeros((2, 1, 2)), np.array([0, 1]), bounds=bounds)
