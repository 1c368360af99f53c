"""The service's Prometheus metrics: real processes writing to one prometheus_client multiprocess directory
(as BentoML's workers do) and the merged exposition read back; no BentoML involved."""

import json
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forde_serve.monitoring.prometheus import ServiceMetrics, set_size_buckets

# One worker: PROMETHEUS_MULTIPROC_DIR is in its environment from the start (as circus starts BentoML's
# workers), unless `late` is given: then prometheus_client is imported first and the variable set after,
# the order that hid metrics in BentoML issue 5056.
_WORKER = """
import json, os, sys
work = json.loads(sys.argv[1])
if work.get("late"):
    import prometheus_client  # single-process values, chosen at import
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = work.pop("late")
from forde_serve.monitoring.prometheus import ServiceMetrics
metrics = ServiceMetrics(classes=4)
metrics.observe_predictions(work["mi"], work["abstain"], work["sets"])
metrics.observe_shift(work["shift"], work["alarm"])
metrics.observe_feedback(work["feedback"])
for level, coverage in work["coverage"].items():
    metrics.set_realized_coverage(level, coverage)
"""


def _worker(directory, late=False, **work):
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if late:
        work["late"] = str(directory)
    else:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    result = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(work)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def _samples(exposition: bytes) -> dict:
    """{(sample name, sorted labels): value} of the forde_* families."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        if family.name.startswith("forde_")
        for s in family.samples
    }


@pytest.mark.slow  # real processes
def test_two_workers_merge_into_one_exposition(tmp_path):
    first = _worker(
        tmp_path,
        mi=[0.0005, 0.3, 1.5],
        abstain=[False, True, True],
        sets={"0.9": [1, 2, 4]},
        shift=150.0,
        alarm=True,
        feedback=2,
        coverage={"0.9": 0.5},
    )
    # the second worker writes later, after the alarm was re-armed: the gauges must show its values
    second = _worker(
        tmp_path,
        late=True,
        mi=[0.004],
        abstain=[False],
        sets={"0.9": [0], "0.95": [3]},
        shift=2.0,
        alarm=False,
        feedback=1,
        coverage={"0.9": 0.75},
    )
    assert "imported before PROMETHEUS_MULTIPROC_DIR" in second.stderr and not first.stderr
    assert len(list(tmp_path.glob("*.db"))) >= 2  # files of both processes

    # a third worker answers /metrics: its exposition merges every process's files
    reader = "import sys; from forde_serve.monitoring.prometheus import ServiceMetrics as M; "
    reader += "sys.stdout.buffer.write(M(classes=4).exposition())"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    exposition = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True, check=True).stdout
    samples = _samples(exposition)

    assert samples[("forde_predictions_total", ())] == 4
    assert samples[("forde_abstentions_total", ())] == 2
    assert samples[("forde_feedback_total", ())] == 3
    mi = {dict(k[1])["le"]: v for k, v in samples.items() if k[0] == "forde_mutual_information_nats_bucket"}
    assert (mi["0.001"], mi["0.005"], mi["0.2"], mi["0.5"], mi["1.0"], mi["2.0"], mi["+Inf"]) == (1, 2, 2, 3, 3, 4, 4)
    assert samples[("forde_mutual_information_nats_count", ())] == 4
    assert samples[("forde_mutual_information_nats_sum", ())] == pytest.approx(0.0005 + 0.3 + 1.5 + 0.004)
    sizes = {
        (dict(k[1])["level"], dict(k[1])["le"]): v
        for k, v in samples.items()
        if k[0] == "forde_prediction_set_size_bucket"
    }
    assert [sizes["0.9", le] for le in ("0.0", "1.0", "2.0", "3.0", "4.0", "+Inf")] == [1, 2, 3, 3, 4, 4]
    assert [sizes["0.95", le] for le in ("2.0", "3.0")] == [0, 1]
    # one series per gauge (no per-process `pid` label), holding the value written last
    assert samples[("forde_shift_statistic", ())] == 2.0
    assert samples[("forde_shift_alarm", ())] == 0.0
    assert samples[("forde_realized_coverage", (("level", "0.9"), ("method", "static")))] == 0.75
    assert not any(dict(labels).get("pid") for _, labels in samples)


def test_single_process_metrics_live_in_their_own_registry(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    one, two = ServiceMetrics(classes=10), ServiceMetrics(classes=10)  # no duplicate-registration error
    one.observe_predictions([0.01, float("nan")], [True, False], {"0.9": [10]})
    one.set_realized_coverage("0.9", 0.8, method="adaptive")
    samples = _samples(one.exposition())
    assert samples[("forde_predictions_total", ())] == 2 and samples[("forde_abstentions_total", ())] == 1
    assert samples[("forde_mutual_information_nats_count", ())] == 1  # the NaN row is counted, not observed
    assert samples[("forde_prediction_set_size_bucket", (("le", "9.0"), ("level", "0.9")))] == 0
    assert samples[("forde_prediction_set_size_bucket", (("le", "10.0"), ("level", "0.9")))] == 1
    assert samples[("forde_realized_coverage", (("level", "0.9"), ("method", "adaptive")))] == 0.8
    assert _samples(two.exposition())[("forde_predictions_total", ())] == 0
    with pytest.raises(ValueError, match="method: expected one of"):
        one.set_realized_coverage("0.9", 0.8, method="both")


def test_set_size_buckets_hold_every_small_size_and_the_class_count():
    assert set_size_buckets(4) == (0.0, 1.0, 2.0, 3.0, 4.0)
    assert set_size_buckets(1000) == (*map(float, range(11)), 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
    assert set_size_buckets(37)[-3:] == (10.0, 20.0, 37.0)
    with pytest.raises(ValueError, match="classes: expected a positive integer, got 0"):
        set_size_buckets(0)
