"""Calibrated probabilities and conformal prediction sets, end to end: what `forde export` bakes into a
file, what the runtime serves from it, and how a file exported before them keeps serving."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from forde_serve.calibration import ensemble_probs, member_probs
from forde_serve.conformal import prediction_sets, set_coverage_and_size
from forde_serve.metrics import uncertainty
from forde_serve.runtime import EnsembleRuntime, InvalidInput
from forde_serve.validation import choose_on_validation

from helpers import MODEL, copy_with_metadata, run_forde

OLD_KEYS = ("forde.calibration", "forde.conformal")


def test_choices_are_made_in_order_on_the_same_inputs():
    # Three-member ensemble on synthetic data whose labels follow softmax(logits / 2): the fitted
    # temperature is near 2, the conformal thresholds are those of the probabilities at that
    # temperature, and the abstention threshold is chosen on their mutual information.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 3, 5))
    probs_true = ensemble_probs(logits, 2.0)
    labels = np.array([rng.choice(5, p=p) for p in probs_true])
    chosen = choose_on_validation(logits, labels, coverages=(0.85,))
    assert chosen.temperature.temperature == pytest.approx(2.0, rel=0.1)
    assert chosen.conformal.coverages == (0.8, 0.85, 0.9, 0.95, 0.99)
    sets = prediction_sets(ensemble_probs(logits, chosen.temperature_value), chosen.conformal, 0.9)
    covered, _ = set_coverage_and_size(sets, labels)
    assert covered >= 0.9  # on the calibration inputs themselves, by construction of the quantile
    uncalibrated = choose_on_validation(logits, labels, calibrate_temperature=False)
    assert uncalibrated.temperature is None and uncalibrated.temperature_value == 1.0
    assert not [w for w in chosen.warnings + uncalibrated.warnings if "temperature" in w]


def test_a_temperature_at_the_search_bound_is_refused_with_a_warning():
    # Labels that follow the members' argmax exactly: the NLL keeps falling as T -> 0, to the search's bound.
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (200, 1, 4))  # one member: the ensemble's argmax is its argmax
    labels = ensemble_probs(logits).argmax(1)
    chosen = choose_on_validation(logits, labels)
    assert chosen.temperature is None and chosen.temperature_value == 1.0
    assert chosen.warnings[0].startswith("the temperature search ended at its bound (0.05, searched 0.05 to 20)")


def test_a_temperature_that_worsens_ece_is_kept_and_said():
    # One overconfident member over two classes, labels its argmax 60% of the time: the NLL-optimal T
    # (about 3.8) lowers the NLL and raises the 15-bin ECE (found by a scan of such setups; seed 3's draw).
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4.1, (167, 1, 2))
    labels = np.where(rng.uniform(size=167) < 0.6, ensemble_probs(logits).argmax(1), rng.integers(0, 2, 167))
    chosen = choose_on_validation(logits, labels, target_risk=0.5)
    fit = chosen.temperature
    assert fit is not None and fit.nll_after < fit.nll_before and fit.ece_after > fit.ece_before
    assert [w for w in chosen.warnings if "temperature" in w] == [
        f"the temperature {fit.temperature:.3g} lowers the validation NLL ({fit.nll_before:.4f} -> "
        f"{fit.nll_after:.4f}) but raises its ECE ({fit.ece_before:.4f} -> {fit.ece_after:.4f}); it is kept "
        "(NLL is the criterion), export with --no-calibrate to keep temperature 1"
    ]


def test_an_abstention_rule_that_accepts_almost_nothing_is_said():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (180, 4, 10))
    labels = rng.integers(0, 10, 180)  # labels unrelated to the members: no threshold reaches 1% error
    chosen = choose_on_validation(logits, labels, calibrate_temperature=False)
    assert chosen.abstention.coverage < 0.05
    assert any(w.startswith("the abstention threshold accepts 0.0% of the validation inputs") for w in chosen.warnings)


def test_an_abstention_rule_that_accepts_everything_is_said():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (200, 4, 10))
    labels = ensemble_probs(logits).argmax(1)
    labels[0] = (labels[0] + 1) % 10  # one wrong of 200: 0.5% error, within the 1% target at every threshold
    chosen = choose_on_validation(logits, labels, calibrate_temperature=False, target_risk=0.01)
    assert (chosen.abstention.coverage, chosen.abstention.validation_risk) == (1.0, 0.005)
    # set at the largest mutual information among the validation inputs: nothing stranger was seen
    assert chosen.abstention.threshold == uncertainty(member_probs(logits))["mutual_information"].max()
    assert chosen.warnings == (
        "the abstention threshold accepts every validation input (their error rate 0.5% is within the target "
        "1.0%), so it was set at the largest mutual information seen and says little about stranger inputs",
    )


@pytest.mark.slow
def test_export_bakes_the_temperature_and_stores_thresholds(digits_export, digits_split, quickstart_runs):
    path, stdout = digits_export
    # the run's metrics.json said which temperature the export would fit, and at what test accuracy
    trained = json.loads((quickstart_runs["forde"] / "metrics.json").read_text())["calibrated"]
    assert EnsembleRuntime(path).card.temperature == pytest.approx(trained["temperature"], rel=1e-9)
    assert "temperature" in stdout and "prediction sets (lac) for coverage 0.8, 0.9, 0.95, 0.99" in stdout
    runtime = EnsembleRuntime(path)
    card = runtime.card
    assert card.calibration is not None and card.temperature != 1.0
    assert card.coverage_levels == (0.8, 0.9, 0.95, 0.99)
    # The graph's member logits are the raw ones divided by T: its probabilities are ensemble_probs at T.
    out = runtime.predict(digits_split["val"][0])
    raw = out["member_logits"].astype(np.float64) * card.temperature
    np.testing.assert_allclose(out["probs"], ensemble_probs(raw, card.temperature), atol=1e-5)
    # What the file stores is what choose_on_validation decides on the same validation split.
    again = choose_on_validation(raw, digits_split["val"][1])
    assert again.temperature.temperature == pytest.approx(card.temperature, rel=1e-4)
    assert again.conformal.score == card.conformal.score
    for level in card.coverage_levels:
        assert again.conformal.threshold(level) == pytest.approx(card.conformal.threshold(level), abs=1e-5)


@pytest.mark.slow
def test_export_options_no_calibrate_and_extra_levels(quickstart_runs, tmp_path):
    out = tmp_path / "m.onnx"
    result = run_forde(
        "export", quickstart_runs["de"], "--out", out, "--no-calibrate", "--conformal-score", "aps", "--alpha", "0.03"
    )
    assert "temperature" not in result.stdout
    card = EnsembleRuntime(out).card
    assert card.calibration is None and card.temperature == 1.0
    assert card.conformal.score == "aps" and card.coverage_levels == (0.8, 0.9, 0.95, 0.97, 0.99)
    bad = run_forde("export", quickstart_runs["de"], "--out", tmp_path / "b.onnx", "--raps-k-reg", "2", check=False)
    assert bad.returncode == 2 and "only for --conformal-score raps" in bad.stderr


def test_the_runtime_serves_sets_for_stored_levels(runtime):
    x = np.random.default_rng(1).uniform(0, 16, (6, 1, 8, 8)).astype(np.float32)
    plain = runtime.predict(x)
    out = runtime.predict(x, coverage=0.95)
    np.testing.assert_array_equal(out["probs"], plain["probs"])
    conformal = runtime.card.conformal  # Mondrian: each input's group by its predictive entropy
    by_group = prediction_sets(plain["probs"], conformal, 0.95, group_scores=plain[conformal.group_score])
    np.testing.assert_array_equal(out["prediction_set"], by_group)
    np.testing.assert_array_equal(out["set_size"], out["prediction_set"].sum(1))
    wider = runtime.predict(x, coverage=0.99)["prediction_set"]
    assert (wider >= out["prediction_set"]).all()  # a higher level's sets contain a lower one's
    with pytest.raises(InvalidInput, match=r"coverage: this model is calibrated for 0.8, 0.9, 0.95, 0.99, got 0.5"):
        runtime.predict(x, coverage=0.5)
    assert "prediction_set" in runtime.explain(x[:2], coverage=0.9)


def test_a_file_exported_before_calibration_serves_as_before(runtime, tmp_path):
    old = EnsembleRuntime(copy_with_metadata(MODEL, tmp_path, lambda props: [props.pop(k, None) for k in OLD_KEYS]))
    assert old.card.calibration is None and old.card.coverage_levels == ()
    x = np.random.default_rng(2).uniform(0, 16, (4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(old.predict(x)["probs"], runtime.predict(x)["probs"])
    with pytest.raises(InvalidInput, match="this model file has no conformal thresholds"):
        old.predict(x, coverage=0.9)


def test_broken_conformal_metadata_is_a_model_file_error(tmp_path):
    from forde_serve.runtime import ModelFileError

    path = copy_with_metadata(MODEL, tmp_path, lambda props: props.update({"forde.conformal": json.dumps({"a": 1})}))
    with pytest.raises(ModelFileError, match="broken metadata"):
        EnsembleRuntime(path)


def test_the_committed_file_is_calibrated_and_stores_thresholds(runtime):
    card = runtime.card
    assert card.temperature != 1.0 and card.coverage_levels == (0.8, 0.9, 0.95, 0.99)
    meta = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["forde.calibration"])["temperature"] == runtime.card.temperature
