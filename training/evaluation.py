"""Metrics of a torch ensemble with forde_serve's numpy maths: the clean split after training, and
`forde evaluate` (robustness reports) for run folders and exported files."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError

from forde_serve.calibration import member_probs as member_softmax
from forde_serve.contract import ImageSpec, ValidationChoices
from forde_serve.corruptions import corrupted_versions
from forde_serve.errors import FordeError
from forde_serve.evaluation import Evaluation, RuntimePredictor, evaluate
from forde_serve.metrics import classification_metrics, gradient_cosine_distance
from forde_serve.runtime import NOT_FINITE, EnsembleRuntime, finite_float32_rows
from forde_serve.validation import choose_on_validation
from training import corruptions as rgb_corruptions
from training.config import DataConfig
from training.data import load_corrupted_cifar, load_dataset
from training.diversity import run_diagnostics
from training.forde import member_input_gradients
from training.models import Ensemble, parameter_count
from training.run import load_run

__all__ = [
    "EvaluationError",
    "TorchPredictor",
    "EvaluationJob",
    "clean_metrics",
    "evaluate_job",
    "member_logits",
    "member_probabilities",
    "predicted_class_input_gradients",
]


@torch.no_grad()
def member_logits(ensemble: Ensemble, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Every member's logits, `[N, M, C]` float64, for raw inputs `x` `[N, *input_shape]`."""
    device = next(ensemble.parameters()).device
    chunks = [ensemble(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).double().numpy()


@torch.no_grad()
def member_probabilities(ensemble: Ensemble, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax of every member, `[N, M, C]`, for raw inputs `x` `[N, *input_shape]`."""
    device = next(ensemble.parameters()).device
    chunks = [ensemble(x[i : i + batch_size].to(device)).softmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).double().numpy()


def predicted_class_input_gradients(ensemble: Ensemble, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Each member's gradient of the ensemble-predicted class logit w.r.t. the RAW input, `[N, M, *input_shape]`."""
    device = next(ensemble.parameters()).device
    chunks = []
    for i in range(0, len(x), batch_size):
        _, grads = member_input_gradients(ensemble, ensemble.normalize(x[i : i + batch_size].to(device)))
        chunks.append((grads / ensemble.std).cpu())  # chain rule through z = (x - mean) / std
    return torch.cat(chunks).double().numpy()


def clean_metrics(
    ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, validation: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict:
    """accuracy, nll, ece, brier, mutual_information and gradient_cosine_distance on one split, at T = 1,
    and the ensemble's `parameters` (distinct trained parameters: a weight shared by the members counts once).

    With `validation` (inputs, labels), also `calibrated`: accuracy, nll and ece at the temperature
    `forde export` will fit on that split (`choose_on_validation`, the same fit), and that temperature:
    an average of tempered softmaxes can rank classes differently, so the served accuracy may differ.
    """
    was_training = ensemble.training
    ensemble.eval()
    logits = member_logits(ensemble, x)
    metrics = classification_metrics(member_softmax(logits), y.numpy())
    if ensemble.members > 1:
        metrics["gradient_cosine_distance"] = gradient_cosine_distance(predicted_class_input_gradients(ensemble, x))
    metrics["parameters"] = parameter_count(ensemble)
    if validation is not None:
        temperature = choose_on_validation(
            member_logits(ensemble, validation[0]), validation[1].numpy()
        ).temperature_value
        at_t = classification_metrics(member_softmax(logits, temperature), y.numpy())
        metrics["calibrated"] = {"temperature": temperature} | {k: at_t[k] for k in ("accuracy", "nll", "ece")}
    ensemble.train(was_training)
    return metrics


class TorchPredictor:
    """A torch ensemble (from a run folder) as `forde_serve.evaluation` measures it."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble.eval()
        self.members = ensemble.members

    def member_logits(self, x: np.ndarray) -> np.ndarray:
        return member_logits(self.ensemble, torch.from_numpy(np.ascontiguousarray(x)))

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        return predicted_class_input_gradients(self.ensemble, torch.from_numpy(np.ascontiguousarray(x)))


class EvaluationError(FordeError, ValueError):
    """A source, dataset or OOD file that cannot be evaluated together; the message says why."""


@dataclass(frozen=True)
class EvaluationJob:
    """One `forde evaluate`: what to measure, on which data, and how much."""

    source: Path  # a training run folder (measured through PyTorch) or an exported NAME.onnx (the serving runtime)
    data: str = "digits"  # the dataset the model was trained on: digits | cifar10 | cifar100 | imagefolder
    data_root: str | None = None  # folder holding CIFAR (torchvision's layout) or the image folder
    corrupted_root: str | None = None  # folder holding CIFAR-10-C / CIFAR-100-C (default: data_root)
    ood: Path | None = None  # out-of-distribution inputs (.npy, raw input space) for the MI detection AUROC
    seed: int = 0  # of the digits-C and image-folder corruptions
    per_severity: int | None = None  # CIFAR-C, image folders: the first N images of each corrupted set
    gradient_rows: int = 1000  # inputs per set whose member gradients are compared; 0 skips
    # validation: choose settings without the test split (digits, image folders)
    split: Literal["test", "validation"] = "test"
    target_risk: float = 0.01  # a run folder's abstention threshold is chosen for this, as `forde export` does


@dataclass(frozen=True)
class _Measured:
    """The ensemble behind a source, as evaluation sees it."""

    predictor: TorchPredictor | RuntimePredictor
    engine: str
    method: str
    members: int
    trained_on: str | None
    split_seed: int
    # None: a run folder, whose temperature, conformal and abstention thresholds are chosen on its
    # validation split exactly as `forde export` chooses them.
    choices: ValidationChoices | None
    data_config: dict  # the trained data section (an export from elsewhere: what its image spec says)
    structure: str = "independent"
    parameters: int | None = None  # distinct trained parameters (None: an export that did not record them)


def _measured(source: Path) -> _Measured:
    if not source.exists():
        raise EvaluationError(f"{source} does not exist: give a training run folder or an exported NAME.onnx")
    if source.is_dir():
        run = load_run(source)
        return _Measured(
            TorchPredictor(run.ensemble),
            "the PyTorch ensemble (run folder)",
            run.config.ensemble.method,
            run.ensemble.members,
            run.config.data.dataset,
            run.config.data.split_seed,
            None,
            run.config.data.model_dump(),
            run.config.ensemble.structure,
            parameter_count(run.ensemble),
        )
    card = (runtime := EnsembleRuntime(source)).card
    trained = card.training_config.get("data") or {}
    return _Measured(
        RuntimePredictor(runtime),
        "the exported ONNX file (onnxruntime, as served)",
        card.method,
        card.members,
        trained.get("dataset"),
        trained.get("split_seed", 0),
        card.choices,
        trained or _data_config_from_image_spec(card.image),
        card.structure,
        card.parameters,
    )


def _data_config_from_image_spec(image: ImageSpec | None) -> dict:
    """An export without a training config (made elsewhere): its image folder's evaluation transform,
    as its image spec records it."""
    if image is None or image.resize is None:
        return {}
    return {"dataset": "imagefolder", "image_size": image.size[0], "resize": image.resize}


def _image_folder_config(job: EvaluationJob, measured: _Measured) -> DataConfig:
    """The trained image folder's data config, read from `job.data_root`: the same evaluation transform
    (size, resize) and, without val/, the same held-out validation pictures (split_seed)."""
    trained = measured.data_config
    if trained.get("dataset") != "imagefolder":
        raise EvaluationError(
            f"--data imagefolder: {job.source} does not record how its pictures were prepared "
            "(no imagefolder data config and no resize/crop in its image spec)"
        )
    try:
        return DataConfig.model_validate(trained | {"root": job.data_root})
    except ValidationError as err:
        raise EvaluationError(f"{job.source}: its recorded data config is not usable: {err}") from None


def _ood_inputs(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    try:
        ood_x = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise EvaluationError(f"--ood: cannot read {path} as a .npy array ({err})") from None
    if ood_x.ndim != len(input_shape) + 1 or ood_x.shape[1:] != input_shape or ood_x.dtype.kind not in "fiu":
        raise EvaluationError(
            f"--ood: expected numbers shaped [n, {', '.join(map(str, input_shape))}] in the "
            f"model's raw input space, got {ood_x.dtype} {list(ood_x.shape)}"
        )
    ood_x, finite = finite_float32_rows(np.asarray(ood_x))
    if not finite.all():
        raise EvaluationError(f"--ood: {NOT_FINITE} in row(s) {np.flatnonzero(~finite)[:10].tolist()}")
    return ood_x


def evaluate_job(job: EvaluationJob, on_set: Callable[[str], None] | None = None) -> Evaluation:
    """`forde evaluate`: measure a run folder (torch) or an exported NAME.onnx (the serving runtime)
    on the test split of the data it was trained on, clean and corrupted (digits-C; CIFAR-10/100-C
    from `corrupted_root`, default `data_root`; an image folder's test/ through the RGB suite of
    `training.corruptions`); `on_set(name)` after each set.

    `split="validation"` measures the validation split instead (digits and image folders, whose
    suites corrupt any split), for choosing settings without looking at the test split."""
    measured = _measured(Path(job.source))
    if measured.trained_on is not None and measured.trained_on != job.data:
        raise EvaluationError(f"--data: {job.source} was trained on {measured.trained_on}, got {job.data!r}")
    if job.split not in ("test", "validation"):
        raise EvaluationError(f"--split: expected test or validation, got {job.split!r}")
    if job.split == "validation" and job.data not in ("digits", "imagefolder"):
        raise EvaluationError("--split validation: CIFAR-C corrupts the test split only; evaluate the test split")
    if job.data != "digits" and not job.data_root:
        raise EvaluationError(f"--data-root: {job.data} is read from a local folder; give the folder holding it")
    if job.data == "imagefolder":
        dataset = load_dataset(_image_folder_config(job, measured), for_training=False)
    else:
        dataset = load_dataset(
            DataConfig(dataset=job.data, root=job.data_root, augment=False, split_seed=measured.split_seed)
        )
    if job.split == "test" and dataset.test is None:
        raise EvaluationError(
            f"--split test: {job.data_root} has no test split (no test/ folder of class folders); add one, "
            "or measure the validation split with --split validation"
        )
    chosen = dataset.test if job.split == "test" else dataset.val
    x, y = chosen.x.numpy(), chosen.y.numpy()
    choices = measured.choices
    if choices is None:  # a run folder: chosen on its validation split, as `forde export` does
        choices = choose_on_validation(
            measured.predictor.member_logits(dataset.val.x.numpy()), dataset.val.y.numpy(), target_risk=job.target_risk
        )
    if job.data == "digits":
        corrupted = ((name, severity, xc, y) for name, severity, xc in corrupted_versions(x, job.seed, 0.0, 16.0))
        suite = f"digits-C (seed {job.seed})"
    elif job.data == "imagefolder":
        rows = slice(None, job.per_severity)
        corrupted = (
            (name, severity, xc.numpy(), y[rows])
            for name, severity, xc in rgb_corruptions.corrupted_versions(torch.from_numpy(x[rows]), job.seed)
        )
        suite = f"the RGB corruption suite (training/corruptions.py, seed {job.seed})"
    else:
        corrupted = load_corrupted_cifar(job.data, job.corrupted_root or job.data_root, job.per_severity)
        corrupted = itertools.chain([next(corrupted)], corrupted)  # a missing folder fails here, before any work
        suite = "CIFAR-10-C" if job.data == "cifar10" else "CIFAR-100-C"
    ood_x = None if job.ood is None else _ood_inputs(Path(job.ood), tuple(x.shape[1:]))
    evaluation = evaluate(
        measured.predictor,
        x,
        y,
        corrupted,
        choices=choices,
        ood_x=ood_x,
        gradient_rows=job.gradient_rows,
        on_set=on_set,
    )
    evaluation.metrics["source"] = {
        "name": Path(job.source).name,
        "path": str(job.source),
        "method": measured.method,
        "structure": measured.structure,
        "members": measured.members,
        "engine": measured.engine,
        "data": f"{job.data} {job.split} split + {suite}",
    }
    evaluation.metrics["inputs"] = int(len(x))
    evaluation.metrics["parameters"] = measured.parameters
    if isinstance(measured.predictor, TorchPredictor) and "diversity" in evaluation.metrics:
        entries, evaluation.trajectory = run_diagnostics(Path(job.source), measured.predictor.ensemble)
        evaluation.metrics["diversity"] |= entries
    return evaluation
