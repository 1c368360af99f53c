"""`forde export` (a run folder) and `forde fuse` (checkpoints trained elsewhere): one fused ONNX pair."""

from __future__ import annotations

from pathlib import Path

import click

from training.cli._common import COMMAND, CommandError, held_out_from, held_out_options, quantize_option, training_extra


@click.command(**COMMAND)
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Predict graph to write, NAME.onnx; the explain graph goes beside it as NAME.explain.onnx.",
)
@held_out_options
@click.option(
    "--validation-inputs",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Validation inputs on which both files are checked against the PyTorch ensemble.",
)
@quantize_option
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
    with training_extra():
        from training.export import export_run
        from training.export.quantize import check_precision

        options = held_out_from(**held_out)
    precision = quantize or "float32"
    check_precision(precision, has_validation=True)
    export_run(
        run, out, options, validation_inputs=validation_inputs, echo=click.echo, precision=precision, layout=layout
    )


@click.command(**COMMAND)
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
@held_out_options
@quantize_option
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
    with training_extra():
        from training.export.fuse import FuseJob, fuse_checkpoints

        options = held_out_from(**held_out)
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
