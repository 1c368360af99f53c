"""DE vs FoRDE on digits and digits-C: the comparison table of BENCHMARKS.md, from run folders.

    # train: for seed in 0 1 2, DE and FoRDE with pca / identity / tuned lengthscales (M = 8)
    forde train training/configs/digits.toml --method de --seed 0 --out runs/robust/de-s0
    forde train CONFIG_WITH_lengthscale=pca --seed 0 --out runs/robust/forde-pca-s0   # and so on
    # then
    python benchmarks/robustness_digits.py runs/robust --reports reports/robust

Every folder `<variant>-s<seed>` under RUNS is evaluated with `forde evaluate` (skipped when
its report exists), and the script prints one JSON object: per variant, mean and standard
deviation over seeds of clean and corrupted accuracy / NLL / ECE, gradient cosine distance
and corrupted AURC; plus the table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

FORDE = str(Path(sys.executable).with_name("forde"))
COLUMNS = (
    ("accuracy", ()),
    ("nll", ()),
    ("ece", ()),
    ("accuracy", ("corrupted",)),
    ("nll", ("corrupted",)),
    ("ece", ("corrupted",)),
    ("aurc", ("corrupted",)),
    ("gradient_cosine_distance", ()),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--reports", type=Path, required=True)
    args = parser.parse_args()
    variants: dict[str, list[dict]] = {}
    for run in sorted(p for p in args.runs.iterdir() if (p / "metrics.json").exists()):
        match = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if not match:
            continue
        report = args.reports / run.name
        if not (report / "metrics.json").exists():
            subprocess.run([FORDE, "evaluate", str(run), "--out", str(report), "--quiet"], check=True)
        variants.setdefault(match.group(1), []).append(json.loads((report / "metrics.json").read_text()))
    summary = {}
    for name, reports in variants.items():
        row = {"seeds": len(reports)}
        for key, path in COLUMNS:
            values = [(r[path[0]] if path else r)[key] for r in reports]
            label = ".".join((*path, key))
            row[label] = {
                "mean": round(statistics.mean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            }
        summary[name] = row
    header = ["variant", "seeds", *[".".join((*p, k)) for k, p in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in summary.items():
        cells = [f"{row[c]['mean']:.4f} ± {row[c]['std']:.4f}" for c in header[2:]]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    print(json.dumps({"variants": summary, "markdown": "\n".join(lines)}, indent=2))


if __name__ == "__main__":
    main()
