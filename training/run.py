"""A training run folder: what it holds, and how to write and read it.

    config.json               the resolved TrainConfig (rebuilds the model from the folder alone)
    dataset.json              dataset name, class names, input shape, normalization statistics
    pca.safetensors           PCA basis of the normalized training inputs (FoRDE with pca/pca_centred/tuned),
                              metadata `centred` says which second moment it decomposes
    checkpoint.safetensors    weights + optimizer + RNG state after the last finished epoch
    train_log.jsonl           one JSON line per finished epoch
    members.safetensors       final member weights, stacked [M, ...] per tensor
    metrics.json              clean test metrics (docs/design.md section 3)

Everything tensor-valued is safetensors: nothing in a run folder is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from forde_serve._io import atomic_path, atomic_write_text
from forde_serve.contract import ImageSpec
from forde_serve.errors import FordeError
from training.config import ConfigError, TrainConfig, load_config, with_overrides
from training.data import IMAGE_SPECS, INPUT_SPACES, Dataset
from training.forde import PCABasis
from training.models import Ensemble, build_ensemble

__all__ = ["DatasetInfo", "LoadedRun", "RunError", "RunPlan", "check_run_dir", "load_run", "plan_run", "write_weights"]

CONFIG, DATASET, PCA = "config.json", "dataset.json", "pca.safetensors"
CHECKPOINT, LOG, WEIGHTS, METRICS = "checkpoint.safetensors", "train_log.jsonl", "members.safetensors", "metrics.json"


class RunError(FordeError, ValueError):
    """A run folder that is incomplete or corrupt; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a run was trained on, as far as the model and its export need to know."""

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_space: str  # what one raw input is, in words
    image: ImageSpec | None  # how an uploaded picture becomes one raw input; None: inputs are not pictures

    @classmethod
    def of(cls, data: Dataset) -> DatasetInfo:
        return cls(data.name, data.class_names, data.input_shape, data.mean, data.std, data.input_space, data.image)

    def write(self, run_dir: Path) -> None:
        data = asdict(self) | {"image": None if self.image is None else self.image.to_metadata()}
        atomic_write_text(run_dir / DATASET, json.dumps(data, indent=2))

    @classmethod
    def read(cls, run_dir: Path) -> DatasetInfo:
        path = run_dir / DATASET
        try:
            raw = json.loads(path.read_text())
            return cls(
                raw["name"],
                tuple(raw["class_names"]),
                tuple(raw["input_shape"]),
                tuple(raw["mean"]),
                tuple(raw["std"]),
                # run folders written before these keys existed: the dataset's own
                raw.get("input_space") or INPUT_SPACES[raw["name"]],
                _image(raw["image"]) if "image" in raw else IMAGE_SPECS.get(raw["name"]),
            )
        except FileNotFoundError:
            raise RunError(f"{run_dir} is not a complete training run: {DATASET} is missing") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise RunError(f"{path} is broken ({err!r}); re-run training to regenerate it") from None


def _image(value: dict | None) -> ImageSpec | None:
    return None if value is None else ImageSpec.from_metadata(value)


def new_ensemble(config: TrainConfig, info: DatasetInfo, load_init: bool = False) -> Ensemble:
    """The run's ensemble, freshly built; `load_init`: start the members from `model.init` (a new run)."""
    model = config.model
    return build_ensemble(
        model.arch,
        config.ensemble.members,
        info.input_shape,
        len(info.class_names),
        info.mean,
        info.std,
        width=model.width,
        depth=model.depth,
        kwargs=model.kwargs,
        factory=model.factory,
        init=model.init if load_init else None,
        structure=config.ensemble.structure,
        embedded=config.embedded,
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
    """The basis, with which second moment it decomposes (metadata `centred`: "true" or "false")."""
    tensors = {"eigenvectors": pca.eigenvectors, "eigenvalues": pca.eigenvalues}
    write_tensors(run_dir / PCA, tensors, {"centred": "true" if pca.centred else "false"})


def read_pca(run_dir: Path) -> PCABasis:
    """The run's basis. A file without the `centred` record was written when every basis was centred."""
    tensors = read_tensors(run_dir / PCA)
    with safe_open(str(run_dir / PCA), "pt") as f:
        centred = (f.metadata() or {}).get("centred", "true")
    if centred not in ("true", "false"):
        raise RunError(f"{run_dir / PCA}: metadata 'centred' must be true or false, got {centred!r}")
    return PCABasis(tensors["eigenvectors"], tensors["eigenvalues"], centred=centred == "true")


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


@dataclass(frozen=True)
class RunPlan:
    """What `forde train` will do: train `config` into `run_dir`, from scratch or resuming it."""

    config: TrainConfig
    run_dir: Path
    resume: bool


def plan_run(
    config: str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    **overrides,
) -> RunPlan:
    """A new run from a config file (with `overrides`: method, members, structure, epochs, seed, device), or the
    continuation of a killed run with its own resolved config (only the device may change)."""
    if resume is not None:
        changed = [name for name, value in overrides.items() if value is not None and name != "device"]
        if config is not None or out is not None or changed:
            raise ConfigError(
                "--resume continues a run with its own config: give only the run folder (and optionally --device)"
            )
        run_dir = Path(resume)
        _require_run_folder(run_dir)
        return RunPlan(with_overrides(load_config(run_dir / CONFIG), device=overrides.get("device")), run_dir, True)
    if config is None:
        raise ConfigError("missing CONFIG: give a TOML config (e.g. training/configs/digits.toml) or --resume RUN")
    resolved = with_overrides(load_config(config), **overrides)
    ensemble = resolved.ensemble
    structure = "" if ensemble.structure == "independent" else f"-{ensemble.structure}"
    run_dir = (
        Path(out)
        if out is not None
        else Path("runs") / f"{Path(config).stem}-{ensemble.method}{structure}-seed{resolved.seed}"
    )
    return RunPlan(resolved, run_dir, False)


def _require_run_folder(run_dir: Path) -> None:
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"--resume {run_dir}: not a training run folder ({CONFIG} is missing)")


def check_run_dir(config: TrainConfig, run_dir: Path, resume: bool, processes: int = 1) -> None:
    """Raise RunError if `run_dir` cannot take this run (nothing is written)."""
    if config.ensemble.method == "forde" and config.forde.batch and processes > 1:
        raise RunError(
            "forde.batch (repulsion on a subset of each batch) is not supported with several "
            "processes yet; remove it from the config or train in one process"
        )
    if resume:
        _require_run_folder(run_dir)
    elif (run_dir / CHECKPOINT).exists() or (run_dir / WEIGHTS).exists():
        raise RunError(
            f"{run_dir} already holds a training run: continue it with `forde train --resume "
            f"{run_dir}` or choose another --out"
        )
