"""Metrics of a torch ensemble with forde_serve's numpy maths: the clean split after training, and
`forde evaluate` (robustness reports) for run folders and exported files."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from forde_serve.metrics import classification_metrics, gradient_cosine_distance
from training.ensemble import Ensemble
from training.forde import member_input_gradients

__all__ = [
    "EvaluationError",
    "TorchPredictor",
    "clean_metrics",
    "evaluate_source",
    "member_probabilities",
    "predicted_class_input_gradients",
]


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


def clean_metrics(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """accuracy, nll, ece, brier, mutual_information and gradient_cosine_distance on one split."""
    was_training = ensemble.training
    ensemble.eval()
    metrics = classification_metrics(member_probabilities(ensemble, x), y.numpy())
    if ensemble.members > 1:
        metrics["gradient_cosine_distance"] = gradient_cosine_distance(predicted_class_input_gradients(ensemble, x))
    ensemble.train(was_training)
    return metrics


class TorchPredictor:
    """A torch ensemble (from a run folder) as `forde_serve.evaluation` measures it."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble.eval()
        self.members = ensemble.members

    def member_probs(self, x: np.ndarray) -> np.ndarray:
        return member_probabilities(self.ensemble, torch.from_numpy(np.ascontiguousarray(x)))

    def input_gradients(self, x: np.ndarray) -> np.ndarray:
        return predicted_class_input_gradients(self.ensemble, torch.from_numpy(np.ascontiguousarray(x)))


class EvaluationError(ValueError):
    """A source, dataset or OOD file that cannot be evaluated together; the message says why."""


def evaluate_source(
    source: str | Path,
    data: str,
    data_root: str | None = None,
    corrupted_root: str | None = None,
    ood: str | Path | None = None,
    seed: int = 0,
    per_severity: int | None = None,
    gradient_rows: int = 1000,
    target_risk: float = 0.01,
    split: str = "test",
    on_set=None,
):
    """`forde evaluate`: measure a run folder (torch) or an exported NAME.onnx (the serving runtime)
    on the test split of the data it was trained on, clean and corrupted (digits-C, or
    CIFAR-10/100-C from `corrupted_root`, default `data_root`). Returns a forde_serve Evaluation.

    `split="validation"` measures the validation split instead (digits only: digits-C corrupts any
    split), for choosing settings without looking at the test split."""
    from forde_serve.corruptions import corrupted_versions
    from forde_serve.evaluation import RuntimePredictor, evaluate
    from forde_serve.runtime import NOT_FINITE, EnsembleRuntime, finite_float32_rows
    from training.config import DataConfig
    from training.data import load_corrupted_cifar, load_dataset
    from training.export import validation_abstention
    from training.run import load_run

    source = Path(source)
    if not source.exists():
        raise EvaluationError(f"{source} does not exist: give a training run folder or an exported NAME.onnx")
    if source.is_dir():
        run = load_run(source)
        trained_dataset, split_seed = run.config.data.dataset, run.config.data.split_seed
        method, members = run.config.ensemble.method, run.ensemble.members
        predictor, engine = TorchPredictor(run.ensemble), "the PyTorch ensemble (run folder)"
        threshold = None
    else:
        runtime = EnsembleRuntime(source)
        card = runtime.card
        trained = card.training_config.get("data") or {}
        trained_dataset, split_seed = trained.get("dataset"), trained.get("split_seed", 0)
        method, members = card.method, card.members
        predictor, engine = RuntimePredictor(runtime), "the exported ONNX file (onnxruntime, as served)"
        threshold = card.abstain_threshold
    if trained_dataset is not None and trained_dataset != data:
        raise EvaluationError(f"--data: {source} was trained on {trained_dataset}, got {data!r}")
    if split not in ("test", "validation"):
        raise EvaluationError(f"--split: expected test or validation, got {split!r}")
    if split == "validation" and data != "digits":
        raise EvaluationError("--split validation: CIFAR-C corrupts the test split only; evaluate the test split")
    if data != "digits" and not data_root:
        raise EvaluationError(f"--data-root: {data} is read from a local folder; give the folder holding it")
    dataset = load_dataset(DataConfig(dataset=data, root=data_root, augment=False, split_seed=split_seed))
    chosen = dataset.test if split == "test" else dataset.val
    x, y = chosen.x.numpy(), chosen.y.numpy()
    if threshold is None:  # a run folder: chosen on its validation split, as `forde export` does
        threshold = validation_abstention(
            predictor.member_probs(dataset.val.x.numpy()), dataset.val.y.numpy(), target_risk
        )["threshold"]
    if data == "digits":
        corrupted = ((name, severity, xc, y) for name, severity, xc in corrupted_versions(x, seed, 0.0, 16.0))
        suite = f"digits-C (seed {seed})"
    else:
        corrupted = load_corrupted_cifar(data, corrupted_root or data_root, per_severity)
        corrupted = itertools.chain([next(corrupted)], corrupted)  # a missing folder fails here, before any work
        suite = "CIFAR-10-C" if data == "cifar10" else "CIFAR-100-C"
    ood_x = None
    if ood is not None:
        try:
            ood_x = np.load(ood, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise EvaluationError(f"--ood: cannot read {ood} as a .npy array ({err})") from None
        if ood_x.ndim != x.ndim or ood_x.shape[1:] != x.shape[1:] or ood_x.dtype.kind not in "fiu":
            raise EvaluationError(
                f"--ood: expected numbers shaped [n, {', '.join(map(str, x.shape[1:]))}] in the "
                f"model's raw input space, got {ood_x.dtype} {list(ood_x.shape)}"
            )
        ood_x, finite = finite_float32_rows(np.asarray(ood_x))
        if not finite.all():
            raise EvaluationError(f"--ood: {NOT_FINITE} in row(s) {np.flatnonzero(~finite)[:10].tolist()}")
    evaluation = evaluate(
        predictor, x, y, corrupted, abstain_threshold=threshold, ood_x=ood_x, gradient_rows=gradient_rows, on_set=on_set
    )
    evaluation.metrics["source"] = {
        "name": source.name,
        "path": str(source),
        "method": method,
        "members": members,
        "engine": engine,
        "data": f"{data} {split} split + {suite}",
    }
    evaluation.metrics["inputs"] = int(len(x))
    return evaluation
