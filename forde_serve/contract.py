"""The contract of an exported ensemble: tensor names, the model card in its metadata, the output row.

An exported ensemble is a pair of ONNX files (`NAME.onnx` predict, `NAME.explain.onnx` explain);
everything a server needs travels in their `metadata_props`. The writers (`forde export`,
`forde fuse`) build a `ModelCard` and write `card.to_metadata(graph)`; every reader (the runtime,
the service, scoring, the /ui page, evaluation) gets it back with `ModelCard.from_metadata`. No
metadata key is spelled anywhere else, and `PREDICTION_FIELDS` is the one definition of the row
every answer (HTTP and `forde score`) is made of.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forde_serve.calibration import TemperatureFit
from forde_serve.conformal import ConformalCalibration
from forde_serve.errors import FordeError
from forde_serve.reference import MonitorReference

__all__ = [
    "EXPLAIN_OUTPUTS",
    "FORMAT_VERSION",
    "GRAPHS",
    "INPUT",
    "PREDICTION_FIELDS",
    "PREDICT_OUTPUTS",
    "STRUCTURES",
    "TARGET",
    "UNCERTAINTY",
    "Abstention",
    "ImageSpec",
    "ModelCard",
    "ModelFileError",
    "RowField",
    "ValidationChoices",
    "explain_path",
    "prediction_rows",
]

FORMAT_VERSION = "1"
GRAPHS = ("predict", "explain")  # NAME.onnx, NAME.explain.onnx
# How the members are built (docs/design.md section 11): independent networks, or embedded ones that
# share one set of weights (BatchEnsemble's rank-1 modulations, MC-dropout's fixed masks).
STRUCTURES = ("independent", "batchensemble", "mc_dropout")

INPUT = "input"  # float32 [batch, *input_shape], raw input space (normalization is in the graph)
TARGET = "target"  # int64 [batch], class whose input gradient to return; -1 = the ensemble's prediction

UNCERTAINTY = (
    "predictive_entropy",  # [batch] total uncertainty, nats
    "expected_entropy",  # [batch] aleatoric, nats
    "mutual_information",  # [batch] epistemic = total - aleatoric, nats
    "vote_disagreement",  # [batch] fraction of members whose top class differs from the ensemble's
)
PREDICT_OUTPUTS = (
    "probs",  # [batch, classes] mean of member softmaxes
    "member_logits",  # [batch, members, classes]
    "member_probs",  # [batch, members, classes]
    *UNCERTAINTY,
)
EXPLAIN_OUTPUTS = PREDICT_OUTPUTS + (
    "input_gradients",  # [batch, members, *input_shape] d member_logits[b, m, target_b] / d input[b]
)

# metadata_props of both files; values are strings, JSON where structured. Private: read and written
# only through ModelCard.
_KEY = {
    "format_version": "forde.format_version",
    "graph": "forde.graph",  # predict | explain
    "class_names": "forde.class_names",  # JSON list
    "input_shape": "forde.input_shape",  # JSON list, without the batch axis
    "input_space": "forde.input_space",  # what a raw input is, in words
    "image": "forde.image",  # JSON (ImageSpec) or null
    "members": "forde.members",
    "method": "forde.method",  # forde | de | external
    "kernel": "forde.kernel",  # JSON: lengthscale, alpha, every, batch, strength (FoRDE) or null
    "training_config": "forde.training_config",  # JSON: the resolved TrainConfig
    "metrics": "forde.metrics",  # JSON: the run's clean test metrics
    "abstain_threshold": "forde.abstain_threshold",  # abstain when mutual_information > this
    "abstain_target_risk": "forde.abstain_target_risk",
    "abstain_coverage": "forde.abstain_coverage",  # fraction of validation inputs accepted
    "abstain_validation_risk": "forde.abstain_validation_risk",  # error rate among them
    "calibration": "forde.calibration",  # JSON (TemperatureFit) or absent: T = 1
    "conformal": "forde.conformal",  # JSON (ConformalCalibration) or absent: no prediction sets
    "structure": "forde.structure",  # one of STRUCTURES; absent: independent
    "parameters": "forde.parameters",  # distinct trained parameters (shared weights once); absent: not recorded
    # JSON or absent (independent members: their grouped graph): the layout each graph of an embedded
    # ensemble was written in (native | folded), the provider it was measured on and the measurements
    "layout": "forde.layout",
    "shift_reference": "forde.shift_reference",  # JSON (MonitorReference) or absent: no label-free shift test
    "precision": "forde.precision",  # float32 (absent), int8 or fp16: the arithmetic of this file's graph
}
_REQUIRED = ("format_version", "class_names", "input_shape", "members", "method", "abstain_threshold")


class ModelFileError(FordeError, ValueError):
    """An exported file that cannot be served: missing, not ONNX, unknown format or broken metadata."""


def explain_path(predict_path: str) -> str:
    """`NAME.onnx` -> `NAME.explain.onnx`."""
    if not predict_path.endswith(".onnx") or predict_path.endswith(".explain.onnx"):
        raise ValueError(f"model path: expected NAME.onnx (the predict graph), got {predict_path!r}")
    return predict_path[: -len(".onnx")] + ".explain.onnx"


@dataclass(frozen=True)
class ImageSpec:
    """How an uploaded picture becomes one raw input `[channels, *size]`.

    The picture is converted to `mode`, then either resized to `size` as a whole, or (image folders,
    `resize` set) resized so its shorter side is `resize` and centre-cropped to `size`, as the model's
    evaluation transform did; pixel values (0..255) are inverted first when `invert`, then times `scale`.
    """

    mode: str  # "L" (one channel) or "RGB"
    size: tuple[int, int]  # (height, width) of the model's input
    scale: float  # raw value = pixel * scale
    invert: bool  # pixel -> 255 - pixel before scaling (the digits' ink is high)
    resize: int | None = None  # shorter side before the centre crop; None: resize the whole picture
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in ("L", "RGB"):
            raise ValueError(f"image.mode: expected 'L' or 'RGB', got {self.mode!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"image.size: expected [height, width] of positive integers, got {list(self.size)}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"image.scale: expected a positive number, got {self.scale!r}")
        if self.resize is not None and self.resize < max(self.size):
            raise ValueError(f"image.resize: expected at least the crop {list(self.size)}, got {self.resize}")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_metadata(self) -> dict:
        data = {"mode": self.mode, "size": list(self.size), "scale": self.scale, "invert": self.invert}
        if self.resize is not None:
            data |= {"resize": self.resize, "crop": list(self.size), "interpolation": self.interpolation}
        return data

    @classmethod
    def from_metadata(cls, data: Any) -> ImageSpec:
        if not isinstance(data, dict):
            raise ValueError(f"image: expected a JSON object or null, got {type(data).__name__}")
        known = {"mode", "size", "scale", "invert", "resize", "crop", "interpolation"}
        if set(data) - known or not {"mode", "size", "scale", "invert"} <= set(data):
            raise ValueError(
                f"image: expected the keys mode, size, scale, invert (and resize, crop), got {sorted(data)}"
            )
        if "crop" in data and list(data["crop"]) != list(data["size"]):
            raise ValueError(f"image.crop: expected the input size {data['size']}, got {data['crop']}")
        return cls(
            mode=data["mode"],
            size=tuple(data["size"]),
            scale=float(data["scale"]),
            invert=bool(data["invert"]),
            resize=None if data.get("resize") is None else int(data["resize"]),
            interpolation=data.get("interpolation", "bilinear"),
        )


@dataclass(frozen=True)
class Abstention:
    """The abstention rule: abstain when mutual information is above `threshold` (+inf: never),
    chosen on validation data to reach `target_risk`; there it accepted `coverage` of the inputs
    with error rate `validation_risk`."""

    threshold: float = math.inf
    target_risk: float | None = None
    coverage: float | None = None
    validation_risk: float | None = None

    def to_metadata(self) -> dict[str, str]:
        values = {
            "abstain_threshold": self.threshold,
            "abstain_target_risk": self.target_risk,
            "abstain_coverage": self.coverage,
            "abstain_validation_risk": self.validation_risk,
        }
        return {_KEY[k]: repr(float(v)) for k, v in values.items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Abstention:
        def number(key: str) -> float | None:
            return None if _KEY[key] not in meta else float(meta[_KEY[key]])

        return cls(
            threshold=float(meta[_KEY["abstain_threshold"]]),
            target_risk=number("abstain_target_risk"),
            coverage=number("abstain_coverage"),
            validation_risk=number("abstain_validation_risk"),
        )


@dataclass(frozen=True)
class ValidationChoices:
    """What held-out validation data decided, in this order: the temperature (None: T = 1), the conformal
    thresholds on the calibrated probabilities (None: no prediction sets), the abstention rule on their
    mutual information. The one shape used by the exporters, the runtime and evaluation."""

    temperature: TemperatureFit | None = None
    conformal: ConformalCalibration | None = None
    abstention: Abstention = field(default_factory=Abstention)
    # the validation split's uncertainty scores: what the served traffic's shift test compares with
    reference: MonitorReference | None = None
    # What the person exporting should know about these choices (a temperature refused, an abstention rule
    # that accepts almost nothing); said at export time, not stored in the file.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def temperature_value(self) -> float:
        """The temperature baked into the graphs: their `member_logits` are the raw logits divided by it."""
        return 1.0 if self.temperature is None else self.temperature.temperature

    @property
    def coverage_levels(self) -> tuple[float, ...]:
        """Coverage levels with stored conformal thresholds (empty: no prediction sets)."""
        return () if self.conformal is None else self.conformal.coverages

    def to_metadata(self) -> dict[str, str]:
        meta = self.abstention.to_metadata()
        if self.temperature is not None:
            meta[_KEY["calibration"]] = json.dumps(self.temperature.to_metadata())
        if self.conformal is not None:
            meta[_KEY["conformal"]] = json.dumps(self.conformal.to_metadata())
        if self.reference is not None:
            meta[_KEY["shift_reference"]] = json.dumps(self.reference.to_metadata())
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ValidationChoices:
        def parsed(key: str, kind):
            return None if _KEY[key] not in meta else kind.from_metadata(json.loads(meta[_KEY[key]]))

        return cls(
            temperature=parsed("calibration", TemperatureFit),
            conformal=parsed("conformal", ConformalCalibration),
            abstention=Abstention.from_metadata(meta),
            reference=parsed("shift_reference", MonitorReference),
        )


@dataclass(frozen=True)
class ModelCard:
    """What an exported file says about itself: the model, its inputs and what validation decided."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # one raw input, without the batch axis
    input_space: str  # what a raw input is, in words
    image: ImageSpec | None  # None: the model takes arrays, not pictures
    members: int
    method: str  # forde | de | external
    kernel: dict | None = None  # FoRDE's kernel settings
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the run's clean test metrics
    choices: ValidationChoices = field(default_factory=ValidationChoices)
    format_version: str = FORMAT_VERSION
    structure: str = "independent"  # one of STRUCTURES
    parameters: int | None = None  # distinct trained parameters; None: not recorded (files written before)
    layout: dict | None = None  # embedded ensembles: {"predict": native | folded, "explain": ..., ...}
    precision: str = "float32"  # this file's graph: float32, int8 (quantized) or fp16 (for the CUDA provider)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {', '.join(STRUCTURES)}, got {self.structure!r}")
        if self.parameters is not None and (isinstance(self.parameters, bool) or int(self.parameters) < 1):
            raise ValueError(f"parameters: expected a positive count, got {self.parameters!r}")

    # The choices, as most readers want them.
    @property
    def temperature(self) -> float:
        return self.choices.temperature_value

    @property
    def coverage_levels(self) -> tuple[float, ...]:
        return self.choices.coverage_levels

    @property
    def calibration(self) -> TemperatureFit | None:
        return self.choices.temperature

    @property
    def conformal(self) -> ConformalCalibration | None:
        return self.choices.conformal

    @property
    def abstain_threshold(self) -> float:
        return self.choices.abstention.threshold

    def to_metadata(self, graph: str) -> dict[str, str]:
        """The `metadata_props` of the file holding `graph` (predict or explain)."""
        if graph not in GRAPHS:
            raise ValueError(f"graph: expected one of {GRAPHS}, got {graph!r}")
        meta = {
            _KEY["format_version"]: self.format_version,
            _KEY["graph"]: graph,
            _KEY["class_names"]: json.dumps(list(self.class_names)),
            _KEY["input_shape"]: json.dumps(list(self.input_shape)),
            _KEY["input_space"]: self.input_space,
            _KEY["image"]: json.dumps(None if self.image is None else self.image.to_metadata()),
            _KEY["members"]: str(self.members),
            _KEY["method"]: self.method,
            _KEY["kernel"]: json.dumps(self.kernel),
            _KEY["training_config"]: json.dumps(self.training_config, indent=2),
            _KEY["metrics"]: json.dumps(self.metrics),
        }
        # Written where they say something beyond their default, so a file read back writes back the same.
        if self.structure != "independent":
            meta[_KEY["structure"]] = self.structure
        if self.parameters is not None:
            meta[_KEY["parameters"]] = str(self.parameters)
        if self.layout is not None:
            meta[_KEY["layout"]] = json.dumps(self.layout)
        if self.precision != "float32":  # absent means float32, so files written before read the same
            meta[_KEY["precision"]] = self.precision
        return meta | self.choices.to_metadata()

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str = "model file") -> ModelCard:
        """Read a file's `metadata_props` back; ModelFileError naming `source` if they are not a card."""
        version = meta.get(_KEY["format_version"])
        if version is not None and version != FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: format version {version!r} is not one this forde-serve knows (it reads "
                f"{FORMAT_VERSION!r}); re-export it or upgrade forde-serve"
            )
        missing = [_KEY[k] for k in _REQUIRED if _KEY[k] not in meta]
        if missing:
            raise ModelFileError(
                f"{source} is not a forde-serve export: metadata {', '.join(missing)} missing "
                "(export it with `forde export`)"
            )
        try:
            image = json.loads(meta.get(_KEY["image"], "null"))
            return cls(
                class_names=tuple(json.loads(meta[_KEY["class_names"]])),
                input_shape=tuple(json.loads(meta[_KEY["input_shape"]])),
                input_space=meta.get(_KEY["input_space"], ""),
                image=None if image is None else ImageSpec.from_metadata(image),
                members=int(meta[_KEY["members"]]),
                method=meta[_KEY["method"]],
                kernel=json.loads(meta.get(_KEY["kernel"], "null")),
                training_config=json.loads(meta.get(_KEY["training_config"], "{}")),
                metrics=json.loads(meta.get(_KEY["metrics"], "{}")),
                choices=ValidationChoices.from_metadata(meta),
                format_version=meta[_KEY["format_version"]],
                structure=meta.get(_KEY["structure"], "independent"),
                parameters=None if _KEY["parameters"] not in meta else int(meta[_KEY["parameters"]]),
                layout=json.loads(meta[_KEY["layout"]]) if _KEY["layout"] in meta else None,
                precision=meta.get(_KEY["precision"], "float32"),
            )
        except (json.JSONDecodeError, TypeError, ValueError, KeyError) as err:
            raise ModelFileError(f"{source}: broken metadata ({err}); re-export the model") from None

    @staticmethod
    def graph_of(meta: Mapping[str, str]) -> str | None:
        """Which graph a file's metadata says it holds (predict, explain; None for files written before)."""
        return meta.get(_KEY["graph"])


@dataclass(frozen=True)
class RowField:
    """One field of the answer row: its name, its JSON type (a Python annotation) and what it means."""

    name: str
    annotation: Any
    description: str
    on_request: bool = False  # null unless the request asked for it


PREDICTION_FIELDS: tuple[RowField, ...] = (
    RowField("predicted_class", int, "index of the ensemble's top class"),
    RowField("class_name", str, "name of the ensemble's top class"),
    RowField("confidence", float, "the ensemble's probability of its predicted class"),
    RowField("probs", list[float], "mean of the members' softmaxes, one per class"),
    RowField("predictive_entropy", float, "total uncertainty, nats"),
    RowField("expected_entropy", float, "aleatoric uncertainty, nats"),
    RowField("mutual_information", float, "epistemic uncertainty (members disagreeing), nats"),
    RowField("vote_disagreement", float, "fraction of members whose top class differs from the ensemble's"),
    RowField("abstain", bool, "mutual_information is above the model's abstention threshold"),
    RowField(
        "member_probs",
        list[list[float]],
        "[members, classes]: each member's probabilities; null unless asked for with members",
        on_request=True,
    ),
    RowField(
        "prediction_set",
        list[str],
        "class names in the conformal prediction set at the requested coverage (may be empty: no class is "
        "likely enough); null unless asked for with coverage",
        on_request=True,
    ),
    RowField("set_size", int, "number of classes in prediction_set; null unless asked for", on_request=True),
)


def prediction_rows(
    out: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    members: Sequence[bool],
    sets: Sequence[list[str] | None] | None = None,
) -> list[dict]:
    """The answer rows (`PREDICTION_FIELDS`, in order) of runtime outputs `out` (batch first): row i
    carries member probabilities when `members[i]` and its prediction set `sets[i]` (class names)."""
    rows = []
    for i, with_members in enumerate(members):
        index = int(out["predicted_class"][i])
        chosen = None if sets is None else sets[i]
        rows.append(
            {
                "predicted_class": index,
                "class_name": class_names[index],
                "confidence": float(out["confidence"][i]),
                "probs": out["probs"][i].tolist(),
                **{name: float(out[name][i]) for name in UNCERTAINTY},
                "abstain": bool(out["abstain"][i]),
                "member_probs": out["member_probs"][i].tolist() if with_members else None,
                "prediction_set": chosen,
                "set_size": None if chosen is None else len(chosen),
            }
        )
    return rows
