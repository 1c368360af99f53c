"""Evaluation reports a person reads at a glance: metrics.json, report.md and PNG figures; and
side-by-side comparisons of several reports (`forde compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from forde_serve import diversity_report
from forde_serve._io import atomic_path, atomic_write_text
from forde_serve.errors import FordeError

if TYPE_CHECKING:
    # Only annotations need it: `forde evaluate --help` imports this module for FIGURES, and the
    # evaluation maths would add a tenth of a second to every `forde` start.
    from forde_serve.evaluation import Evaluation

__all__ = ["COMPARED", "FIGURES", "ReportError", "compare_reports", "write_diversity_plane", "write_report"]

# Every figure `write_report` can draw, in the order report.md shows them, with what it shows. `forde
# evaluate --help` lists them from here, and `write_report` refuses a name missing here, so the help
# cannot fall behind the report.
FIGURES = {
    "reliability.png": "reliability diagram, clean and corrupted, before and after the temperature",
    "risk_coverage.png": "error rate of the accepted inputs against the share accepted",
    "severity.png": "accuracy and NLL per corruption severity",
    "coverage.png": "prediction-set coverage and size per severity, at each stored level",
    "saliency.png": "image inputs: members' input gradients on clean test inputs of different classes",
    "diversity_disagreement.png": "two or more members: their pairwise disagreement (run folders: and their "
    "weights' cosine similarity)",
    "diversity_by_size.png": "two or more members: accuracy and NLL of k-member ensembles, k from 1 to M (the mean "
    "over member subsets of each size)",
    "trajectories_tsne.png": "run folders: t-SNE of the members' predictions along training",
}

# (label, path into metrics.json) of the rows `forde compare` shows.
COMPARED = (
    ("clean accuracy", ("accuracy",)),
    ("clean NLL", ("nll",)),
    ("clean ECE", ("ece",)),
    ("clean Brier", ("brier",)),
    ("clean mutual information", ("mutual_information",)),
    ("gradient cosine distance", ("gradient_cosine_distance",)),
    ("clean AURC", ("aurc",)),
    ("corrupted accuracy", ("corrupted", "accuracy")),
    ("corrupted NLL", ("corrupted", "nll")),
    ("corrupted ECE", ("corrupted", "ece")),
    ("corrupted Brier", ("corrupted", "brier")),
    ("corrupted mutual information", ("corrupted", "mutual_information")),
    ("corrupted AURC", ("corrupted", "aurc")),
    ("clean accuracy at T = 1", ("accuracy_uncalibrated",)),
    ("clean NLL at T = 1", ("nll_uncalibrated",)),
    ("clean ECE at T = 1", ("ece_uncalibrated",)),
    ("corrupted accuracy at T = 1", ("corrupted", "accuracy_uncalibrated")),
    ("corrupted ECE at T = 1", ("corrupted", "ece_uncalibrated")),
    ("clean coverage of the 90% sets", ("set_coverage@0.9",)),
    ("clean size of the 90% sets", ("set_size@0.9",)),
    ("corrupted coverage of the 90% sets", ("corrupted", "set_coverage@0.9")),
    ("corrupted size of the 90% sets", ("corrupted", "set_size@0.9")),
    ("OOD AUROC (mutual information)", ("ood", "auroc_mutual_information")),
    ("distinct trained parameters", ("parameters",)),
    ("mean pairwise disagreement", ("diversity", "mean_disagreement")),
    ("disagreement / (1 - accuracy)", ("diversity", "normalized_disagreement")),
    ("members' JS divergence, clean", ("diversity", "js_divergence", "clean")),
    ("members' JS divergence, corrupted", ("diversity", "js_divergence", "corrupted")),
)


class ReportError(FordeError, ValueError):
    """A report folder that cannot be read; the message names it."""


def _figure(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = draw(plt)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _reliability(evaluation: Evaluation):
    def draw(plt):
        figure, axis = plt.subplots(figsize=(4.5, 5.4))
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        temperature = evaluation.metrics.get("temperature", 1.0)
        for name, bins in evaluation.reliability.items():
            used = bins["count"] > 0
            before = name.endswith("T = 1")
            label = name if before else f"{name}, T = {temperature:.3g} (as served)"
            axis.plot(
                bins["confidence"][used],
                bins["accuracy"][used],
                marker="o",
                linestyle=":" if before else "-",
                label=label,
            )
        axis.set(
            xlabel="confidence (15 bins)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram"
        )
        # below the axes: inside, the legend covered the curves it names
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
        return figure

    return draw


def _coverage(metrics: dict):
    """Empirical coverage and mean size of the conformal sets per severity, one line per level."""

    def draw(plt):
        levels = metrics["coverage_levels"]
        severities = [0] + [int(s) for s in metrics.get("per_severity", {})]
        rows = [metrics] + [metrics["per_severity"][str(s)] for s in severities[1:]]
        figure, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
        for level in levels:
            coverage = [r[f"set_coverage@{level:g}"] for r in rows]
            line = axes[0].plot(severities, coverage, marker="o", label=f"{level:g} sets")
            axes[0].axhline(level, color=line[0].get_color(), linestyle=":", linewidth=1)
            axes[1].plot(severities, [r[f"set_size@{level:g}"] for r in rows], marker="o", label=f"{level:g} sets")
        axes[0].set(
            xlabel="severity (0 = clean)",
            ylabel="share of inputs whose set holds the label",
            title="Coverage (dotted: promised on clean data)",
        )
        axes[1].set(xlabel="severity (0 = clean)", ylabel="classes per set", title="Set size")
        for axis in axes:
            axis.set_xticks(severities)
        axes[1].legend(loc="upper left", fontsize="small")
        return figure

    return draw


def _severity(metrics: dict):
    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
        levels = [0] + [int(s) for s in metrics["per_severity"]]
        for axis, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "nll", "NLL")):
            values = [metrics[key]] + [metrics["per_severity"][str(s)][key] for s in levels[1:]]
            axis.plot(levels, values, marker="o", color="black", label="mean over corruptions")
            for rows in _by_corruption(metrics).values():
                axis.plot(levels, [metrics[key]] + [r[key] for r in rows], alpha=0.35, linewidth=1)
            axis.set(xlabel="severity (0 = clean)", ylabel=label, title=f"{label} per severity")
            axis.set_xticks(levels)
        axes[0].legend(loc="lower left")
        return figure

    return draw


def _by_corruption(metrics: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in metrics.get("per_set", []):
        rows.setdefault(row["corruption"], []).append(row)
    return {name: sorted(r, key=lambda row: row["severity"]) for name, r in rows.items()}


def _risk_coverage(evaluation: Evaluation):
    def draw(plt):
        figure, axis = plt.subplots(figsize=(4.8, 3.8))
        for name, curve in evaluation.risk_coverage.items():
            axis.plot(curve["coverage"], curve["risk"], label=f"{name} (AURC {curve['aurc']:.4f})")
        coverage = evaluation.metrics.get("abstain_coverage")
        if coverage is not None:
            axis.axvline(coverage, color="grey", linestyle=":", label="model's abstention threshold (clean)")
        axis.set(
            xlabel="coverage (most certain first, by mutual information)",
            ylabel="error rate among accepted",
            title="Risk-coverage",
        )
        # below the axes: inside, the legend covered the curves it names
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
        return figure

    return draw


def _saliency(evaluation: Evaluation):
    inputs, gradients = evaluation.saliency_inputs, evaluation.saliency_gradients

    def draw(plt):
        rows, members = gradients.shape[:2]
        figure, axes = plt.subplots(rows, members + 2, figsize=(1.1 * (members + 2), 1.15 * rows), squeeze=False)
        for r in range(rows):
            saliency = np.abs(gradients[r]).max(axis=1)  # [M, H, W], strongest channel
            image = inputs[r].transpose(1, 2, 0)
            image = image[..., 0] if image.shape[-1] == 1 else np.clip(image / max(image.max(), 1e-12), 0, 1)
            panels = [(image, "gray" if image.ndim == 2 else None, "input"), (saliency.mean(0), "magma", "ensemble")]
            panels += [(saliency[m], "magma", f"member {m + 1}") for m in range(members)]
            for c, (panel, cmap, title) in enumerate(panels):
                axes[r, c].imshow(panel, cmap=cmap)
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
                if r == 0:
                    axes[r, c].set_title(title, fontsize=7)
        figure.suptitle("|input gradient| of the predicted class: where each member looks", fontsize=9)
        return figure

    return draw


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(metrics: dict, figures: list[str]) -> str:
    source = metrics.get("source", {})
    lines = [
        f"# Evaluation: {source.get('name', 'ensemble')}",
        "",
        f"{source.get('method', '?')} ensemble ({source.get('structure', 'independent')} members), "
        f"{source.get('members', '?')} members, evaluated on "
        f"{source.get('data', '?')} ({metrics.get('inputs', '?')} test inputs) through "
        f"{source.get('engine', '?')}.",
        "",
    ]
    corrupted = metrics.get("corrupted")
    lines += ["| metric | clean | corrupted |", "| --- | --- | --- |"]
    for key, label in (
        ("accuracy", "accuracy"),
        ("nll", "NLL"),
        ("ece", "ECE (15 bins)"),
        ("brier", "Brier"),
        ("predictive_entropy", "total uncertainty (predictive entropy)"),
        ("expected_entropy", "aleatoric (expected entropy)"),
        ("mutual_information", "epistemic (mutual information)"),
        ("gradient_cosine_distance", "members' gradient cosine distance"),
        ("aurc", "risk-coverage area (lower is better)"),
        ("abstain_coverage", "accepted at the model's threshold"),
        ("accuracy_when_accepted", "accuracy of the accepted"),
    ):
        lines.append(f"| {label} | {_fmt(metrics.get(key))} | {_fmt(corrupted.get(key)) if corrupted else 'n/a'} |")
    lines += ["", f"Abstention: the model abstains when mutual information > {metrics['abstain_threshold']:.4g}."]
    lines += _calibration_section(metrics) + _coverage_section(metrics) + diversity_report.diversity_section(metrics)
    if "ood" in metrics:
        lines += [
            "",
            f"Out-of-distribution detection by mutual information ({metrics['ood']['inputs']} OOD inputs): "
            f"AUROC {metrics['ood']['auroc_mutual_information']:.4f}.",
        ]
    if corrupted:
        lines += [
            "",
            "## Per corruption (mean over severities 1-5)",
            "",
            "| corruption | accuracy | NLL | ECE | NLL at T = 1 | ECE at T = 1 | mutual information |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in metrics["per_corruption"].items():
            lines.append(
                f"| {name} | {_fmt(row['accuracy'])} | {_fmt(row['nll'])} | {_fmt(row['ece'])} | "
                f"{_fmt(row['nll_uncalibrated'])} | {_fmt(row['ece_uncalibrated'])} | "
                f"{_fmt(row['mutual_information'])} |"
            )
        lines += [
            "",
            "## Per severity (mean over corruptions)",
            "",
            "| severity | accuracy | NLL | ECE |",
            "| --- | --- | --- | --- |",
            f"| 0 (clean) | {_fmt(metrics['accuracy'])} | {_fmt(metrics['nll'])} | {_fmt(metrics['ece'])} |",
        ]
        for severity, row in metrics["per_severity"].items():
            lines.append(f"| {severity} | {_fmt(row['accuracy'])} | {_fmt(row['nll'])} | {_fmt(row['ece'])} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _calibration_section(metrics: dict) -> list[str]:
    corrupted = metrics.get("corrupted") or {}

    def row(name: str, values: dict) -> str:
        # each metric at T = 1 beside its value as served: the temperature can move accuracy too (it
        # rescales each member's softmax before the mean), not only NLL and ECE
        cells = [
            _fmt(values.get(f"{key}{suffix}")) for key in ("accuracy", "nll", "ece") for suffix in ("_uncalibrated", "")
        ]
        return f"| {name} | " + " | ".join(cells) + " |"

    return [
        "",
        f"## Calibration (temperature {metrics.get('temperature', 1.0):.4g}, fitted on the validation split)",
        "",
        "| | accuracy at T = 1 | accuracy as served | NLL at T = 1 | NLL as served | ECE at T = 1 | ECE as served |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        row("clean", metrics),
        *([row("corrupted", corrupted)] if corrupted else []),
    ]


def _coverage_section(metrics: dict) -> list[str]:
    levels = metrics.get("coverage_levels") or []
    if not levels:
        return ["", "No prediction sets: the model has no conformal thresholds."]
    lines = [
        "",
        f"## Conformal prediction sets ({metrics.get('conformal_score', '?')} score)",
        "",
        "The promised coverage holds for inputs exchangeable with the validation split the thresholds "
        "were chosen on (the clean column); under corruption it is measured, not promised.",
        "",
        "| promised coverage | clean coverage | clean mean size | corrupted coverage | corrupted mean size |",
        "| --- | --- | --- | --- | --- |",
    ]
    corrupted = metrics.get("corrupted") or {}
    for level in levels:
        c, z = f"set_coverage@{level:g}", f"set_size@{level:g}"
        lines.append(
            f"| {level:g} | {_fmt(metrics.get(c))} | {_fmt(metrics.get(z), 2)} | "
            f"{_fmt(corrupted.get(c)) if corrupted else 'n/a'} | {_fmt(corrupted.get(z), 2) if corrupted else 'n/a'} |"
        )
    if "per_severity" in metrics:
        header = " | ".join(f"{level:g}" for level in levels)
        lines += [
            "",
            f"Coverage per severity (columns: promised {header})",
            "",
            "| severity | " + header + " |",
            "|" + " --- |" * (len(levels) + 1),
        ]
        for severity, row in [("0 (clean)", metrics), *metrics["per_severity"].items()]:
            lines.append(f"| {severity} | " + " | ".join(_fmt(row.get(f"set_coverage@{v:g}")) for v in levels) + " |")
    return lines


def write_report(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, report.md and the figures into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics
    drawings = {"reliability.png": _reliability(evaluation), "risk_coverage.png": _risk_coverage(evaluation)}
    if "per_severity" in metrics:
        drawings["severity.png"] = _severity(metrics)
    if metrics.get("coverage_levels"):
        drawings["coverage.png"] = _coverage(metrics)
    if len(evaluation.saliency_gradients) and len(evaluation.saliency_inputs[0].shape) == 3:
        drawings["saliency.png"] = _saliency(evaluation)
    if "diversity" in metrics:
        drawings["diversity_disagreement.png"] = diversity_report.disagreement_figure(metrics["diversity"])
        drawings["diversity_by_size.png"] = diversity_report.by_size_figure(metrics["diversity"])
    if evaluation.trajectory is not None:
        drawings["trajectories_tsne.png"] = diversity_report.trajectory_figure(evaluation.trajectory)
    # in FIGURES' order; a name missing there fails here, before anything is written
    drawings = {name: drawings[name] for name in sorted(drawings, key=list(FIGURES).index)}
    paths = {}
    for name, draw in drawings.items():
        _figure(out_dir / name, draw)
        paths[name] = out_dir / name
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out_dir / "report.md", _markdown(metrics, list(drawings)))
    return {"metrics.json": out_dir / "metrics.json", "report.md": out_dir / "report.md", **paths}


def _lookup(metrics: dict, path: tuple[str, ...]) -> float | None:
    """The number at `path`, or None where a report lacks it (or holds something else there)."""
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics) if isinstance(metrics, (int, float)) and not isinstance(metrics, bool) else None


def _read_reports(report_dirs: list[Path]) -> list[dict]:
    metrics = []
    for folder in report_dirs:
        path = Path(folder) / "metrics.json"
        try:
            metrics.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ReportError(
                f"{folder}: not an evaluation report (no metrics.json); make one with `forde evaluate`"
            ) from None
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not valid JSON ({err})") from None
    return metrics


def write_diversity_plane(report_dirs: list[Path], path: str | Path) -> Path | None:
    """Draw the reports on the diversity-accuracy plane (clean accuracy against mean disagreement /
    (1 - accuracy)) into the PNG `path`; None (nothing written) when no report has the measure."""
    points = []
    for folder, metrics in zip(report_dirs, _read_reports(report_dirs), strict=True):
        accuracy, normalized = (
            _lookup(metrics, ("accuracy",)),
            _lookup(metrics, ("diversity", "normalized_disagreement")),
        )
        if accuracy is not None and normalized is not None:
            points.append((Path(folder).name, accuracy, normalized))
    if not points:
        return None
    names, accuracy, normalized = zip(*points, strict=True)
    _figure(Path(path), diversity_report.plane_figure(names, accuracy, normalized))
    return Path(path)


def compare_reports(report_dirs: list[Path]) -> tuple[list[str], list[tuple[str, list, list]], str]:
    """(names, rows, markdown): each row is (label, values per report, differences to the first)."""
    metrics = _read_reports(report_dirs)
    names = [Path(folder).name for folder in report_dirs]
    rows = []
    for label, path in COMPARED:
        values = [_lookup(m, path) for m in metrics]
        if all(v is None for v in values):
            continue
        diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
        rows.append((label, values, diffs))
    header = ["metric", *names, *[f"{n} - {names[0]}" for n in names[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, values, diffs in rows:
        cells = [_fmt(v) for v in values] + ["n/a" if d is None else f"{d:+.4f}" for d in diffs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return names, rows, "\n".join(lines) + "\n"
