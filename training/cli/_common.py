"""What the torch-side commands share: their click settings, their errors, the held-out options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from forde_serve.errors import FordeError

TRAIN_EXTRA = "pip install 'forde-serve[train]'"


class CommandError(FordeError, ValueError):
    """A command-line value that cannot be used; the message names the option."""


class MissingExtra(FordeError, ImportError):
    """A torch-side command run where the train extra is not installed."""


@contextmanager
def training_extra() -> Iterator[None]:
    """Around a lazy `from training... import`: say which extra to install when torch is missing."""
    try:
        yield
    except ImportError as err:
        if err.name and err.name.split(".")[0] in {"torch", "torchvision", "sklearn", "safetensors", "onnx"}:
            raise MissingExtra(
                f"this command needs the training extra ({err.name} is not installed): {TRAIN_EXTRA}"
            ) from None
        raise


COMMAND = {"context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 100}}


def held_out_options(command):
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


def quantize_option(command):
    """`--quantize` of `forde export` / `forde fuse`: the predict graph's precision."""
    return click.option(
        "--quantize",
        metavar="int8|fp16",
        help="Lower the predict graph's precision: int8 (onnxruntime static quantization for the CPU, "
        "calibrated on the validation split) or fp16 (float16, for the CUDA provider). Temperature, "
        "prediction-set and abstention thresholds are fitted on the lowered graph's own outputs; the explain "
        "graph stays float32. Default: float32.",
    )(command)


def held_out_from(target_risk, no_calibrate, conformal_score, alpha, raps_k_reg, raps_lambda):
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
