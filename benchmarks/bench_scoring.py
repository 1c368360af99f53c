"""Batch scoring throughput: `forde score`'s local engine and its Ray engine against in-process predict.

    python benchmarks/bench_scoring.py                          # exported/digits.onnx, 100k rows
    python benchmarks/bench_scoring.py --rows 300000 --ray-workers 2

Prints one JSON object. The input is the bundled digits repeated to `--rows` rows, saved as
.npy. Each round runs, one after another on the same file:

- predict: `EnsembleRuntime.predict` over in-memory batches of `--batch-size` (no reading, no
  writing): the cost of the model alone;
- local: `forde_serve.scoring.score(..., engine="local")` end to end: model load and hash,
  memory-mapped reads, Parquet parts, manifest, final output;
- ray: the same with `engine="ray"` on a local Ray instance with `--ray-workers` actors,
  including Ray's start-up (skipped with --ray-workers 0 or when Ray is not installed).

Figures are medians over rounds, in rows per second; `local_overhead` is 1 - local/predict.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forde_serve.runtime import EnsembleRuntime
from forde_serve.scoring import ScoreJob, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=Path("exported/digits.onnx"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-workers", type=int, default=2, help="Ray actors (0: skip Ray)")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32)[:, None]
    x = np.resize(digits, (args.rows, *digits.shape[1:]))
    runtime = EnsembleRuntime(args.model, max_batch=args.batch_size)
    with_ray = args.ray_workers > 0 and importlib.util.find_spec("ray") is not None

    def predict() -> None:
        for start in range(0, len(x), args.batch_size):
            runtime.predict(x[start : start + args.batch_size])

    times: dict[str, list[float]] = {"predict": [], "local": []} | ({"ray": []} if with_ray else {})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.npy"
        np.save(data, x)
        runs = {"predict": predict}
        for engine in ("local", "ray") if with_ray else ("local",):

            def run(engine=engine) -> None:
                job = ScoreJob(
                    model=args.model, input=data, out=Path(tmp) / f"{engine}.parquet", batch_size=args.batch_size
                )
                score(job, engine=engine, workers=args.ray_workers, overwrite=True)

            runs[engine] = run
        predict()  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rows_per_s = {name: round(args.rows / statistics.median(t)) for name, t in times.items()}
    result = {
        "device": f"cpu ({platform.machine()}), onnxruntime {ort.__version__} {runtime.providers[0]}",
        "model": str(args.model),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "rows_per_second": rows_per_s,
        "local_over_predict": round(rows_per_s["local"] / rows_per_s["predict"], 3),
        "local_overhead": round(1 - rows_per_s["local"] / rows_per_s["predict"], 3),
    }
    if with_ray:
        result["ray_workers"] = args.ray_workers
        result["ray_over_local"] = round(rows_per_s["ray"] / rows_per_s["local"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
