"""Clean-split metrics of a torch ensemble, computed with forde_serve's numpy metrics."""

from __future__ import annotations

import numpy as np
import torch

from forde_serve.metrics import classification_metrics, gradient_cosine_distance
from training.ensemble import Ensemble
from training.forde import member_input_gradients

__all__ = ["clean_metrics", "member_probabilities", "predicted_class_input_gradients"]


@torch.no_grad()
def member_probabilities(ensemble: Ensemble, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax of every member, `[N, M, C]`, for raw inputs `x` `[N, *input_shape]`."""
    device = next(ensemble.parameters()).device
    chunks = [ensemble(x[i:i + batch_size].to(device)).softmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).double().numpy()


def predicted_class_input_gradients(ensemble: Ensemble, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Each member's gradient of the ensemble-predicted class logit w.r.t. the RAW input, `[N, M, *input_shape]`."""
    device = next(ensemble.parameters()).device
    chunks = []
    for i in range(0, len(x), batch_size):
        _, grads = member_input_gradients(ensemble, ensemble.normalize(x[i:i + batch_size].to(device)))
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
