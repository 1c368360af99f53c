"""`forde evaluate MODEL.onnx --stream`: the served file replayed over streams of rows, through the same
`Monitor` the server runs (`forde_serve.monitoring.stream`), each replay on its own SQLite state store.

Streams (digits): the clean test split, each digits-C corruption at each severity, and the held-out
shifts (`forde_serve.corruptions.HELD_OUT_SHIFTS`, which nothing was tuned on). Measured: false alarms
over shuffled orders of the clean rows, detection delays (rows until the alarm) over shuffled orders of
each shifted stream, and the coverage over time of the static, label-free (Mondrian) and adaptive sets
(labels fed back after each row). Needs no torch: the digits' split comes from `training.splits`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forde_serve._io import atomic_write_text
from forde_serve.corruptions import HELD_OUT_SHIFTS, corrupted_versions, shift
from forde_serve.errors import FordeError
from forde_serve.monitoring.figures import coverage_figure, martingale_figure, save_png
from forde_serve.monitoring.monitor import MonitorConfig
from forde_serve.monitoring.store import StateStore
from forde_serve.monitoring.stream import evaluate_streams
from forde_serve.runtime import EnsembleRuntime
from training.splits import digits_split

__all__ = ["StreamJob", "StreamError", "stream_report"]


class StreamError(FordeError, ValueError):
    """A stream evaluation that cannot run as asked."""


@dataclass(frozen=True)
class StreamJob:
    model: Path  # an exported NAME.onnx
    out: Path  # the report folder
    seed: int = 0  # of the corruptions and the orders
    orders: int = 10  # shuffled orders per shifted stream (detection delays)
    permutations: int = 100  # shuffled orders of the clean rows (false alarms)
    coverage: float = 0.9
    delta: float = 0.01
    gamma: float = 0.01


def _streams(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    streams = {f"{name} {severity}": (xc, y) for name, severity, xc in corrupted_versions(x, seed)}
    return streams | {f"held-out {name}": (shift(x, name, seed), y) for name in HELD_OUT_SHIFTS}


def stream_report(job: StreamJob, on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the replays and write `stream.json`, `stream.md` and the figures into `job.out`; returns the report."""
    if job.model.is_dir() or not job.model.name.endswith(".onnx"):
        raise StreamError(
            f"--stream: expected an exported NAME.onnx (the replay runs the served file, whose shift reference "
            f"and thresholds it needs), got {str(job.model)!r}; export a run folder first with `forde export`"
        )
    runtime = EnsembleRuntime(job.model)
    card = runtime.card
    if card.choices.reference is None or card.conformal is None or not card.conformal.scores:
        raise StreamError(
            f"--stream: {job.model.name} has no shift reference or no conformity scores (exported before "
            "shift-aware serving); re-export it with a current `forde export`"
        )
    trained_on = (card.training_config.get("data") or {}).get("dataset")
    if trained_on != "digits":
        raise StreamError(f"--stream: the stream replay builds its streams from the digits data; {job.model.name} "
                          f"was trained on {trained_on or 'data this file does not name'}")  # fmt: skip
    split_seed = (card.training_config.get("data") or {}).get("split_seed", 0)
    x, y = digits_split(split_seed)["test"]
    scratch = Path(tempfile.mkdtemp(prefix="forde-stream-"))
    replays = iter(range(10**9))

    def store() -> StateStore:  # one SQLite file per replay: the server's store, started empty
        return StateStore(f"sqlite:///{scratch / f'replay-{next(replays)}.sqlite3'}")

    if on_stage:
        on_stage("replaying")
    try:
        report = evaluate_streams(
            runtime,
            (x, y),
            _streams(x, y, job.seed),
            store_factory=store,
            reference=card.choices.reference,
            calibration=card.conformal,
            config=MonitorConfig(delta=job.delta, gamma=job.gamma),
            coverage=job.coverage,
            orders=job.orders,
            permutations=job.permutations,
            seed=job.seed,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["source"] = {"model": str(job.model), "rows": int(len(y)), "seed": job.seed, "delta": job.delta}
    _write(report, job, card.temperature)
    return report


def _write(report: dict, job: StreamJob, temperature: float) -> None:
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.out / "stream.json", json.dumps(report, indent=1))
    coverage = report["coverage"]
    threshold = 1.0 / job.delta
    held_out = [name for name in coverage if name.startswith("held-out")]
    shown = {name: coverage[name]["log_statistic"] for name in ("clean", *held_out)}
    save_png(martingale_figure(shown, threshold, "Shift test: clean and held-out shifts"), job.out / "martingale.png")
    severe = {name: coverage[name]["log_statistic"] for name in coverage if name.endswith(" 5")}
    save_png(martingale_figure(severe, threshold, "Shift test: digits-C at severity 5"), job.out / "martingale-c5.png")
    for name in ("clean", *held_out):
        file = "coverage-" + name.replace("held-out ", "").replace(" ", "-") + ".png"
        title = f"{job.coverage:.0%} sets over the rows: {name}"
        save_png(coverage_figure(coverage[name]["running"], job.coverage, title), job.out / file)
    atomic_write_text(job.out / "stream.md", _markdown(report, job))


def _markdown(report: dict, job: StreamJob) -> str:
    alarms = report["false_alarms"]
    lines = [
        f"# Stream replay: {Path(report['source']['model']).name}",
        "",
        f"Every stream is the {report['source']['rows']} test rows (shuffled for the alarm figures), served one per "
        f"request through the server's monitor; delta = {job.delta:g} (alarm at M >= {1 / job.delta:g}).",
        "",
        f"False alarms: {alarms['fired']} of {alarms['permutations']} clean orders (rate {alarms['rate']:.3f}, 95% "
        f"upper bound {alarms['rate_upper_95']:.3f}).",
        "",
        "| stream | alarm fired (orders) | median delay (rows) | max delay | coverage static | Mondrian | adaptive "
        "| adaptive mean size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def shown(value, digits=3):
        return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    for name, delays in report["detection"].items():
        covered = report["coverage"][name]["coverage"]
        sizes = report["coverage"][name]["mean_set_size"]
        lines.append(
            f"| {name} | {delays['fired']}/{len(delays['delays'])} | {shown(delays['median_delay'], 1)} | "
            f"{shown(delays['max_delay'])} | {shown(covered.get('static'))} | {shown(covered.get('mondrian'))} | "
            f"{shown(covered.get('adaptive'))} | {shown(sizes.get('adaptive'), 2)} |"
        )
    figures = ["martingale.png", "martingale-c5.png"] + sorted(p.name for p in job.out.glob("coverage-*.png"))
    lines += ["", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)
