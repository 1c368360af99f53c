"""Shift-aware serving through a real `bentoml serve` with 2 workers on a fresh export: the label-free
alarm, ids and labels, adaptive sets, Prometheus counters summed over workers, the admin token, a
SIGKILL of the whole server, and two replicas sharing one real PostgreSQL."""

import os
import re
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from forde_serve.corruptions import HELD_OUT_SHIFTS, shift

from helpers import FORDE, free_port, kill_whole_server, new_postgres_database, start_server, stop_server

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def test_split(digits_split):
    return digits_split["test"]


@pytest.fixture(scope="module")
def served(digits_export):
    """The fresh export behind a real server with 2 workers, its own state, the admin token set."""
    process, url = start_server(
        {"FORDE_MODEL": str(digits_export[0]), "FORDE_WORKERS": "2", "FORDE_ADMIN_TOKEN": TOKEN}
    )
    yield url
    stop_server(process)


# One client, its connections kept alive: these tests send thousands of small requests one after another,
# and a new connection for each was half of their time.
_HTTP = httpx.Client(timeout=60)


def _post(url, path, body, token=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _HTTP.post(f"{url}{path}", json=body, headers=headers, **kwargs)


def _predict(url, x, **options):
    response = _post(url, "/predict", {"inputs": [{"input": row.tolist(), **options} for row in x]})
    assert response.status_code == 200, response.text
    return response.json()


def _monitor(url):
    response = _HTTP.get(f"{url}/monitor")
    assert response.status_code == 200, response.text
    return response.json()


def _reset(url):
    response = _post(url, "/monitor", {"reset": True}, token=TOKEN)
    assert response.status_code == 200, response.text
    assert response.json()["shift"]["rows"] == 0 and not response.json()["shift"]["alarm"]


def _counter(url, name) -> float:
    text = _HTTP.get(f"{url}/metrics").text
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_clean_traffic_raises_no_alarm_and_every_row_is_counted_once(served, test_split):
    x, _ = test_split
    _reset(served)
    before = _counter(served, "forde_predictions_total")
    # 18 requests of 20 rows from 6 threads: the two workers both answer
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda k: _predict(served, x[k : k + 20]), range(0, 360, 20)))
    ids = [row["id"] for answer in answers for row in answer]
    assert len(ids) == len(set(ids)) == 360
    shift_state = _monitor(served)["shift"]
    assert shift_state["rows"] == 360 and shift_state["alarm"] is False and shift_state["fired_at"] is None
    assert shift_state["statistic"] < shift_state["threshold"] == 100.0
    assert _counter(served, "forde_predictions_total") - before == 360


@pytest.mark.parametrize("name", list(HELD_OUT_SHIFTS))
def test_each_held_out_shift_raises_the_alarm_within_100_rows(served, test_split, name):
    x, _ = test_split
    shifted = shift(x, name, seed=0)
    _reset(served)
    for row in range(100):
        _predict(served, shifted[row : row + 1])
        if _monitor(served)["shift"]["alarm"]:
            break
    state = _monitor(served)["shift"]
    assert state["alarm"] and state["fired_at"] <= 100, state
    assert _counter(served, "forde_shift_alarm") == 1.0
    _reset(served)
    assert _counter(served, "forde_shift_alarm") == 0.0


def test_adaptive_sets_keep_coverage_under_shift_with_labels_fed_back(served, test_split):
    """Each row: an adaptive 90% set, then its true label. The adaptive thresholds live in the shared store,
    so both workers serve the same ones; the shifts follow one another, as they would on a server."""
    x, y = test_split
    classes = 10
    for name in HELD_OUT_SHIFTS:
        shifted = shift(x, name, seed=0)
        covered, sizes = [], []
        for i in range(len(shifted)):
            (row,) = _predict(served, shifted[i : i + 1], coverage=0.9, adaptive=True)
            covered.append(str(y[i]) in row["prediction_set"])
            sizes.append(row["set_size"])
            stored = _post(served, "/feedback", {"items": [{"id": row["id"], "label": int(y[i])}]}, token=TOKEN)
            assert stored.status_code == 200 and stored.json()["stored"] == 1, stored.text
        sizes = np.asarray(sizes)
        assert np.mean(covered) >= 0.85, (name, np.mean(covered))
        # not degenerate: sets that hold every class are not the rule, and on average they are smaller
        assert np.mean(sizes == classes) < 0.75 and sizes.mean() < classes, (name, sizes.mean())
    feedback = _monitor(served)["feedback"]
    assert feedback["labels"] >= 4 * 360 and feedback["coverage"]["0.9"]["adaptive"] >= 0.85


def test_write_paths_need_the_token_and_reads_do_not(served, test_split):
    x, y = test_split
    (row,) = _predict(served, x[:1])  # predictions need no token
    for token in (None, "wrong-token"):
        refused = _post(served, "/feedback", {"items": [{"id": row["id"], "label": int(y[0])}]}, token=token)
        assert refused.status_code == 401 and refused.json()["detail"][0]["field"] == "authorization", refused.text
        assert _post(served, "/monitor", {"reset": True}, token=token).status_code == 401
    assert _post(served, "/monitor", {}).status_code == 200 and httpx.get(f"{served}/monitor").status_code == 200
    stored = _post(served, "/feedback", {"items": [{"id": row["id"], "label": int(y[0])}]}, token=TOKEN)
    assert stored.status_code == 200 and stored.json()["stored"] == 1
    again = _post(served, "/feedback", {"items": [{"id": row["id"], "label": 3}]}, token=TOKEN)
    assert again.json()["stored"] == 0 and again.json()["duplicates"] == [row["id"]]  # the first label stands


def test_every_acknowledged_label_survives_a_kill_of_the_whole_server(digits_export, test_split, tmp_path):
    x, y = test_split
    env = {"FORDE_MODEL": str(digits_export[0]), "FORDE_WORKERS": "2", "FORDE_STATE_DIR": str(tmp_path / "state")}
    process, url = start_server(env)
    try:
        ids = [row["id"] for row in _predict(url, x[:60])]
        acknowledged = []

        def label(i):
            response = _post(url, "/feedback", {"items": [{"id": ids[i], "label": int(y[i])}]})
            if response.status_code == 200:
                acknowledged.append(ids[i])

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(label, i) for i in range(40)]
            deadline = time.monotonic() + 60
            while len(acknowledged) < 20 and time.monotonic() < deadline:
                time.sleep(0.005)
            kill_whole_server(process)  # every process of the server, its workers too, mid-traffic
            for future in futures:
                try:
                    future.result(timeout=30)
                except httpx.HTTPError:
                    pass  # cut off by the kill: never acknowledged
    finally:
        stop_server(process)
    process, url = start_server(env)
    try:
        feedback = _monitor(url)["feedback"]
        assert feedback["labels"] >= len(acknowledged) >= 20
        assert _monitor(url)["stored"]["predictions"] == 60
        # every acknowledged label is there: sent again, each is a duplicate, and nothing is stored twice
        again = _post(url, "/feedback", {"items": [{"id": i, "label": 0} for i in acknowledged]})
        assert again.status_code == 200 and set(again.json()["duplicates"]) == set(acknowledged), again.text
        assert again.json()["stored"] == 0 and _monitor(url)["feedback"]["labels"] == feedback["labels"]
        # a prediction made before the kill can still be labelled; a repeat is not counted again
        late = _post(url, "/feedback", {"items": [{"id": ids[59], "label": int(y[59])}]})
        assert late.status_code == 200 and late.json()["stored"] == 1
        repeat = _post(url, "/feedback", {"items": [{"id": acknowledged[0], "label": 0}]})
        assert repeat.json()["stored"] == 0 and repeat.json()["duplicates"] == [acknowledged[0]]
        assert _monitor(url)["feedback"]["labels"] == feedback["labels"] + 1
    finally:
        stop_server(process)


def test_two_replicas_share_one_postgresql(digits_export, test_split, postgres_server):
    x, y = test_split
    env = {"FORDE_MODEL": str(digits_export[0]), "FORDE_STATE_URL": new_postgres_database(postgres_server)}
    first, first_url = start_server(env)
    second, second_url = start_server(env)
    try:
        ids = [row["id"] for row in _predict(first_url, x[:10])]
        _predict(second_url, x[10:15])
        # labels for the first replica's answers, sent to the second
        items = [{"id": i, "label": int(v)} for i, v in zip(ids, y[:10], strict=True)]
        stored = _post(second_url, "/feedback", {"items": items})
        assert stored.status_code == 200 and stored.json()["stored"] == 10
        for url in (first_url, second_url):
            document = _monitor(url)
            assert document["stored"] == {"predictions": 15, "labels": 10}
            assert document["shift"]["rows"] == 15
    finally:
        stop_server(first)
        stop_server(second)


def test_forde_serve_on_every_interface_without_a_token_warns(tmp_path):
    port = free_port()
    env = dict(os.environ) | {"FORDE_STATE_DIR": tempfile.mkdtemp(dir=tmp_path), "BENTOML_HOME": str(tmp_path)}
    process = subprocess.Popen(
        [FORDE, "serve", "--host", "0.0.0.0", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        first = process.stderr.readline()
        assert first.startswith("warning: serving on 0.0.0.0 without FORDE_ADMIN_TOKEN"), first
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
