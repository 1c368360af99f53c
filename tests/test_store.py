"""The service's state store on real databases: an SQLite file, and a PostgreSQL server the tests start
themselves (Debian's `postgresql` package); real processes for the concurrency and SIGKILL tests."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from forde_serve.monitoring.store import (
    SCHEMA_VERSION,
    LabelRecord,
    PredictionRecord,
    StateStore,
    StateStoreError,
    default_state_dir,
)

from helpers import free_port, new_postgres_database


def _prediction(id, created=None, **overrides):
    fields = dict(
        id=id,
        created=time.time() if created is None else created,
        predicted_class=3,
        confidence=0.75,
        mutual_information=0.125,
        abstain=False,
        probs=np.array([0.05, 0.1, 0.1, 0.75], np.float32),
        group=None,
        set_sizes={"0.9": 2, "0.95": 3},
        served={"alpha": {"0.9": 0.1}},
    )
    return PredictionRecord(**(fields | overrides))


def _same(a: PredictionRecord, b: PredictionRecord) -> bool:
    scalars = ("id", "created", "predicted_class", "confidence", "mutual_information", "abstain", "group")
    return (
        all(getattr(a, f) == getattr(b, f) for f in scalars)
        and (a.set_sizes, a.served, a.input) == (b.set_sizes, b.served, b.input)
        and np.array_equal(a.probs, b.probs)
        and a.probs.dtype == b.probs.dtype
    )


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'state.sqlite3'}"


def _round_trip(url: str) -> None:
    """Write states, predictions and labels, then read them back through a fresh engine."""
    kept = _prediction("a", group=2, input=np.arange(4, dtype=np.float32).tobytes())
    plain = _prediction("b", abstain=True, probs=np.array([0.5, 0.5, 0.0, 0.0]), set_sizes={})
    store = StateStore(url)
    with store.transaction() as tx:
        assert tx.get_state("martingale") is None and tx.counts() == {"predictions": 0, "labels": 0}
        tx.put_state("martingale", {"log_value": -1.5, "seen": 3})
        tx.insert_predictions([kept, plain])
    with store.transaction() as tx:
        tx.put_state("martingale", {"log_value": 0.25, "seen": 4})  # replaces
        tx.insert_labels(
            [LabelRecord("a", 3, 100.0, {"correct": True}), LabelRecord("b", 1, 101.0, {"correct": False})]
        )
    store.dispose()

    store = StateStore(url)  # a fresh engine: everything came from the database
    with store.transaction() as tx:
        assert tx.get_state("martingale") == {"log_value": 0.25, "seen": 4}
        got = tx.predictions(["a", "b", "never-served"])
        assert set(got) == {"a", "b"} and _same(got["a"], kept) and _same(got["b"], plain)
        assert [r.id for r in tx.recent_predictions(5)] == ["b", "a"] and [r.id for r in tx.recent_predictions(1)] == [
            "b"
        ]
        assert tx.labelled(["a", "b", "c"]) == {"a", "b"}
        assert [(r.id, r.label, r.received, r.outcome) for r in tx.label_outcomes()] == [
            ("b", 1, 101.0, {"correct": False}),
            ("a", 3, 100.0, {"correct": True}),
        ]
        assert [r.id for r in tx.label_outcomes(1)] == ["b"]
        assert tx.counts() == {"predictions": 2, "labels": 2}


def test_round_trip_through_a_reopened_file(sqlite_url):
    _round_trip(sqlite_url)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        # the raw input is stored only for the record that carries it
        assert dict(db.execute("SELECT id, input IS NOT NULL FROM forde_predictions")) == {"a": 1, "b": 0}
        assert db.execute("SELECT value FROM forde_meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )


@pytest.fixture
def prune_every_insert(monkeypatch):
    """Retention applied on every insert (the store prunes once per 64 rows a process inserts)."""
    from forde_serve.monitoring import store as module

    monkeypatch.setattr(module, "_PRUNE_EVERY", 1)


def test_retention_keeps_the_newest_predictions_and_every_label(sqlite_url, prune_every_insert):
    store = StateStore(sqlite_url, max_predictions=5)
    for batch in range(3):  # 12 predictions, 4 per transaction; the first 2 get labels
        with store.transaction() as tx:
            tx.insert_predictions([_prediction(f"p{4 * batch + i}") for i in range(4)])
            if batch == 0:
                tx.insert_labels([LabelRecord(f"p{i}", 3, time.time(), {"correct": True}) for i in range(2)])
    with store.transaction() as tx:
        assert tx.counts() == {"predictions": 5, "labels": 2}
        assert set(tx.predictions([f"p{i}" for i in range(12)])) == {f"p{i}" for i in range(7, 12)}
        assert [r.id for r in tx.recent_predictions(100)] == [f"p{i}" for i in range(11, 6, -1)]
        # a pruned prediction is absent (labelling it is recognisable), its label stays
        assert tx.predictions(["p0"]) == {} and tx.labelled(["p0", "p1"]) == {"p0", "p1"}
        tx.insert_predictions([_prediction(f"q{i}") for i in range(16)])  # one batch larger than the limit
        assert [r.id for r in tx.recent_predictions(100)] == [f"q{i}" for i in range(15, 10, -1)]


def test_retention_is_passed_by_at_most_64_rows_per_process(sqlite_url):
    store = StateStore(sqlite_url, max_predictions=10)
    counts = []
    for batch in range(40):
        with store.transaction() as tx:
            tx.insert_predictions([_prediction(f"p{8 * batch + i}") for i in range(8)])
            counts.append(tx.counts()["predictions"])
    assert counts[0] == 8 and max(counts) <= 10 + 64 and counts[-1] < 320  # pruned, in passes
    assert 10 in counts  # a pass leaves exactly the bound


def test_retention_by_age(sqlite_url, prune_every_insert):
    store = StateStore(sqlite_url, max_age_s=60)
    now = time.time()
    with store.transaction() as tx:
        tx.insert_predictions([_prediction("old", created=now - 120), _prediction("new", created=now - 30)])
        assert set(tx.predictions(["old", "new"])) == {"new"}


def test_a_block_that_raises_stores_nothing(sqlite_url):
    store = StateStore(sqlite_url)
    with pytest.raises(KeyError, match="boom"), store.transaction() as tx:
        tx.put_state("aci", {"alpha": 0.1})
        tx.insert_predictions([_prediction("x")])
        raise KeyError("boom")
    with store.transaction() as tx:
        assert tx.get_state("aci") is None and tx.counts()["predictions"] == 0
    with pytest.raises(RuntimeError, match="has exited"):
        tx.get_state("aci")
    with pytest.raises(RuntimeError, match="not reentrant"), store.transaction(), store.transaction():
        pass
    with store.transaction() as tx:  # the refused inner block left the store usable
        assert tx.counts()["predictions"] == 0


def test_a_duplicate_id_is_a_state_store_error_naming_the_database(sqlite_url):
    store = StateStore(sqlite_url)
    with store.transaction() as tx:
        tx.insert_predictions([_prediction("x")])
    with pytest.raises(
        StateStoreError, match=r"state database sqlite:///.*state\.sqlite3 could not be written.*UNIQUE"
    ):
        with store.transaction() as tx:
            tx.put_state("aci", {"alpha": 0.1})
            tx.insert_predictions([_prediction("x")])
    with store.transaction() as tx:  # the failed block left nothing behind
        assert tx.get_state("aci") is None and tx.counts()["predictions"] == 1


def test_databases_that_cannot_be_used_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        StateStoreError, match=r"state database sqlite:///.*a-file/state\.sqlite3: cannot create its directory"
    ):
        StateStore(f"sqlite:///{tmp_path / 'a-file' / 'state.sqlite3'}")
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(
        StateStoreError, match=r"garbage\.sqlite3 cannot be opened, created or written: file is not a database"
    ):
        StateStore(f"sqlite:///{tmp_path / 'garbage.sqlite3'}")
    with pytest.raises(StateStoreError, match="expected a SQLAlchemy URL, got 'not a url'"):
        StateStore("not a url")
    with pytest.raises(StateStoreError, match="expected a SQLite file shared by every worker"):
        StateStore("sqlite://")
    with pytest.raises(
        StateStoreError, match=r"max_predictions \(FORDE_STATE_MAX_PREDICTIONS\): expected a positive integer, got 0"
    ):
        StateStore(f"sqlite:///{tmp_path / 's.sqlite3'}", max_predictions=0)
    with pytest.raises(
        StateStoreError,
        match=r"max_age_s \(FORDE_STATE_MAX_AGE_S\): expected a positive number of seconds or None, got -1",
    ):
        StateStore(f"sqlite:///{tmp_path / 's.sqlite3'}", max_age_s=-1)
    with pytest.raises(StateStoreError, match=r"cannot use this URL \(PostgreSQL needs the `postgres` extra\)"):
        StateStore("postgresql+nosuchdriver://user:secret@localhost/db")
    port = free_port()  # nothing listens there
    with pytest.raises(StateStoreError) as refused:
        StateStore(f"postgresql://forde:secret@127.0.0.1:{port}/state")
    assert str(refused.value).startswith(
        f"state database postgresql+psycopg://forde:***@127.0.0.1:{port}/state cannot be opened, created or written: "
    )
    assert "Connection refused" in str(refused.value)  # the driver's reason; the password is never shown


def test_threads_of_one_process_take_turns(sqlite_url):
    store = StateStore(sqlite_url)

    def increment(thread):
        for i in range(40):
            with store.transaction() as tx:
                n = (tx.get_state("counter") or {"n": 0})["n"]
                tx.put_state("counter", {"n": n + 1})
                tx.insert_predictions([_prediction(f"t{thread}-{i}")])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(increment, range(4)))
    with store.transaction() as tx:
        assert tx.get_state("counter") == {"n": 160} and tx.counts()["predictions"] == 160


def test_a_forked_child_opens_its_own_connections(sqlite_url):
    store = StateStore(sqlite_url)
    with store.transaction() as tx:
        tx.put_state("counter", {"n": 1})
    pid = os.fork()
    if pid == 0:  # the child: the parent's pooled connection must not be reused here
        code = 1
        try:
            with store.transaction() as tx:
                tx.put_state("counter", {"n": tx.get_state("counter")["n"] + 1})
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    with store.transaction() as tx:
        assert tx.get_state("counter") == {"n": 2}


def test_a_newer_schema_and_another_models_state_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    StateStore(url, model_key="aaaa").dispose()
    StateStore(url, model_key="aaaa").dispose()  # the same model reopens its state
    with pytest.raises(StateStoreError, match="holds the state of model 'aaaa', not of 'bbbb'"):
        StateStore(url, model_key="bbbb")
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        db.execute("UPDATE forde_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(
        StateStoreError, match=f"schema version {SCHEMA_VERSION + 1} was written by a newer forde-serve"
    ):
        StateStore(url)


def test_from_environment_places_one_file_per_model(tmp_path, monkeypatch):
    for name in ("FORDE_STATE_URL", "FORDE_STATE_DIR", "FORDE_STATE_MAX_PREDICTIONS", "FORDE_STATE_MAX_AGE_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "forde-serve"
    store = StateStore.from_environment("0123abcd")
    assert (tmp_path / "xdg" / "forde-serve" / "0123abcd.sqlite3").is_file()
    assert (store.max_predictions, store.max_age_s) == (100_000, None)
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert default_state_dir() == Path.home() / ".local" / "state" / "forde-serve"

    monkeypatch.setenv("FORDE_STATE_DIR", str(tmp_path / "dir"))
    monkeypatch.setenv("FORDE_STATE_MAX_PREDICTIONS", "250")
    monkeypatch.setenv("FORDE_STATE_MAX_AGE_S", "3600")
    store = StateStore.from_environment("0123abcd")
    assert (tmp_path / "dir" / "0123abcd.sqlite3").is_file() and (store.max_predictions, store.max_age_s) == (250, 3600)
    monkeypatch.setenv("FORDE_STATE_URL", f"sqlite:///{tmp_path / 'url.sqlite3'}")
    StateStore.from_environment("0123abcd")
    assert (tmp_path / "url.sqlite3").is_file()

    monkeypatch.setenv("FORDE_STATE_MAX_PREDICTIONS", "ten")
    with pytest.raises(
        StateStoreError,
        match=r"max_predictions \(FORDE_STATE_MAX_PREDICTIONS\): expected a positive integer, got 'ten'",
    ):
        StateStore.from_environment("0123abcd")
    with pytest.raises(StateStoreError, match=r"model_key: expected .* got '\.\./up'"):
        StateStore.from_environment("../up")


# --- real processes, on SQLite and on a real PostgreSQL server ---

_CHILD = """
import sys, time
import numpy as np
from forde_serve.monitoring.store import LabelRecord, PredictionRecord, StateStore

url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # the go signal: every child opens the store (creating the tables) at once
store = StateStore(url)
i = 0
while count == 0 or i < count:  # 0: until killed, acknowledging each commit
    id = f"{name}-{i}"
    with store.transaction() as tx:
        n = (tx.get_state("counter") or {"n": 0})["n"] + 1
        tx.put_state("counter", {"n": n})
        probs = np.full(4, 0.25, np.float32)
        tx.insert_predictions([PredictionRecord(id, time.time(), 0, 0.25, 0.0, False, probs, None, {}, {"n": n})])
        tx.insert_labels([LabelRecord(id, 0, time.time(), {"n": n})])
    if count == 0:
        print(id, flush=True)  # acknowledged: printed only after the commit
    i += 1
"""


def _start_children(url: str, names: list[str], count: int) -> list[subprocess.Popen]:
    """One process per name, all in one new process group (the first's), released together."""
    children = []
    for name in names:
        group = children[0].pid if children else 0  # 0: a new group, led by the first child
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, url, name, str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                process_group=group,
            )
        )
    for child in children:
        assert child.stdout.readline() == "ready\n"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    return children


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty database: an SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.mark.slow  # a PostgreSQL server
def test_round_trip_on_postgresql(postgres_server):
    # the request path's statements run as the driver's own SQL: JSON goes in as text, comes back parsed
    _round_trip(new_postgres_database(postgres_server))


@pytest.mark.slow  # real processes (and a PostgreSQL server)
def test_concurrent_writers_lose_no_update(database_url):
    names, count = ["w0", "w1", "w2"], 120
    children = _start_children(database_url, names, count)
    for child in children:
        assert child.wait(timeout=120) == 0
    store = StateStore(database_url)
    with store.transaction() as tx:
        total = len(names) * count
        assert tx.get_state("counter") == {"n": total}
        assert tx.counts() == {"predictions": total, "labels": total}
        seen = sorted(r.served["n"] for r in tx.recent_predictions(total))
        assert seen == list(range(1, total + 1))  # every increment saw the one before it, exactly once
    store.dispose()


@pytest.mark.slow  # real processes (and a PostgreSQL server)
def test_acknowledged_writes_survive_a_sigkill_of_every_writer(database_url):
    children = _start_children(database_url, ["k0", "k1"], 0)
    acknowledged = []
    for child in children:  # both have acknowledged some, and keep writing
        acknowledged += [child.stdout.readline().strip() for _ in range(25)]
    os.killpg(children[0].pid, signal.SIGKILL)
    for child in children:
        acknowledged += child.stdout.read().split()  # what each printed before it died
        assert child.wait(timeout=30) == -signal.SIGKILL
    store = StateStore(database_url)
    with store.transaction() as tx:
        assert set(tx.predictions(acknowledged)) == set(acknowledged)
        assert tx.labelled(acknowledged) == set(acknowledged)
        counts = tx.counts()
        # each transaction was all or nothing: the counter, the predictions and the labels agree
        assert tx.get_state("counter") == {"n": counts["predictions"]} and counts["labels"] == counts["predictions"]
        tx.insert_predictions([_prediction("after")])  # no lock was left behind
    store.dispose()
