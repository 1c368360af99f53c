"""Embedded ensembles against independent ones on digits and digits-C (docs/design.md section 11).

    python benchmarks/bench_embedded.py runs/embedded --seeds 0 1 2 [--sweeps]

Variants (M = 4, training/configs/digits.toml otherwise, --epochs 15 by default):

    de                 deep ensemble, independent members
    forde              FoRDE, independent members (identity lengthscales, as the config)
    be_independent     BatchEnsemble, random-sign modulations, gamma(M) = 1 (the independent regime)
    be_collective      BatchEnsemble, N(1, 0.5) modulations, gamma(M) = M (the collective regime)
    forde_be           FoRDE-BatchEnsemble (random signs, gamma 1)
    mc_dropout         MC-dropout ensemble (fixed masks, keep 0.8, gamma 1)
    be_sign_gamma_m    the gamma study's other corners: random signs with gamma M,
    be_normal_gamma_1  and N(1, 0.5) with gamma 1

Each `<variant>-s<seed>` is trained with the real `forde train` (a JSON config written beside it),
evaluated as a run folder with `forde evaluate RUN --out RUN/report --gradient-rows 200` (test
split clean and digits-C, 11 corruptions x 5 severities; temperature and conformal sets chosen on the
validation split as `forde export` chooses them), and, for seed 0, exported with `forde export`
(--layout auto: the embedded ensembles' layouts timed on this CPU). Any step whose output exists is
skipped, so a 1-seed run can be extended to 3. A run that diverges is reported as such.

Timing, in one run of this script: every seed-0 file through `EnsembleRuntime` (as served), predict
and explain at batch 1 and 256, interleaved rounds with the order rotated, medians, as ratios to DE's;
the embedded ensembles' files twice: as `--layout auto` chose, and in the native layout (`NAME-native`).

--sweeps (seed 0 only, train + clean test metrics): DE and be_independent at widths 4..64
(0.25x to 4x the config's 16) with 4 members, and at 1, 2, 4, 8 members with width 16; figures
accuracy vs width, vs members and vs parameter count (PNGs in RUNS).

Prints one JSON object: per variant the mean and sample standard deviation over seeds of every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from forde_serve.runtime import EnsembleRuntime

FORDE = str(Path(sys.executable).with_name("forde"))
ROOT = Path(__file__).parents[1]

VARIANTS = {
    "de": {"method": "de"},
    "forde": {"method": "forde"},
    "be_independent": {"method": "de", "structure": "batchensemble", "init": "random_sign", "gamma": 1},
    "be_collective": {"method": "de", "structure": "batchensemble", "init": "normal", "gamma": "M"},
    "forde_be": {"method": "forde", "structure": "batchensemble", "init": "random_sign", "gamma": 1},
    "mc_dropout": {"method": "de", "structure": "mc_dropout", "gamma": 1},
    "be_sign_gamma_m": {"method": "de", "structure": "batchensemble", "init": "random_sign", "gamma": "M"},
    "be_normal_gamma_1": {"method": "de", "structure": "batchensemble", "init": "normal", "gamma": 1},
}
WIDTHS = (4, 8, 16, 32, 64)
MEMBERS = (1, 2, 4, 8)


def _config(variant: dict, seed: int, epochs: int, members: int = 4, width: int | None = None) -> dict:
    from training.config import load_config

    data = load_config(ROOT / "training/configs/digits.toml").model_dump()
    data["seed"], data["device"] = seed, "cpu"
    data["optim"]["epochs"] = epochs
    data["ensemble"] |= {
        "method": variant["method"],
        "members": members,
        "structure": variant.get("structure", "independent"),
    }
    if width is not None:
        data["model"]["width"] = width
    if "init" in variant:
        data["embedded"]["init"] = variant["init"]
    if "gamma" in variant:
        data["embedded"]["shared_grad_scale"] = variant["gamma"]
    return data


def _run(args: list, log: Path) -> bool:
    """Run `forde ARGS`; its output goes to `log`; False if it failed (e.g. training diverged)."""
    with log.open("a") as out:
        return subprocess.run([FORDE, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0


def _train(run: Path, config: dict) -> bool:
    if (run / "metrics.json").exists():
        return True
    if (run / "checkpoint.safetensors").exists():
        return _run(["train", "--resume", run, "--quiet"], run.with_suffix(".log"))
    run.parent.mkdir(parents=True, exist_ok=True)
    path = run.with_suffix(".json")
    path.write_text(json.dumps(config, indent=2))
    return _run(["train", path, "--out", run, "--quiet"], run.with_suffix(".log"))


def _figures(run: Path) -> dict:
    report = json.loads((run / "report" / "metrics.json").read_text())
    corrupted, diversity = report["corrupted"], report["diversity"]
    cosine = np.asarray(diversity["weight_cosine_similarity"])
    return {
        "parameters": report["parameters"],
        "accuracy": report["accuracy"],
        "nll": report["nll"],
        "ece": report["ece"],
        "corrupted.accuracy": corrupted["accuracy"],
        "corrupted.nll": corrupted["nll"],
        "coverage@0.9": report["set_coverage@0.9"],
        "corrupted.coverage@0.9": corrupted["set_coverage@0.9"],
        "gradient_cosine_distance": report["gradient_cosine_distance"],
        "mean_disagreement": diversity["mean_disagreement"],
        "normalized_disagreement": diversity["normalized_disagreement"],
        "js_divergence.clean": diversity["js_divergence"]["clean"],
        "js_divergence.corrupted": diversity["js_divergence"]["corrupted"],
        "weight_cosine": float(cosine[~np.eye(len(cosine), dtype=bool)].mean()),
        "accuracy_single_member": diversity["accuracy_by_size"][0],
    }


def _summary(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
    return out


def _timings(files: dict[str, Path], rounds: int) -> dict:
    """Median ms of predict / explain at batch 1 and 256 per file (one process, interleaved rounds),
    and each as a ratio to DE's."""
    runtimes = {name: EnsembleRuntime(path) for name, path in files.items()}
    rng = np.random.default_rng(0)
    batches = {b: rng.uniform(0, 16, size=(b, 1, 8, 8)).astype(np.float32) for b in (1, 256)}
    calls = [(graph, b) for graph in ("predict", "explain") for b in batches]
    times = {(name, graph, b): [] for name in runtimes for graph, b in calls}
    names = list(runtimes)
    for turn in range(rounds + 2):  # two warm-up rounds
        order = names[turn % len(names) :] + names[: turn % len(names)]
        for name in order:
            for graph, b in calls:
                start = time.perf_counter()
                getattr(runtimes[name], graph)(batches[b])
                if turn >= 2:
                    times[name, graph, b].append((time.perf_counter() - start) * 1000)
    out = {}
    for name in runtimes:
        entry = {}
        for graph, b in calls:
            ms = statistics.median(times[name, graph, b])
            entry[f"{graph}_b{b}_ms"] = ms
            entry[f"{graph}_b{b}_vs_de"] = ms / statistics.median(times["de", graph, b])
        out[name] = entry
    return out


def _sweeps(out: Path, epochs: int) -> dict:
    points, diverged = {}, []
    for name in ("de", "be_independent"):
        for width in WIDTHS:
            run = out / "sweeps" / f"{name}-w{width}"
            if _train(run, _config(VARIANTS[name], 0, epochs, 4, width)):
                points[f"{name}-w{width}"] = {"width": width, "members": 4, **_trained(run)}
            else:
                diverged.append(run.name)
        for members in MEMBERS:
            run = out / "sweeps" / f"{name}-m{members}"
            if _train(run, _config(VARIANTS[name], 0, epochs, members)):
                points[f"{name}-m{members}"] = {"width": 16, "members": members, **_trained(run)}
            else:
                diverged.append(run.name)
    _draw_sweeps(out, points)
    return {"points": points, "diverged": diverged}


def _trained(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "nll": metrics["nll"], "parameters": metrics["parameters"]}


def _draw_sweeps(out: Path, points: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"de": "deep ensemble", "be_independent": "BatchEnsemble (random signs, gamma 1)"}
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for name, label in labels.items():
        widths = [p for key, p in points.items() if key.startswith(f"{name}-w")]
        members = [p for key, p in points.items() if key.startswith(f"{name}-m")]
        axes[0].plot([p["width"] for p in widths], [p["accuracy"] for p in widths], marker="o", label=label)
        axes[1].plot([p["members"] for p in members], [p["accuracy"] for p in members], marker="o", label=label)
        every = widths + members
        axes[2].scatter([p["parameters"] for p in every], [p["accuracy"] for p in every], label=label)
    axes[0].set(xscale="log", xlabel="width (first conv's channels; 4 members)", ylabel="clean test accuracy")
    axes[0].set_xticks(WIDTHS, [str(w) for w in WIDTHS])
    axes[0].minorticks_off()
    axes[1].set(xlabel="members (width 16)", ylabel="clean test accuracy")
    axes[1].set_xticks(MEMBERS)
    axes[2].set(xscale="log", xlabel="distinct trained parameters", ylabel="clean test accuracy")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize="small")
    figure.suptitle("digits, seed 0: accuracy against width, members and parameters (runs that diverged: not drawn)")
    figure.savefig(out / "embedded_sweeps.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder for the runs, reports, exports and figures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (after 2 warm-up rounds)")
    parser.add_argument("--sweeps", action="store_true", help="also the width / members sweeps and their figures")
    args = parser.parse_args()
    out = args.runs
    result: dict = {"epochs": args.epochs, "members": 4, "seeds": args.seeds, "variants": {}, "diverged": []}
    files = {}
    for name in args.variants:
        rows = []
        for seed in args.seeds:
            run = out / f"{name}-s{seed}"
            if not _train(run, _config(VARIANTS[name], seed, args.epochs)):
                result["diverged"].append(f"{name}-s{seed}")
                continue
            if not (run / "report" / "metrics.json").exists():
                _run(
                    ["evaluate", run, "--out", run / "report", "--quiet", "--gradient-rows", "200"],
                    run.with_suffix(".log"),
                )
            rows.append(_figures(run))
            if seed == 0:
                layouts = {"": "auto", "-native": "native"} if "structure" in VARIANTS[name] else {"": "auto"}
                for suffix, layout in layouts.items():
                    path = out / "exported" / f"{name}{suffix}.onnx"
                    if not path.exists():
                        _run(["export", run, "--out", path, "--layout", layout], run.with_suffix(".log"))
                    files[name + suffix] = path
        if rows:
            result["variants"][name] = _summary(rows)
    for name, path in files.items():
        card = EnsembleRuntime(path).card
        sizes = {
            "predict_bytes": path.stat().st_size,
            "explain_bytes": path.with_suffix(".explain.onnx").stat().st_size,
        }
        layout = None if card.layout is None else {g: card.layout[g] for g in ("predict", "explain")}
        result.setdefault("files", {})[name] = sizes | {"layout": layout}
    if args.sweeps:
        result["sweeps"] = _sweeps(out, args.epochs)
    if "de" in files:  # last, so that nothing this script started runs beside it
        result["timing"] = _timings(files, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
