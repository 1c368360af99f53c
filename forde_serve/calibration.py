"""Temperature scaling of an ensemble, in numpy.

Guo, Pleiss, Sun, Weinberger. "On calibration of modern neural networks", ICML 2017, applied to
an ensemble: every member's logits are divided by one shared temperature T before its softmax,
and the members' softmaxes are averaged,

    p_T(x) = (1/M) sum_m softmax(z_m(x) / T).

T is fitted on held-out data by minimizing the negative log-likelihood of p_T over T > 0 (one
scalar, so the ensemble's ranking of classes never changes). The exported graph bakes T in; the
fit (`TemperatureFit`) travels in the file's metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from forde_serve.errors import FordeError
from forde_serve.metrics import ECE_BINS, expected_calibration_error

__all__ = ["CalibrationError", "TemperatureFit", "ensemble_nll", "ensemble_probs", "fit_temperature", "member_probs"]

# Golden-section search on log T stops when the bracket is this narrow: T is then known to a
# relative 1e-7, far below the statistical error of any fit (about 1/sqrt(N) relative).
_LOG_T_TOLERANCE = 1e-7
# Coarse grid on log T before the golden-section search: the NLL of a softmax average need not be
# unimodal in T, so the search starts from the bracket around the best of these points, and the
# bounds themselves are candidates.
_GRID_POINTS = 17
_INV_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


class CalibrationError(FordeError, ValueError):
    """Member logits, labels, a temperature or calibration metadata that cannot be used."""


def member_probs(member_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Each member's softmax `[N, M, C]` of its logits `[N, M, C]` divided by `temperature`
    (computed as exp(z - max z) / sum, so large logits do not overflow)."""
    logits = _check_logits(member_logits)
    return np.exp(_log_softmax(logits / _check_temperature(temperature)))


def ensemble_probs(member_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Ensemble probabilities `[N, C]` at `temperature` from member logits `[N, M, C]`: the mean of
    the members' softmaxes of their logits divided by the temperature (`member_probs`)."""
    return member_probs(member_logits, temperature).mean(axis=1)


def ensemble_nll(member_logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` `[N]` under `ensemble_probs(member_logits, temperature)`.

    Computed as -mean log((1/M) sum_m exp(log_softmax_m[y])) with a log-sum-exp over members, so it
    stays exact where a probability underflows (the metrics module clips probabilities at 1e-12
    instead; the two agree whenever every true-class probability is above that).
    """
    logits = _check_logits(member_logits)
    return _NLL(logits, _check_labels(labels, logits))(_check_temperature(temperature))


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and what it changed on the data it was fitted on.

    `nll_*` as `ensemble_nll`; `ece_*` is `forde_serve.metrics.expected_calibration_error` with
    15 bins; `*_before` at T = 1, `*_after` at `temperature`.
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def to_metadata(self) -> dict[str, float]:
        """A JSON-able dict of plain floats (the exported file's metadata)."""
        return {name: float(value) for name, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict) -> TemperatureFit:
        """Read back what `to_metadata` wrote; a missing or non-numeric field is named."""
        if not isinstance(metadata, dict):
            raise CalibrationError(f"temperature metadata: expected a JSON object, got {type(metadata).__name__}")
        values = {}
        for name in cls.__dataclass_fields__:
            value = metadata.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise CalibrationError(f"temperature metadata field {name!r}: expected a finite number, got {value!r}")
            values[name] = float(value)
        if values["temperature"] <= 0.0:
            raise CalibrationError(
                f"temperature metadata field 'temperature': expected a number > 0, got {values['temperature']!r}"
            )
        return cls(**values)


def fit_temperature(
    member_logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> TemperatureFit:
    """The temperature in `bounds` that minimizes the ensemble NLL of `labels` `[N]` given `member_logits` `[N, M, C]`.

    The search runs on log T: the NLL at 17 points evenly spaced from log lo to log hi (the bounds
    included), then golden-section search inside the bracket around the best of them, until the
    bracket is 1e-7 wide in log T. The result is the best of the grid points, the golden-section
    minimum and T = 1 (when inside the bounds), so `nll_after <= nll_before` whenever 1 is in `bounds`.
    """
    logits = _check_logits(member_logits)
    labels = _check_labels(labels, logits)
    lo, hi = _check_bounds(bounds)
    nll = _NLL(logits, labels)

    def nll_at(log_t: float) -> float:
        return nll(math.exp(log_t))

    grid = np.linspace(math.log(lo), math.log(hi), _GRID_POINTS)
    grid_nll = [nll_at(float(x)) for x in grid]
    best = int(np.argmin(grid_nll))
    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, _GRID_POINTS - 1)])
    candidates = {float(x): value for x, value in zip(grid, grid_nll, strict=True)}
    # Golden section: keep two interior points; each step drops the side beyond the worse one.
    c, d = b - _INV_GOLDEN * (b - a), a + _INV_GOLDEN * (b - a)
    fc, fd = nll_at(c), nll_at(d)
    while b - a > _LOG_T_TOLERANCE:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_GOLDEN * (b - a)
            fc = nll_at(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_GOLDEN * (b - a)
            fd = nll_at(d)
    candidates[c], candidates[d] = fc, fd
    nll_before = nll(1.0)
    if lo <= 1.0 <= hi:
        candidates[0.0] = nll_before
    log_t = min(candidates, key=lambda x: (candidates[x], abs(x)))  # on a tie, the temperature nearest 1
    temperature = math.exp(log_t)
    return TemperatureFit(
        temperature=temperature,
        nll_before=nll_before,
        nll_after=candidates[log_t],
        ece_before=expected_calibration_error(np.exp(_log_softmax(logits)).mean(1), labels, ECE_BINS),
        ece_after=expected_calibration_error(np.exp(_log_softmax(logits / temperature)).mean(1), labels, ECE_BINS),
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class _NLL:
    """T -> -mean_n log((1/M) sum_m softmax(z_nm / T)[y_n]) for checked float64 logits `[N, M, C]`.

    The search calls it about 70 times: what does not depend on T is computed once. For T > 0,
    max(z / T) = max(z) / T, so the logits are shifted by their maximum once and each call needs
    one scaling, one exp and one sum.
    """

    def __init__(self, logits: np.ndarray, labels: np.ndarray) -> None:
        self._shifted = logits - logits.max(axis=-1, keepdims=True)  # [N, M, C], <= 0
        self._true_class = np.take_along_axis(self._shifted, labels[:, None, None], axis=2)[..., 0]  # [N, M]
        self._log_members = math.log(logits.shape[1])

    def __call__(self, temperature: float) -> float:
        scale = 1.0 / temperature
        log_norm = np.log(np.exp(self._shifted * scale).sum(axis=-1))  # [N, M]; each sum is >= 1
        true_class = self._true_class * scale - log_norm  # [N, M]: log softmax of the true class
        peak = true_class.max(axis=1, keepdims=True)  # log-sum-exp over members
        log_prob = peak[:, 0] + np.log(np.exp(true_class - peak).sum(axis=1)) - self._log_members
        return float(-log_prob.mean())


def _check_logits(member_logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(member_logits)
    if logits.ndim != 3:
        raise CalibrationError(f"member_logits: expected an array [inputs, members, classes], got shape {logits.shape}")
    if 0 in logits.shape:
        raise CalibrationError(
            f"member_logits: expected at least one input, member and class, got shape {logits.shape}"
        )
    if logits.shape[2] < 2:
        raise CalibrationError(f"member_logits: expected at least 2 classes, got {logits.shape[2]}")
    if not np.issubdtype(logits.dtype, np.number) or np.issubdtype(logits.dtype, np.complexfloating):
        raise CalibrationError(f"member_logits: expected real numbers, got dtype {logits.dtype}")
    logits = logits.astype(np.float64)
    if not np.isfinite(logits).all():
        raise CalibrationError("member_logits: expected finite numbers, got NaN or infinity")
    return logits


def _check_labels(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    inputs, _, classes = logits.shape
    if labels.shape != (inputs,):
        raise CalibrationError(f"labels: expected shape ({inputs},) to match member_logits, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= classes:
        raise CalibrationError(
            f"labels: expected class indices in 0..{classes - 1}, got values from {labels.min()} to {labels.max()}"
        )
    return labels.astype(np.intp)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating | np.integer):
        raise CalibrationError(f"temperature: expected a number > 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise CalibrationError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise CalibrationError(f"bounds: expected two numbers (lowest, highest temperature), got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise CalibrationError(f"bounds: expected 0 < lowest < highest, both finite, got {bounds!r}")
    return lo, hi
