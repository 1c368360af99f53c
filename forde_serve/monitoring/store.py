"""The service's shared state in one SQL database: predictions awaiting labels, labels, and named JSON
documents (the shift martingale, the adaptive-conformal alphas), for every worker and replica at once.

Where: `StateStore.from_environment(model_key)` opens `FORDE_STATE_URL` when it is set (any SQLAlchemy
URL; PostgreSQL, `postgresql://user:password@host/db`, when several machines serve one model), else the
SQLite file `<state dir>/<model_key>.sqlite3`. The state dir is `FORDE_STATE_DIR`, else
`$XDG_STATE_HOME/forde-serve`, else `~/.local/state/forde-serve`. One database per served model: the
first store to open a database records its `model_key` (e.g. a prefix of the model file's sha256), and
a store for another model refuses it, so a re-exported model never inherits the old one's martingale.
Tables are created on first use (one process at a time, so workers starting together are safe) and
the schema version is recorded; a database written by a newer schema is refused.

Writers: `StateStore.transaction()` admits ONE writer at a time across threads, processes and
machines (SQLite: `BEGIN IMMEDIATE`, waiting up to 30 s for another process's transaction;
other backends, PostgreSQL included: `SELECT ... FOR UPDATE` on the one row of `forde_writer_lock`,
under READ COMMITTED, so every statement after the lock sees every earlier writer's commit). A block
that reads a document and writes it back therefore never loses another worker's update. The block is
committed when it exits (rolled back if it raises): call it before answering the request.

Durability: SQLite runs in WAL mode. With `synchronous=NORMAL` (the default) a commit is in the WAL file
when the block exits, so it survives a SIGKILL of any or all processes; it is NOT fsynced, so an
operating-system crash or power loss can lose the last commits (the file stays consistent), and WAL
needs every process on one machine (no NFS). `sqlite_synchronous="FULL"` (`FORDE_STATE_SQLITE_SYNCHRONOUS`)
fsyncs each commit and survives power loss too, at the cost of an fsync per transaction. PostgreSQL
commits are as durable as the server's `synchronous_commit` / `fsync` settings (durable by default).

Retention: the newest `max_predictions` predictions are kept (default 100 000;
`FORDE_STATE_MAX_PREDICTIONS`), and with `max_age_s` (`FORDE_STATE_MAX_AGE_S`) none older than that
(by their `created` time); both are applied when a process has inserted 64 predictions since its last
pass (and on its first insert), so each bound may be passed by at most 64 rows per process. A label row carries
all it needs (label, time, outcome) and stays after its prediction is pruned. A label for a pruned or
unknown id is recognisable: `Transaction.predictions` does not return that id.

Raw inputs are stored only when a `PredictionRecord` carries them (`input`, set when the operator asked
to keep inputs); everything else stored is derived from the model's outputs.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from forde_serve.errors import FordeError
from forde_serve.monitoring._schema import (
    INSERT_LABELS,
    INSERT_STATE,
    LABELLED_BY_ID,
    LOCK_WRITERS,
    PREDICTIONS_BY_ID,
    PRUNE_BY_AGE,
    PRUNE_BY_COUNT,
    DriverStatement,
    DriverStatements,
    dumps,
    json_value,
    labels_table,
    meta_table,
    prediction_record,
    prediction_row,
    predictions_table,
    tables,
    writer_lock,
)
from forde_serve.monitoring.records import LabelRecord, PredictionRecord

__all__ = [
    "DEFAULT_MAX_PREDICTIONS",
    "SCHEMA_VERSION",
    "LabelRecord",
    "PredictionRecord",
    "StateStore",
    "StateStoreError",
    "Transaction",
    "default_state_dir",
]

SCHEMA_VERSION = 1
DEFAULT_MAX_PREDICTIONS = 100_000
_SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another process's transaction, then fails
_SQLITE_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_IDS_PER_QUERY = 500  # ids per IN (...) list: far below every backend's limit on bound parameters
_SCHEMA_LOCK = 0x666F726465  # PostgreSQL advisory lock ("forde") held while the tables are created
_PRUNE_EVERY = 64  # rows a process inserts between two retention passes
_MODEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it names a file


class StateStoreError(FordeError):
    """The state database cannot be opened, created or written, or a state setting is invalid."""


def default_state_dir() -> Path:
    """`FORDE_STATE_DIR`, else `$XDG_STATE_HOME/forde-serve` (an absolute XDG_STATE_HOME only, as the XDG
    spec says), else `~/.local/state/forde-serve`."""
    if os.environ.get("FORDE_STATE_DIR"):
        return Path(os.environ["FORDE_STATE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "forde-serve"


# FORDE_STATE_* settings: the variable, the StateStore keyword it sets, how its text is read
_SETTINGS = (
    ("FORDE_STATE_MAX_PREDICTIONS", "max_predictions", int),
    ("FORDE_STATE_MAX_AGE_S", "max_age_s", float),
    ("FORDE_STATE_SQLITE_SYNCHRONOUS", "sqlite_synchronous", str.upper),
)


class StateStore:
    """One database of service state, opened once per process (one engine, pooled connections; each
    thread checks out its own connection for the length of a transaction)."""

    def __init__(
        self,
        url: str,
        *,
        max_predictions: int = DEFAULT_MAX_PREDICTIONS,
        max_age_s: float | None = None,
        model_key: str | None = None,
        sqlite_synchronous: str = "NORMAL",
    ) -> None:
        if isinstance(max_predictions, bool) or not isinstance(max_predictions, int) or max_predictions < 1:
            raise StateStoreError(
                f"max_predictions (FORDE_STATE_MAX_PREDICTIONS): expected a positive integer, got {max_predictions!r}"
            )
        if max_age_s is not None and not (isinstance(max_age_s, int | float) and 0 < max_age_s < math.inf):
            raise StateStoreError(
                f"max_age_s (FORDE_STATE_MAX_AGE_S): expected a positive number of seconds or None, got {max_age_s!r}"
            )
        if sqlite_synchronous not in _SQLITE_SYNCHRONOUS:
            raise StateStoreError(
                f"sqlite_synchronous (FORDE_STATE_SQLITE_SYNCHRONOUS): expected one of {_SQLITE_SYNCHRONOUS}, "
                f"got {sqlite_synchronous!r}"
            )
        self.max_predictions, self.max_age_s, self.model_key = max_predictions, max_age_s, model_key
        self._unpruned = _PRUNE_EVERY  # the first insert of a process prunes (a restart catches up at once)
        try:
            self.url = sa.make_url(url)
        except exc.ArgumentError:
            raise StateStoreError(f"state database URL: expected a SQLAlchemy URL, got {url!r}") from None
        if self.url.drivername == "postgresql":  # the `postgres` extra installs psycopg 3, not psycopg2
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.shown_url = self.url.render_as_string(hide_password=True)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        if self.sqlite:
            self._prepare_sqlite_file()
        self._engine = self._create_engine(sqlite_synchronous)
        self._driver = DriverStatements(self._engine.dialect)
        self._driver_error = self._engine.dialect.loaded_dbapi.Error
        self._pid, self._one_thread, self._owner = os.getpid(), threading.Lock(), None
        self._initialize()

    @classmethod
    def from_environment(cls, model_key: str) -> StateStore:
        """The store the service uses for the model `model_key`: FORDE_STATE_URL, else SQLite under the
        state dir (see the module docstring), with the FORDE_STATE_* retention settings."""
        if not isinstance(model_key, str) or not _MODEL_KEY.fullmatch(model_key):
            raise StateStoreError(
                f"model_key: expected 1-128 letters, digits, '.', '_' or '-' (it names a file), got {model_key!r}"
            )
        url = os.environ.get("FORDE_STATE_URL", "").strip()
        if not url:
            url = sa.URL.create("sqlite", database=str(default_state_dir() / f"{model_key}.sqlite3")).render_as_string()
        settings = {}
        for variable, keyword, parse in _SETTINGS:
            if raw := os.environ.get(variable, "").strip():
                try:
                    settings[keyword] = parse(raw)
                except ValueError:
                    settings[keyword] = raw  # the check names the variable and what it expects
        return cls(url, model_key=model_key, **settings)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """The one writer across threads, processes and machines; committed when the block exits, rolled
        back if it raises. Not reentrant; keep the block short (every other writer waits for it)."""
        if os.getpid() != self._pid:  # a forked child: the parent's pooled connections are not its own
            self._engine.dispose(close=False)
            self._pid, self._one_thread, self._owner = os.getpid(), threading.Lock(), None
        if self._owner == threading.get_ident():
            raise RuntimeError("StateStore.transaction() is not reentrant: this thread is inside one already")
        # Threads of one process queue on a mutex, not on SQLite's busy handler (which sleeps in steps of
        # up to 100 ms); processes and machines then queue on the database's own lock.
        with self._one_thread:
            self._owner = threading.get_ident()
            try:
                with self._engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE (see _create_engine)
                    if not self.sqlite:
                        connection.execute(LOCK_WRITERS)
                    transaction = Transaction(connection, self)
                    try:
                        yield transaction
                    finally:
                        transaction._connection = None
            except (exc.DBAPIError, self._driver_error) as err:
                raise self._error("could not be written", err) from err
            finally:
                self._owner = None

    def dispose(self) -> None:
        """Close this process's pooled connections (the next transaction opens new ones)."""
        self._engine.dispose()

    def _error(self, what: str, err: Exception) -> StateStoreError:
        # SQLAlchemy wraps the driver's error (`orig`); the request path's own statements raise it bare
        cause = getattr(err, "orig", err)
        reason = str(err if cause is None else cause).strip().splitlines()[0]
        return StateStoreError(f"state database {self.shown_url} {what}: {reason}")

    def _prepare_sqlite_file(self) -> None:
        database = self.url.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in database:
            raise StateStoreError(
                f"state database URL: expected a SQLite file shared by every worker, got the in-memory {self.shown_url}"
            )
        try:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateStoreError(
                f"state database {self.shown_url}: cannot create its directory ({err.strerror})"
            ) from None

    def _create_engine(self, synchronous: str) -> sa.Engine:
        try:
            if not self.sqlite:
                isolation = {"isolation_level": "READ COMMITTED"} if self.url.get_backend_name() == "postgresql" else {}
                # pre-ping: a connection the database server dropped (restart, idle timeout) is replaced, not failed
                return sa.create_engine(self.url, json_serializer=dumps, pool_pre_ping=True, **isolation)
            engine = sa.create_engine(self.url, json_serializer=dumps, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError, TypeError) as err:
            hint = " (PostgreSQL needs the `postgres` extra)" if "postgres" in self.url.drivername else ""
            raise StateStoreError(f"state database {self.shown_url}: cannot use this URL{hint}: {err}") from None

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            # sqlite3 would BEGIN only before DML, so reads would escape the transaction: we BEGIN ourselves
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # Switching a new file to WAL needs it to itself, and SQLite answers a second process doing the
            # same at that moment with "database is locked" without waiting: retry, as a busy wait would.
            deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
            while True:
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as err:
                    if getattr(err, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:
            # IMMEDIATE takes the write lock now: a read-then-write block cannot interleave with another writer
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _initialize(self) -> None:
        """Create the tables and record the schema version and model key, one process at a time."""
        try:
            with self._engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE, and its DDL is transactional
                if self.sqlite:
                    mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
                    if str(mode).lower() != "wal":
                        raise StateStoreError(
                            f"state database {self.shown_url}: WAL mode refused (journal mode {mode})"
                        )
                elif self.url.get_backend_name() == "postgresql":
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
                tables.create_all(connection, checkfirst=True)
                stored = {k: v for k, v in connection.execute(sa.select(meta_table.c.key, meta_table.c.value))}
                if not stored:
                    stored = {"schema_version": str(SCHEMA_VERSION), "created": repr(time.time())}
                    if self.model_key is not None:
                        stored["model_key"] = self.model_key
                    connection.execute(sa.insert(meta_table), [{"key": k, "value": v} for k, v in stored.items()])
                    connection.execute(sa.insert(writer_lock).values(id=1))
        except exc.DBAPIError as err:
            self._engine.dispose()
            raise self._error("cannot be opened, created or written", err) from err
        if int(stored["schema_version"]) > SCHEMA_VERSION:
            raise StateStoreError(
                f"state database {self.shown_url}: schema version {stored['schema_version']} was written by a newer "
                f"forde-serve; this one knows version {SCHEMA_VERSION}"
            )
        if self.model_key is not None and stored.get("model_key", self.model_key) != self.model_key:
            raise StateStoreError(
                f"state database {self.shown_url}: holds the state of model {stored['model_key']!r}, not of "
                f"{self.model_key!r}; give this model its own database (FORDE_STATE_URL or FORDE_STATE_DIR)"
            )


def _chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    ids = list(dict.fromkeys(ids))
    for start in range(0, len(ids), _IDS_PER_QUERY):
        yield ids[start : start + _IDS_PER_QUERY]


class Transaction:
    """What one `StateStore.transaction()` block may read and write; unusable after the block."""

    def __init__(self, connection: sa.Connection, store: StateStore) -> None:
        self._connection: sa.Connection | None = connection
        self._store = store
        self._cursor = None

    def _run(self, statement: DriverStatement, values: dict[str, Any] | None, many: list | None = None):
        """Execute a request-path statement on the driver's cursor of this transaction's connection (`many`:
        one execution per item of driver parameters)."""
        connection = self._db  # raises once the block has exited
        if self._cursor is None:
            self._cursor = connection.connection.cursor()
        if many is not None:
            self._cursor.executemany(statement.sql, many)
        else:
            self._cursor.execute(statement.sql, statement.parameters(values))
        return self._cursor

    @property
    def _db(self) -> sa.Connection:
        if self._connection is None:
            raise RuntimeError("this Transaction's block has exited; open a new StateStore.transaction()")
        return self._connection

    def get_state(self, name: str) -> dict | None:
        """The JSON document stored under `name`, or None."""
        row = self._run(self._store._driver.get_state, {"b_name": name}).fetchone()
        return None if row is None else json_value(row[0])

    def put_state(self, name: str, value: dict) -> None:
        """Store (insert or replace) the JSON document `value` under `name`."""
        if not isinstance(value, dict):
            raise TypeError(f"value: expected a JSON-able dict for state {name!r}, got {type(value).__name__}")
        now = time.time()
        # update-then-insert is race-free here: this transaction holds the writer lock
        values = {"b_name": name, "b_value": dumps(value), "b_updated": now}
        if not self._run(self._store._driver.update_state, values).rowcount:
            self._db.execute(INSERT_STATE, {"name": name, "value": value, "updated": now})

    def insert_predictions(self, records: Sequence[PredictionRecord]) -> None:
        """Store new predictions (ids must be new), then prune to the store's count and age limits."""
        if not records:
            return
        insert = self._store._driver.insert_predictions
        texts: dict[int, str] = {}  # alive as long as the records, so no id is reused meanwhile
        self._run(insert, None, many=[insert.parameters(prediction_row(r, texts)) for r in records])
        # Pruning is a DELETE over the table's newest-rows bound: done once per _PRUNE_EVERY rows this process
        # inserts, not per request, so the bounds are exceeded by at most that many rows per process.
        self._store._unpruned += len(records)
        if self._store._unpruned >= _PRUNE_EVERY:
            self._store._unpruned = 0
            self._db.execute(PRUNE_BY_COUNT, {"b_keep": self._store.max_predictions})
            if self._store.max_age_s is not None:
                self._db.execute(PRUNE_BY_AGE, {"b_cutoff": time.time() - self._store.max_age_s})

    def predictions(self, ids: Sequence[str]) -> dict[str, PredictionRecord]:
        """The stored predictions among `ids` (a pruned or unknown id is simply absent)."""
        found: dict[str, PredictionRecord] = {}
        for chunk in _chunks(ids):
            for row in self._db.execute(PREDICTIONS_BY_ID, {"b_ids": chunk}):
                found[row.id] = prediction_record(row)
        return found

    def labelled(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` that already have a label."""
        found: set[str] = set()
        for chunk in _chunks(ids):
            found.update(self._db.execute(LABELLED_BY_ID, {"b_ids": chunk}).scalars())
        return found

    def insert_labels(self, records: Sequence[LabelRecord]) -> None:
        """Store labels (ids must not be labelled yet: check with `labelled` in the same transaction)."""
        if records:
            self._db.execute(INSERT_LABELS, [{f.name: getattr(r, f.name) for f in fields(r)} for r in records])

    def recent_predictions(self, n: int) -> list[PredictionRecord]:
        """The `n` most recently inserted predictions still stored, newest first."""
        query = sa.select(predictions_table).order_by(predictions_table.c.seq.desc()).limit(n)
        return [prediction_record(row) for row in self._db.execute(query)]

    def label_outcomes(self, n: int | None = None) -> list[LabelRecord]:
        """The `n` most recently stored labels (None: all), newest first."""
        query = sa.select(labels_table).order_by(labels_table.c.seq.desc())
        return [
            LabelRecord(**{k: v for k, v in row._mapping.items() if k != "seq"})
            for row in self._db.execute(query if n is None else query.limit(n))
        ]

    def counts(self) -> dict[str, int]:
        """{"predictions": stored predictions, "labels": stored labels}."""
        count = sa.func.count()
        return {
            "predictions": self._db.execute(sa.select(count).select_from(predictions_table)).scalar_one(),
            "labels": self._db.execute(sa.select(count).select_from(labels_table)).scalar_one(),
        }
