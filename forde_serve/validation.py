"""What a held-out validation split decides about an ensemble, in one place for `forde export`,
`forde fuse` and `forde evaluate` on a run folder: the temperature (calibration), the conformal
thresholds (prediction sets) and the abstention threshold, in that order, each on the
probabilities the previous step produced, so a served number means what it was chosen to mean.
The decisions are a `contract.ValidationChoices`, the shape the exported file stores them in.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from forde_serve.calibration import ensemble_probs, fit_temperature, member_probs
from forde_serve.conformal import DEFAULT_COVERAGES, calibrate
from forde_serve.contract import Abstention, ValidationChoices
from forde_serve.metrics import validation_abstention

__all__ = ["choose_on_validation"]


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
    chosen = validation_abstention(member_probs(member_logits, temperature), labels, target_risk)
    abstention = Abstention(chosen["threshold"], target_risk, chosen["coverage"], chosen["risk"])
    return ValidationChoices(fit, conformal, abstention)
