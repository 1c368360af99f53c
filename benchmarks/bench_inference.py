"""Inference latency: the fused ONNX graph vs M single-member sessions vs PyTorch eager.

    python benchmarks/bench_inference.py runs/digits-forde            # a training run folder
    python benchmarks/bench_inference.py exported/digits.onnx         # fused + explain only

Prints one JSON object. For each batch size every variant runs once per round, interleaved,
after warm-up; figures are medians in milliseconds:

- fused_ms: the exported predict graph (all members in one graph), onnxruntime
- sessions_ms: M single-member predict graphs in M onnxruntime sessions, averaged in numpy
- eager_ms: the fused PyTorch module (no_grad), softmax and mean
- eager_loop_ms: M separate PyTorch members one after another
- explain_ms: the explain graph (predict outputs + every member's input gradient)

Given an exported file instead of a run, only fused_ms and explain_ms are measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forde_serve.runtime import EnsembleRuntime

BATCHES = (1, 8, 64, 256)


def _median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _baselines(run_dir: Path, workdir: Path, device: str):
    """Export the run's fused pair and one predict graph per member; build the eager models."""
    from training.export import export_run, write_predict_graph
    from training.models import build_ensemble, member_state_dict
    from training.run import load_run

    run = load_run(run_dir)
    fused_path = workdir / "fused.onnx"
    export_run(run_dir, fused_path, echo=lambda line: None)
    config, info = run.config, run.dataset
    singles, sessions = [], []
    for m in range(run.ensemble.members):
        single = build_ensemble(
            config.model.arch,
            1,
            info.input_shape,
            len(info.class_names),
            info.mean,
            info.std,
            width=config.model.width,
            depth=config.model.depth,
        )
        single.load_state_dict(member_state_dict(run.ensemble, m))
        single.eval()
        singles.append(single.to(device))
        path = workdir / f"member{m}.onnx"
        write_predict_graph(single, path)
        sessions.append(path)
    return run, fused_path, singles, sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_or_run", type=Path, help="a training run folder, or an exported NAME.onnx")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per batch size (fewer for 256)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes to time")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: CUDA execution provider and torch on the GPU"
    )
    args = parser.parse_args()

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        is_run = args.model_or_run.is_dir()
        if is_run:
            import torch

            run, fused_path, singles, member_paths = _baselines(args.model_or_run, Path(tmp), args.device)
            ensemble = run.ensemble.to(args.device)
            options = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            member_sessions = [ort.InferenceSession(str(p), options, providers=providers) for p in member_paths]
        else:
            fused_path = args.model_or_run
        # Spinning onnxruntime threads would starve torch between interleaved calls: off for all.
        runtime = EnsembleRuntime(fused_path, providers=providers, spin=False)
        shape = runtime.card.input_shape
        high = 16.0 if "0 to 16" in runtime.card.input_space else 1.0
        rng = np.random.default_rng(0)
        results = []
        for batch in args.batches:
            x = rng.uniform(0, high, (batch, *shape)).astype(np.float32)
            variants = {
                "fused_ms": lambda x=x: runtime.predict(x),
                "explain_ms": lambda x=x: runtime.explain(x),
            }
            if is_run:
                xt = torch.from_numpy(x).to(args.device)

                def sessions(x=x) -> np.ndarray:
                    return np.mean([s.run(["probs"], {"input": x})[0] for s in member_sessions], axis=0)

                def eager(xt=xt) -> np.ndarray:
                    with torch.no_grad():
                        out = ensemble(xt).softmax(-1).mean(1)
                    return out.cpu().numpy()

                def eager_loop(xt=xt) -> np.ndarray:
                    with torch.no_grad():
                        out = torch.stack([s(xt)[:, 0].softmax(-1) for s in singles], 1).mean(1)
                    return out.cpu().numpy()

                variants |= {"sessions_ms": sessions, "eager_ms": eager, "eager_loop_ms": eager_loop}
            for _ in range(args.warmup):
                for fn in variants.values():
                    fn()
            rounds = max(5, args.rounds // (4 if batch >= 256 else 1))
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(_median_ms(fn, 1))
            row = {"batch": batch, **{name: round(statistics.median(v), 3) for name, v in times.items()}}
            if is_run:
                best = min(row["sessions_ms"], row["eager_ms"], row["eager_loop_ms"])
                row["best_baseline_over_fused"] = round(best / row["fused_ms"], 3)
            row["explain_over_fused"] = round(row["explain_ms"] / row["fused_ms"], 3)
            results.append(row)
    device = "cpu" if args.device == "cpu" else "cuda"
    print(
        json.dumps(
            {
                "device": f"{device} ({platform.machine()}), onnxruntime {ort.__version__} {runtime.providers[0]}",
                "model": str(args.model_or_run),
                "members": runtime.card.members,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
