"""`forde evaluate`: a robustness report of a run folder or an exported file, or (`--stream`) a stream replay."""

from __future__ import annotations

import textwrap
from contextlib import nullcontext
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from forde_serve.report import FIGURES
from training.cli._common import COMMAND, training_extra

_WIDTH = max(map(len, FIGURES)) + 2  # the name column of the files the report writes


def _entry(name: str, what: str) -> str:
    """One file of the report in the help: its name, then what it holds, wrapped under itself."""
    lines = textwrap.wrap(what, width=100 - 6 - _WIDTH)
    return "\n".join([f"      {name:<{_WIDTH}}{lines[0]}"] + [" " * (6 + _WIDTH) + line for line in lines[1:]])


_FILES = "\n".join(
    [
        _entry(
            "metrics.json",
            "accuracy, NLL, ECE, Brier, uncertainty decomposition, gradient cosine distance, risk-coverage "
            "area, accuracy at the model's abstention threshold, OOD AUROC; `corrupted`, `per_severity`, "
            "`per_corruption`, `per_set` and (two or more members) `diversity`",
        ),
        _entry("report.md", "the same as tables, with the figures"),
    ]
    + [_entry(name, what) for name, what in FIGURES.items()]
)

_HELP = f"""Measure an ensemble's robustness: SOURCE is a training run folder or an exported NAME.onnx.

    \b
    Clean and corrupted test data (digits: the digits-C suite, 11 corruptions x 5 severities;
    CIFAR: CIFAR-10-C / CIFAR-100-C from a local folder; an image folder: its test/ split through
    an RGB suite in the spirit of CIFAR-10-C, 15 corruptions x 5 severities, seeded by --seed),
    averaged over all corruption types and severities. Writes to REPORT_DIR (--out):
{_FILES}

    An exported file is measured through the serving runtime, a run folder through PyTorch; the
    two agree on the same model. Compare reports with `forde compare`.

    \b
    With --stream (an exported file; no torch needed), the file's rows are replayed instead, one
    per request, through the same monitor the server runs (each replay on its own SQLite store):
      stream.json, stream.md   false alarms over --permutations clean orders; rows until the alarm
                               over --orders orders of each digits-C set and held-out shift; 90%
                               coverage of static, label-free (Mondrian) and adaptive sets
      martingale*.png          the shift statistic over rows, with the alarm threshold
      coverage-*.png           running coverage of the three kinds of sets, clean and per shift
    """


@click.command(**COMMAND, help=_HELP)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--data",
    type=click.Choice(["digits", "cifar10", "cifar100", "imagefolder"]),
    default="digits",
    show_default=True,
    help="The dataset the model was trained on; its test split is evaluated clean and corrupted.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Folder holding CIFAR (torchvision's layout), or the image folder (train/, val/, test/ of class folders).",
)
@click.option(
    "--corrupted-root",
    type=click.Path(file_okay=False),
    help="Folder holding CIFAR-10-C / CIFAR-100-C (default: --data-root).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Report folder to write.")
@click.option(
    "--ood",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Out-of-distribution inputs (.npy, raw input space) for the MI detection AUROC.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the digits-C and image-folder corruptions."
)
@click.option(
    "--per-severity",
    type=click.IntRange(min=1),
    help="CIFAR-C and image folders: corrupt only the first N images of each severity (default: all).",
)
@click.option(
    "--gradient-rows",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Inputs per set whose member gradients are compared (cosine distance); 0 skips.",
)
@click.option(
    "--split",
    type=click.Choice(["test", "validation"]),
    default="test",
    show_default=True,
    help="validation: measure the validation split (digits, image folders), to choose settings without the test split.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Replay streams of rows through the server's monitor instead (SOURCE: an exported NAME.onnx, digits): "
    "false alarms, detection delays per digits-C corruption and held-out shift, coverage over time of static, "
    "label-free and adaptive sets; stream.json, stream.md and figures.",
)
@click.option(
    "--orders",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="--stream: shuffled orders of each shifted stream (detection delays).",
)
@click.option(
    "--permutations",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="--stream: shuffled orders of the clean rows (false alarms).",
)
@click.option("--quiet", is_flag=True, help="No progress bar or summary table.")
def evaluate(
    source: Path,
    data: str,
    data_root: str | None,
    corrupted_root: str | None,
    out: Path,
    ood: Path | None,
    seed: int,
    per_severity: int | None,
    gradient_rows: int,
    split: str,
    stream: bool,
    orders: int,
    permutations: int,
    quiet: bool,
) -> None:
    """`forde evaluate`: its help (`_HELP`) lists the figures from `forde_serve.report.FIGURES`."""
    if stream:
        from training.streams import StreamJob, stream_report

        with Console().status("replaying streams through the monitor", spinner="dots") if not quiet else nullcontext():
            report = stream_report(
                StreamJob(model=source, out=out, seed=seed, orders=orders, permutations=permutations)
            )
        if not quiet:
            alarms = report["false_alarms"]
            click.echo(
                f"false alarms: {alarms['fired']} of {alarms['permutations']} clean orders; report: {out / 'stream.md'}"
            )
        return
    with training_extra():
        from training.evaluation import EvaluationJob, evaluate_job
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from forde_serve.corruptions import CORRUPTIONS, SEVERITIES
    from forde_serve.report import write_report

    job = EvaluationJob(
        source=source,
        data=data,
        data_root=data_root,
        corrupted_root=corrupted_root,
        ood=ood,
        seed=seed,
        per_severity=per_severity,
        gradient_rows=gradient_rows,
        split=split,
    )
    with Progress(
        TextColumn("evaluating {task.fields[current]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
    ) as bar:
        if data == "imagefolder":
            with training_extra():
                from training.corruptions import CORRUPTIONS as RGB_CORRUPTIONS
            total = 1 + len(RGB_CORRUPTIONS) * len(SEVERITIES)
        else:
            total = 1 + len(CORRUPTIONS) * len(SEVERITIES) if data == "digits" else None  # CIFAR-C: as files found
        task = bar.add_task("sets", total=total, current="clean")
        evaluation = evaluate_job(job, on_set=lambda name: bar.update(task, advance=1, current=name))
        paths = write_report(evaluation, out)
    if quiet:
        return
    metrics = evaluation.metrics
    table = Table(title=f"{source.name}: {metrics['source']['data']}")
    table.add_column("metric")
    table.add_column(f"clean (T = {metrics['temperature']:.3g})", justify="right")
    table.add_column("clean, T = 1", justify="right")
    table.add_column("corrupted", justify="right")
    corrupted = metrics.get("corrupted") or {}

    def shown(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for key in ("accuracy", "nll", "ece", "brier", "mutual_information", "gradient_cosine_distance", "aurc"):
        table.add_row(
            key,
            shown(metrics.get(key)),
            shown(metrics.get(f"{key}_uncalibrated")) if key in ("accuracy", "nll", "ece") else "",
            shown(corrupted.get(key)),
        )
    console = Console()
    console.print(table)
    if "ood" in metrics:
        console.print(f"OOD AUROC (mutual information): {metrics['ood']['auroc_mutual_information']:.4f}")
    console.print(f"report: {paths['report.md']}")
