"""The HTTP service: an exported FoRDE ensemble behind BentoML 1.4.

    bentoml serve                                  # from the repository root: exported/digits.onnx
    FORDE_MODEL=path/to/NAME.onnx bentoml serve    # another exported ensemble

Settings (environment): FORDE_MODEL, FORDE_MAX_INPUTS (rows per request, 256),
FORDE_MAX_BODY_BYTES (8 MiB), FORDE_BATCHING (1; 0 turns adaptive batching off), FORDE_SPIN (0;
1 lets onnxruntime's idle threads spin-wait, which only pays on cores the server has to itself).

Endpoints (POST, JSON): `predict` (adaptive batching), `explain`, `predict_image` (file
upload), `metadata`; BentoML's own `/readyz`, `/livez`, `/metrics`, the Swagger page at `/`
and the OpenAPI spec at `/docs.json` stay. Every row is validated when its request is parsed,
before it can join a batch, so one caller's bad input never fails another caller's request.
What a request must look like on the wire, the one shape of every error answer and the spec
that says so live in `_edge.py`. `/ui` is a page to try the model in a browser
(forde_serve/app/ui.py), on the same runtime.
"""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from forde_serve.app._edge import RequestEdge, quiet_caller_errors, refusal
from forde_serve.app.ui import mount_page
from forde_serve.images import IMAGE_FORMATS, image_to_input
from forde_serve.runtime import NOT_FINITE_OUTPUTS, EnsembleRuntime, InvalidInput, NonFiniteOutput, array_from_json
from forde_serve.saliency import saliency_png

__all__ = ["FordeEnsemble"]

MODEL_ENV = "FORDE_MODEL"  # path of the exported NAME.onnx to serve
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "exported" / "digits.onnx"
MAX_INPUTS = int(os.environ.get("FORDE_MAX_INPUTS", "256"))  # rows per request
MAX_BODY_BYTES = int(os.environ.get("FORDE_MAX_BODY_BYTES", str(8 * 1024 * 1024)))
BATCHING = os.environ.get("FORDE_BATCHING", "1") != "0"  # adaptive batching of predict (0: off)
# Spinning onnxruntime threads compete with the event loop that parses and answers requests.
SPIN = os.environ.get("FORDE_SPIN", "0") != "0"

MODEL_PATH = Path(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
# The one runtime of this process, opened at import: the request models below check each row at
# parse time with its rules (shape, finiteness), and the service answers with its sessions.
RUNTIME = EnsembleRuntime(MODEL_PATH, max_batch=max(MAX_INPUTS, 1024), spin=SPIN)
_SHAPE = list(RUNTIME.card.input_shape)  # every request model checks rows against it


def _raw_input(value: Any) -> np.ndarray:
    """Check one row at parse time and hand on the float32 array the model will see: the same numbers
    in the same float32 as `forde score` reads from a file (`array_from_json`)."""
    try:
        return RUNTIME.validate_one(array_from_json(value))
    except InvalidInput as err:
        raise ValueError(str(err).removeprefix("input: ")) from None  # the error's location names the field


def _class_index(value: Any) -> int | None:
    if value is None or value == -1 and type(value) is int:
        return None
    if isinstance(value, str):
        if value not in RUNTIME.card.class_names:
            raise ValueError(f"expected a class name from /metadata or an index, got unknown class {value!r}")
        return RUNTIME.card.class_names.index(value)
    if type(value) is not int:  # strict: true is not class 1, nor 3.0 class 3
        raise ValueError(f"expected a class index (an integer) or a class name (a string), got {value!r}")
    if not 0 <= value < len(RUNTIME.card.class_names):
        raise ValueError(f"expected a class index in [0, {len(RUNTIME.card.class_names) - 1}], got {value}")
    return value


def _nested_numbers(shape: list[int], description: str) -> WithJsonSchema:
    """The JSON schema of nested lists of numbers shaped `shape`, outermost first."""
    schema: dict[str, Any] = {"type": "number"}
    for size in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": size, "maxItems": size}
    return WithJsonSchema(schema | {"description": description})


class _Request:
    """The rows of one request: adaptive batching runs them in a batch with other requests' rows, and a
    row the graph cannot score must fail its own request only (see `FordeEnsemble.predict`)."""

    def __init__(self) -> None:
        self.unscorable: list[int] = []  # positions in the request

    def refusal(self) -> InvalidArgument:
        return _unscorable(sorted(self.unscorable))


def _unscorable(rows: list[int], field: str = "inputs") -> InvalidArgument:
    listed = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
    return InvalidArgument(f"{field}: {NOT_FINITE_OUTPUTS} in row(s) {listed}")


def _one_request(rows: list) -> list:
    request = _Request()
    for position, row in enumerate(rows):
        row._position, row._request = position, request
    return rows


def _check_coverage(value: float | None) -> float | None:
    if value is not None:
        try:
            RUNTIME.check_coverage(value)
        except InvalidInput as err:
            raise ValueError(str(err).removeprefix("coverage: ")) from None
    return value


_COVERAGE_DESCRIPTION = (
    "also return the conformal prediction set at this coverage: the classes that hold the true one with "
    "this probability on data like the validation split; one of "
    + ", ".join(f"{c:g}" for c in RUNTIME.card.coverage_levels)
    if RUNTIME.card.coverage_levels
    else "prediction sets: this model file has no conformal thresholds, so only null is accepted"
)


class PredictRow(BaseModel):
    # extra: a misspelt option is an error, not silently ignored; strict: "yes" is not a boolean
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Annotated[list, _nested_numbers(_SHAPE, f"one raw input shaped {_SHAPE}: {RUNTIME.card.input_space}")]
    members: bool = Field(False, description="also return every member's probabilities")
    coverage: float | None = Field(None, description=_COVERAGE_DESCRIPTION)
    _position: int = PrivateAttr(0)
    _request: _Request | None = PrivateAttr(None)

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: list) -> np.ndarray:
        return _raw_input(value)

    @field_validator("coverage")
    @classmethod
    def _check_coverage(cls, value: float | None) -> float | None:
        return _check_coverage(value)


_TARGET_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": -1, "maximum": len(RUNTIME.card.class_names) - 1},
        {"type": "string", "enum": list(RUNTIME.card.class_names)},
    ],
    "nullable": True,
    "description": "class index or name whose input gradient to return; null or -1: the ensemble's predicted class",
}


class ExplainRow(PredictRow):
    target: Annotated[int | None, WithJsonSchema(_TARGET_SCHEMA)] = None
    saliency_png: bool = Field(False, description="also return a PNG: input, mean saliency, each member's saliency")

    @field_validator("target", mode="before")
    @classmethod
    def _check_target(cls, value: Any) -> int | None:
        return _class_index(value)

    @field_validator("saliency_png")
    @classmethod
    def _check_saliency(cls, value: bool) -> bool:
        if value and RUNTIME.card.image is None:
            raise ValueError("expected false: this model's inputs are not images, so there is no saliency picture")
        return value


class Prediction(BaseModel):
    # Every float must be finite: the response is JSON, which has no NaN (the runtime refuses such
    # outputs first; this is the last line).
    model_config = ConfigDict(allow_inf_nan=False)

    predicted_class: int
    class_name: str
    confidence: float = Field(description="the ensemble's probability of its predicted class")
    probs: list[float] = Field(description="mean of the members' softmaxes, one per class")
    predictive_entropy: float = Field(description="total uncertainty, nats")
    expected_entropy: float = Field(description="aleatoric uncertainty, nats")
    mutual_information: float = Field(description="epistemic uncertainty (members disagreeing), nats")
    vote_disagreement: float = Field(description="fraction of members whose top class differs from the ensemble's")
    abstain: bool = Field(description="mutual_information is above the model's abstention threshold")
    member_probs: list[list[float]] | None = Field(
        None, description="[members, classes]: each member's probabilities; null unless asked for with members"
    )
    prediction_set: list[str] | None = Field(
        None,
        description="class names in the conformal prediction set at the requested coverage (may be empty: no "
        "class is likely enough); null unless asked for with coverage",
    )
    set_size: int | None = Field(None, description="number of classes in prediction_set; null unless asked for")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unscorable(cls, data: Any) -> Any:
        # A row the graph could not score travels to the response as its request; refusing it here turns
        # that request, and only that one, into a 400 (pydantic hands the exception to BentoML as it is).
        if isinstance(data, _Request):
            raise data.refusal()
        return data


class Explanation(Prediction):
    target: int = Field(description="class whose input gradients are returned")
    input_gradients: Annotated[
        list,
        _nested_numbers([RUNTIME.card.members, *_SHAPE], "[members, *input_shape]: d member logit[target] / d input"),
    ]
    mean_gradient: Annotated[list, _nested_numbers(_SHAPE, "[*input_shape]: the members' mean input gradient")]
    saliency_png: str | None = Field(
        None,
        description="base64 PNG: each member's input gradient over the input; null unless asked for",
    )


class ModelInfo(BaseModel):
    model: str = Field(description="file name of the exported ensemble")
    class_names: list[str]
    input_shape: list[int]
    input_space: str = Field(description="what a raw input is")
    image: dict | None = Field(description="how an uploaded picture becomes an input; null: the model takes arrays")
    members: int
    method: str = Field(description="forde or de")
    kernel: dict | None
    metrics: dict = Field(description="the run's clean test metrics (a value the file holds as NaN is null)")
    abstain_threshold: float | None = Field(
        description="abstain when mutual_information is above this; null: never (no validation data chose one)"
    )
    abstain_coverage: float | None
    abstain_target_risk: float | None
    temperature: float = Field(description="the member logits are divided by this before the softmax (calibration)")
    calibration: dict | None = Field(description="temperature fit: NLL and ECE on the validation split before/after")
    coverage_levels: list[float] = Field(description="levels a request may ask prediction sets for (coverage)")
    conformal_score: str | None = Field(description="score of the prediction sets: lac, aps or raps")
    max_inputs_per_request: int
    format_version: str


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None: JSON has no NaN, and a model file's metrics may hold one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


_ROWS_PER_REQUEST = Field(min_length=1, max_length=MAX_INPUTS)
# A list response's declared content type: without it BentoML works the media type out from the
# response model's JSON schema, built again for every response (measured: ~18% of the server's CPU
# under load). The spec still declares the full response schema.
_JSON = ContentType("application/json")


def _prediction_sets(probs: np.ndarray, coverages: list[float | None], skip=()) -> list[list[str] | None]:
    """Each row's prediction set (class names) at its own coverage level (None: not asked for). Rows of
    a batch may ask for different levels: one vectorized call per level present."""
    sets: list[list[str] | None] = [None] * len(coverages)
    for level in {c for c in coverages if c is not None}:
        rows = [i for i, c in enumerate(coverages) if c == level and i not in skip]
        if rows:
            for i, mask in zip(rows, RUNTIME.prediction_sets(probs[rows], level), strict=True):
                sets[i] = [RUNTIME.card.class_names[k] for k in np.flatnonzero(mask)]
    return sets


def _rows(out: dict[str, np.ndarray], members: list[bool], sets: list[list[str] | None] | None = None) -> list[dict]:
    rows = []
    for i, with_members in enumerate(members):
        index = int(out["predicted_class"][i])
        rows.append(
            {
                "predicted_class": index,
                "class_name": RUNTIME.card.class_names[index],
                "confidence": float(out["confidence"][i]),
                "probs": out["probs"][i].tolist(),
                **{
                    k: float(out[k][i])
                    for k in ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")
                },
                "abstain": bool(out["abstain"][i]),
                "member_probs": out["member_probs"][i].tolist() if with_members else None,
                "prediction_set": None if sets is None else sets[i],
                "set_size": None if sets is None or sets[i] is None else len(sets[i]),
            }
        )
    return rows


def _saliency_png(x: np.ndarray, gradients: np.ndarray, member_probs: np.ndarray, target: int) -> str:
    """forde_serve.saliency's figure for one row (input, mean gradient, each member's), base64 PNG."""
    figure = saliency_png(x, gradients, member_probs, RUNTIME.card.class_names, target, RUNTIME.card.image)
    return base64.b64encode(figure).decode()


@bentoml.service(traffic={"timeout": 60, "max_concurrency": 256}, workers=1)
class FordeEnsemble:
    """Robust predictions with honest uncertainty from an exported FoRDE (or deep) ensemble."""

    def __init__(self) -> None:
        self.runtime = RUNTIME

    @bentoml.api(batchable=BATCHING, max_batch_size=1024, max_latency_ms=10_000)
    def predict(
        self, inputs: Annotated[list[PredictRow], _ROWS_PER_REQUEST, AfterValidator(_one_request)]
    ) -> Annotated[list[Prediction], _JSON]:
        """Class, probabilities, uncertainty and abstention for each input (adaptive batching)."""
        x = np.stack([row.input for row in inputs])
        try:
            out, unscorable = self.runtime.predict(x), ()
        except NonFiniteOutput as err:
            out, unscorable = err.outputs, err.rows
        sets = _prediction_sets(out["probs"], [row.coverage for row in inputs], skip=set(unscorable))
        rows: list = _rows(out, [row.members for row in inputs], sets)
        # `inputs` may hold the rows of several requests (adaptive batching): a row whose outputs are not
        # finite is answered by its request, which the response model refuses (`Prediction`), so only that
        # request fails; called with rows not parsed from a request, the whole call fails.
        for i in unscorable:
            request = inputs[i]._request
            if request is None:
                raise _unscorable(list(unscorable))
            request.unscorable.append(inputs[i]._position)
            rows[i] = request
        return rows

    @bentoml.api
    def explain(self, inputs: Annotated[list[ExplainRow], _ROWS_PER_REQUEST]) -> Annotated[list[Explanation], _JSON]:
        """`predict` plus every member's input gradient for the predicted (or requested) class."""
        x = np.stack([row.input for row in inputs])
        targets = np.asarray([-1 if row.target is None else row.target for row in inputs], dtype=np.int64)
        out = self._run("inputs", self.runtime.explain, x, targets)
        chosen = np.where(targets < 0, out["predicted_class"], targets)
        rows = _rows(out, [row.members for row in inputs], _prediction_sets(out["probs"], [r.coverage for r in inputs]))
        for i, row in enumerate(inputs):
            grads = out["input_gradients"][i]
            rows[i] |= {
                "target": int(chosen[i]),
                "input_gradients": grads.tolist(),
                "mean_gradient": grads.mean(0, dtype=np.float64).tolist(),  # float64: a sum of float32 can overflow
                "saliency_png": _saliency_png(x[i], grads, out["member_probs"][i], int(chosen[i]))
                if row.saliency_png
                else None,
            }
        return rows

    @bentoml.api
    def predict_image(
        self,
        image: Annotated[Path, Field(description=f"a picture ({', '.join(IMAGE_FORMATS)}), known by its content")],
        members: Annotated[bool, Strict()] = False,
        coverage: Annotated[float | None, Strict(), Field(description=_COVERAGE_DESCRIPTION)] = None,
    ) -> Prediction:
        """An uploaded picture, converted to the model's input as its metadata says."""
        try:
            _check_coverage(coverage)
        except ValueError as err:
            raise InvalidArgument(f"coverage: {err}") from None
        x = self._image_to_input(image)
        out = self._run("image", self.runtime.predict, x[None])
        return Prediction(**_rows(out, [members], _prediction_sets(out["probs"], [coverage]))[0])

    @bentoml.api
    def metadata(self) -> ModelInfo:
        """The model card: classes, input shape, members, method, kernel, metrics, abstention."""
        return _MODEL_INFO

    @staticmethod
    def _run(field: str, method, *args) -> dict[str, np.ndarray]:
        """`method(*args)` of the runtime, its refusals as BentoML's 4xx; rows whose outputs are not finite
        are named as rows of the request's `field`."""
        try:
            return method(*args)
        except NonFiniteOutput as err:
            raise _unscorable(list(err.rows), field) from None
        except InvalidInput as err:
            raise refusal(err) from None

    def _image_to_input(self, path: Path) -> np.ndarray:
        try:
            return image_to_input(path, RUNTIME.card.image)
        except InvalidInput as err:
            raise refusal(err) from None


_MODEL_INFO = ModelInfo(
    model=MODEL_PATH.name,
    class_names=list(RUNTIME.card.class_names),
    input_shape=list(RUNTIME.card.input_shape),
    input_space=RUNTIME.card.input_space,
    image=RUNTIME.card.image,
    members=RUNTIME.card.members,
    method=RUNTIME.card.method,
    kernel=_json_safe(RUNTIME.card.kernel),
    metrics=_json_safe(RUNTIME.card.metrics),
    abstain_threshold=_json_safe(RUNTIME.card.abstain_threshold),
    abstain_coverage=_json_safe(RUNTIME.card.abstain_coverage),
    abstain_target_risk=_json_safe(RUNTIME.card.abstain_target_risk),
    temperature=RUNTIME.card.temperature,
    calibration=None if RUNTIME.card.calibration is None else RUNTIME.card.calibration.to_metadata(),
    coverage_levels=list(RUNTIME.card.coverage_levels),
    conformal_score=None if RUNTIME.card.conformal is None else RUNTIME.card.conformal.score,
    max_inputs_per_request=MAX_INPUTS,
    format_version=RUNTIME.card.format_version,
)

FordeEnsemble.add_asgi_middleware(RequestEdge, service=FordeEnsemble, max_body_bytes=MAX_BODY_BYTES)
quiet_caller_errors()
mount_page(FordeEnsemble, RUNTIME)  # the /ui page, answering with this same runtime
