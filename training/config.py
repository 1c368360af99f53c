"""Training configuration: one frozen pydantic model per TOML section, validated at load.

A config file is read once (`load_config`), command-line overrides are applied
(`with_overrides`), and the resolved config is written into the run folder, so a
run can be rebuilt from its folder alone.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forde_serve.contract import STRUCTURES
from forde_serve.errors import FordeError

__all__ = [
    "BUILTIN_ARCHITECTURES",
    "DATASET_NAMES",
    "FACTORY",
    "STRUCTURES",
    "TORCHVISION",
    "ConfigError",
    "TrainConfig",
    "check_model",
    "load_config",
    "with_overrides",
]


class ConfigError(FordeError, ValueError):
    """A config file or override that cannot be used; the message names the field."""


BUILTIN_ARCHITECTURES = ("mlp", "cnn", "resnet18", "preact_resnet18")
# The datasets `data.dataset` may name; `training.data.DATASETS` maps each to its loader.
DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder")
TORCHVISION = "torchvision:"  # model.arch = "torchvision:NAME": a torchvision classification builder
FACTORY = "factory"  # model.arch = "factory": model.factory = "package.module:function"


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def check_model(arch: str, kwargs: Mapping[str, Any] | None = None, factory: str | None = None) -> None:
    """Raise ConfigError unless `arch` (with `kwargs`, `factory`) names a member this package can build.

    Checked here, at load, so a bad name stops a run before anything is built; torchvision is
    imported only for a torchvision:NAME."""
    kwargs = kwargs or {}
    if arch == FACTORY:
        if not factory:
            raise ConfigError('model.arch "factory" needs model.factory = "package.module:function"')
        module, _, function = factory.partition(":")
        if not module or not function or not all(part.isidentifier() for part in (*module.split("."), function)):
            raise ConfigError(f'model.factory: expected "package.module:function", got {factory!r}')
    elif factory:
        raise ConfigError(f'model.factory is given, so model.arch must be "factory" (or left out), got {arch!r}')
    elif arch.startswith(TORCHVISION):
        name, names = arch[len(TORCHVISION) :], _torchvision_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(TORCHVISION + c for c in close)}" if close else "none is close"
            raise ConfigError(
                f"model.arch: {name!r} is not a torchvision classifier ({hint}; all: torchvision.models.list_models())"
            )
    elif arch not in BUILTIN_ARCHITECTURES:
        raise ConfigError(
            f"model.arch: expected one of {', '.join(BUILTIN_ARCHITECTURES)}, torchvision:NAME or factory, got {arch!r}"
        )
    elif kwargs:
        takes = {"mlp": "model.width and model.depth", "cnn": "model.width"}.get(arch, "no arguments (fixed widths)")
        raise ConfigError(f"model.kwargs: the built-in {arch!r} takes {takes}, not kwargs, got {sorted(kwargs)}")
    if "weights" in kwargs:
        raise ConfigError(
            "model.kwargs.weights: nothing is downloaded; start the members from a local file with model.init = PATH"
        )
    if "num_classes" in kwargs:
        raise ConfigError("model.kwargs.num_classes: the class count comes from the data, leave it out")


def _ignored_keys(arch: str) -> tuple[str, ...]:
    """The keys of `model.width` and `model.depth` that `arch` does not read: the mlp reads both, the cnn
    its width (its depth is fixed), the ResNets neither (fixed widths), nor the builders (torchvision:NAME,
    factory), which take their own arguments in model.kwargs."""
    return {"mlp": (), "cnn": ("depth",)}.get(arch, ("width", "depth"))


def _what_reads(arch: str, key: str) -> str:
    if arch.startswith(TORCHVISION) or arch == FACTORY:
        return "a builder takes its arguments in model.kwargs"
    return "only the mlp reads it" if key == "depth" else "only the mlp and the cnn read it"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    # mlp | cnn | resnet18 | preact_resnet18 | torchvision:NAME (any torchvision classifier) | factory
    arch: str = "cnn"
    # Only for the architectures that read them (`_ignored_keys`); given for another one, they are refused.
    width: int = Field(32, gt=0)  # channels of the first conv (cnn) or hidden units (mlp)
    depth: int = Field(2, gt=0)  # hidden layers of the mlp
    kwargs: dict[str, Any] = {}  # torchvision:NAME and factory: the builder's keyword arguments
    factory: str | None = None  # "package.module:function", called as function(num_classes, **kwargs)
    init: str | None = None  # one member's weights (.safetensors, .pt, .pth) every member starts from

    @model_validator(mode="before")
    @classmethod
    def _factory_sets_arch(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("factory") and "arch" not in data:
            return {**data, "arch": "factory"}
        return data

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        check_model(self.arch, self.kwargs, self.factory)
        # Only keys the config gives: the defaults of width and depth sit in every config, read or not. (A run
        # folder's resolved config gives every key; `load_config` drops those its arch ignores.)
        given = [key for key in _ignored_keys(self.arch) if key in self.model_fields_set]
        if given:
            key = given[0]
            raise ValueError(
                f"model.{key}: expected none for arch {self.arch!r}, which ignores it ({_what_reads(self.arch, key)}), "
                f"got {getattr(self, key)}: remove it"
            )
        if self.init is not None and not self.init.endswith((".safetensors", ".pt", ".pth")):
            raise ValueError(f"model.init: expected a .safetensors, .pt or .pth file of weights, got {self.init!r}")
        return self


class DataConfig(_Section):
    dataset: Literal[DATASET_NAMES] = "digits"
    # CIFAR: the folder holding it in torchvision's layout; imagefolder: the folder holding
    # train/<class>/ pictures (and optionally val/ and test/); unused for digits
    root: str | None = None
    augment: bool = True  # CIFAR: random crop (padding 4) + flip; imagefolder: random resized crop + flip
    split_seed: int = 0  # the fixed splits: digits' 70/10/20, CIFAR's and imagefolder's held-out validation
    # imagefolder only (the others have fixed input sizes and statistics):
    image_size: int | None = Field(None, ge=8, le=1024)  # S: the model's input is RGB [3, S, S] in [0, 1]
    # Shorter side before the centre crop; default round(S * 8 / 7), the 256 -> 224 ratio of the
    # ImageNet evaluation transform, so the crop keeps the central 7/8 of the picture.
    resize: int | None = Field(None, ge=8)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (torchvision's default)
    flip: bool = True  # random horizontal flips when augmenting
    mean: tuple[float, float, float] | None = None  # per channel, raw [0, 1] space; default: of the train split
    std: tuple[float, float, float] | None = None
    workers: int = Field(0, ge=0)  # decoding processes (torch DataLoader); 0 decodes in the training process

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.dataset != "digits" and not self.root:
            raise ValueError(f"dataset {self.dataset!r} is read from a local folder: set data.root")
        if self.dataset != "imagefolder":
            given = [name for name in ("image_size", "resize", "mean", "std") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"data.{given[0]}: only an imagefolder dataset takes it ({self.dataset} has a fixed input), "
                    f"got {getattr(self, given[0])!r}"
                )
            return self
        if self.image_size is None:
            raise ValueError(
                "data.image_size: an imagefolder dataset needs the model's input size S "
                "(pictures become RGB [3, S, S]), got none"
            )
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(
                f"data.resize: expected at least data.image_size ({self.image_size}) so that the centre crop "
                f"fits, got {self.resize}"
            )
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"data.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {[low, high]}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std: give both (per-channel statistics) or neither, got one")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.std: expected three positive numbers, got {list(self.std)}")
        return self

    @property
    def resize_to(self) -> int | None:
        """imagefolder: the shorter side before the centre crop (`resize`, default round(S * 8 / 7))."""
        if self.image_size is None:
            return None
        return self.resize if self.resize is not None else round(self.image_size * 8 / 7)


# How the members are built (docs/design.md section 11; the names: forde_serve.contract.STRUCTURES),
# orthogonal to ensemble.method:
#   independent    M networks, each with its own weights (the fusion pass runs them as one module)
#   batchensemble  one shared set of weights; member a's layer weight is W o (r_a s_a^T), r_a and s_a trained
#   mc_dropout     one shared set of weights; member a has a fixed dropout mask on every layer's input channels
Structure = Literal[STRUCTURES]


class EnsembleConfig(_Section):
    method: Literal["forde", "de"] = "forde"  # de = deep ensemble, the repulsion switched off
    members: int = Field(8, ge=1, le=256)
    structure: Structure = "independent"  # independent | batchensemble | mc_dropout (see STRUCTURES)


class EmbeddedConfig(_Section):
    """Embedded ensembles (ensemble.structure batchensemble or mc_dropout); ignored for independent members."""

    # batchensemble: how r and s start. random_sign: +-1 at random (mean 0: members independent at
    # initialization); normal: N(1, 0.5) (mean 1: members positively correlated)
    init: Literal["random_sign", "normal"] = "random_sign"
    # gamma(M): the shared weights step by lr * gamma / M * (sum over members of their gradients), the
    # prior (weight decay) at full strength. 1: the independent regime (the mean gradient); "M": the
    # collective one (the sum). The modulations and per-member biases step by their own gradient.
    shared_grad_scale: Literal[1, "M"] = 1
    # The modulations' learning rate / optim.lr (no weight decay on them). Each r_i, s_j sums the gradient
    # of a whole row or column of W, so its step moves many weights at once: measured on digits (cnn
    # width 16, 15 epochs, seed 0), 0.5 diverged or stalled at 1 and 2 members and at width 64, 0.1 still
    # stalled at 1 member (0.49 accuracy); 0.02 trained everywhere tried (0.92-0.98).
    modulation_lr_ratio: float = Field(0.02, gt=0.0)
    # mc_dropout: a channel's chance to be kept in a member's fixed mask (kept ones scaled by 1 / keep_prob)
    keep_prob: float = Field(0.8, gt=0.0, lt=1.0)


class FordeConfig(_Section):
    # pca: PCA of the uncentred second moment X^T X / (n - 1) (the reference code); pca_centred: of the
    # covariance; identity; tuned: the pca basis with lengthscales mixed towards identity by alpha
    lengthscale: Literal["pca", "pca_centred", "identity", "tuned"] = "pca"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # tuned mix: 1 = pca, 0 = identity
    every: int = Field(1, ge=1)  # compute the repulsion every k-th step (paper's cost cut)
    batch: int | None = Field(None, ge=2)  # repulsion on the first N inputs of each batch (extra forward)
    eps: float = Field(1e-12, gt=0.0)  # added to ||u||^2 when normalizing onto the sphere
    # Multiplies R in the loss. 1 is the method as published (and the reference code); other
    # values are for studying how much the repulsion matters (BENCHMARKS.md, digits-C).
    strength: float = Field(1.0, gt=0.0)


class OptimConfig(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0.0)
    lr_ratio: float = Field(0.01, gt=0.0, le=1.0)  # final lr = lr_ratio * lr (from 90% of training)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)  # the Gaussian prior, added to the gradient


class TrainConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    forde: FordeConfig = FordeConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _forde_needs_two_members(self) -> TrainConfig:
        if self.ensemble.method == "forde" and self.ensemble.members < 2:
            raise ValueError(
                f"ensemble.members: FoRDE repels members from each other, so it needs at least 2, "
                f"got {self.ensemble.members}"
            )
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2)


_OVERRIDE_FIELDS = {
    "method": ("ensemble", "method"),
    "members": ("ensemble", "members"),
    "structure": ("ensemble", "structure"),
    "epochs": ("optim", "epochs"),
    "seed": (None, "seed"),
    "device": (None, "device"),
}


def _describe(error: ValidationError, source: str) -> str:
    """One actionable line per validation failure: field, what was expected, what came."""
    parts = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        elif err["type"] == "value_error":
            parts.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])
        else:
            parts.append(f"{field}: {err['msg'].lower()}, got {err.get('input')!r}")
    return f"{source}: " + "; ".join(parts)


def _validate(data: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def _resolved(data: Any) -> Any:
    """A run folder's resolved config (JSON) without the model keys its arch ignores: it gives every key,
    width and depth too (filled in with their defaults, or as an earlier version kept them), and they
    were no choice of the user's to refuse."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        return data
    ignored = _ignored_keys(model["arch"])
    return {**data, "model": {key: value for key, value in model.items() if key not in ignored}}


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training config, or a run folder's resolved JSON one (which gives every key:
    the keys its architecture ignores are dropped, not refused)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {err}") from None
    return _validate(_resolved(data) if path.suffix == ".json" else data, str(path))


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """Apply command-line overrides (`method`, `members`, `structure`, `epochs`, `seed`, `device`); None = keep."""
    # only what was given, so that the check of ignored keys sees what the user set, not every default
    data = config.model_dump(exclude_unset=True)
    for name, value in overrides.items():
        if value is None:
            continue
        section, field = _OVERRIDE_FIELDS[name]
        (data.setdefault(section, {}) if section else data)[field] = value
    return _validate(data, "command-line overrides")
