"""What a held-out validation split decides about an ensemble, in one place for `forde export`,
`forde fuse` and `forde evaluate` on a run folder: the temperature (calibration), the conformal
thresholds (prediction sets) and the abstention threshold, in that order, each on the
probabilities the previous step produced, so a served number means what it was chosen to mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from forde_serve.calibration import TemperatureFit, ensemble_probs, fit_temperature, member_probs
from forde_serve.conformal import DEFAULT_COVERAGES, ConformalCalibration, calibrate
from forde_serve.metrics import validation_abstention

__all__ = ["ValidationChoices", "choose_on_validation"]


@dataclass(frozen=True)
class ValidationChoices:
    """The temperature fit (None: not calibrated, T = 1), the conformal calibration on the
    calibrated probabilities, and the abstention threshold on their mutual information."""

    temperature: TemperatureFit | None
    conformal: ConformalCalibration
    abstention: dict[str, float]  # threshold, coverage, risk (metrics.abstention_threshold)
    target_risk: float

    @property
    def temperature_value(self) -> float:
        return 1.0 if self.temperature is None else self.temperature.temperature


def choose_on_validation(
    member_logits: np.ndarray,
    labels: np.ndarray,
    *,
    calibrate_temperature: bool = True,
    score: str = "lac",
    coverages: Iterable[float] = (),
    k_reg: int | None = None,
    lam: float | None = None,
    target_risk: float = 0.01,
) -> ValidationChoices:
    """Fit T on `member_logits` `[N, M, C]` (unless `calibrate_temperature` is False), then conformal
    thresholds for the default levels plus `coverages`, then the abstention threshold reaching
    `target_risk`, all on the same validation inputs (labels `[N]`)."""
    fit = fit_temperature(member_logits, labels) if calibrate_temperature else None
    temperature = 1.0 if fit is None else fit.temperature
    probs = ensemble_probs(member_logits, temperature)
    levels = sorted(set(DEFAULT_COVERAGES) | {float(c) for c in coverages})
    conformal = calibrate(probs, labels, score=score, coverages=levels, k_reg=k_reg, lam=lam)
    abstention = validation_abstention(member_probs(member_logits, temperature), labels, target_risk)
    return ValidationChoices(fit, conformal, abstention, target_risk)
