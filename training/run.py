"""A training run folder: what it holds, and how to write and read it.

    config.json               the resolved TrainConfig (rebuilds the model from the folder alone)
    dataset.json              dataset name, class names, input shape, normalization statistics
    pca.safetensors           PCA basis of the normalized training inputs (FoRDE with pca/tuned)
    checkpoint.safetensors    weights + optimizer + RNG state after the last finished epoch
    train_log.jsonl           one JSON line per finished epoch
    members.safetensors       final member weights, stacked [M, ...] per tensor
    metrics.json              clean test metrics (DESIGN.md section 5)

Everything tensor-valued is safetensors: nothing in a run folder is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from forde_serve._io import atomic_path, atomic_write_text
from training.config import ConfigError, TrainConfig, load_config
from training.ensemble import Ensemble, build_ensemble
from training.forde import PCABasis

__all__ = ["DatasetInfo", "LoadedRun", "RunError", "load_run", "write_weights"]

CONFIG, DATASET, PCA = "config.json", "dataset.json", "pca.safetensors"
CHECKPOINT, LOG, WEIGHTS, METRICS = "checkpoint.safetensors", "train_log.jsonl", "members.safetensors", "metrics.json"


class RunError(ValueError):
    """A run folder that is incomplete or corrupt; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def write(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / DATASET, json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, run_dir: Path) -> DatasetInfo:
        path = run_dir / DATASET
        try:
            raw = json.loads(path.read_text())
            return cls(
                raw["name"], tuple(raw["class_names"]), tuple(raw["input_shape"]), tuple(raw["mean"]), tuple(raw["std"])
            )
        except FileNotFoundError:
            raise RunError(f"{run_dir} is not a complete training run: {DATASET} is missing") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunError(f"{path} is broken ({err!r}); re-run training to regenerate it") from None


def new_ensemble(config: TrainConfig, info: DatasetInfo) -> Ensemble:
    return build_ensemble(
        config.model.arch,
        config.ensemble.members,
        info.input_shape,
        len(info.class_names),
        info.mean,
        info.std,
        width=config.model.width,
        depth=config.model.depth,
    )


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunError(f"{path.parent} is not a complete training run: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RunError(f"{path} is not a readable safetensors file ({err})") from None


def write_weights(run_dir: Path, ensemble: Ensemble) -> None:
    write_tensors(run_dir / WEIGHTS, ensemble.state_dict(), {"members": str(ensemble.members)})


def write_pca(run_dir: Path, pca: PCABasis) -> None:
    write_tensors(run_dir / PCA, {"eigenvectors": pca.eigenvectors, "eigenvalues": pca.eigenvalues})


def read_pca(run_dir: Path) -> PCABasis:
    tensors = read_tensors(run_dir / PCA)
    return PCABasis(tensors["eigenvectors"], tensors["eigenvalues"])


@dataclass(frozen=True)
class LoadedRun:
    config: TrainConfig
    dataset: DatasetInfo
    ensemble: Ensemble  # in eval mode, on the CPU
    metrics: dict


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run's ensemble from its folder; a missing or broken file is named."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"training run {str(run_dir)!r} does not exist")
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"{run_dir} is not a training run: {CONFIG} is missing")
    try:
        config = load_config(run_dir / CONFIG)
    except ConfigError as err:
        raise RunError(f"{CONFIG} is broken: {err}") from None
    info = DatasetInfo.read(run_dir)
    if not (run_dir / WEIGHTS).is_file():
        raise RunError(f"{run_dir} has no {WEIGHTS}: training did not finish (continue it with --resume)")
    ensemble = new_ensemble(config, info)
    state = read_tensors(run_dir / WEIGHTS)
    try:
        ensemble.load_state_dict(state)
    except RuntimeError as err:
        raise RunError(f"{run_dir / WEIGHTS} does not match the model in {CONFIG}: {err}") from None
    try:
        metrics = json.loads((run_dir / METRICS).read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir} has no {METRICS}: training did not finish (continue it with --resume)") from None
    except json.JSONDecodeError as err:
        raise RunError(f"{run_dir / METRICS} is broken: {err}") from None
    return LoadedRun(config, info, ensemble.eval(), metrics)
