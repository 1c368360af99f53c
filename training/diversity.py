"""Loss-landscape diagnostics that need the torch ensemble (Fort, Hu, Lakshminarayanan 2019, "Deep
ensembles: a loss landscape perspective"); the numpy measures on predictions are `forde_serve.diversity`.

- Weight cosine similarity between members: each member's Conv2d / Linear weights flattened into one
  vector (biases and normalization parameters excluded), cos = <w_i, w_j> / (|w_i| |w_j|). An embedded
  member's weights are its folded ones, diag(r_a) W diag(s_a).
- Trajectories: every member's softmax on a fixed probe set of `PROBE_ROWS` inputs, recorded by the
  trainer before the first epoch and after each one (`trajectory.safetensors` in the run folder),
  stacked `[members x frames, probe x classes]` and projected by a 2-component t-SNE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from training import run as run_files
from training.data import Dataset
from training.models import Ensemble, folded_ensemble
from training.models.layers import FusedConv2d, FusedLinear

__all__ = [
    "PROBE_ROWS",
    "TRAJECTORY",
    "Trajectory",
    "member_weight_vectors",
    "probe_inputs",
    "probe_probabilities",
    "read_trajectory",
    "run_diagnostics",
    "trajectory_tsne",
    "weight_cosine_similarity",
    "write_trajectory",
]

PROBE_ROWS = 64  # probe inputs: 64 x 10 classes x 4 bytes per member and epoch (2.5 kB), so the file stays small
TRAJECTORY = "trajectory.safetensors"


def member_weight_vectors(ensemble: Ensemble) -> torch.Tensor:
    """`[M, P]`: every member's Conv2d and Linear weights flattened (biases excluded), float64."""
    body = folded_ensemble(ensemble).body
    parts = [m.weight.detach().flatten(1) for m in body.modules() if isinstance(m, (FusedConv2d, FusedLinear))]
    if not parts:
        raise ValueError("weight cosine similarity: the members have no Conv2d or Linear weights")
    return torch.cat(parts, dim=1).double().cpu()


def weight_cosine_similarity(ensemble: Ensemble) -> np.ndarray:
    """`[M, M]` cosine similarity of the members' flattened weights (ones on the diagonal)."""
    weights = member_weight_vectors(ensemble)
    unit = weights / weights.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ unit.T).numpy()


def probe_inputs(data: Dataset) -> tuple[torch.Tensor, str]:
    """The fixed probe set: the first PROBE_ROWS raw inputs of the test split (the validation split
    where there is none), and that split's name."""
    split, name = (data.test, "test") if data.test is not None else (data.val, "validation")
    return split.x[:PROBE_ROWS], name


@torch.no_grad()
def probe_probabilities(ensemble: Ensemble, probe: torch.Tensor) -> torch.Tensor:
    """Every member's softmax on the probe inputs in eval mode, `[M, P, C]` float32 on the CPU."""
    was_training = ensemble.training
    ensemble.eval()
    device = next(ensemble.parameters()).device
    probs = ensemble(probe.to(device)).softmax(-1).transpose(0, 1).float().cpu()
    ensemble.train(was_training)
    return probs


def write_trajectory(run_dir: Path, frames: list[torch.Tensor], split: str) -> None:
    """`frames` (one `[M, P, C]` per recording, the first before training) as `probs` `[F, M, P, C]`."""
    run_files.write_tensors(run_dir / TRAJECTORY, {"probs": torch.stack(frames)}, {"split": split})


@dataclass(frozen=True)
class Trajectory:
    """A run's recorded member probabilities: `probs` `[frames, M, P, C]` (frame 0 before training,
    frame e after epoch e) on the first P inputs of `split`."""

    probs: np.ndarray
    split: str


def read_trajectory(run_dir: Path, frames: int | None = None) -> Trajectory | None:
    """The run's trajectory (its first `frames` recordings), or None for a run written before they were kept."""
    path = Path(run_dir) / TRAJECTORY
    if not path.is_file():
        return None
    probs = run_files.read_tensors(path)["probs"]
    with safe_open(str(path), "pt") as f:
        split = (f.metadata() or {}).get("split", "test")
    return Trajectory(probs[:frames].numpy(), split)


def trajectory_tsne(probs: np.ndarray, seed: int = 0) -> np.ndarray:
    """`[frames, M, P, C]` -> `[M, frames, 2]`: scikit-learn's t-SNE of the stacked `[M * frames, P * C]`."""
    from sklearn.manifold import TSNE

    frames, members = probs.shape[:2]
    points = probs.transpose(1, 0, 2, 3).reshape(members * frames, -1).astype(np.float64)
    # Perplexity must stay below the number of points; 30 (scikit-learn's default) for long runs.
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return embedded.reshape(members, frames, 2)


def run_diagnostics(run_dir: Path, ensemble: Ensemble) -> tuple[dict, np.ndarray | None]:
    """What only a run folder can tell: the members' weight cosine similarity `[M, M]` and, where the
    trainer kept them, their trajectories' t-SNE `[M, frames, 2]`; returns (the entries for the
    evaluation's `diversity` block, the t-SNE or None)."""
    entries: dict = {"weight_cosine_similarity": weight_cosine_similarity(ensemble).tolist()}
    trajectory = read_trajectory(run_dir)
    if trajectory is None or len(trajectory.probs) < 2:
        return entries, None
    frames, _, rows, _ = trajectory.probs.shape
    entries["trajectory"] = {"frames": frames, "probe_rows": rows, "split": trajectory.split}
    return entries, trajectory_tsne(trajectory.probs)
