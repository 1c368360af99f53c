"""`forde train`: a TOML config into a run folder, in this process or under torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from training.cli._common import COMMAND, training_extra


@click.command(**COMMAND)
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to create. Default: runs/<config name>-<method>[-<structure>]-seed<seed>.",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="RUN",
    help="Continue a killed run from its last finished epoch (its own config is used; give no CONFIG).",
)
@click.option(
    "--method",
    type=click.Choice(["forde", "de"]),
    help="Override ensemble.method: forde (input-gradient repulsion) or de (deep-ensemble baseline).",
)
@click.option("--members", type=click.IntRange(min=1), help="Override ensemble.members (M).")
@click.option(
    "--structure",
    type=click.Choice(["independent", "batchensemble", "mc_dropout"]),
    help="Override ensemble.structure: independent networks, or members sharing one set of weights "
    "(batchensemble: rank-1 modulations; mc_dropout: a fixed dropout mask each); options in [embedded].",
)
@click.option("--epochs", type=click.IntRange(min=1), help="Override optim.epochs.")
@click.option("--seed", type=int, help="Override seed (model init, shuffling, augmentation).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Override device; auto takes CUDA when torch sees a GPU.",
)
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes on this machine (torchrun --standalone): one per GPU, or CPU processes with Gloo. "
    "For several machines, run torchrun yourself (see the README).",
)
def train(
    config: Path | None,
    out: Path | None,
    resume: Path | None,
    method: str | None,
    members: int | None,
    structure: str | None,
    epochs: int | None,
    seed: int | None,
    device: str | None,
    quiet: bool,
    nproc: int,
) -> None:
    """Train an ensemble from a TOML CONFIG (see training/configs/) into a run folder.

    The run folder holds the resolved config, the PCA basis (FoRDE with pca/pca_centred/tuned lengthscales),
    member weights (safetensors), train_log.jsonl, metrics.json (clean test accuracy, NLL, ECE,
    Brier, gradient cosine distance, parameters) and trajectory.safetensors (every member's
    probabilities on 64 test inputs after each epoch). A checkpoint is written after every epoch.

    --structure batchensemble / mc_dropout (FoRDE or DE alike): the members share one network's
    weights; the [embedded] section sets the modulations' init (random_sign | normal), the shared
    weights' step gamma(M) (shared_grad_scale 1 | "M"), modulation_lr_ratio and keep_prob.

    Your own pictures: data.dataset = "imagefolder", data.root holding train/<class>/ (and
    optionally val/ and test/), data.image_size S; see training/configs/imagefolder.toml.

    With --nproc N (or `torchrun --nproc_per_node N -m training ...`) every process holds all
    members and takes 1/N of each global batch; the repulsion still sees the whole global batch,
    so the result does not depend on N. Only rank 0 writes the run folder.
    """
    with training_extra():
        from training.run import check_run_dir, plan_run
        from training.trainer import train as run_training

    plan = plan_run(
        config,
        out,
        resume,
        method=method,
        members=members,
        structure=structure,
        epochs=epochs,
        seed=seed,
        device=device,
    )
    if nproc > 1:  # checked here, so that a mistake is one line rather than N ranks' failures
        check_run_dir(plan.config, plan.run_dir, plan.resume, processes=nproc)
        _launch_torchrun(
            nproc,
            config,
            out=None if plan.resume else plan.run_dir,
            resume=resume,
            method=method,
            members=members,
            structure=structure,
            epochs=epochs,
            seed=seed,
            device=device,
            quiet=quiet,
        )
    metrics = run_training(plan.config, plan.run_dir, resume=plan.resume, progress=not quiet)

    if metrics is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    console = Console()
    ensemble = plan.config.ensemble
    structure = "" if ensemble.structure == "independent" else f" {ensemble.structure}"
    if set(metrics) - {"parameters"}:
        table = Table(title=f"{ensemble.method}{structure} x{ensemble.members}: clean test metrics")
        calibrated = metrics.get("calibrated", {})
        table.add_column("metric")
        table.add_column("T = 1", justify="right")
        if calibrated:  # what `forde export` will serve: the temperature it fits on the validation split
            table.add_column(f"T = {calibrated['temperature']:.3g} (as exported)", justify="right")
        for name, value in metrics.items():
            if name == "parameters":
                table.add_row(name, f"{value:,}", *([""] if calibrated else []))
            elif name != "calibrated":
                served = [f"{calibrated[name]:.4f}" if name in calibrated else ""] if calibrated else []
                table.add_row(name, f"{value:.4f}", *served)
        console.print(table)
    else:
        console.print(
            f"no test split (the image folder has no test/): metrics.json holds only the {metrics['parameters']:,} "
            "parameters"
        )
    console.print(f"run folder: {plan.run_dir}")


def _launch_torchrun(nproc: int, config: Path | None, **options) -> None:
    """Re-run this `forde train` as `torchrun --standalone --nproc_per_node N -m training ...` and exit with it."""
    import subprocess

    args = [str(config)] if config is not None else []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "training",
        *args,
    ]
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(130)
