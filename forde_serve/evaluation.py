"""Robustness evaluation: clean and corrupted metrics, calibration before and after, conformal
coverage, selective prediction, OOD detection.

Model-agnostic: anything with `member_logits(x)` and `input_gradients(x)` (a `Predictor`) is
measured the same way, whether it is the serving runtime over an exported file
(`RuntimePredictor`) or a torch ensemble from a run folder (`training.evaluation`). All the
maths is `forde_serve.metrics`, `calibration` and `conformal`, so a number means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from forde_serve.calibration import member_probs as member_softmax
from forde_serve.conformal import prediction_sets, set_coverage_and_size
from forde_serve.contract import ValidationChoices
from forde_serve.diversity import diversity_block, mean_pairwise_js_divergence
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

__all__ = ["Evaluation", "Predictor", "RuntimePredictor", "evaluate", "set_keys"]

# Per data set (clean, or one corruption at one severity), all means over its inputs, of the
# ensemble as served (calibrated); `*_uncalibrated` at T = 1.
BASE_KEYS = (
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
    "accuracy_uncalibrated",
    "nll_uncalibrated",
    "ece_uncalibrated",
)


def set_keys(coverages: Iterable[float]) -> tuple[str, ...]:
    """The per-set keys of the conformal sets: empirical coverage and mean size at each nominal level."""
    return tuple(key for c in coverages for key in (f"set_coverage@{c:g}", f"set_size@{c:g}"))


class Predictor(Protocol):
    """An ensemble as evaluation sees it."""

    members: int

    def member_logits(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs `[N, *input_shape]` -> each member's uncalibrated logits `[N, M, C]` (T = 1)."""

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs -> each member's gradient of the ensemble-predicted class logit `[N, M, *input_shape]`."""


class RuntimePredictor:
    """The serving runtime over an exported file, in batches."""

    def __init__(self, runtime: EnsembleRuntime, batch_size: int = 512):
        self.runtime, self.batch_size = runtime, min(batch_size, runtime.max_batch)
        self.members = runtime.card.members

    def _batched(self, method, key: str, x: np.ndarray) -> np.ndarray:
        return np.concatenate([method(x[i : i + self.batch_size])[key] for i in range(0, len(x), self.batch_size)])

    def member_logits(self, x: np.ndarray) -> np.ndarray:
        # The graphs divide the logits by the file's temperature: undo it to get T = 1.
        calibrated = self._batched(self.runtime.predict, "member_logits", x).astype(np.float64)
        return calibrated * self.runtime.card.temperature

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self.runtime.explain, "input_gradients", x)


@dataclass
class _Pooled:
    """Reliability-bin sums and per-input (MI, correct) pooled over many sets, for the figures."""

    count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS))
    scores: list = field(default_factory=list)
    js: list = field(default_factory=list)  # per set: the members' mean pairwise JS divergence (as served)
    member_probs: np.ndarray | None = None  # the last set's [N, M, C] as served (the clean pool holds one set)

    def add(self, probs: np.ndarray, labels: np.ndarray, mi: np.ndarray | None = None) -> None:
        bins = reliability_bins(probs, labels)
        self.count += bins["count"]
        self.confidence += np.nan_to_num(bins["confidence"] * bins["count"])
        self.correct += np.nan_to_num(bins["accuracy"] * bins["count"])
        if mi is not None:
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
    # "clean" / "corrupted" (as served) and "clean, T = 1" / "corrupted, T = 1" -> reliability bins
    reliability: dict[str, dict[str, np.ndarray]]
    risk_coverage: dict[str, dict]  # "clean" / "corrupted" -> coverage, risk, aurc
    saliency_inputs: np.ndarray  # [K, *input_shape]
    saliency_gradients: np.ndarray  # [K, M, *input_shape]
    # [M, frames, 2]: t-SNE of the members' probe-set predictions along training (run folders that kept them)
    trajectory: np.ndarray | None = None


def _set_metrics(
    predictor: Predictor,
    model: ValidationChoices,
    x: np.ndarray,
    y: np.ndarray,
    gradient_rows: int,
    pooled: dict[str, _Pooled],
) -> dict:
    """Metrics of one set."""
    logits = predictor.member_logits(x)
    member_probs = member_softmax(logits, model.temperature_value)
    probs = member_probs.mean(1)
    metrics = classification_metrics(member_probs, y)
    uncalibrated_members = member_softmax(logits)
    at_one = classification_metrics(uncalibrated_members, y)
    for key in ("accuracy", "nll", "ece"):
        metrics[f"{key}_uncalibrated"] = at_one[key]
    spread = uncertainty(member_probs)
    metrics["predictive_entropy"] = float(spread["predictive_entropy"].mean())
    metrics["expected_entropy"] = float(spread["expected_entropy"].mean())
    rows = gradient_rows if predictor.members > 1 else 0
    metrics["gradient_cosine_distance"] = (
        gradient_cosine_distance(predictor.input_gradients(x[:rows])) if rows else None
    )
    correct = probs.argmax(1) == y
    mi = spread["mutual_information"]
    metrics["aurc"] = risk_coverage(mi, correct)["aurc"]
    accepted = mi <= model.abstention.threshold
    metrics["abstain_coverage"] = float(accepted.mean())
    metrics["accuracy_when_accepted"] = float(correct[accepted].mean()) if accepted.any() else None
    if model.conformal is not None:
        for level in model.conformal.coverages:
            conformal = model.conformal
            groups = spread[conformal.group_score] if conformal.groups else None
            covered, size = set_coverage_and_size(prediction_sets(probs, conformal, level, groups), y)
            metrics[f"set_coverage@{level:g}"], metrics[f"set_size@{level:g}"] = covered, size
    pooled["served"].add(probs, y, mi)
    pooled["uncalibrated"].add(uncalibrated_members.mean(1), y)
    if predictor.members > 1:
        pooled["served"].js.append(mean_pairwise_js_divergence(member_probs))
        pooled["served"].member_probs = member_probs
    return metrics


def _mean(rows: Iterable[dict], keys: tuple[str, ...]) -> dict:
    rows = list(rows)
    out = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def evaluate(
    predictor: Predictor,
    x: np.ndarray,
    y: np.ndarray,
    corrupted: Iterable[tuple[str, int, np.ndarray, np.ndarray]] = (),
    *,
    choices: ValidationChoices,
    ood_x: np.ndarray | None = None,
    gradient_rows: int = 1000,
    saliency_rows: int = 6,
    on_set: Callable[[str], None] | None = None,
) -> Evaluation:
    """Measure `predictor` on the clean set (`x` raw inputs, `y` labels) and every corrupted set
    `(corruption, severity, x, y)`; corrupted metrics are averaged over all types and severities.

    The ensemble is measured as served by `choices` (what its validation split decided): member
    logits divided by the temperature, abstaining by the abstention rule, with prediction sets from
    the conformal thresholds (None: no set metrics). NLL and ECE are also reported at T = 1
    (`*_uncalibrated`). `ood_x`, if given, is scored against the clean set by mutual information (AUROC).
    With several members, `diversity` holds how differently they predict (`forde_serve.diversity`).
    Input gradients are computed on the
    first `gradient_rows` inputs of each set (cosine distance; 0 skips them and the saliency grid).

    Conformal coverage is guaranteed only for inputs exchangeable with the validation split the
    thresholds were chosen on; on corrupted sets it is measured, not promised.
    """
    model, temperature, conformal = choices, choices.temperature_value, choices.conformal
    keys = BASE_KEYS + (set_keys(conformal.coverages) if conformal is not None else ())
    pooled = {name: {"served": _Pooled(), "uncalibrated": _Pooled()} for name in ("clean", "corrupted")}
    clean = _set_metrics(predictor, model, x, y, gradient_rows, pooled["clean"])
    if on_set:
        on_set("clean")
    per_set = []
    for name, severity, xc, yc in corrupted:
        scores = _set_metrics(predictor, model, xc, yc, gradient_rows, pooled["corrupted"])
        per_set.append({"corruption": name, "severity": severity, **scores})
        if on_set:
            on_set(f"{name} {severity}")

    metrics = dict(clean)
    if per_set:
        metrics["corrupted"] = _mean(per_set, keys)
        metrics["per_severity"] = {
            str(s): _mean((r for r in per_set if r["severity"] == s), keys)
            for s in sorted({r["severity"] for r in per_set})
        }
        metrics["per_corruption"] = {
            c: _mean((r for r in per_set if r["corruption"] == c), keys)
            for c in dict.fromkeys(r["corruption"] for r in per_set)
        }
        metrics["per_set"] = per_set
    if ood_x is not None:
        mi_in = uncertainty(member_softmax(predictor.member_logits(x), temperature))["mutual_information"]
        mi_out = uncertainty(member_softmax(predictor.member_logits(ood_x), temperature))["mutual_information"]
        metrics["ood"] = {"auroc_mutual_information": auroc(mi_in, mi_out), "inputs": len(ood_x)}
    metrics["abstain_threshold"] = float(choices.abstention.threshold)
    metrics["temperature"] = float(temperature)
    metrics["coverage_levels"] = list(conformal.coverages) if conformal is not None else []
    if conformal is not None:
        metrics["conformal_score"] = conformal.score
    if predictor.members > 1:  # how differently the members predict (forde_serve.diversity), as served
        corrupted_js = pooled["corrupted"]["served"].js
        metrics["diversity"] = diversity_block(
            pooled["clean"]["served"].member_probs, y, float(np.mean(corrupted_js)) if corrupted_js else None
        )
    # The saliency grid shows inputs of different classes: the first test input of each, in class order.
    picks = np.unique(y, return_index=True)[1][:saliency_rows] if gradient_rows else np.zeros(0, dtype=int)
    gradients = predictor.input_gradients(x[picks]) if len(picks) else np.zeros((0,))
    reliability, curves = {}, {}
    for name, both in pooled.items():
        if both["served"].scores:
            reliability[name] = both["served"].reliability()
            reliability[f"{name}, T = 1"] = both["uncalibrated"].reliability()
            curves[name] = both["served"].risk_coverage()
    return Evaluation(
        metrics=metrics,
        reliability=reliability,
        risk_coverage=curves,
        saliency_inputs=x[picks],
        saliency_gradients=gradients,
    )
