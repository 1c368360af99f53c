"""PLACEHOLDER until the `store` branch is merged: the two record types of the agreed interface
(/work/notes/monitor-interface.md), so the monitor imports and its tests run on this branch. At the
merge, take the store branch's `store.py` (it defines these records and the StateStore itself)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LabelRecord", "PredictionRecord"]


@dataclass(frozen=True, eq=False)
class PredictionRecord:
    id: str  # opaque string the service returns to the caller (unique)
    created: float  # unix seconds
    predicted_class: int
    confidence: float  # max calibrated probability
    mutual_information: float  # nats
    abstain: bool
    probs: np.ndarray  # [classes] float32 calibrated ensemble probabilities
    group: int | None  # uncertainty group of a Mondrian calibration (None: not grouped)
    set_sizes: dict[str, int]  # coverage level as str ("0.9") -> size of the static set served/computed
    served: dict  # JSON-able: what the monitor needs later (e.g. ACI alpha_t per level at serve time)
    input: bytes | None = None  # raw input (float32 bytes) only when the operator asked to keep inputs


@dataclass(frozen=True)
class LabelRecord:
    id: str
    label: int
    received: float
    outcome: dict  # JSON-able: e.g. {"correct": true, "covered": {"0.9": {"static": true, "adaptive": false}}}
