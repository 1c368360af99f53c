"""Inference latency: the fused ONNX graph vs M single-member sessions vs PyTorch eager.

    python benchmarks/bench_inference.py runs/digits-forde            # a training run folder
    python benchmarks/bench_inference.py exported/digits.onnx         # fused + explain only

Prints one JSON object. For each batch size every variant runs once per round, interleaved
(in a new random order each round),
after warm-up; figures are medians in milliseconds:

- fused_ms: the exported predict graph (all members in one graph), onnxruntime
- sessions_ms: M single-member predict graphs in M onnxruntime sessions, averaged in numpy
- eager_ms: the fused PyTorch module (no_grad), softmax and mean
- eager_loop_ms: M separate PyTorch members one after another
- explain_ms: the explain graph (predict outputs + every member's input gradient)

Given an exported file instead of a run, only fused_ms and explain_ms are measured.

`--candidates` also times other forms of the same fused predict graph, each a bare onnxruntime
session (all outputs; no input checks, so compare them with each other and with sessions_ms):

- graph_all_ms / graph_extended_ms / graph_basic_ms: the exported graph at onnxruntime's graph
  optimization levels ENABLE_ALL (what the runtime uses), ENABLE_EXTENDED and ENABLE_BASIC
- branches_ms: every grouped convolution (one group per member) rewritten as Split -> M dense
  convolutions -> Concat, a per-member branch layout (ENABLE_ALL)
- onnxslim_ms: the graph after `onnxslim.slim` (ENABLE_ALL), where the onnxslim package is installed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forde_serve.runtime import EnsembleRuntime

# torch's OpenMP threads spin after each eager call, taking the cores from whatever runs next: they
# sleep instead (read when torch starts its threads, so before it is imported), as onnxruntime's do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BATCHES = (1, 8, 64, 256)


def _median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _median_ratio(numerators: np.ndarray, denominators: np.ndarray) -> float:
    """Median over rounds of each round's own ratio (see the module docstring)."""
    return round(float(np.median(numerators / denominators)), 3)


def _per_member_branches(model, members: int) -> int:
    """Rewrite, in place, every Conv with one group per member (group = `members`) as Split -> `members`
    dense Convs -> Concat; returns how many were rewritten. Each output element is the same sum."""
    from onnx import helper

    nodes, rewritten = [], 0
    for conv in model.graph.node:
        group = next((helper.get_attribute_value(a) for a in conv.attribute if a.name == "group"), 1)
        if conv.op_type != "Conv" or members == 1 or group != members:
            nodes.append(conv)
            continue
        base = conv.name or conv.output[0]
        parts = []
        for slot, axis in ((0, 1), (1, 0), (2, 0)):  # input by channels; weight and bias by output channels
            if slot < len(conv.input) and conv.input[slot]:
                outputs = [f"{base}/split{slot}/{m}" for m in range(members)]
                nodes.append(helper.make_node("Split", [conv.input[slot]], outputs, axis=axis, num_outputs=members))
                parts.append(outputs)
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute if a.name != "group"}
        branches = [f"{base}/member{m}" for m in range(members)]
        for m, out in enumerate(branches):
            nodes.append(helper.make_node("Conv", [p[m] for p in parts], [out], **attributes))
        nodes.append(helper.make_node("Concat", branches, [conv.output[0]], axis=1))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _bare_session(
    path: Path, providers: list[str], level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
) -> ort.InferenceSession:
    """A plain onnxruntime session, threads not spinning (as the runtime's, see main)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=providers)


def _candidates(fused_path: Path, workdir: Path, members: int, providers: list[str]) -> dict:
    """Bare sessions over other forms of the fused predict graph (see the module docstring)."""
    import onnx

    levels = ort.GraphOptimizationLevel
    found = {
        "graph_all_ms": _bare_session(fused_path, providers),
        "graph_extended_ms": _bare_session(fused_path, providers, levels.ORT_ENABLE_EXTENDED),
        "graph_basic_ms": _bare_session(fused_path, providers, levels.ORT_ENABLE_BASIC),
    }
    model = onnx.load(str(fused_path))
    if _per_member_branches(model, members):
        onnx.save(model, str(workdir / "branches.onnx"))
        found["branches_ms"] = _bare_session(workdir / "branches.onnx", providers)
    try:
        import onnxslim
    except ImportError:
        print("onnxslim is not installed: onnxslim_ms not measured", file=sys.stderr)
    else:
        onnx.save(onnxslim.slim(onnx.load(str(fused_path))), str(workdir / "slim.onnx"))
        found["onnxslim_ms"] = _bare_session(workdir / "slim.onnx", providers)
    return found


def _baselines(run_dir: Path, workdir: Path, device: str):
    """Export the run's fused pair and one predict graph per member (with the fused graph's
    temperature, so every session computes the same probabilities); build the eager models."""
    from training.export import export_run, write_predict_graph
    from training.models import build_ensemble, member_state_dict
    from training.run import load_run

    run = load_run(run_dir)
    fused_path = workdir / "fused.onnx"
    export_run(run_dir, fused_path, echo=lambda line: None)
    temperature = EnsembleRuntime(fused_path).card.temperature
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
        write_predict_graph(single, path, temperature=temperature)
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
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="also time other forms of the fused graph: optimization levels, per-member branches, onnxslim",
    )
    args = parser.parse_args()

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        is_run = args.model_or_run.is_dir()
        if is_run:
            import torch

            run, fused_path, singles, member_paths = _baselines(args.model_or_run, Path(tmp), args.device)
            ensemble = run.ensemble.to(args.device)
            member_sessions = [_bare_session(p, providers) for p in member_paths]
        else:
            fused_path = args.model_or_run
        # Spinning onnxruntime threads would starve torch between interleaved calls: off for all.
        runtime = EnsembleRuntime(fused_path, providers=providers, spin=False)
        candidates = _candidates(fused_path, Path(tmp), runtime.card.members, providers) if args.candidates else {}
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
            for name, session in candidates.items():
                variants[name] = lambda x=x, session=session: session.run(None, {"input": x})
            if "branches_ms" in candidates:  # an exact rewrite: the same probabilities, or it is not measured
                np.testing.assert_allclose(
                    variants["branches_ms"]()[0], variants["graph_all_ms"]()[0], rtol=0, atol=1e-6
                )
            for _ in range(args.warmup):
                for fn in variants.values():
                    fn()
            rounds = max(5, args.rounds // (4 if batch >= 256 else 1))
            times: dict[str, list[float]] = {name: [] for name in variants}
            shuffle = np.random.default_rng(batch)
            for _ in range(rounds):
                # A new random order each round, so that no variant always runs right after the same other
                # one and carries what that one leaves behind (torch's OpenMP threads keep spinning after an
                # eager call). A rotated order would not do: it keeps every variant's neighbours.
                for name in shuffle.permutation(list(variants)):
                    times[name].append(_median_ms(variants[name], 1))
            row = {"batch": batch, **{name: round(statistics.median(v), 3) for name, v in times.items()}}
            if is_run:
                best = min(row["sessions_ms"], row["eager_ms"], row["eager_loop_ms"])
                row["best_baseline_over_fused"] = round(best / row["fused_ms"], 3)
                for name in candidates:  # how much faster than M sessions each candidate form is
                    row[f"sessions_over_{name.removesuffix('_ms')}"] = round(row["sessions_ms"] / row[name], 3)
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
