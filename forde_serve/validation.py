"""What a held-out validation split decides about an ensemble, in one place for `forde export`,
`forde fuse` and `forde evaluate` on a run folder: the temperature (calibration), the conformal
thresholds (prediction sets) and the abstention threshold, in that order, each on the
probabilities the previous step produced, so a served number means what it was chosen to mean.
The decisions are a `contract.ValidationChoices`, the shape the exported file stores them in.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from forde_serve.calibration import fit_temperature, member_probs
from forde_serve.conformal import DEFAULT_COVERAGES, calibrate
from forde_serve.contract import Abstention, ValidationChoices
from forde_serve.metrics import uncertainty, validation_abstention
from forde_serve.reference import MonitorReference

__all__ = ["choose_on_validation"]

_BOUNDS = (0.05, 20.0)  # the temperature search's range
# Which uncertainty output groups the Mondrian sets and which one the shift test watches: measured on
# digits-C (benchmarks/bench_monitoring.py), entropy groups held coverage best, mutual information
# detects shifts fastest.
GROUP_SCORE = "predictive_entropy"
SHIFT_SCORE = "mutual_information"
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
    groups: int | None = None,
) -> ValidationChoices:
    """Fit T on `member_logits` `[N, M, C]` (unless `calibrate_temperature` is False), then conformal
    thresholds for the default levels plus `coverages`, then the abstention threshold reaching
    `target_risk`, all on the same validation inputs (labels `[N]`), and the shift test's reference.

    The prediction sets are group-conditional (Mondrian) on the predictive entropy: `groups` equal groups
    at its validation quantiles (None: the dyadic groups of `forde_serve.conformal`; 1: plain split
    conformal), so an input the members are unsure of gets the looser threshold of the inputs like it.
    Measured on digits (benchmarks/bench_monitoring.py): clean coverage kept, far better under shift.
    """
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
    members = member_probs(member_logits, temperature)
    probs = members.mean(axis=1)
    spread = uncertainty(members)
    levels = sorted(set(DEFAULT_COVERAGES) | {float(c) for c in coverages})
    conformal = calibrate(
        probs,
        labels,
        score=score,
        coverages=levels,
        k_reg=k_reg,
        lam=lam,
        group_scores=None if groups == 1 else spread[GROUP_SCORE],
        groups=None if groups in (None, 1) else groups,
        group_score=GROUP_SCORE,
    )
    reference = MonitorReference.from_scores(spread[SHIFT_SCORE], score=SHIFT_SCORE)
    chosen = validation_abstention(members, labels, target_risk)
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
    return ValidationChoices(fit, conformal, abstention, reference, tuple(warnings))
