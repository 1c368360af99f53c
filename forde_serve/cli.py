"""The `forde` command line.

Commands are thin: parse, validate into a typed config, call one library function.
This is the only module that reaches both packages: torch-side code (`training`) is
imported lazily inside the commands that need it, so the inference commands work
where torch is not installed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

__all__ = ["main"]


class BadInput(click.ClickException):
    """A caller's mistake (argument, config file, data folder): one line, exit code 2."""

    exit_code = 2


def _file_problem(err: OSError) -> BadInput:
    """An unwritable or unreadable path (e.g. --out under a file) as one line, not a traceback."""
    return BadInput(f"{err.filename}: {err.strerror or err}")


def _training(module: str = "training"):
    """Import a torch-side module, or explain how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name and err.name.split(".")[0] in {"torch", "torchvision", "sklearn"}:
            raise click.ClickException(
                f"this command needs the training extra ({err.name} is not installed): "
                "pip install 'forde-serve[train]'"
            ) from None
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="forde-serve")
def main() -> None:
    """Train FoRDE ensembles, export them as one ONNX graph, serve them with honest uncertainty.

    \b
    Quickstart (CPU, under a minute):
      forde train training/configs/digits.toml --out runs/digits-forde
      forde train training/configs/digits.toml --method de --out runs/digits-de
    """


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder to create. Default: runs/<config name>-<method>-seed<seed>.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), metavar="RUN",
              help="Continue a killed run from its last finished epoch (its own config is used; give no CONFIG).")
@click.option("--method", type=click.Choice(["forde", "de"]),
              help="Override ensemble.method: forde (input-gradient repulsion) or de (deep-ensemble baseline).")
@click.option("--members", type=click.IntRange(min=1), help="Override ensemble.members (M).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override optim.epochs.")
@click.option("--seed", type=int, help="Override seed (model init, shuffling, augmentation).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
              help="Override device; auto takes CUDA when torch sees a GPU.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train(config: Path | None, out: Path | None, resume: Path | None, method: str | None, members: int | None,
          epochs: int | None, seed: int | None, device: str | None, quiet: bool) -> None:
    """Train an ensemble from a TOML CONFIG (see training/configs/) into a run folder.

    The run folder holds the resolved config, the PCA basis (FoRDE with pca/tuned lengthscales),
    member weights (safetensors), train_log.jsonl and metrics.json (clean test accuracy, NLL,
    ECE, Brier, gradient cosine distance). A checkpoint is written after every epoch.
    """
    training = _training()
    trainer = _training("training.trainer")
    data_errors = (training.ConfigError, trainer.TrainingError, _training("training.data").DatasetError,
                   _training("training.run").RunError)
    try:
        if resume is not None:
            if config is not None or any(v is not None for v in (out, method, members, epochs, seed)):
                raise BadInput("--resume continues a run with its own config: give only the run folder "
                               "(and optionally --device)")
            resolved = training.with_overrides(training.load_config(resume / "config.json"), device=device)
            run_dir = resume
        else:
            if config is None:
                raise BadInput("missing CONFIG: give a TOML config (e.g. training/configs/digits.toml) "
                               "or --resume RUN")
            resolved = training.with_overrides(training.load_config(config), method=method, members=members,
                                               epochs=epochs, seed=seed, device=device)
            run_dir = out or Path("runs") / f"{config.stem}-{resolved.ensemble.method}-seed{resolved.seed}"
        metrics = training.train(resolved, run_dir, resume=resume is not None, progress=not quiet)
    except data_errors as err:
        raise BadInput(str(err)) from None
    except OSError as err:
        raise _file_problem(err) from None

    table = Table(title=f"{resolved.ensemble.method} x{resolved.ensemble.members}: clean test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"run folder: {run_dir}")


@main.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Predict graph to write, NAME.onnx; the explain graph goes beside it as NAME.explain.onnx.")
@click.option("--target-risk", type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
              default=0.01, show_default=True,
              help="Error rate the accepted predictions should reach on the validation split; sets the "
                   "abstention threshold on mutual information.")
@click.option("--validation-inputs", type=click.IntRange(min=1), default=64, show_default=True,
              help="Validation inputs on which both files are checked against the PyTorch ensemble.")
def export(run: Path, out: Path, target_risk: float, validation_inputs: int) -> None:
    """Fuse a training RUN into one batched ONNX graph (NAME.onnx) and its explain twin.

    Both files carry everything a server needs in their metadata (classes, input shape, members,
    method, kernel, training config, metrics, abstention threshold). After writing, both are run
    in onnxruntime on real validation inputs and compared output by output with the PyTorch
    ensemble; if any output is off, the files are removed and the command exits 1.
    """
    if not out.name.endswith(".onnx") or out.name.endswith(".explain.onnx"):
        raise BadInput(f"--out: expected a NAME.onnx path for the predict graph, got {str(out)!r}")
    exporter = _training("training.export")
    try:
        exporter.export_run(run, out, target_risk=target_risk, validation_inputs=validation_inputs,
                            echo=click.echo)
    except (_training("training.run").RunError, _training("training.data").DatasetError) as err:
        raise BadInput(str(err)) from None
    except exporter.ExportValidationError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise _file_problem(err) from None


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True, help="HTTP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
def serve(model: Path | None, port: int, host: str) -> None:
    """Serve an exported MODEL (NAME.onnx; default: exported/digits.onnx) over HTTP with BentoML.

    The same as `FORDE_MODEL=MODEL bentoml serve forde_serve.service:FordeEnsemble --port PORT`.
    Endpoints: /predict, /explain, /predict_image, /metadata (POST), /readyz, /metrics, /docs.
    """
    import os
    import subprocess

    from forde_serve.runtime import EnsembleRuntime, ModelFileError

    env = dict(os.environ)
    if model is not None:
        try:
            EnsembleRuntime(model, providers=["CPUExecutionProvider"])
        except ModelFileError as err:
            raise BadInput(str(err)) from None
        env["FORDE_MODEL"] = str(model.resolve())
    command = [sys.executable, "-m", "bentoml", "serve", "forde_serve.service:FordeEnsemble",
               "--port", str(port), "--host", host]
    try:
        sys.exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:  # Ctrl+C reaches the server too; it shuts itself down
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
