"""What prediction sets add to a prediction: `forde_serve.conformal.prediction_sets` vs the predict call.

    python benchmarks/bench_conformal.py                          # exported/digits.onnx
    python benchmarks/bench_conformal.py exported/mine.onnx --rounds 200

Prints one JSON object. The model is calibrated (each score: lac, aps, raps) on its own
probabilities for 2000 random raw inputs, with labels drawn from those probabilities (the cost
does not depend on how good the calibration is). Then, for each batch size, the predict call and
the three set computations on its probabilities run once per round, interleaved, after warm-up;
figures are medians in milliseconds, and `*_ratio` is sets / predict measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from forde_serve.conformal import calibrate, prediction_sets
from forde_serve.runtime import EnsembleRuntime

BATCHES = (1, 8, 64, 256)
SCORES = ("lac", "aps", "raps")


def _raw_inputs(runtime: EnsembleRuntime, rows: int, rng: np.random.Generator) -> np.ndarray:
    # Digits-like raw values (0 to 16); any finite input exercises the same code.
    return rng.uniform(0.0, 16.0, size=(rows, *runtime.card.input_shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="exported/digits.onnx")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    runtime = EnsembleRuntime(args.model)
    calibration_probs = runtime.predict(_raw_inputs(runtime, 2000, rng))["probs"].astype(np.float64)
    calibration_probs /= calibration_probs.sum(axis=1, keepdims=True)
    labels = (calibration_probs.cumsum(axis=1) > rng.random((2000, 1))).argmax(axis=1)
    calibrations = {score: calibrate(calibration_probs, labels, score) for score in SCORES}

    results = {}
    for batch in BATCHES:
        x = _raw_inputs(runtime, batch, rng)
        probs = runtime.predict(x)["probs"]
        tasks = {"predict": lambda x=x: runtime.predict(x)}
        for score, calibration in calibrations.items():
            tasks[score] = lambda probs=probs, calibration=calibration: prediction_sets(probs, calibration, 0.9)
        times = {name: [] for name in tasks}
        for round_index in range(args.rounds + 5):
            for name, task in tasks.items():
                start = time.perf_counter()
                task()
                if round_index >= 5:  # the first rounds are warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
        medians = {name: statistics.median(values) for name, values in times.items()}
        results[str(batch)] = {
            "predict_ms": medians["predict"],
            **{f"{score}_sets_ms": medians[score] for score in SCORES},
            **{f"{score}_ratio": medians[score] / medians["predict"] for score in SCORES},
        }
    print(
        json.dumps(
            {"model": args.model, "machine": platform.processor() or platform.machine(), "batches": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
