"""A lowered predict graph (`forde export --quantize int8`, or fp16) vs float32, on a digits run.

    python benchmarks/bench_quantize.py runs/digits-forde                    # float32 and int8
    python benchmarks/bench_quantize.py runs/digits-forde --precisions int8 fp16 --candidates
    python benchmarks/bench_quantize.py runs/digits-forde --precisions fp16 --device cuda   # fp16 on the GPU

Exports the run once per precision (`export_run`, the code `forde export` runs) into a temporary
folder and prints one JSON object:

- sizes: bytes of each predict file, and `size_ratio` (lowered / float32)
- timing: for each thread setting (onnxruntime's default, and 1 intra-op thread) and batch size,
  `EnsembleRuntime.predict` of every file once per round, interleaved (in a new random order
  each round), after warm-up; medians in milliseconds, and `speedup` = float32 / lowered measured in
  the same run. fp16 is timed on the CPU only with --time-fp16 (it is meant for the CUDA provider),
  always with --device cuda (onnxruntime's CUDA provider; only the default thread setting is timed).
- test: on the run's test split, through the runtime, for each file: accuracy, NLL, ECE, Brier,
  coverage and mean size of the 90% prediction sets, abstention rate and accuracy of the accepted
  rows, and `agreement` (share of test inputs whose predicted class is float32's)
- candidates (--candidates): other int8 forms of the float32 predict graph, bare onnxruntime
  sessions at batch 64 (both thread settings) with their test accuracy: static QDQ of the fused
  (grouped-convolution) graph, static QOperator of the per-member branch layout, dynamic
  quantization (ConvInteger / MatMulInteger); `chosen` is the file `--quantize int8` writes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forde_serve.conformal import set_coverage_and_size
from forde_serve.metrics import classification_metrics
from forde_serve.runtime import EnsembleRuntime

BATCHES = (1, 64, 256)
THREADS = {"default": None, "1": 1}


def _rounds_of(batch: int, rounds: int) -> int:
    return rounds if batch < 256 else max(10, rounds // 3)


def _interleaved(tasks: dict, rounds: int) -> dict[str, float]:
    """Median ms of each task, all run once per round in a new random order (a rotated order would keep
    every task's neighbours), after 5 warm-up rounds."""
    names = list(tasks)
    times = {name: [] for name in names}
    shuffle = np.random.default_rng(0)
    for round_index in range(rounds + 5):
        for name in shuffle.permutation(names):
            start = time.perf_counter()
            tasks[name]()
            if round_index >= 5:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def _test_metrics(runtime: EnsembleRuntime, x: np.ndarray, y: np.ndarray, reference: np.ndarray | None) -> dict:
    out = runtime.predict(x)
    metrics = classification_metrics(out["member_probs"].astype(np.float64), y)
    coverage, size = set_coverage_and_size(runtime.prediction_sets(out, 0.9), y)
    accepted = ~out["abstain"]
    metrics |= {
        "coverage_0.9": coverage,
        "set_size_0.9": size,
        "abstain_rate": float(out["abstain"].mean()),
        "accepted_accuracy": float((out["predicted_class"][accepted] == y[accepted]).mean())
        if accepted.any()
        else None,
    }
    if reference is not None:
        metrics["agreement"] = float((out["predicted_class"] == reference).mean())
    return metrics, out["predicted_class"]


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _candidates(float_path: Path, chosen: Path, workdir: Path, calibration: np.ndarray, test: tuple, rounds: int):
    """The int8 forms not chosen, built from the float32 predict file, timed as bare sessions at batch 64."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from training.export.quantize import member_branches

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self.batches, None)

    members = EnsembleRuntime(float_path).card.members
    prepared, branched = workdir / "prepared.onnx", workdir / "branched.onnx"
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    member_branches(model, members)
    onnx.save(model, str(branched))
    body = ["Conv", "Relu", "MaxPool"]  # the members' convolutional body, as the chosen form quantizes it
    common = {"per_channel": True, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
    paths = {"float32": float_path, "chosen": chosen}
    quantize_static(
        str(prepared), str(workdir / "qdq_grouped.onnx"), Reader(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=body, **common,
    )  # fmt: skip
    paths["static_qdq_grouped"] = workdir / "qdq_grouped.onnx"
    quantize_static(
        str(branched), str(workdir / "qop_branches.onnx"), Reader(), quant_format=QuantFormat.QOperator,
        op_types_to_quantize=body, **common,
    )  # fmt: skip
    paths["static_qoperator_branches"] = workdir / "qop_branches.onnx"
    quantize_dynamic(str(prepared), str(workdir / "dynamic.onnx"), weight_type=QuantType.QInt8)
    paths["dynamic"] = workdir / "dynamic.onnx"
    x_test, y_test = test
    batch = np.ascontiguousarray(x_test[np.arange(64) % len(x_test)])
    found = {name: {"bytes": path.stat().st_size} for name, path in paths.items()}
    for label, threads in THREADS.items():
        sessions = {name: _session(path, threads) for name, path in paths.items()}
        medians = _interleaved({n: lambda s=s: s.run(None, {"input": batch}) for n, s in sessions.items()}, rounds)
        for name, session in sessions.items():
            found[name][f"ms_64_threads_{label}"] = round(medians[name], 4)
            found[name][f"speedup_64_threads_{label}"] = round(medians["float32"] / medians[name], 3)
            if label == "default":
                probs = session.run(["probs"], {"input": x_test})[0]
                found[name]["test_accuracy"] = float((probs.argmax(1) == y_test).mean())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a digits training run folder (forde train ... --out RUN)")
    parser.add_argument("--precisions", nargs="+", default=["int8"], choices=["int8", "fp16"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--candidates", action="store_true", help="also time the int8 forms not chosen")
    parser.add_argument("--time-fp16", action="store_true", help="time fp16 too (CPU; it is meant for CUDA)")
    parser.add_argument("--workdir", type=Path, help="keep the exported files here (default: a temporary folder)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: time on the CUDA provider")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    threads = {"default": None} if cuda else THREADS

    from training.export import export_run
    from training.run import load_run
    from training.splits import digits_split

    config = load_run(args.run).config
    if config.data.dataset != "digits":
        sys.exit(f"run: expected a digits run (the test split is read without torch), got {config.data.dataset!r}")
    splits = digits_split(config.data.split_seed)
    x_test, y_test = splits["test"]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for precision in ("float32", *args.precisions):
            paths[precision] = workdir / f"{precision}.onnx"
            export_run(args.run, paths[precision], echo=lambda line: None, precision=precision)
        result = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "onnxruntime": ort.__version__,
                "providers": providers,
            },
            "run": str(args.run),
            "sizes": {p: path.stat().st_size for p, path in paths.items()},
        }
        result["size_ratio"] = {p: round(result["sizes"][p] / result["sizes"]["float32"], 4) for p in args.precisions}
        result["test"], reference = {}, None
        for precision, path in paths.items():
            runtime = EnsembleRuntime(path, providers=providers)
            result["test"][precision], predicted = _test_metrics(runtime, x_test, y_test, reference)
            reference = predicted if reference is None else reference
        timed = [p for p in paths if p != "fp16" or args.time_fp16 or cuda]
        result["timing"] = {}
        for label, count in threads.items():
            runtimes = {p: EnsembleRuntime(paths[p], providers=providers, threads=count) for p in timed}
            result["machine"][f"ran_on_threads_{label}"] = {p: r.providers[0] for p, r in runtimes.items()}
            for batch in BATCHES:
                x = np.ascontiguousarray(x_test[np.arange(batch) % len(x_test)])
                tasks = {p: lambda r=r, x=x: r.predict(x) for p, r in runtimes.items()}
                medians = _interleaved(tasks, _rounds_of(batch, args.rounds))
                row = {f"{p}_ms": round(m, 4) for p, m in medians.items()}
                row |= {f"{p}_speedup": round(medians["float32"] / medians[p], 3) for p in timed if p != "float32"}
                result["timing"][f"threads_{label}_batch_{batch}"] = row
        if args.candidates and "int8" in paths:
            x_val = splits["val"][0]
            result["candidates"] = _candidates(
                paths["float32"], paths["int8"], workdir, x_val, (x_test, y_test), args.rounds
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
