"""A label-free alarm for served traffic that no longer looks like the validation split: a conformal
test martingale on an uncertainty score (Vovk, Gammerman, Shafer, "Algorithmic learning in a random
world", 2nd ed., ch. 8; Vovk, Nouretdinov, Gammerman 2003, "Testing exchangeability on-line").

Scores. Each served row gets s_t, by default its mutual information (larger = stranger). The
reference s_1..s_n are the validation split's (`MonitorReference`). The p-value of row t compares it
with the reference AND every row served since the test was armed, the new one counted among the
equal ones, with U_t ~ Uniform(0, 1):

    p_t = (#{i < t : s_i > s_t} + U_t * #{i <= t : s_i = s_t}) / (N_t + 1),   N_t = n + (t - 1),

the index running over the reference and the earlier stream rows. If the n + t scores are
exchangeable, p_1, p_2, ... are independent and uniform on (0, 1) (ALRW, Theorem 8.2: smoothed
p-values in the on-line mode; the reference is the first n observations, whose own p-values are
not bet on), so the test stays valid however long it runs and however often it is looked at.

Betting. A test martingale M_t = prod_k f_k(p_k) with every f_k >= 0 integrating to 1 over (0, 1):

- "mixture" (default): the simple mixture martingale, the average over eps of the power martingales
  prod_k eps p_k^(eps - 1), on the grid eps = (j - 1/2) / 100, j = 1..100 (an average of test
  martingales is one). Its state is t and S_t = sum_k ln p_k: ln M_t = logmeanexp_j(t ln eps_j +
  (eps_j - 1) S_t), computed in log space.
- "power": one eps (`MartingaleConfig.epsilon`), ln M_t = t ln eps + (eps - 1) S_t.
- "jumper": ALRW's Simple Jumper (Algorithm 8.1; MAPIE's `OnlineMartingaleTest` default and crepes'
  `SimpleJumper`): experts betting 1 + e (p - 1/2) for e in {-1, 0, 1}, a share J of the wealth
  redistributed evenly before each bet, so it recovers after a long stretch of clean traffic.

Alarm. By Ville's inequality, P(sup_t M_t >= 1/delta) <= delta for any test martingale: on traffic
exchangeable with the reference the alarm (M_t >= 1/delta, delta = 0.01 by default) fires falsely
with probability at most 1%, ever. Re-arming (`start`) restarts M at 1 against the reference alone.
A shift that leaves the score's distribution alone is not detected.

Quantized scores. The state lives in a database shared by every worker and is rewritten once per
request, so the stream is kept as counts per bin of the reference's fixed edges, and p_t is computed
on the bin index q(s) instead of s. q is a fixed function, so if the scores are exchangeable so are
their bins, and the p-value above of q(s_t) among q(s_1), ... (equal bins being ties, broken by U) is
exactly uniform: the guarantee is exact for the quantized score. What quantization costs is
resolution (two scores in one bin count as equal). Measured on the committed digits model (26
shifted streams, 20 orders each, benchmarks/bench_monitoring.py): the median over streams of the
median rows to the alarm was 6.0 with the default 256 log-spaced bins and 6.25 on exact scores (one
bin per distinct value) for the mixture, 18.75 with both for the jumper; 32 bins gave 6.5.

Which betting. From arming, the mixture fired first (median 6 rows vs the jumper's 18.75 above). After
360 clean rows the jumper caught up faster (held-out shifts: median 26-152 rows vs the mixture's
30-210), and the power martingale at eps = 0.1 had decayed so far that it did not fire within 360
shifted rows. The default is the mixture; re-arm after a clean stretch is trusted, or use the jumper.

Randomness. U comes from the caller's numpy Generator: seeded for reproducible offline replays,
fresh (`np.random.default_rng()`) in a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from forde_serve.errors import FordeError
from forde_serve.reference import MonitorReference

__all__ = [
    "BETTINGS",
    "DEFAULT_DELTA",
    "MIXTURE_EPSILONS",
    "ConformalMartingale",
    "MartingaleConfig",
    "MartingaleStateError",
    "log_martingale_path",
]

BETTINGS = ("mixture", "power", "jumper")
DEFAULT_DELTA = 0.01
MIXTURE_EPSILONS = tuple((np.arange(100) + 0.5) / 100)
JUMPER_EXPERTS = (-1.0, 0.0, 1.0)
STATE_VERSION = 1
_TINY = np.finfo(np.float64).tiny  # p = 0 needs U = 0 exactly (probability 2**-53 per draw): keep ln p finite
_EPS = np.array(MIXTURE_EPSILONS)
_LOG_EPS = np.log(_EPS)
_LOG_MIXTURE = math.log(len(MIXTURE_EPSILONS))


class MartingaleStateError(FordeError, ValueError):
    """A shift-test setting or stored state that cannot be used (the message says which)."""


@dataclass(frozen=True)
class MartingaleConfig:
    """How the shift test bets and when it fires."""

    betting: str = "mixture"  # mixture | power | jumper (the module docstring)
    delta: float = DEFAULT_DELTA  # alarm at M_t >= 1 / delta: false-alarm probability at most delta
    epsilon: float = 0.1  # power only: M_t = prod eps p^(eps - 1), 0 < eps < 1
    jump: float = 0.01  # jumper only: share of the wealth redistributed before each bet, 0 < J < 1

    def __post_init__(self) -> None:
        if self.betting not in BETTINGS:
            raise MartingaleStateError(f"betting: expected one of {', '.join(BETTINGS)}, got {self.betting!r}")
        for name in ("delta", "epsilon", "jump"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
                raise MartingaleStateError(f"{name}: expected a number strictly between 0 and 1, got {value!r}")

    @property
    def log_threshold(self) -> float:
        return -math.log(self.delta)


def _log_statistic(config: MartingaleConfig, rows: int, log_p_sum: float, log_wealth: list[float] | None) -> float:
    if config.betting == "mixture":
        terms = rows * _LOG_EPS + (_EPS - 1.0) * log_p_sum
        peak = terms.max()
        return float(peak + math.log(np.exp(terms - peak).sum()) - _LOG_MIXTURE)
    if config.betting == "power":
        return rows * math.log(config.epsilon) + (config.epsilon - 1.0) * log_p_sum
    return _logsumexp(log_wealth)


def _logsumexp(values: list[float]) -> float:
    peak = max(values)
    return peak + math.log(sum(math.exp(v - peak) for v in values))


def _jump(config: MartingaleConfig, log_wealth: list[float], p: float) -> list[float]:
    """One Simple Jumper step in log space: redistribute a share J evenly, then bet 1 + e (p - 1/2)
    (between 1/2 and 3/2, so never 0)."""
    shared = math.log(config.jump / len(JUMPER_EXPERTS)) + _logsumexp(log_wealth)
    kept = math.log1p(-config.jump)
    return [
        float(np.logaddexp(kept + w, shared)) + math.log1p(e * (p - 0.5))
        for w, e in zip(log_wealth, JUMPER_EXPERTS, strict=True)
    ]


def log_martingale_path(p_values: np.ndarray, config: MartingaleConfig | None = None) -> np.ndarray:
    """ln M_t `[T]` after each of `p_values` `[T]` (in (0, 1]), starting from M_0 = 1: the betting of
    `ConformalMartingale`, for offline checks against other implementations."""
    config = config or MartingaleConfig()
    values = np.asarray(p_values, dtype=np.float64).ravel()
    if not ((values > 0) & (values <= 1)).all():
        raise MartingaleStateError("p_values: expected numbers in (0, 1]")
    out = np.empty(len(values))
    log_p_sum, log_wealth = 0.0, [-math.log(len(JUMPER_EXPERTS))] * len(JUMPER_EXPERTS)
    for t, p in enumerate(values):
        log_p_sum += math.log(p)
        if config.betting == "jumper":
            log_wealth = _jump(config, log_wealth, float(p))
        out[t] = _log_statistic(config, t + 1, log_p_sum, log_wealth)
    return out


class ConformalMartingale:
    """The shift test of one reference; its state is a small JSON-able dict kept by the caller.

    `start()` -> the state at arming; `update(state, scores, rng)` -> (the new state, the rows'
    p-values); `summary(state)` -> what the /monitor document shows.
    """

    def __init__(self, reference: MonitorReference, config: MartingaleConfig | None = None):
        self.reference = reference
        self.config = config or MartingaleConfig()
        self._reference_counts = reference.counts

    def start(self) -> dict:
        """The state at arming: M = 1, no stream rows, no alarm."""
        state = {
            "version": STATE_VERSION,
            "score": self.reference.score,
            "betting": self.config.betting,
            "rows": 0,
            "log_statistic": 0.0,
            "log_max": 0.0,
            "fired_at": None,
            "alarm": False,
            "log_p_sum": 0.0,
            "stream_counts": [0] * self.reference.bins,
        }
        if self.config.betting == "jumper":
            state["log_wealth"] = [-math.log(len(JUMPER_EXPERTS))] * len(JUMPER_EXPERTS)
        return state

    def update(self, state: dict, scores: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """Step the test over `scores` `[T]` in order; returns (new state, p-values `[T]`). The old state
        is not modified. One U per row is drawn from `rng`."""
        self.check_state(state)
        bins = self.reference.bin_of(scores)
        u = rng.random(len(bins))
        stream = np.array(state["stream_counts"], dtype=np.int64)
        rows, log_p_sum = int(state["rows"]), float(state["log_p_sum"])
        log_statistic, log_max, fired_at = float(state["log_statistic"]), float(state["log_max"]), state["fired_at"]
        log_wealth = list(state.get("log_wealth", ()))
        p_values = np.empty(len(bins))
        total = self._reference_counts + stream  # reference and stream scores per bin
        seen = int(total.sum())  # N_t: scores before this row
        for i, b in enumerate(bins.tolist()):
            greater = int(total[b + 1 :].sum())
            p = (greater + u[i] * (int(total[b]) + 1)) / (seen + 1)
            p_values[i] = p
            stream[b] += 1
            total[b] += 1
            seen += 1
            rows += 1
            log_p_sum += math.log(max(p, _TINY))
            if self.config.betting == "jumper":
                log_wealth = _jump(self.config, log_wealth, p)
            log_statistic = _log_statistic(self.config, rows, log_p_sum, log_wealth)
            log_max = max(log_max, log_statistic)
            if fired_at is None and log_statistic >= self.config.log_threshold:
                fired_at = rows
        new = dict(state)
        new.update(
            rows=rows,
            log_statistic=log_statistic,
            log_max=log_max,
            fired_at=fired_at,
            alarm=fired_at is not None,
            log_p_sum=log_p_sum,
            stream_counts=stream.tolist(),
        )
        if self.config.betting == "jumper":
            new["log_wealth"] = log_wealth
        return new, p_values

    def summary(self, state: dict) -> dict:
        """The shift part of the /monitor document (JSON-able; M is capped at e^709, the float range)."""
        self.check_state(state)
        return {
            "score": state["score"],
            "betting": state["betting"],
            "alarm": bool(state["alarm"]),
            "statistic": math.exp(min(state["log_statistic"], 709.0)),
            "max_statistic": math.exp(min(state["log_max"], 709.0)),
            "log_statistic": state["log_statistic"],
            "threshold": 1.0 / self.config.delta,
            "rows": state["rows"],
            "fired_at": state["fired_at"],
        }

    def check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise MartingaleStateError(f"martingale state: expected version {STATE_VERSION}, got {got!r}; re-arm it")
        expected = (self.reference.score, self.config.betting, self.reference.bins)
        got = (state.get("score"), state.get("betting"), len(state.get("stream_counts", ())))
        if got != expected:
            raise MartingaleStateError(
                f"martingale state: it is for (score, betting, bins) {got}, this test is {expected}; re-arm it"
            )
