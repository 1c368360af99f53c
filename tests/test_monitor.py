"""The Monitor facade over a state store: what observe stores, feedback's rules (one label per id,
whole requests refused on a bad item, adaptive alphas in arrival order), the /monitor document, and
several monitors (workers) sharing one store. Runs on the in-memory stand-in of the store interface,
and on the real store too once it is merged (tests/monitor_fakes.py)."""

import json
import logging

import numpy as np
import pytest
from monitor_fakes import fake_outputs, store_factories

from forde_serve.conformal import ConformalError, calibrate, prediction_sets
from forde_serve.monitoring.adaptive import AdaptiveSets
from forde_serve.monitoring.martingale import ConformalMartingale
from forde_serve.monitoring.monitor import FeedbackError, Monitor, MonitorConfig, MonitorError
from forde_serve.reference import MonitorReference


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _rows(seed, n, flatten=1.0, classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, classes))
    labels = (np.cumsum(_softmax(logits), 1) > rng.random((n, 1))).argmax(1)
    probs = _softmax(logits / flatten)
    mi = rng.exponential(0.2 * flatten, n)
    return fake_outputs(probs, mi), labels


@pytest.fixture(params=sorted(store_factories()))
def store(request, tmp_path):
    made = store_factories()[request.param](tmp_path)
    yield made
    made.dispose()


@pytest.fixture
def parts():
    validation, labels = _rows(0, 180)
    calibration = calibrate(
        validation["probs"], labels, group_scores=validation["predictive_entropy"], group_score="predictive_entropy"
    )
    return calibration, MonitorReference.from_scores(validation["mutual_information"])


def _monitor(store, parts, **config):
    calibration, reference = parts
    return Monitor(
        store,
        calibration=calibration,
        reference=reference,
        config=MonitorConfig(**config),
        rng=np.random.default_rng(1),
    )


def test_observe_stores_each_row_and_steps_the_shift_test_in_one_transaction(store, parts):
    monitor = _monitor(store, parts)
    outputs, _ = _rows(1, 6)
    served = monitor.observe(outputs, coverage=[0.9, None, 0.8, 0.9, 0.95, 0.9], adaptive=[True] + [False] * 5)
    assert getattr(store, "transactions", 1) == 1  # the stand-in counts them
    assert len({row.id for row in served}) == 6
    assert served[0].adaptive_set is not None and served[1].adaptive_set is None
    calibration = parts[0]
    groups = calibration.group_of(outputs["predictive_entropy"])
    assert [row.group for row in served] == groups.tolist()
    with store.transaction() as tx:
        records = tx.predictions([row.id for row in served])
        martingale = tx.get_state("martingale")
    assert martingale["rows"] == 6
    static = prediction_sets(outputs["probs"], calibration, 0.9, group_scores=outputs["predictive_entropy"])
    for i, row in enumerate(served):
        record = records[row.id]
        assert record.predicted_class == outputs["predicted_class"][i] and record.group == groups[i]
        assert record.set_sizes["0.9"] == static[i].sum() and set(record.set_sizes) == {"0.8", "0.9", "0.95", "0.99"}
        assert record.served["alpha"] == pytest.approx({"0.8": 0.2, "0.9": 0.1, "0.95": 0.05, "0.99": 0.01})
    # the adaptive set at its start alpha is the static (Mondrian) set
    np.testing.assert_array_equal(served[0].adaptive_set, static[0])


def test_the_shift_test_sees_every_row_across_requests_and_workers(store, parts):
    # Two monitors on one store are two workers: one martingale over all their rows, in order.
    a, b = _monitor(store, parts), _monitor(store, parts)
    outputs, _ = _rows(2, 40, flatten=3.0)  # a strange stream
    for start in range(0, 40, 5):
        (a if start % 10 == 0 else b).observe({k: v[start : start + 5] for k, v in outputs.items()})
    shift = a.snapshot()["shift"]
    assert shift["rows"] == 40 and shift == b.snapshot()["shift"]
    calibration, reference = parts
    test = ConformalMartingale(reference)
    one_worker, _ = test.update(test.start(), outputs["mutual_information"], np.random.default_rng(0))
    assert shift["alarm"] == one_worker["alarm"] is True


def test_feedback_stores_once_reports_duplicates_and_judges_against_serve_time(store, parts):
    monitor = _monitor(store, parts)
    outputs, labels = _rows(3, 4)
    ids = [row.id for row in monitor.observe(outputs, coverage=0.9, adaptive=True)]
    first = monitor.feedback([(ids[0], int(labels[0])), (ids[1], int(labels[1])), (ids[0], (int(labels[0]) + 1) % 4)])
    assert first.stored == (ids[0], ids[1]) and first.duplicates == (ids[0],)
    again = monitor.feedback([(ids[1], 0), (ids[2], int(labels[2]))])
    assert again.stored == (ids[2],) and again.duplicates == (ids[1],)
    with store.transaction() as tx:
        outcomes = {r.id: r for r in tx.label_outcomes()}
    assert outcomes[ids[0]].label == labels[0]  # the first label stands
    calibration = parts[0]
    static = prediction_sets(outputs["probs"], calibration, 0.9, group_scores=outputs["predictive_entropy"])
    for i in range(3):
        outcome = outcomes[ids[i]].outcome
        assert outcome["correct"] == (outputs["predicted_class"][i] == labels[i])
        assert outcome["covered"]["0.9"]["static"] == static[i, labels[i]]
        assert outcome["covered"]["0.9"]["adaptive"] == static[i, labels[i]]  # served at the start alpha
    feedback = monitor.snapshot()["feedback"]
    assert feedback["labels"] == 3
    assert feedback["accuracy"] == pytest.approx(np.mean(outputs["predicted_class"][:3] == labels[:3]))
    assert feedback["coverage"]["0.9"]["static"] == pytest.approx(static[np.arange(3), labels[:3]].mean())


def test_late_out_of_order_labels_update_alpha_in_arrival_order_judged_at_serve_time(store, parts):
    calibration, _ = parts
    monitor = _monitor(store, parts, gamma=0.2)
    outputs, labels = _rows(4, 3, flatten=4.0)
    ids = []
    for i in range(3):  # row 1 is labelled before row 2 is served; rows 0 and 2 come back later, reversed
        ids.append(monitor.observe({k: v[i : i + 1] for k, v in outputs.items()}, coverage=0.9, adaptive=True)[0].id)
        if i == 1:
            monitor.feedback([(ids[1], int(labels[1]))])
    monitor.feedback([(ids[2], int(labels[2])), (ids[0], int(labels[0]))])

    aci = AdaptiveSets(calibration, gamma=0.2)
    groups = calibration.group_of(outputs["predictive_entropy"])
    state, served_alpha = aci.start(), {}
    served_alpha[0] = served_alpha[1] = 0.1
    covered = {}
    for i in (1, 2, 0):  # arrival order; row 2 was served after row 1's label
        if i == 2:
            served_alpha[2] = aci.alphas(state)["0.9"]
        covered[i] = bool(aci.sets(outputs["probs"][i : i + 1], served_alpha[i], groups[i : i + 1])[0, labels[i]])
        state = aci.update(state, "0.9", covered[i])
    snapshot = monitor.snapshot()["feedback"]
    assert snapshot["adaptive"]["0.9"]["alpha"] == pytest.approx(aci.alphas(state)["0.9"])
    assert snapshot["coverage"]["0.9"]["adaptive"] == pytest.approx(np.mean(list(covered.values())))
    with store.transaction() as tx:
        assert tx.predictions([ids[2]])[ids[2]].served["alpha"]["0.9"] == pytest.approx(served_alpha[2])


def test_a_bad_item_refuses_the_whole_request_and_names_it(store, parts):
    monitor = _monitor(store, parts)
    outputs, _ = _rows(5, 2)
    ids = [row.id for row in monitor.observe(outputs)]
    for items, match in [
        ([(ids[0], 1), ("nope", 1)], r"items\[1\].id: expected the id of a stored prediction, got 'nope'"),
        ([(ids[0], 1), (ids[1], 4)], r"items\[1\].label: expected a class index in 0..3 for id '.+', got 4"),
        ([(ids[0], True)], r"items\[0\].label: expected a class index"),
        ([(ids[0], "1")], r"items\[0\].label: expected a class index"),
        ([(7, 1)], r"items\[0\].id: expected a non-empty string"),
        ([ids[0]], r"items\[0\]: expected an \(id, label\) pair"),
    ]:
        with pytest.raises(FeedbackError, match=match):
            monitor.feedback(items)
    snapshot = monitor.snapshot()
    assert snapshot["feedback"]["labels"] == 0 and snapshot["stored"]["labels"] == 0  # nothing half-stored


@pytest.mark.parametrize("kind", sorted(store_factories()))
def test_a_repeat_label_after_retention_is_a_duplicate_and_a_pruned_unlabelled_id_is_named(kind, tmp_path, parts):
    store = store_factories()[kind](tmp_path, max_predictions=2)
    monitor = _monitor(store, parts)
    outputs, labels = _rows(11, 2)
    labelled, unlabelled = (row.id for row in monitor.observe(outputs))
    assert monitor.feedback([(labelled, int(labels[0]))]).stored == (labelled,)
    monitor.observe(outputs)  # two newer predictions: both of the first two are pruned
    assert monitor.feedback([(labelled, 1)]).duplicates == (labelled,)
    with pytest.raises(FeedbackError, match="retention"):
        monitor.feedback([(unlabelled, 1)])
    assert monitor.snapshot()["stored"] == {"predictions": 2, "labels": 1}
    store.dispose()


def test_snapshot_window_estimates_over_the_newest_rows(store, parts):
    monitor = _monitor(store, parts, window=10)
    empty = monitor.snapshot()["window"]
    assert empty["rows"] == 0 and empty["estimated_accuracy"] is None and empty["mean_set_size"]["0.9"] is None
    outputs, _ = _rows(6, 25)
    monitor.observe(outputs)
    window = monitor.snapshot()["window"]
    newest = slice(15, 25)
    assert window["rows"] == 10
    assert window["estimated_accuracy"] == pytest.approx(outputs["confidence"][newest].mean())
    assert window["mean_mutual_information"] == pytest.approx(outputs["mutual_information"][newest].mean(), rel=1e-6)
    assert window["abstain_rate"] == pytest.approx(outputs["abstain"][newest].mean())
    calibration = parts[0]
    sizes = prediction_sets(outputs["probs"], calibration, 0.9, group_scores=outputs["predictive_entropy"]).sum(1)
    assert window["mean_set_size"]["0.9"] == pytest.approx(sizes[newest].mean())
    document = monitor.snapshot()
    assert json.loads(json.dumps(document, allow_nan=False)) == document


def test_reset_rearms_the_shift_test_and_keeps_labels(store, parts):
    monitor = _monitor(store, parts)
    outputs, labels = _rows(7, 60, flatten=5.0)
    ids = [row.id for row in monitor.observe(outputs, coverage=0.9, adaptive=True)]
    monitor.feedback([(ids[0], int(labels[0]))])
    assert monitor.snapshot()["shift"]["alarm"]
    summary = monitor.reset()
    assert summary["statistic"] == 1.0 and not summary["alarm"] and summary["rows"] == 0
    after = monitor.snapshot()
    assert after["shift"] == summary and after["feedback"]["labels"] == 1


def test_requests_the_monitor_cannot_serve_are_named(store, parts):
    calibration, reference = parts
    monitor = _monitor(store, parts)
    outputs, _ = _rows(8, 2)
    with pytest.raises(MonitorError, match="row 0: adaptive sets need a coverage level"):
        monitor.observe(outputs, adaptive=True)
    with pytest.raises(ConformalError, match="0.8, 0.9, 0.95, 0.99"):
        monitor.observe(outputs, coverage=0.85)
    with pytest.raises(MonitorError, match="coverage: expected one value per row"):
        monitor.observe(outputs, coverage=[0.9])
    with pytest.raises(MonitorError, match="missing predictive_entropy"):
        monitor.observe({k: v for k, v in outputs.items() if k != "predictive_entropy"})
    no_scores = type(calibration)("lac", calibration.thresholds, calibration.n_calibration, calibration.n_classes)
    legacy = Monitor(store, calibration=no_scores, reference=reference)
    with pytest.raises(MonitorError, match="re-export"):
        legacy.observe(outputs, coverage=0.9, adaptive=True)
    assert legacy.snapshot()["feedback"]["adaptive"] is None
    bare = Monitor(store)
    bare.observe(outputs)
    assert bare.snapshot()["shift"] is None
    with pytest.raises(MonitorError, match="no validation reference"):
        bare.reset()
    for kwargs, match in [({"window": 0}, "window"), ({"gamma": 2.0}, "gamma"), ({"betting": "x"}, "betting")]:
        with pytest.raises(Exception, match=match):
            MonitorConfig(**kwargs)


def test_a_stored_state_from_other_settings_is_rearmed_with_a_warning(store, parts, caplog):
    mixture = _monitor(store, parts)
    outputs, _ = _rows(9, 5)
    mixture.observe(outputs)
    jumper = _monitor(store, parts, betting="jumper")
    with caplog.at_level(logging.WARNING, logger="forde_serve.monitoring.monitor"):
        jumper.observe(outputs)
    assert "does not fit" in caplog.text
    assert jumper.snapshot()["shift"]["rows"] == 5 and jumper.snapshot()["shift"]["betting"] == "jumper"


def test_inputs_are_kept_only_when_asked(store, parts):
    outputs, _ = _rows(10, 2)
    x = np.arange(2 * 4, dtype=np.float32).reshape(2, 1, 2, 2)
    plain = _monitor(store, parts).observe(outputs, inputs=x)
    keeping = _monitor(store, parts, keep_inputs=True).observe(outputs, inputs=x)
    with store.transaction() as tx:
        records = tx.predictions([plain[0].id, keeping[1].id])
    assert records[plain[0].id].input is None
    assert np.frombuffer(records[keeping[1].id].input, dtype="<f4").tolist() == x[1].ravel().tolist()
