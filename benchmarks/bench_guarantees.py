"""What the served guarantees give on digits and digits-C: lengthscales, prediction sets, temperature.

The tables of BENCHMARKS.md "PCA lengthscales as the reference computes them", "Prediction sets:
coverage and size" and "Temperature scaling", from run folders, measured on the exported files:

    # train: for seed in 0 1 2, DE and FoRDE with pca / pca_centred / identity lengthscales (M = 8);
    # CONFIG_<ls> is training/configs/digits.toml with `[forde] lengthscale = "<ls>"`
    forde train training/configs/digits.toml --method de --seed 0 --out runs/guarantees/de-s0 --quiet
    forde train CONFIG_pca --method forde --seed 0 --out runs/guarantees/forde-pca-s0 --quiet
    forde train CONFIG_pca_centred --method forde --seed 0 --out runs/guarantees/forde-pca_centred-s0 --quiet
    forde train CONFIG_identity --method forde --seed 0 --out runs/guarantees/forde-identity-s0 --quiet
    # then
    python benchmarks/bench_guarantees.py runs/guarantees --exports exported/guarantees --reports reports/guarantees

Every folder `<variant>-s<seed>` under RUNS is exported with `forde export RUN --out
EXPORTS/<name>.onnx` (temperature fitted on the validation split, split-conformal LAC thresholds
for 0.8 / 0.9 / 0.95 / 0.99 on the calibrated probabilities) and that file, the thing a server
loads, is measured with `forde evaluate NAME.onnx --gradient-rows 0 --out REPORTS/<name>` on the test split clean and
on digits-C (11 corruptions x 5 severities, seed 0, averaged over the 55 sets); either step is
skipped when its output exists. The temperature and its validation NLL / ECE before and after are
read from the file's metadata (`EnsembleRuntime(path).card.calibration`). The reports skip the
input gradients (`--gradient-rows 0`, to save time); the gradient cosine distance is the one
`forde train` measured on the clean test split (the run's metrics.json).

Prints one JSON object: per variant, mean and sample standard deviation over seeds of every
figure, and under "markdown" the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from forde_serve.runtime import EnsembleRuntime

FORDE = str(Path(sys.executable).with_name("forde"))
ORDER = ("de", "forde-pca", "forde-pca_centred", "forde-identity")
LABELS = {
    "de": "DE",
    "forde-pca": "FoRDE, pca (uncentred)",
    "forde-pca_centred": "FoRDE, pca_centred",
    "forde-identity": "FoRDE, identity",
}
LEVELS = ("0.8", "0.9", "0.95", "0.99")
SEVERITIES = ("1", "2", "3", "4", "5")


def _figures(report: dict, calibration, trained: dict) -> dict[str, float]:
    """The flat figures of one run: test clean / corrupted metrics, per-severity 90% coverage, the
    temperature fit, and the clean gradient cosine distance from training's metrics (`trained`)."""
    corrupted = report["corrupted"]
    out = {"gradient_cosine_distance": trained["gradient_cosine_distance"]}
    for key in ("accuracy", "nll", "ece", "nll_uncalibrated", "ece_uncalibrated"):
        out[key] = report[key]
        out[f"corrupted.{key}"] = corrupted[key]
    for level in LEVELS:
        for key in (f"set_coverage@{level}", f"set_size@{level}"):
            out[key] = report[key]
            out[f"corrupted.{key}"] = corrupted[key]
    for severity in SEVERITIES:
        out[f"severity{severity}.set_coverage@0.9"] = report["per_severity"][severity]["set_coverage@0.9"]
    out["temperature"] = report["temperature"]
    for key in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after"):
        out[f"validation.{key}"] = getattr(calibration, key)
    return out


def _cell(row: dict, key: str, digits: int = 4) -> str:
    return f"{row[key]['mean']:.{digits}f} ± {row[key]['std']:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _markdown(summary: dict[str, dict]) -> dict[str, str]:
    names = [n for n in ORDER if n in summary] + [n for n in summary if n not in ORDER]
    label = {n: LABELS.get(n, n) for n in names}
    lengthscales = _table(
        [
            "variant",
            "seeds",
            "clean accuracy",
            "clean NLL",
            "clean ECE",
            "corrupted accuracy",
            "corrupted NLL",
            "corrupted ECE",
            "clean 90%-set coverage",
            "corrupted 90%-set coverage",
            "gradient cosine distance",
        ],
        [
            [label[n], str(summary[n]["seeds"])]
            + [
                _cell(summary[n], k)
                for k in (
                    "accuracy",
                    "nll",
                    "ece",
                    "corrupted.accuracy",
                    "corrupted.nll",
                    "corrupted.ece",
                    "set_coverage@0.9",
                    "corrupted.set_coverage@0.9",
                    "gradient_cosine_distance",
                )
            ]
            for n in names
        ],
    )
    sets = _table(
        [
            "variant",
            "nominal coverage",
            "clean coverage",
            "clean mean set size",
            "digits-C coverage",
            "digits-C mean set size",
        ],
        [
            [label[n], level]
            + [
                _cell(summary[n], k, 3)
                for k in (
                    f"set_coverage@{level}",
                    f"set_size@{level}",
                    f"corrupted.set_coverage@{level}",
                    f"corrupted.set_size@{level}",
                )
            ]
            for n in names
            for level in LEVELS
        ],
    )
    severities = _table(
        ["variant", "clean", *[f"severity {s}" for s in SEVERITIES]],
        [
            [label[n], _cell(summary[n], "set_coverage@0.9", 3)]
            + [_cell(summary[n], f"severity{s}.set_coverage@0.9", 3) for s in SEVERITIES]
            for n in names
        ],
    )
    temperature = _table(
        [
            "variant",
            "T",
            "validation NLL before -> after",
            "validation ECE before -> after",
            "clean NLL T = 1 -> T",
            "clean ECE T = 1 -> T",
            "corrupted NLL T = 1 -> T",
            "corrupted ECE T = 1 -> T",
        ],
        [
            [label[n], _cell(summary[n], "validation.temperature", 3)]
            + [
                f"{_cell(summary[n], before)} -> {_cell(summary[n], after)}"
                for before, after in (
                    ("validation.nll_before", "validation.nll_after"),
                    ("validation.ece_before", "validation.ece_after"),
                    ("nll_uncalibrated", "nll"),
                    ("ece_uncalibrated", "ece"),
                    ("corrupted.nll_uncalibrated", "corrupted.nll"),
                    ("corrupted.ece_uncalibrated", "corrupted.ece"),
                )
            ]
            for n in names
        ],
    )
    return {"lengthscales": lengthscales, "sets": sets, "sets_per_severity": severities, "temperature": temperature}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--exports", type=Path, required=True, help="folder for the exported NAME.onnx files")
    parser.add_argument("--reports", type=Path, required=True, help="folder for the `forde evaluate` reports")
    args = parser.parse_args()
    args.exports.mkdir(parents=True, exist_ok=True)
    variants: dict[str, list[dict]] = {}
    for run in sorted(p for p in args.runs.iterdir() if (p / "metrics.json").exists()):
        match = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if not match:
            continue
        exported = args.exports / f"{run.name}.onnx"
        if not exported.exists():
            subprocess.run([FORDE, "export", str(run), "--out", str(exported)], check=True, stdout=subprocess.DEVNULL)
        report = args.reports / run.name
        if not (report / "metrics.json").exists():
            subprocess.run(
                [FORDE, "evaluate", str(exported), "--gradient-rows", "0", "--out", str(report), "--quiet"], check=True
            )
        calibration = EnsembleRuntime(exported).card.calibration
        trained = json.loads((run / "metrics.json").read_text())
        figures = _figures(json.loads((report / "metrics.json").read_text()), calibration, trained)
        variants.setdefault(match.group(1), []).append({"seed": int(match.group(2)), **figures})
    summary = {}
    for name, runs in variants.items():
        row: dict = {"seeds": len(runs), "seed_values": sorted(r["seed"] for r in runs)}
        for key in runs[0]:
            if key == "seed":
                continue
            values = [r[key] for r in runs]
            row[key] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        summary[name] = row
    print(json.dumps({"variants": summary, "markdown": _markdown(summary)}, indent=2))


if __name__ == "__main__":
    main()
