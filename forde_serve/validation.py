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

_BOUNDS = (0.05, 20.0)  # the temperature search's range
_FEW_ACCEPTED = 0.05  # an abstention rule accepting less of the validation split than this is flagged


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
    warnings = []
    fit = fit_temperature(member_logits, labels, _BOUNDS) if calibrate_temperature else None
    if fit is not None and not _BOUNDS[0] * (1 + 1e-6) < fit.temperature < _BOUNDS[1] / (1 + 1e-6):
        # The NLL was still falling at the search's edge: on a validation split this small that says more
        # about the split than about the model, and such a temperature can wreck calibration elsewhere.
        warnings.append(
            f"the temperature search ended at its bound ({fit.temperature:.3g}, searched {_BOUNDS[0]:g} to "
            f"{_BOUNDS[1]:g}): the validation NLL keeps falling past it, so the fit is not trusted and the "
            "file keeps temperature 1; check the validation split (size, labels) or export with --no-calibrate"
        )
        fit = None
    elif fit is not None and fit.ece_after > fit.ece_before:
        warnings.append(
            f"the temperature {fit.temperature:.3g} lowers the validation NLL ({fit.nll_before:.4f} -> "
            f"{fit.nll_after:.4f}) but raises its ECE ({fit.ece_before:.4f} -> {fit.ece_after:.4f}); it is kept "
            "(NLL is the criterion), export with --no-calibrate to keep temperature 1"
        )
    temperature = 1.0 if fit is None else fit.temperature
    probs = ensemble_probs(member_logits, temperature)
    levels = sorted(set(DEFAULT_COVERAGES) | {float(c) for c in coverages})
    conformal = calibrate(probs, labels, score=score, coverages=levels, k_reg=k_reg, lam=lam)
    chosen = validation_abstention(member_probs(member_logits, temperature), labels, target_risk)
    abstention = Abstention(chosen["threshold"], target_risk, chosen["coverage"], chosen["risk"])
    if abstention.coverage < _FEW_ACCEPTED:
        warnings.append(
            f"the abstention threshold accepts {abstention.coverage:.1%} of the validation inputs: no threshold on "
            f"mutual information reaches the target error rate {target_risk:.1%} on more, so the file abstains on "
            "almost everything; raise --target-risk, or give more (or better) validation data"
        )
    elif abstention.coverage >= 1.0:
        warnings.append(
            "the abstention threshold accepts every validation input (their error rate "
            f"{abstention.validation_risk:.1%} is within the target {target_risk:.1%}), so it was set at the largest "
            "mutual information seen and says little about stranger inputs"
        )
    return ValidationChoices(fit, conformal, abstention, tuple(warnings))
