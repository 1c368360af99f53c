"""The reference a shift test compares served traffic with: the validation split's uncertainty scores,
stored in the exported file's metadata, and the fixed bins the test counts scores in.

The bins are part of the reference (their edges are stored, not recomputed), so every worker and
every later version of forde-serve quantizes a score the same way, and the shift test's state can
keep the stream as counts per bin (`forde_serve.monitoring.martingale` says why that is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from forde_serve.errors import FordeError

__all__ = ["DEFAULT_BINS", "REFERENCE_SCORES", "MonitorReference", "ReferenceError"]

# Per-row uncertainty outputs of the runtime (forde_serve.contract) a shift test may watch; larger = stranger.
REFERENCE_SCORES = ("mutual_information", "predictive_entropy", "expected_entropy", "vote_disagreement")
# Log-spaced bins: fine enough that the test's detection delays match those on exact scores (median
# 6.0 vs 6.25 rows on digits, benchmarks/bench_monitoring.py), and a state of a few hundred integers.
DEFAULT_BINS = 256
_MAX_DECADES = 6.0  # the log-spaced range spans at most this many decades below its top
METADATA_VERSION = 1


class ReferenceError(FordeError, ValueError):
    """A reference (scores, bins, metadata) that cannot be used for a shift test."""


@dataclass(frozen=True)
class MonitorReference:
    """The validation split's `score` values (one per validation input, in its order) and the bin edges.

    `edges` ascend strictly; bin b holds the scores s with edges[b - 1] <= s < edges[b] (bin 0
    everything below edges[0], the last bin everything at or above edges[-1]).
    """

    score: str
    scores: tuple[float, ...]
    edges: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.score not in REFERENCE_SCORES:
            raise ReferenceError(f"score: expected one of {', '.join(REFERENCE_SCORES)}, got {self.score!r}")
        object.__setattr__(self, "scores", _finite("scores", self.scores))
        object.__setattr__(self, "edges", _finite("edges", self.edges))
        if not self.scores:
            raise ReferenceError("scores: expected the validation split's scores, got none")
        if not self.edges or np.any(np.diff(self.edges) <= 0):
            raise ReferenceError(f"edges: expected 1 or more strictly ascending numbers, got {len(self.edges)} values")

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, score: str = "mutual_information", bins: int = DEFAULT_BINS
    ) -> MonitorReference:
        """The reference of validation `scores` `[N]` with `bins` log-spaced bins: edges from a tenth of
        the smallest positive score (at most 6 decades below the top) to ten times the largest."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ReferenceError(f"bins: expected an integer >= 2, got {bins!r}")
        if values.size == 0 or not np.isfinite(values).all():
            raise ReferenceError(f"scores: expected finite numbers, got {values.size} values with NaN or infinity")
        top = 10.0 * values.max() if values.max() > 0 else 1.0
        positive = values[values > 0]
        low = positive.min() / 10.0 if positive.size else top * 10.0**-_MAX_DECADES
        low = max(low, top * 10.0**-_MAX_DECADES)
        return cls(score, tuple(values.tolist()), tuple(np.geomspace(low, top, bins - 1).tolist()))

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    @cached_property
    def _edges(self) -> np.ndarray:
        return np.array(self.edges)

    def bin_of(self, scores: np.ndarray) -> np.ndarray:
        """Bin index `[N]` (int64) of scores `[N]`; NaN is refused."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if np.isnan(values).any():
            raise ReferenceError(f"{self.score}: expected numbers to place in the reference's bins, got NaN")
        return np.searchsorted(self._edges, values, side="right").astype(np.int64)

    @cached_property
    def counts(self) -> np.ndarray:
        """Reference scores per bin `[bins]` (int64)."""
        return np.bincount(self.bin_of(np.array(self.scores)), minlength=self.bins).astype(np.int64)

    def to_metadata(self) -> dict:
        """A JSON-able dict of plain numbers (the exported file's metadata)."""
        return {
            "version": METADATA_VERSION,
            "score": self.score,
            "scores": list(self.scores),
            "edges": list(self.edges),
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> MonitorReference:
        """Read back what `to_metadata` wrote; a missing or malformed field is named."""
        if not isinstance(metadata, dict):
            raise ReferenceError(f"monitor reference metadata: expected a JSON object, got {type(metadata).__name__}")
        if metadata.get("version") != METADATA_VERSION:
            raise ReferenceError(
                f"monitor reference metadata field 'version': this forde_serve reads {METADATA_VERSION}, "
                f"got {metadata.get('version')!r}; upgrade forde-serve or re-export the model"
            )
        for name in ("scores", "edges"):
            if not isinstance(metadata.get(name), list):
                raise ReferenceError(
                    f"monitor reference metadata field {name!r}: expected a list of numbers, got {metadata.get(name)!r}"
                )
        try:
            return cls(metadata.get("score"), tuple(metadata["scores"]), tuple(metadata["edges"]))
        except ReferenceError as err:
            raise ReferenceError(f"monitor reference metadata: {err}") from None


def _finite(name: str, values) -> tuple[float, ...]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
            raise ReferenceError(f"{name}: expected numbers, got {value!r}")
        if not math.isfinite(value):
            raise ReferenceError(f"{name}: expected finite numbers, got {value!r}")
        out.append(float(value))
    return tuple(out)
