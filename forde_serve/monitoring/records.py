"""What the state store keeps of one served row and of one label: plain typed records, checked when made."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_ID_LENGTH", "LabelRecord", "PredictionRecord"]

MAX_ID_LENGTH = 128


def _check_id(id: object) -> None:
    if not isinstance(id, str) or not 0 < len(id) <= MAX_ID_LENGTH:
        raise ValueError(f"id: expected a non-empty string of at most {MAX_ID_LENGTH} characters, got {id!r}")


def _set_fields(record: object, **kinds) -> None:
    for name, kind in kinds.items():
        object.__setattr__(record, name, kind(getattr(record, name)))


@dataclass(frozen=True, eq=False)  # eq=False: `probs` is an array, whose == is not a truth value
class PredictionRecord:
    """One served row, as the monitor needs it when its label arrives (possibly much later)."""

    id: str  # opaque string the service returns to the caller (unique)
    created: float  # unix seconds
    predicted_class: int
    confidence: float  # max calibrated probability
    mutual_information: float  # nats
    abstain: bool
    probs: np.ndarray  # [classes] float32 calibrated ensemble probabilities (read-only when read back)
    group: int | None  # uncertainty group of a Mondrian calibration (None: not grouped)
    set_sizes: dict[str, int]  # coverage level as str ("0.9") -> size of the static set served
    served: dict  # JSON-able: what the monitor needs later (e.g. ACI alpha_t per level at serve time)
    input: bytes | None = None  # raw input (float32 bytes), only when the operator asked to keep inputs

    def __post_init__(self) -> None:  # plain Python types from here on (numpy scalars do not bind in sqlite3)
        _check_id(self.id)
        probs = np.asarray(self.probs, dtype=np.float32)
        if probs.ndim != 1:
            raise ValueError(f"probs: expected a [classes] vector, got shape {probs.shape}")
        _set_fields(self, created=float, predicted_class=int, confidence=float, mutual_information=float, abstain=bool)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "group", None if self.group is None else int(self.group))
        if any(type(level) is not str or type(size) is not int for level, size in self.set_sizes.items()):
            object.__setattr__(self, "set_sizes", {str(level): int(size) for level, size in self.set_sizes.items()})
        object.__setattr__(self, "input", None if self.input is None else bytes(self.input))


@dataclass(frozen=True)
class LabelRecord:
    """A label as stored: self-contained, so it outlives the pruning of its prediction."""

    id: str  # the prediction's id
    label: int
    received: float  # unix seconds
    outcome: dict  # JSON-able, e.g. {"correct": true, "covered": {"0.9": {"static": true, "adaptive": false}}}

    def __post_init__(self) -> None:
        _check_id(self.id)
        _set_fields(self, label=int, received=float)
