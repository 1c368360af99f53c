"""The state database's tables and the statements the store runs, built once (building a Core statement
costs more than running it); the request path's few as the driver's own SQL (`DriverStatements`)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import numpy as np
import sqlalchemy as sa

from forde_serve.monitoring.records import MAX_ID_LENGTH, PredictionRecord

tables = sa.MetaData()
meta_table = sa.Table(
    "forde_meta",
    tables,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
writer_lock = sa.Table("forde_writer_lock", tables, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False))
state_table = sa.Table(
    "forde_state",
    tables,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),  # unix seconds
)
# seq: insertion order (inserts are serialized by the writer lock), so "newest" and "keep the last N" are
# index ranges; BIGINT elsewhere, INTEGER on SQLite (only INTEGER PRIMARY KEY is its auto-assigned rowid).
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
predictions_table = sa.Table(
    "forde_predictions",
    tables,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(MAX_ID_LENGTH), nullable=False, unique=True),
    sa.Column("created", sa.Double, nullable=False, index=True),  # unix seconds; age retention
    sa.Column("predicted_class", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Double, nullable=False),
    sa.Column("mutual_information", sa.Double, nullable=False),  # nats
    sa.Column("abstain", sa.Boolean, nullable=False),
    sa.Column("probs", sa.LargeBinary, nullable=False),  # [classes] little-endian float32
    sa.Column("uncertainty_group", sa.Integer, nullable=True),
    sa.Column("set_sizes", sa.JSON, nullable=False),
    sa.Column("served", sa.JSON, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=True),  # raw float32 input bytes, only when asked to keep them
)
labels_table = sa.Table(
    "forde_labels",
    tables,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(MAX_ID_LENGTH), nullable=False, unique=True),  # no foreign key: predictions get pruned
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("received", sa.Double, nullable=False),  # unix seconds
    sa.Column("outcome", sa.JSON, nullable=False),
)
# The statements of the request path, built once (building a Core statement costs more than running it).
GET_STATE = sa.select(state_table.c.value).where(state_table.c.name == sa.bindparam("b_name"))
UPDATE_STATE = (
    sa.update(state_table)
    .where(state_table.c.name == sa.bindparam("b_name"))
    .values(value=sa.bindparam("b_value", type_=sa.JSON), updated=sa.bindparam("b_updated"))
)
INSERT_STATE, INSERT_PREDICTIONS, INSERT_LABELS = (
    sa.insert(state_table),
    sa.insert(predictions_table),
    sa.insert(labels_table),
)
_NEWEST = sa.select(sa.func.max(predictions_table.c.seq)).scalar_subquery()
PRUNE_BY_COUNT = sa.delete(predictions_table).where(predictions_table.c.seq <= _NEWEST - sa.bindparam("b_keep"))
PRUNE_BY_AGE = sa.delete(predictions_table).where(predictions_table.c.created < sa.bindparam("b_cutoff"))
LOCK_WRITERS = sa.select(writer_lock.c.id).where(writer_lock.c.id == 1).with_for_update()
PREDICTIONS_BY_ID = sa.select(predictions_table).where(
    predictions_table.c.id.in_(sa.bindparam("b_ids", expanding=True))
)
LABELLED_BY_ID = sa.select(labels_table.c.id).where(labels_table.c.id.in_(sa.bindparam("b_ids", expanding=True)))
dumps = partial(json.dumps, allow_nan=False, separators=(",", ":"))  # NaN is not JSON (PostgreSQL refuses it)
_PREDICTION_COLUMNS = [c.name for c in predictions_table.columns if c.name != "seq"]


class DriverStatement:
    """A request-path statement as the driver's own SQL and parameter order, compiled once per dialect.

    Run on the driver's cursor, it skips what SQLAlchemy does on every execution (its compiled-cache
    lookup, execution context, per-value type processing), which was most of the monitor's time per
    request: with these (and time-ordered ids) one served row's transaction on SQLite went from 0.80 to
    0.52 ms in process (a one-off profile of `Monitor.observe`). Its values must therefore already be
    what the driver takes (JSON as text, bytes, Python numbers)."""

    def __init__(self, statement, dialect: sa.Dialect, keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        self.sql = compiled.string
        self.order = tuple(compiled.positiontup) if dialect.positional else None

    def parameters(self, values: dict[str, Any]):
        return values if self.order is None else tuple(values[name] for name in self.order)


class DriverStatements:
    """The request path's statements (read and write a state document, insert predictions) for one dialect."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.get_state = DriverStatement(GET_STATE, dialect)
        self.update_state = DriverStatement(UPDATE_STATE, dialect)
        self.insert_predictions = DriverStatement(INSERT_PREDICTIONS, dialect, _PREDICTION_COLUMNS)


def json_value(value):
    """A JSON column's value as the driver returns it (SQLite: text; psycopg: already parsed)."""
    return json.loads(value) if isinstance(value, str | bytes | bytearray) else value


def prediction_row(record: PredictionRecord, texts: dict[int, str]) -> dict[str, Any]:
    """A record as the insert statement's driver values (JSON as text, probabilities as float32 bytes).
    `texts`: JSON text by document identity, so that records sharing a document encode it once."""

    def text(document: dict) -> str:
        if id(document) not in texts:
            texts[id(document)] = dumps(document)
        return texts[id(document)]

    return {
        "id": record.id,
        "created": record.created,
        "predicted_class": record.predicted_class,
        "confidence": record.confidence,
        "mutual_information": record.mutual_information,
        "abstain": record.abstain,
        "probs": record.probs.astype("<f4").tobytes(),
        "uncertainty_group": record.group,
        "set_sizes": text(record.set_sizes),
        "served": text(record.served),
        "input": record.input,
    }


def prediction_record(row: sa.Row) -> PredictionRecord:
    values = dict(row._mapping)
    del values["seq"]
    values["group"], values["probs"] = values.pop("uncertainty_group"), np.frombuffer(values["probs"], "<f4")
    return PredictionRecord(**values)
