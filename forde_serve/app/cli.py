"""The `forde` command line: one click group.

Commands are thin: parse, validate into a typed job or config, call one library function. The
inference commands (score, serve, compare) live here and work without torch; the torch-side ones
(train, export, fuse, evaluate) are contributed by other installed packages through the
`forde.commands` entry points (pyproject.toml), so this package never names them. A contributed
command whose package cannot be imported is still listed, and says what to install when run.

Every error a user can act on derives from `forde_serve.errors.FordeError`; `_Forde.invoke`
turns it (and an unreadable or unwritable path) into one line on stderr and its exit code,
in one place, for every command, contributed ones included.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from forde_serve.errors import FordeError
from forde_serve.scoring import ENGINES

__all__ = ["COMMANDS_GROUP", "main"]

COMMANDS_GROUP = "forde.commands"  # entry points: name = "package.module:click_command"
_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _UserError(click.ClickException):
    """One line on stderr, no traceback, and the error's own exit code (2: the caller's mistake)."""

    def __init__(self, message: str, exit_code: int = FordeError.exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def _user_errors(invoke, ctx: click.Context):
    try:
        return invoke(ctx)
    except FordeError as err:
        raise _UserError(str(err), err.exit_code) from None
    except OSError as err:  # an unwritable or unreadable path (e.g. --out under a file)
        raise _UserError(f"{err.filename}: {err.strerror or err}") from None


def _contributed() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=COMMANDS_GROUP)}


def _unavailable(name: str, point: EntryPoint, err: ImportError) -> click.Command:
    """A stand-in for a contributed command whose package does not import here."""
    missing = err.name or "a dependency"

    def refuse() -> None:
        raise _UserError(
            f"`forde {name}` needs the training extra ({missing} is not installed): pip install 'forde-serve[train]'"
        )

    return click.Command(
        name,
        callback=refuse,
        help=f"(needs the train extra: pip install 'forde-serve[train]'; {missing} is missing)",
        context_settings=_SETTINGS | {"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )


class _Forde(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_contributed()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        point = _contributed().get(name) if command is None else None
        if point is None:
            return command
        try:
            return point.load()
        except ImportError as err:
            return _unavailable(name, point, err)

    def invoke(self, ctx: click.Context):
        return _user_errors(super().invoke, ctx)


@click.group(cls=_Forde, context_settings=_SETTINGS)
@click.version_option(package_name="forde-serve")
def main() -> None:
    """Train FoRDE ensembles, export them as one ONNX graph, serve them with honest uncertainty.

    \b
    Quickstart (CPU, about three minutes):
      forde train training/configs/digits.toml --out runs/digits-forde
      forde train training/configs/digits.toml --method de --out runs/digits-de
      forde evaluate runs/digits-forde --out reports/forde     # clean + digits-C report
      forde evaluate runs/digits-de --out reports/de
      forde compare reports/de reports/forde
      forde export runs/digits-forde --out runs/digits-forde.onnx
      forde score runs/digits-forde.onnx rows.npy --out scores.parquet
      forde serve runs/digits-forde.onnx                        # http://127.0.0.1:3000/ui

    train, export, fuse and evaluate need the train extra (pip install 'forde-serve[train]').
    """


@main.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the table as Markdown to this file (default: print it only, write nothing).",
)
@click.option(
    "--figure",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the reports on the diversity-accuracy plane (clean accuracy against mean pairwise "
    "disagreement / error rate, Fort et al. 2019) into this PNG.",
)
def compare(reports: tuple[Path, ...], out: Path | None, figure: Path | None) -> None:
    """Put evaluation REPORTS (folders written by `forde evaluate`) side by side, with each one's
    difference to the first (e.g. `forde compare reports/de reports/forde --out comparison.md`)."""
    from forde_serve._io import atomic_write_text
    from forde_serve.report import compare_reports, write_diversity_plane

    if len(reports) < 2:
        raise _UserError(f"REPORTS: expected at least two report folders to compare, got {len(reports)}")
    names, rows, markdown = compare_reports(list(reports))
    if out is not None:
        atomic_write_text(out, markdown)
    table = Table(title="comparison")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for name in names[1:]:
        table.add_column(f"{name} - {names[0]}", justify="right")
    for label, values, diffs in rows:
        table.add_row(
            label,
            *["n/a" if v is None else f"{v:.4f}" for v in values],
            *["n/a" if d is None else f"{d:+.4f}" for d in diffs],
        )
    Console().print(table)
    if out is not None:
        click.echo(f"written to {out}")
    if figure is not None:
        if write_diversity_plane(list(reports), figure) is None:
            raise _UserError(
                f"--figure: no report among {', '.join(map(str, reports))} has a diversity block to draw "
                "(evaluate the models again with a current `forde evaluate`)"
            )
        click.echo(f"diversity-accuracy plane: {figure}")


SOME_ROWS_FAILED = 3  # `forde score` finished, but rows listed in the errors file were not scored


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("input", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Results: NAME.parquet (probs as a list column) or NAME.csv (one prob_<class> column each).",
)
@click.option(
    "--explain",
    is_flag=True,
    help="Also write every member's input gradient to NAME.gradients.npy [rows, members, *input_shape], "
    "row i for input row i (NaN for rows that failed).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 65536),
    default=256,
    show_default=True,
    help="Rows per onnxruntime call; memory follows this, not the input size.",
)
@click.option(
    "--part-rows",
    type=click.IntRange(min=1),
    default=8192,
    show_default=True,
    help="Rows per output part: the unit that is redone after a kill.",
)
@click.option("--key", help="Array name in a .npz, or column of a .parquet (default: the only one, or 'input').")
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    show_default=True,
    help="local: this process. ray: Ray Data actors, one onnxruntime session each (pip install 'forde-serve[ray]').",
)
@click.option("--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local one.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Ray actors (default: one per GPU, else one per CPU); for a local cluster, also its CPUs.",
)
@click.option(
    "--coverage",
    type=float,
    help="Also write each row's conformal prediction set at this coverage (a level the model stores, e.g. 0.9): "
    "columns prediction_set (class names) and set_size.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT (and any unfinished parts) and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary table.")
def score(
    model: Path,
    input: Path,
    out: Path,
    explain: bool,
    batch_size: int,
    part_rows: int,
    key: str | None,
    engine: str,
    address: str | None,
    workers: int | None,
    coverage: float | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Score every row of INPUT with an exported MODEL (NAME.onnx), without a server.

    \b
    INPUT is one of:
      rows.npy      [rows, *input_shape], memory-mapped (files larger than RAM work)
      rows.npz      one named array (--key NAME when it holds several)
      rows.parquet  a column of number lists (--key COLUMN; default 'input')
      images/       a folder of pictures (PNG, JPEG, WebP, BMP, TIFF, GIF), converted as the model's metadata says

    Each output row holds row_id (input index, or file name for images), predicted_class,
    class_name, confidence, probs, predictive_entropy, expected_entropy, mutual_information,
    vote_disagreement and abstain (and, with --coverage, prediction_set and set_size). Rows that
    cannot be scored (non-finite values, unreadable images) go to NAME.errors.csv with the reason.

    Killed? Run the same command again: finished parts (NAME.parquet.parts/) are kept and the
    rest is scored, each row exactly once.

    Exit codes: 0 all rows scored; 2 bad arguments, model or input file (nothing scored);
    3 finished, but some rows failed (see NAME.errors.csv).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from forde_serve.scoring import ScoreJob
    from forde_serve.scoring import score as run_score

    # No rate on the bar: the summary's end-to-end figure is the one throughput this prints, and the bar
    # leaves the screen when the job is done.
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn())
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("score", total=None)

        def on_rows(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        job = ScoreJob(
            model=model,
            input=input,
            out=out,
            key=key,
            explain=explain,
            batch_size=batch_size,
            part_rows=part_rows,
            coverage=coverage,
        )
        summary = run_score(job, engine=engine, address=address, workers=workers, overwrite=overwrite, on_rows=on_rows)
    if not quiet:
        table = Table(title=f"scored {input} with {model.name}")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("rows", str(summary.rows))
        table.add_row("scored", str(summary.scored))
        table.add_row("failed", str(summary.failed))
        table.add_row("abstained", f"{summary.abstained} ({summary.abstained / max(summary.scored, 1):.1%})")
        table.add_row("mean mutual information", f"{summary.mean_mutual_information:.4f}")
        table.add_row("mean predictive entropy", f"{summary.mean_predictive_entropy:.4f}")
        table.add_row(
            "throughput",
            f"{summary.rows_this_run} rows in {summary.seconds:.1f} s: {summary.rows_per_second:,.0f} rows/s "
            "(this run, end to end: model loading and writing included)",
        )
        for name, path in summary.outputs.items():
            table.add_row(name, path)
        Console().print(table)
    if summary.failed:
        click.echo(
            f"{summary.failed} of {summary.rows} rows could not be scored; see {summary.outputs['errors']}", err=True
        )
        sys.exit(SOME_ROWS_FAILED)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True, help="HTTP port.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every interface.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes behind the one port (FORDE_WORKERS; default 1). onnxruntime's threads are "
    "shared out among them: cores / workers each, unless FORDE_THREADS says otherwise.",
)
def serve(model: Path | None, port: int, host: str, workers: int | None) -> None:
    """Serve an exported MODEL (NAME.onnx; default: exported/digits.onnx) over HTTP with BentoML.

    The same as `FORDE_MODEL=MODEL bentoml serve forde_serve.app.service:FordeEnsemble --host HOST
    --port PORT`, which this command becomes (it replaces itself with it), so SIGTERM or Ctrl+C stops
    the server and its worker processes. The model and every FORDE_* setting are checked first, so a
    mistake is one line here rather than a traceback from each worker.

    \b
    Endpoints: /predict, /explain, /predict_image, /metadata (POST); /feedback (POST: true labels
    by answer id); /monitor (GET: the shift alarm, window estimates, realized coverage; POST
    {"reset": true} re-arms the alarm); /readyz, /livez, /metrics (Prometheus, every worker);
    the Swagger page at /, the OpenAPI spec at /docs.json, and /ui, a page to try the model in a
    browser.

    \b
    State (labels, the alarm, adaptive thresholds) is shared by every worker: an SQLite file under
    FORDE_STATE_DIR (default ~/.local/state/forde-serve), or FORDE_STATE_URL (any SQLAlchemy URL,
    e.g. postgresql://... for several replicas). FORDE_ADMIN_TOKEN guards /feedback and the reset;
    FORDE_MONITOR=0 keeps no state at all.
    """
    import os

    from forde_serve.app.settings import ServeSettings

    overrides = {} if model is None else {"model": model.resolve()}
    if workers is not None:
        overrides["workers"] = workers
    settings = ServeSettings.load(arguments=overrides)
    from forde_serve.runtime import EnsembleRuntime

    # a bad file or state store is one line here, not a traceback in each worker
    runtime = EnsembleRuntime(settings.model, providers=["CPUExecutionProvider"])
    runtime.warm_up()
    if settings.monitor:
        from forde_serve.app._watch import model_key
        from forde_serve.monitoring.store import StateStore

        StateStore.from_environment(model_key(runtime.path)).dispose()
        if settings.token() is None and not _loopback(host):
            click.echo(
                f"warning: serving on {host} without FORDE_ADMIN_TOKEN: anyone who reaches it can send labels to "
                "/feedback (which move the adaptive sets every caller is served) and re-arm the shift alarm; set "
                "FORDE_ADMIN_TOKEN to require `Authorization: Bearer <token>` there",
                err=True,
            )
    _check_can_listen(host, port)
    env = dict(os.environ) | settings.environment()
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "forde_serve.app.service:FordeEnsemble",
        "--port",
        str(port),
        "--host",
        host,
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: a supervisor's SIGTERM then reaches BentoML's own process, which stops its workers
    # and frees the port; a child left behind by a killed parent would keep serving.
    os.execve(sys.executable, command, env)


def _loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def _check_can_listen(host: str, port: int) -> None:
    """Refuse, in one line, a port that is taken (or a host that is not this machine's) before BentoML
    starts and fails with a traceback. The server binds a moment later, so a race stays possible."""
    import errno
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise _UserError(f"--host: expected an address of this machine, got {host!r} ({err.strerror})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise _UserError(
                    f"--port: {port} on {host} is already in use; stop what holds it or pick another"
                ) from None
            raise _UserError(f"--host/--port: cannot listen on {host}:{port} ({err.strerror})") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
