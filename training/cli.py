"""The torch-side commands of `forde`: train, export, fuse and evaluate.

They join the `forde` group (`forde_serve.app.cli.main`) through the `forde.commands` entry points
in pyproject.toml, so the inference package never names this one. At import this module needs
only click and rich: each command imports the torch-side code it runs when it runs, so `forde
--help` stays quick and, where the train extra is not installed, a command says what to install.

Commands are thin: parse, validate into a typed job or config, call one library function. Errors
a user can act on are `FordeError`s, which the group turns into one line and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from forde_serve.errors import FordeError

__all__ = ["evaluate", "export", "fuse", "train"]

TRAIN_EXTRA = "pip install 'forde-serve[train]'"


class CommandError(FordeError, ValueError):
    """A command-line value that cannot be used; the message names the option."""


class MissingExtra(FordeError, ImportError):
    """A torch-side command run where the train extra is not installed."""


@contextmanager
def _training_extra() -> Iterator[None]:
    """Around a lazy `from training... import`: say which extra to install when torch is missing."""
    try:
        yield
    except ImportError as err:
        if err.name and err.name.split(".")[0] in {"torch", "torchvision", "sklearn", "safetensors", "onnx"}:
            raise MissingExtra(
                f"this command needs the training extra ({err.name} is not installed): {TRAIN_EXTRA}"
            ) from None
        raise


_COMMAND = {"context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 100}}


@click.command(**_COMMAND)
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
    with _training_extra():
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


def _held_out_options(command):
    """The options of what held-out validation data decides (`forde export`, `forde fuse`)."""
    options = [
        click.option(
            "--target-risk",
            type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
            default=0.01,
            show_default=True,
            help="Error rate the accepted predictions should reach on the validation split; sets the "
            "abstention threshold on mutual information.",
        ),
        click.option(
            "--no-calibrate",
            is_flag=True,
            help="Keep temperature 1 (by default a temperature is fitted on the validation split by NLL and "
            "baked into both graphs).",
        ),
        click.option(
            "--conformal-score",
            type=click.Choice(["lac", "aps", "raps"]),
            default="lac",
            show_default=True,
            help="Score of the conformal prediction sets: lac (1 - p_y, smallest sets), aps (adaptive), raps "
            "(aps with a penalty on unlikely classes).",
        ),
        click.option(
            "--alpha",
            type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
            multiple=True,
            help="Also store thresholds for coverage 1 - ALPHA (repeatable); 0.8, 0.9, 0.95 and 0.99 always are.",
        ),
        click.option("--raps-k-reg", type=click.IntRange(min=0), help="RAPS k_reg (default: chosen on validation)."),
        click.option(
            "--raps-lambda", type=click.FloatRange(min=0.0), help="RAPS lambda (default: chosen on validation)."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _quantize_option(command):
    """`--quantize` of `forde export` / `forde fuse`: the predict graph's precision."""
    return click.option(
        "--quantize",
        metavar="int8|fp16",
        help="Lower the predict graph's precision: int8 (onnxruntime static quantization for the CPU, "
        "calibrated on the validation split) or fp16 (float16, for the CUDA provider). Temperature, "
        "prediction-set and abstention thresholds are fitted on the lowered graph's own outputs; the explain "
        "graph stays float32. Default: float32.",
    )(command)


def _held_out(target_risk, no_calibrate, conformal_score, alpha, raps_k_reg, raps_lambda):
    from training.export import HeldOutOptions

    if conformal_score != "raps" and (raps_k_reg is not None or raps_lambda is not None):
        raise CommandError(f"--raps-k-reg / --raps-lambda: only for --conformal-score raps, got {conformal_score}")
    return HeldOutOptions(
        calibrate=not no_calibrate,
        score=conformal_score,
        coverages=tuple(round(1.0 - a, 12) for a in alpha),
        k_reg=raps_k_reg,
        lam=raps_lambda,
        target_risk=target_risk,
    )


@click.command(**_COMMAND)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Predict graph to write, NAME.onnx; the explain graph goes beside it as NAME.explain.onnx.",
)
@_held_out_options
@click.option(
    "--validation-inputs",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Validation inputs on which both files are checked against the PyTorch ensemble.",
)
@_quantize_option
@click.option(
    "--layout",
    type=click.Choice(["auto", "native", "folded"]),
    default="auto",
    show_default=True,
    help="Embedded ensembles: native (one shared network, the batch repeated per member: a file near one "
    "network's size) or folded (per-member weights, one grouped graph); auto times both on this CPU.",
)
def export(run: Path, out: Path, validation_inputs: int, quantize: str | None, layout: str, **held_out) -> None:
    """Fuse a training RUN into one batched ONNX graph (NAME.onnx) and its explain twin.

    \b
    On the run's validation split, in this order:
      temperature      fitted by NLL, baked into both graphs (--no-calibrate: T = 1)
      prediction sets  split-conformal thresholds on the calibrated probabilities for coverage
                       0.8, 0.9, 0.95, 0.99 (+ 1 - --alpha), served by `coverage` in requests
      abstention       the mutual-information threshold reaching --target-risk

    Both files carry everything a server needs in their metadata (classes, input shape, members,
    method, kernel, training config, metrics, temperature, thresholds). After writing, both are run
    in onnxruntime on real validation inputs and compared output by output with the PyTorch
    ensemble; if any output is off, the files are removed and the command exits 1. With --quantize
    the predict file is checked with its precision's looser tolerances (printed with each line).
    """
    if not out.name.endswith(".onnx") or out.name.endswith(".explain.onnx"):
        raise CommandError(f"--out: expected a NAME.onnx path for the predict graph, got {str(out)!r}")
    with _training_extra():
        from training.export import export_run
        from training.export.quantize import check_precision

        options = _held_out(**held_out)
    precision = quantize or "float32"
    check_precision(precision, has_validation=True)
    export_run(
        run, out, options, validation_inputs=validation_inputs, echo=click.echo, precision=precision, layout=layout
    )


@click.command(**_COMMAND)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--arch",
    help="The members' architecture: torchvision:NAME (e.g. torchvision:resnet18), or a built-in "
    "(mlp, cnn, resnet18, preact_resnet18). Leave out with --factory.",
)
@click.option("--factory", metavar="MODULE:FUNCTION", help="Your own member: FUNCTION(num_classes, **kwargs).")
@click.option("--kwargs", metavar="JSON", help="The builder's keyword arguments, e.g. '{\"width_mult\": 0.5}'.")
@click.option("--width", type=click.IntRange(min=1), default=32, show_default=True, help="Built-ins: model.width.")
@click.option("--depth", type=click.IntRange(min=1), default=2, show_default=True, help="Built-ins: model.depth.")
@click.option("--input-shape", required=True, metavar="C,H,W", help="One raw input's shape, e.g. 3,32,32.")
@click.option("--mean", metavar="A,B,C", help="Per-channel mean subtracted inside the graph (default 0).")
@click.option("--std", metavar="A,B,C", help="Per-channel std divided by inside the graph (default 1).")
@click.option("--classes", metavar="NAME,NAME,...", help="Class names (default 0, 1, ...).")
@click.option("--classes-file", type=click.Path(dir_okay=False, path_type=Path), help="Class names, one per line.")
@click.option(
    "--validation",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="DATA.npz",
    help="Held-out data: x (raw inputs) and y (labels). Chooses the abstention threshold and the check's "
    "inputs; without it the file is not calibrated, gives no prediction sets, never abstains and is checked "
    "on random inputs.",
)
@_held_out_options
@_quantize_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Predict graph to write, NAME.onnx; the explain graph goes beside it as NAME.explain.onnx.",
)
def fuse(
    checkpoints: tuple[Path, ...],
    arch: str | None,
    factory: str | None,
    kwargs: str | None,
    width: int,
    depth: int,
    input_shape: str,
    mean: str | None,
    std: str | None,
    classes: str | None,
    classes_file: Path | None,
    validation: Path | None,
    quantize: str | None,
    out: Path,
    **held_out,
) -> None:
    """Fuse CHECKPOINTS, one member each, trained elsewhere, into one ONNX graph and its explain twin.

    \b
    Each CKPT is a state dict of the same architecture: .safetensors, or a .pt/.pth written by
    torch.save(model.state_dict(), path) (read without running pickled code). The class count
    comes from the classifier weights. With --validation, as `forde export` does on a run's
    validation split: a temperature, conformal thresholds for prediction sets, the abstention
    threshold. The files are the ones `forde export` writes (method "external"), checked against
    the PyTorch ensemble before they are kept:
      forde fuse a.pt b.pt c.pt --arch torchvision:resnet18 --input-shape 3,224,224 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --validation val.npz --out fused.onnx
    """
    with _training_extra():
        from training.export.fuse import FuseJob, fuse_checkpoints

        options = _held_out(**held_out)
    job = FuseJob.parse(
        checkpoints,
        out,
        arch,
        factory,
        kwargs,
        input_shape,
        mean=mean,
        std=std,
        classes=classes,
        classes_file=classes_file,
        validation=validation,
        held_out=options,
        width=width,
        depth=depth,
        precision=quantize or "float32",
    )
    fuse_checkpoints(job, echo=click.echo)


@click.command(**_COMMAND)
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
    """Measure an ensemble's robustness: SOURCE is a training run folder or an exported NAME.onnx.

    \b
    Clean and corrupted test data (digits: the digits-C suite, 11 corruptions x 5 severities;
    CIFAR: CIFAR-10-C / CIFAR-100-C from a local folder; an image folder: its test/ split through
    an RGB suite in the spirit of CIFAR-10-C, 15 corruptions x 5 severities, seeded by --seed),
    averaged over all corruption types and severities. Writes to REPORT_DIR (--out):
      metrics.json    accuracy, NLL, ECE, Brier, uncertainty decomposition, gradient cosine
                      distance, risk-coverage area, accuracy at the model's abstention threshold,
                      OOD AUROC; `corrupted`, `per_severity`, `per_corruption` and `per_set`
      report.md       the same as tables, with the figures
      reliability.png    reliability diagram, clean and corrupted, before and after the temperature
      severity.png       accuracy and NLL per corruption severity
      coverage.png       prediction-set coverage and size per severity, at each stored level
      risk_coverage.png  error rate of the accepted inputs against the share accepted
      saliency.png       members' input gradients on clean test inputs of different classes

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
    with _training_extra():
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
            with _training_extra():
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


def train_main() -> None:
    """`python -m training ARGS` (what torchrun starts per rank): `forde train ARGS`, with the group's
    handling of errors (one line, exit code 2)."""
    from forde_serve.app.cli import main

    main.main(args=["train", *sys.argv[1:]], prog_name="python -m training")
