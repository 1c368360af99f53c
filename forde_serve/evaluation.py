"""Robustness evaluation: clean and corrupted metrics, selective prediction, OOD detection.

Model-agnostic: anything with `member_probs(x)` and `input_gradients(x)` (a `Predictor`) is
measured the same way, whether it is the serving runtime over an exported file
(`RuntimePredictor`) or a torch ensemble from a run folder (`training.evaluation`). All the
maths is `forde_serve.metrics`, so a number means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from forde_serve.metrics import (
    ECE_BINS,
    auroc,
    classification_metrics,
    gradient_cosine_distance,
    reliability_bins,
    risk_coverage,
    uncertainty,
)
from forde_serve.runtime import EnsembleRuntime

__all__ = ["Evaluation", "Predictor", "RuntimePredictor", "SET_KEYS", "evaluate"]

# Per data set (clean, or one corruption at one severity), all means over its inputs.
SET_KEYS = (
    "accuracy",
    "nll",
    "ece",
    "brier",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "gradient_cosine_distance",
    "aurc",
    "abstain_coverage",
    "accuracy_when_accepted",
)


class Predictor(Protocol):
    """An ensemble as evaluation sees it."""

    members: int

    def member_probs(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs `[N, *input_shape]` -> member softmaxes `[N, M, C]`."""

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs -> each member's gradient of the ensemble-predicted class logit `[N, M, *input_shape]`."""


class RuntimePredictor:
    """The serving runtime over an exported file, in batches."""

    def __init__(self, runtime: EnsembleRuntime, batch_size: int = 512):
        self.runtime, self.batch_size = runtime, min(batch_size, runtime.max_batch)
        self.members = runtime.card.members

    def _batched(self, method, key: str, x: np.ndarray) -> np.ndarray:
        return np.concatenate([method(x[i : i + self.batch_size])[key] for i in range(0, len(x), self.batch_size)])

    def member_probs(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self.runtime.predict, "member_probs", x).astype(np.float64)

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self.runtime.explain, "input_gradients", x)


@dataclass
class _Pooled:
    """Reliability-bin sums and per-input (MI, correct) pooled over many sets, for the figures."""

    count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    scores: list = field(default_factory=list)

    def add(self, probs: np.ndarray, labels: np.ndarray, mi: np.ndarray) -> None:
        bins = reliability_bins(probs, labels)
        self.count += bins["count"]
        self.confidence += np.nan_to_num(bins["confidence"] * bins["count"])
        self.correct += np.nan_to_num(bins["accuracy"] * bins["count"])
        self.scores.append((mi, probs.argmax(1) == labels))

    def reliability(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "count": self.count,
                "confidence": self.confidence / self.count,
                "accuracy": self.correct / self.count,
            }

    def risk_coverage(self) -> dict:
        return risk_coverage(np.concatenate([s[0] for s in self.scores]), np.concatenate([s[1] for s in self.scores]))


@dataclass
class Evaluation:
    """What `evaluate` measured: `metrics` (the metrics.json content) and arrays for the figures."""

    metrics: dict
    reliability: dict[str, dict[str, np.ndarray]]  # "clean" / "corrupted" -> reliability bins
    risk_coverage: dict[str, dict]  # "clean" / "corrupted" -> coverage, risk, aurc
    saliency_inputs: np.ndarray  # [K, *input_shape]
    saliency_gradients: np.ndarray  # [K, M, *input_shape]


def _set_metrics(
    predictor: Predictor,
    x: np.ndarray,
    y: np.ndarray,
    threshold: float,
    gradient_rows: int,
    pooled: _Pooled,
    keep_rows: int = 0,
) -> tuple[dict, np.ndarray | None]:
    """Metrics of one set; gradients of its first max(gradient_rows, keep_rows) inputs are returned."""
    member_probs = predictor.member_probs(x)
    probs = member_probs.mean(1)
    metrics = classification_metrics(member_probs, y)
    spread = uncertainty(member_probs)
    metrics["predictive_entropy"] = float(spread["predictive_entropy"].mean())
    metrics["expected_entropy"] = float(spread["expected_entropy"].mean())
    rows = max(gradient_rows, keep_rows) if predictor.members > 1 else 0
    gradients = predictor.input_gradients(x[:rows]) if rows else None
    metrics["gradient_cosine_distance"] = (
        gradient_cosine_distance(gradients[:gradient_rows]) if gradients is not None and gradient_rows else None
    )
    correct = probs.argmax(1) == y
    mi = spread["mutual_information"]
    metrics["aurc"] = risk_coverage(mi, correct)["aurc"]
    accepted = mi <= threshold
    metrics["abstain_coverage"] = float(accepted.mean())
    metrics["accuracy_when_accepted"] = float(correct[accepted].mean()) if accepted.any() else None
    pooled.add(probs, y, mi)
    return metrics, gradients


def _mean(rows: Iterable[dict]) -> dict:
    rows = list(rows)
    out = {}
    for key in SET_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def evaluate(
    predictor: Predictor,
    x: np.ndarray,
    y: np.ndarray,
    corrupted: Iterable[tuple[str, int, np.ndarray, np.ndarray]] = (),
    *,
    abstain_threshold: float,
    ood_x: np.ndarray | None = None,
    gradient_rows: int = 1000,
    saliency_rows: int = 6,
    on_set: Callable[[str], None] | None = None,
) -> Evaluation:
    """Measure `predictor` on the clean set (`x` raw inputs, `y` labels) and every corrupted set
    `(corruption, severity, x, y)`; corrupted metrics are averaged over all types and severities.

    `abstain_threshold` is the model's: abstain when mutual information exceeds it. `ood_x`, if
    given, is scored against the clean set by mutual information (AUROC). Input gradients are
    computed on the first `gradient_rows` inputs of each set (cosine distance; 0 skips them and the
    saliency grid).
    """
    pooled = {"clean": _Pooled(), "corrupted": _Pooled()}
    clean, clean_gradients = _set_metrics(
        predictor,
        x,
        y,
        abstain_threshold,
        gradient_rows,
        pooled["clean"],
        keep_rows=saliency_rows if gradient_rows else 0,
    )
    if on_set:
        on_set("clean")
    per_set = []
    for name, severity, xc, yc in corrupted:
        scores, _ = _set_metrics(predictor, xc, yc, abstain_threshold, gradient_rows, pooled["corrupted"])
        per_set.append({"corruption": name, "severity": severity, **scores})
        if on_set:
            on_set(f"{name} {severity}")

    metrics = dict(clean)
    if per_set:
        metrics["corrupted"] = _mean(per_set)
        metrics["per_severity"] = {
            str(s): _mean(r for r in per_set if r["severity"] == s) for s in sorted({r["severity"] for r in per_set})
        }
        metrics["per_corruption"] = {
            c: _mean(r for r in per_set if r["corruption"] == c)
            for c in dict.fromkeys(r["corruption"] for r in per_set)
        }
        metrics["per_set"] = per_set
    if ood_x is not None:
        mi_in = uncertainty(predictor.member_probs(x))["mutual_information"]
        mi_out = uncertainty(predictor.member_probs(ood_x))["mutual_information"]
        metrics["ood"] = {"auroc_mutual_information": auroc(mi_in, mi_out), "inputs": len(ood_x)}
    metrics["abstain_threshold"] = float(abstain_threshold)
    gradients = clean_gradients if clean_gradients is not None else np.zeros((0,))
    return Evaluation(
        metrics=metrics,
        reliability={k: p.reliability() for k, p in pooled.items() if p.scores},
        risk_coverage={k: p.risk_coverage() for k, p in pooled.items() if p.scores},
        saliency_inputs=x[:saliency_rows],
        saliency_gradients=gradients[:saliency_rows],
    )
