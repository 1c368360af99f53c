"""Serving under shift, measured on the committed digits model: label-free sets (plain LAC vs Mondrian),
the shift alarm (detection delay, false alarms, bins), and adaptive sets with labels fed back.

    python benchmarks/bench_monitoring.py                      # exported/digits.onnx, the full run
    python benchmarks/bench_monitoring.py --orders 5 --permutations 20   # quicker

Data: the project's fixed digits split (`training.splits.digits_split()`, the one `training.data`
uses, read without torch). The committed file holds neither the validation split's
mutual information nor the calibration's conformity scores, so both are recomputed here through the
runtime on the validation split (its plain LAC thresholds come out equal to the file's to ~1e-8:
float32 outputs here, the exporter's float64 there).

Streams: the clean test split (360 rows), digits-C (`forde_serve.corruptions.CORRUPTIONS`, 11 types x
5 severities, seed 0) as the DEVELOPMENT shifts on which settings are chosen, and the held-out shifts
(`HELD_OUT_SHIFTS`, fixed before anything here was measured on them) on which they are judged.

Prints one JSON object:
- `sets`: 90% coverage and mean size of plain LAC and Mondrian sets (groups by mutual information and
  by predictive entropy, `calibrate`'s default number of groups), clean / digits-C per severity /
  held-out; and `groups_sweep`, the same for 1 to 8 groups (reported, not used to choose).
- `martingale`: `bins`, detection delays with 32 to 512 log-spaced bins vs exact scores (one bin per
  distinct value), for the mixture and jumper bettings, on digits-C severity 3 and 5 and the held-out
  shifts; `late_shift`, rows until the alarm when a shift starts after the 360 clean rows.
- `streams`: `forde_serve.monitoring.stream.evaluate_streams` with the defaults (the Monitor on an
  in-memory store): false alarms over clean permutations, detection delays (median, max over
  shuffled orders) per stream, coverage with labels fed back after each row.
- `adaptive_gamma`: adaptive coverage / size / share of all-class sets for gamma 0.005 to 0.05, on the
  plain LAC calibration (marginal quantiles) and the Mondrian one (each row's group's quantiles): clean,
  digits-C severity 3 and 5 (development, where the default gamma is chosen) and the held-out shifts.
"""

from __future__ import annotations

import argparse
import json
import platform
from contextlib import contextmanager

import numpy as np

from forde_serve.conformal import calibrate, prediction_sets, set_coverage_and_size
from forde_serve.corruptions import CORRUPTIONS, HELD_OUT_SHIFTS, SEVERITIES, corrupt, shift
from forde_serve.monitoring.adaptive import DEFAULT_GAMMA
from forde_serve.monitoring.martingale import ConformalMartingale, MartingaleConfig
from forde_serve.monitoring.monitor import MonitorConfig
from forde_serve.monitoring.stream import evaluate_streams, predict_outputs, replay
from forde_serve.reference import MonitorReference
from forde_serve.runtime import EnsembleRuntime

COVERAGE = 0.9
BINS = (32, 64, 128, 256, 512)
GAMMAS = (0.005, 0.01, 0.02, 0.05)


class _Store:
    """The state store's interface (forde_serve.monitoring.store) in memory, for one process: the
    benchmark measures the monitor's maths, not a database. JSON documents go through json as they
    would through SQL."""

    def __init__(self):
        self._state, self._predictions, self._labels = {}, {}, {}

    @contextmanager
    def transaction(self):
        yield self

    def get_state(self, name):
        return None if name not in self._state else json.loads(self._state[name])

    def put_state(self, name, value):
        self._state[name] = json.dumps(value, allow_nan=False)

    def insert_predictions(self, records):
        self._predictions.update((r.id, r) for r in records)

    def predictions(self, ids):
        return {i: self._predictions[i] for i in ids if i in self._predictions}

    def labelled(self, ids):
        return {i for i in ids if i in self._labels}

    def insert_labels(self, records):
        self._labels.update((r.id, r) for r in records)

    def recent_predictions(self, n):
        return list(self._predictions.values())[::-1][:n]

    def label_outcomes(self, n=None):
        return list(self._labels.values())[::-1][:n]

    def counts(self):
        return {"predictions": len(self._predictions), "labels": len(self._labels)}


def _sets_figures(probs, labels, calibration, group_scores=None) -> dict:
    sets = prediction_sets(probs, calibration, COVERAGE, group_scores=group_scores)
    coverage, size = set_coverage_and_size(sets, labels)
    return {"coverage": coverage, "size": size}


def _set_comparison(calibrations, val, streams) -> dict:
    out = {}
    for name, (calibration, key) in calibrations.items():
        figures = {
            stream: _sets_figures(o["probs"], y, calibration, None if key is None else o[key])
            for stream, (o, y) in streams.items()
        }
        dev = {s: [figures[f"{c}/{s}"] for c in CORRUPTIONS] for s in SEVERITIES}
        held = {h: figures[h] for h in HELD_OUT_SHIFTS}
        out[name] = {
            "groups": calibration.groups,
            "group_rows": list(calibration.group_rows),
            "clean": figures["clean"],
            "digits_c_per_severity": {
                str(s): {k: float(np.mean([f[k] for f in dev[s]])) for k in ("coverage", "size")} for s in SEVERITIES
            },
            "digits_c_mean_coverage": float(np.mean([f["coverage"] for s in SEVERITIES for f in dev[s]])),
            "held_out": held,
            "held_out_mean_coverage": float(np.mean([f["coverage"] for f in held.values()])),
            "held_out_min_coverage": float(min(f["coverage"] for f in held.values())),
        }
    return out


def _delay(test: ConformalMartingale, scores: np.ndarray, seed) -> int | None:
    state, _ = test.update(test.start(), scores, np.random.default_rng(seed))
    # fired_at over the whole stream equals the first crossing: the rows after it do not change it
    return state["fired_at"]


def _median_delay(reference, betting, streams, orders) -> dict:
    test = ConformalMartingale(reference, MartingaleConfig(betting))
    out = {}
    for name, scores in streams.items():
        delays = []
        for k in range(orders):
            rng = np.random.default_rng([k, len(name)])
            delays.append(_delay(test, scores[rng.permutation(len(scores))], rng.integers(2**32)))
        fired = [d for d in delays if d is not None]
        out[name] = {"fired": len(fired), "median": None if not fired else float(np.median(fired))}
    return out


def _bins_sweep(val_mi, mi_streams, orders) -> dict:
    every = np.unique(np.concatenate([val_mi, *mi_streams.values()]))
    exact = MonitorReference(
        "mutual_information", tuple(val_mi.tolist()), tuple(((every[1:] + every[:-1]) / 2).tolist())
    )
    references = {str(b): MonitorReference.from_scores(val_mi, bins=b) for b in BINS} | {"exact": exact}
    out = {}
    for betting in ("mixture", "jumper"):
        out[betting] = {}
        for name, reference in references.items():
            delays = _median_delay(reference, betting, mi_streams, orders)
            out[betting][name] = {
                "bins": reference.bins,
                "median_of_medians": float(
                    np.median([d["median"] for d in delays.values() if d["median"] is not None])
                ),
                "fired_streams": sum(d["fired"] == orders for d in delays.values()),
                "per_stream": {k: d["median"] for k, d in delays.items()},
            }
    return out


def _late_shift(reference, clean_mi, held_mi, orders) -> dict:
    out = {}
    for betting in ("mixture", "jumper", "power"):
        test = ConformalMartingale(reference, MartingaleConfig(betting))
        out[betting] = {}
        for name, scores in held_mi.items():
            delays = []
            for k in range(orders):
                rng = np.random.default_rng([k, 7])
                stream = np.concatenate(
                    [clean_mi[rng.permutation(len(clean_mi))], scores[rng.permutation(len(scores))]]
                )
                fired = _delay(test, stream, rng.integers(2**32))
                delays.append(None if fired is None else fired - len(clean_mi))
            fired = [d for d in delays if d is not None and d > 0]
            out[betting][name] = {
                "fired_after_shift": len(fired),
                "fired_before_shift": sum(d is not None and d <= 0 for d in delays),
                "median_delay": None if not fired else float(np.median(fired)),
            }
    return out


def _gamma_sweep(streams, reference, calibrations) -> dict:
    return {name: _gammas(streams, reference, cal) for name, (cal, _) in calibrations.items() if name != "mondrian_mi"}


def _gammas(streams, reference, calibration) -> dict:
    out = {}
    for gamma in GAMMAS:
        config = MonitorConfig(gamma=gamma)
        runs = {}
        for name, (outputs, labels) in streams.items():
            run = replay(
                outputs, labels, store_factory=_Store, reference=reference, calibration=calibration, config=config
            )
            runs[name] = {
                "coverage": run["coverage"]["adaptive"],
                "size": run["mean_set_size"]["adaptive"],
                "every_class": run["every_class"]["adaptive"],
            }
        dev = [r for n, r in runs.items() if n not in HELD_OUT_SHIFTS and n != "clean"]
        held = [runs[n] for n in HELD_OUT_SHIFTS]
        out[str(gamma)] = {
            "clean": runs["clean"],
            "development": {
                "mean_coverage": float(np.mean([r["coverage"] for r in dev])),
                "min_coverage": float(min(r["coverage"] for r in dev)),
                "mean_size": float(np.mean([r["size"] for r in dev])),
                "mean_every_class": float(np.mean([r["every_class"] for r in dev])),
            },
            "held_out": {n: runs[n] for n in HELD_OUT_SHIFTS},
            "held_out_mean_coverage": float(np.mean([r["coverage"] for r in held])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="exported/digits.onnx")
    parser.add_argument("--orders", type=int, default=20, help="shuffled orders per shifted stream")
    parser.add_argument("--permutations", type=int, default=100, help="shuffled orders of the clean test rows")
    args = parser.parse_args()

    from training.splits import digits_split

    split = digits_split()
    runtime = EnsembleRuntime(args.model)
    (val_x, val_y), (test_x, test_y) = split["val"], split["test"]
    val = predict_outputs(runtime, val_x)
    reference = MonitorReference.from_scores(val["mutual_information"])
    calibrations = {
        "lac": (calibrate(val["probs"], val_y), None),
        "mondrian_mi": (calibrate(val["probs"], val_y, group_scores=val["mutual_information"]), "mutual_information"),
        "mondrian_entropy": (
            calibrate(val["probs"], val_y, group_scores=val["predictive_entropy"], group_score="predictive_entropy"),
            "predictive_entropy",
        ),
    }
    raw = {"clean": (test_x, test_y)}
    raw |= {f"{c}/{s}": (corrupt(test_x, c, s), test_y) for c in CORRUPTIONS for s in SEVERITIES}
    raw |= {h: (shift(test_x, h), test_y) for h in HELD_OUT_SHIFTS}
    streams = {name: (predict_outputs(runtime, x), y) for name, (x, y) in raw.items()}

    sweep = {}
    for key, name in (("mutual_information", "mi"), ("predictive_entropy", "entropy")):
        for groups in range(1, 9):
            cal = calibrate(val["probs"], val_y, group_scores=val[key], groups=groups, group_score=key)
            sweep[f"{name}/{groups}"] = (cal, key if cal.groups else None)
    sweep_figures = _set_comparison(sweep, val, streams)

    detection = [f"{c}/{s}" for s in (3, 5) for c in CORRUPTIONS] + list(HELD_OUT_SHIFTS)
    mi_streams = {name: streams[name][0]["mutual_information"] for name in detection}
    default_calibration = calibrations["mondrian_entropy"][0]
    shifted = {name: raw[name] for name in detection}
    report = {
        "model": args.model,
        "machine": platform.processor() or platform.machine(),
        "validation_rows": len(val_y),
        "sets": _set_comparison(calibrations, val, streams),
        "groups_sweep": {
            k: {
                key: v[key]
                for key in (
                    "groups",
                    "clean",
                    "digits_c_mean_coverage",
                    "held_out_mean_coverage",
                    "held_out_min_coverage",
                )
            }  # fmt: skip
            for k, v in sweep_figures.items()
        },
        "martingale": {
            "bins": _bins_sweep(val["mutual_information"], mi_streams, args.orders),
            "late_shift": _late_shift(
                reference,
                streams["clean"][0]["mutual_information"],
                {h: mi_streams[h] for h in HELD_OUT_SHIFTS},
                args.orders,
            ),
        },
        "streams": evaluate_streams(
            runtime,
            raw["clean"],
            shifted,
            store_factory=_Store,
            reference=reference,
            calibration=default_calibration,
            orders=args.orders,
            permutations=args.permutations,
        ),
        "adaptive_gamma": _gamma_sweep(
            {name: streams[name] for name in ["clean", *detection]}, reference, calibrations
        ),
        "default_gamma": DEFAULT_GAMMA,
    }
    for entry in report["streams"]["coverage"].values():  # the per-row series are for figures, not this print
        for key in ("running", "alpha", "log_statistic"):
            entry.pop(key)
    for entry in report["streams"]["detection"].values():
        entry.pop("delays")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
