"""The shift test: p-values and martingale paths against MAPIE's and crepes' implementations, the
false-alarm guarantee on exchangeable streams, detection of a shifted one, and the state it keeps."""

import json
import math

import numpy as np
import pytest
from crepes.martingales import EpsilonBettingFunction, SimpleJumper
from mapie.exchangeability_testing import OnlineMartingaleTest
from scipy.stats import kstest

from forde_serve.errors import FordeError
from forde_serve.monitoring.martingale import (
    MIXTURE_EPSILONS,
    ConformalMartingale,
    MartingaleConfig,
    MartingaleStateError,
    log_martingale_path,
)
from forde_serve.reference import MonitorReference, ReferenceError


class _PowerBets:
    """A crepes betting function: for each eps, the power martingale's factor eps p^(eps - 1)."""

    def __init__(self, epsilons):
        self.epsilons = np.asarray(epsilons)

    def apply(self, p_values):
        p = np.asarray(p_values)[:, None]
        return self.epsilons[None] * p ** (self.epsilons[None] - 1)


def _exact_reference(reference_scores, stream_scores):
    """A reference whose bins separate every distinct score: quantization is then the identity on ranks."""
    every = np.unique(np.concatenate([reference_scores, stream_scores]))
    return MonitorReference("mutual_information", tuple(reference_scores), tuple((every[1:] + every[:-1]) / 2))


def test_p_values_equal_mapies_on_exact_scores_ties_included():
    rng = np.random.default_rng(0)
    reference = rng.exponential(size=60)
    stream = np.concatenate([rng.exponential(size=50), 3 * rng.exponential(size=50)])
    stream[[4, 20]] = reference[[7, 7]]  # ties with the reference
    stream[31] = stream[12]  # and within the stream
    test = ConformalMartingale(_exact_reference(reference, stream))
    _, ours = test.update(test.start(), stream, np.random.default_rng(42))

    mapie = OnlineMartingaleTest(random_state=42)  # draws one U per p-value from default_rng(42), as we do
    history, theirs = list(reference), []
    for score in stream:
        theirs.append(mapie.compute_p_value(score, np.array(history)))
        history.append(score)
    np.testing.assert_array_equal(ours, np.array(theirs))


def test_p_values_of_quantized_scores_are_mapies_on_the_bin_indices():
    # With coarse bins many scores share a bin: the p-value is then exactly MAPIE's on the bin index.
    rng = np.random.default_rng(1)
    reference = MonitorReference.from_scores(rng.exponential(size=80), bins=8)
    stream = rng.exponential(size=120) * 2
    test = ConformalMartingale(reference)
    _, ours = test.update(test.start(), stream, np.random.default_rng(3))
    mapie = OnlineMartingaleTest(random_state=3)
    history, theirs = list(reference.bin_of(np.array(reference.scores)).astype(float)), []
    for b in reference.bin_of(stream).astype(float):
        theirs.append(mapie.compute_p_value(b, np.array(history)))
        history.append(b)
    np.testing.assert_array_equal(ours, np.array(theirs))


@pytest.fixture
def p_values():
    return np.random.default_rng(2).uniform(size=400) ** 1.4  # a little small: the paths go somewhere


def test_mixture_path_equals_crepes_average_of_power_martingales(p_values):
    # crepes' SimpleJumper with a negligible jump rate is the plain average of its accounts' products.
    theirs = SimpleJumper(J=1e-300, bf=_PowerBets(MIXTURE_EPSILONS)).apply(p_values)
    np.testing.assert_allclose(log_martingale_path(p_values, MartingaleConfig("mixture")), np.log(theirs), atol=1e-9)


@pytest.mark.parametrize("epsilon", [0.05, 0.3, 0.9])
def test_power_path_equals_crepes(p_values, epsilon):
    theirs = SimpleJumper(J=1e-300, bf=_PowerBets([epsilon])).apply(p_values)
    ours = log_martingale_path(p_values, MartingaleConfig("power", epsilon=epsilon))
    np.testing.assert_allclose(ours, np.log(theirs), atol=1e-9)


@pytest.mark.parametrize("jump", [0.01, 0.2])
def test_jumper_path_equals_crepes_and_mapie(p_values, jump):
    ours = log_martingale_path(p_values, MartingaleConfig("jumper", jump=jump))
    crepes = SimpleJumper(J=jump, bf=EpsilonBettingFunction(E=[-1, 0, 1])).apply(p_values)
    mapie = OnlineMartingaleTest(jump_size=jump)
    mapie_path = [mapie.update_simple_jumper_martingale(float(p)) for p in p_values]
    np.testing.assert_allclose(ours, np.log(crepes), atol=1e-9)
    np.testing.assert_allclose(ours, np.log(mapie_path), atol=1e-9)


def test_the_test_itself_follows_log_martingale_path():
    rng = np.random.default_rng(4)
    reference = MonitorReference.from_scores(rng.exponential(size=100))
    for betting in ("mixture", "power", "jumper"):
        test = ConformalMartingale(reference, MartingaleConfig(betting))
        state, p = test.start(), []
        path = []
        for chunk in np.split(rng.exponential(size=90) * 1.5, [10, 11, 50]):  # requests of several sizes
            state, chunk_p = test.update(state, chunk, rng)
            p.extend(chunk_p)
            path.append(state["log_statistic"])
        expected = log_martingale_path(np.array(p), MartingaleConfig(betting))
        np.testing.assert_allclose(path, expected[[9, 10, 49, 89]], atol=1e-9)
        assert state["log_max"] == pytest.approx(max(0.0, expected.max()))


def test_exchangeable_streams_give_uniform_p_values_and_rare_false_alarms():
    # Scores from one distribution for reference and stream, with ties (rounded) and coarse bins: the
    # p-values must still be exactly uniform (the sharp check), and alarms at most delta = 1% of
    # streams: over 600 streams the binomial standard deviation at 1% is 0.41 points, so the bound
    # checked is 1% + 1.5 points (3.7 sigma). Measured: 6 and 4 alarms in 1000 streams of this kind.
    rng = np.random.default_rng(5)
    pooled, alarms = [], {"mixture": 0, "jumper": 0}
    for k in range(600):
        scores = np.round(rng.gamma(2.0, size=200), 1)
        reference = MonitorReference.from_scores(scores[:100], bins=64)
        for betting in alarms:
            test = ConformalMartingale(reference, MartingaleConfig(betting))
            state, p = test.update(test.start(), scores[100:], rng)
            alarms[betting] += state["alarm"]
            if betting == "mixture" and k < 200:
                pooled.extend(p)
    assert kstest(pooled, "uniform").pvalue > 0.001
    for betting, count in alarms.items():
        assert count / 600 <= 0.025, (betting, count)


def test_a_shifted_stream_fires_stays_fired_and_rearms_at_one():
    rng = np.random.default_rng(6)
    reference = MonitorReference.from_scores(rng.exponential(size=180))
    test = ConformalMartingale(reference)
    state, _ = test.update(test.start(), rng.exponential(size=100), rng)
    assert not state["alarm"] and state["fired_at"] is None
    state, _ = test.update(state, 4 * rng.exponential(size=100), rng)  # the stranger half
    assert state["alarm"] and 100 < state["fired_at"] <= 200
    assert state["log_max"] >= math.log(100) and state["rows"] == 200
    state, _ = test.update(state, rng.exponential(size=300), rng)  # clean again: the alarm stays
    assert state["alarm"] and state["fired_at"] <= 200
    summary = test.summary(state)
    assert summary["alarm"] and summary["threshold"] == 100.0 and summary["rows"] == 500
    rearmed = test.start()
    assert rearmed["log_statistic"] == 0.0 and rearmed["rows"] == 0 and sum(rearmed["stream_counts"]) == 0
    assert test.summary(rearmed)["statistic"] == 1.0


def test_state_is_small_json_left_unchanged_and_seeded_runs_repeat():
    rng = np.random.default_rng(7)
    reference = MonitorReference.from_scores(rng.exponential(size=180))
    test = ConformalMartingale(reference, MartingaleConfig("jumper"))
    start = test.start()
    frozen = json.dumps(start)
    scores = rng.exponential(size=50)
    a, pa = test.update(start, scores, np.random.default_rng(9))
    b, pb = test.update(json.loads(frozen), scores, np.random.default_rng(9))
    assert json.dumps(start) == frozen  # the old state is not modified
    assert a == b and np.array_equal(pa, pb)
    text = json.dumps(a, allow_nan=False)
    assert len(text) < 4000 and json.loads(text) == a


def test_bad_settings_and_foreign_states_are_named():
    reference = MonitorReference.from_scores(np.arange(1, 50) / 50)
    for kwargs, match in [
        ({"betting": "kelly"}, "mixture, power, jumper"),
        ({"delta": 0.0}, "delta"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"jump": True}, "jump"),
    ]:
        with pytest.raises(MartingaleStateError, match=match) as caught:
            MartingaleConfig(**kwargs)
        assert isinstance(caught.value, FordeError)
    mixture = ConformalMartingale(reference).start()
    with pytest.raises(MartingaleStateError, match="re-arm"):
        ConformalMartingale(reference, MartingaleConfig("jumper")).update(mixture, np.ones(2), np.random.default_rng())
    with pytest.raises(MartingaleStateError, match="version"):
        ConformalMartingale(reference).summary({"version": 99})
    with pytest.raises(MartingaleStateError, match=r"\(0, 1\]"):
        log_martingale_path(np.array([0.5, 0.0]))


def test_reference_bins_and_metadata():
    scores = np.array([0.02, 0.3, 0.3, 1.2, 0.0])
    reference = MonitorReference.from_scores(scores, bins=16)
    assert reference.bins == 16 and reference.counts.sum() == 5
    edges = np.array(reference.edges)
    assert edges[0] == pytest.approx(0.002) and edges[-1] == pytest.approx(12.0)
    np.testing.assert_allclose(np.diff(np.log(edges)), np.diff(np.log(edges))[0])  # log-spaced
    assert reference.bin_of(np.array([0.0, -1e-9]))[0] == 0 == reference.bin_of(np.array([-1e-9]))[0]
    assert reference.bin_of(np.array([edges[3]]))[0] == 4  # an edge belongs to the bin above it
    assert reference.bin_of(np.array([1e9]))[0] == 15
    text = json.dumps(reference.to_metadata(), allow_nan=False)
    assert MonitorReference.from_metadata(json.loads(text)) == reference


@pytest.mark.parametrize(
    "change,match",
    [
        ({"version": 2}, "version"),
        ({"score": "confidence"}, "mutual_information"),
        ({"scores": "0.1"}, "'scores'"),
        ({"scores": []}, "got none"),
        ({"scores": [0.1, float("nan")]}, "finite"),
        ({"edges": [0.2, 0.1]}, "ascending"),
        ({"edges": [0.1, True]}, "numbers"),
    ],
)
def test_bad_reference_metadata_is_named(change, match):
    metadata = MonitorReference.from_scores(np.array([0.1, 0.2])).to_metadata() | change
    with pytest.raises(ReferenceError, match=match):
        MonitorReference.from_metadata(metadata)


def test_nan_scores_are_refused_with_the_score_named():
    reference = MonitorReference.from_scores(np.array([0.1, 0.2]))
    with pytest.raises(ReferenceError, match="mutual_information"):
        ConformalMartingale(reference).update(ConformalMartingale(reference).start(), np.array([np.nan]), None)
