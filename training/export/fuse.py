"""`forde fuse`: M members trained elsewhere, one plain checkpoint each, become the same predict /
explain pair `forde export` writes (one fused graph, checked against the PyTorch ensemble).

The checkpoints are state dicts of one architecture (`.safetensors`, or `.pt`/`.pth` read with
`torch.load(weights_only=True)`); the class count is read from their classifier weights. With
validation data (`x` raw inputs, `y` labels in one `.npz`) the abstention threshold is chosen on
it and the files are checked on its inputs; without, the file never abstains.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forde_serve.contract import ModelCard
from forde_serve.errors import FordeError
from training.config import FACTORY, check_model
from training.export.exporter import HeldOutOptions, export_validated
from training.export.quantize import check_precision
from training.models import build_member, ensemble_of
from training.models.members import classes_in, classifier_keys, match_state, read_state_dict

__all__ = ["FuseError", "FuseJob", "fuse_checkpoints"]


class FuseError(FordeError, ValueError):
    """An argument of `forde fuse` that cannot be used; the message names it."""


def _numbers(text: str | None, option: str, kind: type) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise FuseError(f"{option}: expected comma-separated {noun} (e.g. 3,32,32), got {text!r}") from None


@dataclass(frozen=True)
class FuseJob:
    """What `forde fuse` does, validated when made: fuse `checkpoints` of `arch` into `out`."""

    checkpoints: tuple[Path, ...]
    out: Path
    arch: str
    input_shape: tuple[int, ...]  # one raw input, e.g. (3, 32, 32)
    mean: tuple[float, ...] | None = None  # per channel, subtracted in the graph; None: 0
    std: tuple[float, ...] | None = None  # per channel, divided by in the graph; None: 1
    class_names: tuple[str, ...] | None = None  # None: "0", "1", ...
    validation: Path | None = None  # .npz with x [N, *input_shape] (raw) and y [N] (labels)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the builder's keyword arguments
    factory: str | None = None  # "package.module:function" when arch is "factory"
    width: int = 32  # built-ins only
    depth: int = 2  # built-ins only
    held_out: HeldOutOptions = field(default_factory=HeldOutOptions)  # what --validation decides, and how
    precision: str = "float32"  # --quantize: int8 (needs --validation to calibrate on) or fp16

    def __post_init__(self):
        if not self.checkpoints:
            raise FuseError("CKPT: give at least one checkpoint (one per member)")
        if not self.out.name.endswith(".onnx") or self.out.name.endswith(".explain.onnx"):
            raise FuseError(f"--out: expected a NAME.onnx path for the predict graph, got {str(self.out)!r}")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise FuseError(f"--input-shape: expected positive sizes such as 3,32,32, got {list(self.input_shape)}")
        channels = self.input_shape[0]
        for option, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) != channels:
                raise FuseError(
                    f"{option}: expected one number per input channel ({channels}, from --input-shape), "
                    f"got {len(values)}"
                )
        if self.std is not None and any(not s > 0 for s in self.std):
            raise FuseError(f"--std: expected positive numbers, got {list(self.std)}")
        if self.class_names is not None and (
            len(set(self.class_names)) != len(self.class_names) or not all(self.class_names)
        ):
            raise FuseError(f"--classes: expected distinct non-empty names, got {list(self.class_names)}")
        check_model(self.arch, self.kwargs, self.factory)
        check_precision(self.precision, self.validation is not None)

    @classmethod
    def parse(
        cls,
        checkpoints: Sequence[Path],
        out: Path,
        arch: str | None,
        factory: str | None,
        kwargs: str | None,
        input_shape: str,
        mean: str | None = None,
        std: str | None = None,
        classes: str | None = None,
        classes_file: Path | None = None,
        validation: Path | None = None,
        held_out: HeldOutOptions | None = None,
        width: int = 32,
        depth: int = 2,
        precision: str = "float32",
    ) -> FuseJob:
        """The job from the command line's strings (comma-separated lists, a JSON object of kwargs)."""
        if arch is None:
            if factory is None:
                raise FuseError("--arch: required (a built-in, torchvision:NAME), or give --factory MODULE:FUNCTION")
            arch = FACTORY
        if classes is not None and classes_file is not None:
            raise FuseError("--classes and --classes-file: give one of them, not both")
        names = None if classes is None else tuple(name.strip() for name in classes.split(","))
        if classes_file is not None:
            if not classes_file.is_file():
                raise FuseError(f"--classes-file: {str(classes_file)!r} does not exist")
            names = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
        try:
            builder_kwargs = {} if kwargs is None else json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise FuseError(
                f"--kwargs: expected a JSON object such as '{{\"width_mult\": 0.5}}', got {kwargs!r} ({err})"
            ) from None
        if not isinstance(builder_kwargs, dict):
            raise FuseError(f"--kwargs: expected a JSON object such as '{{\"width_mult\": 0.5}}', got {kwargs!r}")
        return cls(
            checkpoints=tuple(checkpoints),
            out=out,
            arch=arch,
            input_shape=_numbers(input_shape, "--input-shape", int),
            mean=_numbers(mean, "--mean", float),
            std=_numbers(std, "--std", float),
            class_names=names,
            validation=validation,
            kwargs=builder_kwargs,
            factory=factory,
            width=width,
            depth=depth,
            held_out=held_out or HeldOutOptions(),
            precision=precision,
        )

    def describe(self) -> str:
        return f"model.factory {self.factory!r}" if self.arch == FACTORY else self.arch


def _read_validation(path: Path, input_shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw inputs `[N, *input_shape]` float32, labels `[N]` int64) from an `.npz` holding x and y."""
    if not path.is_file():
        raise FuseError(f"--validation: {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("x", "y") if key in data.files}
            found = data.files
    except (ValueError, OSError) as err:
        raise FuseError(f"--validation: {path} is not a readable .npz file ({err})") from None
    if set(arrays) != {"x", "y"}:
        raise FuseError(f"--validation: {path} must hold arrays 'x' (raw inputs) and 'y' (labels), it holds {found}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape or len(x) == 0:
        raise FuseError(f"--validation: x must be [N, {', '.join(map(str, input_shape))}], got {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise FuseError(f"--validation: x must hold finite numbers, got dtype {x.dtype} with non-finite or no values")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise FuseError(f"--validation: y must be {len(x)} integer labels [N], got {y.dtype} {list(y.shape)}")
    if y.min() < 0 or y.max() >= classes:
        raise FuseError(f"--validation: y must be class indices 0 to {classes - 1}, got {y.min()} to {y.max()}")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def fuse_checkpoints(job: FuseJob, echo: Callable[[str], None] = print) -> dict:
    """Fuse the job's checkpoints and export them (`export_validated`); returns its summary.

    A checkpoint of another architecture or class count than the first raises ModelError naming
    the file and the key.
    """
    states = [read_state_dict(path, field="CKPT") for path in job.checkpoints]

    def build(classes: int) -> torch.nn.Module:
        return build_member(job.arch, job.input_shape, classes, job.width, job.depth, job.kwargs, job.factory)

    heads = classifier_keys(build)
    classes = classes_in(states[0], heads, job.checkpoints[0], job.describe())
    names = job.class_names or tuple(str(i) for i in range(classes))
    if len(names) != classes:
        raise FuseError(
            f"--classes: {len(names)} names given, but the checkpoints' classifier has {classes} classes "
            f"({job.checkpoints[0].name})"
        )
    validation = None if job.validation is None else _read_validation(job.validation, job.input_shape, classes)
    what = f"{job.describe()} with {classes} classes (as in {job.checkpoints[0].name})"
    members = []
    for path, state in zip(job.checkpoints, states, strict=True):
        member = build(classes)
        member.load_state_dict(match_state(state, member.state_dict(), path, what), strict=False)
        members.append(member.eval())
    channels = job.input_shape[0]
    mean, std = job.mean or (0.0,) * channels, job.std or (1.0,) * channels
    ensemble = ensemble_of(members, job.input_shape, classes, mean, std)
    normalization = (
        "no normalization in the graph"
        if job.mean is None and job.std is None
        else f"the graph normalizes with mean {list(mean)} and std {list(std)}"
    )
    card = ModelCard(
        class_names=names,
        input_shape=job.input_shape,
        input_space=f"float32 {list(job.input_shape)} as the fused checkpoints were trained on ({normalization})",
        image=None,
        members=len(members),
        method="external",
        training_config={
            "fused_from": [path.name for path in job.checkpoints],
            "arch": job.arch,
            "kwargs": job.kwargs,
            "factory": job.factory,
            "mean": list(mean),
            "std": list(std),
        },
    )
    echo(f"fusing {len(members)} checkpoints of {job.describe()} ({classes} classes) -> {job.out}")
    return export_validated(ensemble, job.out, card, validation, job.held_out, echo=echo, precision=job.precision)
