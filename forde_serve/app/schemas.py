"""The service's request and response models, built for one exported file.

The models check each row when its request is parsed, before it can join an adaptive batch, with
the runtime's own rules (shape, finiteness, class names, stored coverage levels), and their JSON
schemas say those rules, so `/docs.json` and BentoML's clients know them. The answer row is
`contract.PREDICTION_FIELDS`; nothing here repeats it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from bentoml import IODescriptor
from bentoml.exceptions import InvalidArgument
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from forde_serve.contract import PREDICTION_FIELDS
from forde_serve.runtime import NOT_FINITE_OUTPUTS, EnsembleRuntime, InvalidInput, array_from_json

__all__ = [
    "ApiModels",
    "FeedbackAnswer",
    "FeedbackStatus",
    "MonitorDocument",
    "MonitorInput",
    "ShiftStatus",
    "WindowEstimates",
    "api_models",
    "json_safe",
    "unscorable",
]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as None: JSON has no NaN, and a model file's metrics may hold one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def unscorable(rows: list[int], field: str = "inputs") -> InvalidArgument:
    """The 400 for rows whose outputs came out NaN or infinite."""
    listed = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
    return InvalidArgument(f"{field}: {NOT_FINITE_OUTPUTS} in row(s) {listed}")


class _Request:
    """The rows of one request: adaptive batching runs them in a batch with other requests' rows, and a
    row the graph cannot score must fail its own request only (see the service's `predict`)."""

    def __init__(self) -> None:
        self.unscorable: list[int] = []  # positions in the request

    def refusal(self) -> InvalidArgument:
        return unscorable(sorted(self.unscorable))


def _one_request(rows: list) -> list:
    request = _Request()
    for position, row in enumerate(rows):
        row._position, row._request = position, request
    return rows


def _nested_numbers(shape: list[int], description: str) -> WithJsonSchema:
    """The JSON schema of nested lists of numbers shaped `shape`, outermost first."""
    schema: dict[str, Any] = {"type": "number"}
    for size in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": size, "maxItems": size}
    return WithJsonSchema(schema | {"description": description})


class _Strict(IODescriptor):
    # A misspelt top-level field (`"coverage"` beside `inputs`) is an error, as inside a row.
    model_config = ConfigDict(extra="forbid")


class _PredictionBase(BaseModel):
    # Every float must be finite: the response is JSON, which has no NaN (the runtime refuses such
    # outputs first; this is the last line).
    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unscorable(cls, data: Any) -> Any:
        # A row the graph could not score travels to the response as its request; refusing it here turns
        # that request, and only that one, into a 400 (pydantic hands the exception to BentoML as it is).
        if isinstance(data, _Request):
            raise data.refusal()
        return data


class ShiftStatus(BaseModel):
    """The label-free shift alarm: a conformal test martingale on the served rows' uncertainty."""

    score: str = Field(description="the uncertainty output the test watches (larger = stranger)")
    betting: str = Field(description="how the martingale bets: mixture, power or jumper")
    alarm: bool = Field(description="the statistic has reached the threshold since the test was armed")
    statistic: float = Field(description="the martingale now (1 when armed; on exchangeable traffic it rarely grows)")
    max_statistic: float = Field(description="its largest value since arming")
    log_statistic: float = Field(description="the natural log of statistic, unclipped")
    threshold: float = Field(description="1/delta: P(the statistic ever reaches it on unshifted traffic) <= delta")
    rows: int = Field(description="rows tested since the test was armed")
    fired_at: int | None = Field(description="the row (counted from arming) at which the alarm fired; null: not yet")


class WindowEstimates(BaseModel):
    """Label-free estimates over the newest stored rows."""

    rows: int = Field(description="rows the estimates average over")
    estimated_accuracy: float | None = Field(
        description="mean calibrated confidence (as NannyML's CBPE): right while the calibration holds, too high "
        "under shift, so read it beside the alarm"
    )
    mean_mutual_information: float | None = Field(description="nats")
    abstain_rate: float | None
    mean_set_size: dict[str, float | None] = Field(description="coverage level -> mean size of the static sets")


class FeedbackStatus(BaseModel):
    """What the labels sent back say."""

    labels: int = Field(description="labels stored")
    accuracy: float | None = Field(description="share of labelled rows whose prediction was right")
    coverage: dict[str, dict[str, float | None]] = Field(
        description="coverage level -> {static, adaptive}: share of labelled rows whose true class was in the set"
    )
    adaptive: dict[str, dict] | None = Field(
        description="coverage level -> the adaptive sets' alpha_t, thresholds (one per group), labels judged, coverage"
    )


class MonitorDocument(BaseModel):
    """GET /monitor: the shift alarm, the window estimates, the labels."""

    monitoring: bool = Field(description="false: the server runs with FORDE_MONITOR=0 and keeps no state")
    shift: ShiftStatus | None = Field(description="null: the model file has no validation reference to test against")
    window: WindowEstimates | None
    feedback: FeedbackStatus | None
    stored: dict[str, int] | None = Field(description="rows in the state store: predictions, labels")


class MonitorInput(IODescriptor):
    model_config = ConfigDict(extra="forbid", strict=True)

    reset: bool = Field(
        False,
        description="re-arm the shift alarm against the exported reference (needs the admin token when one is set)",
    )


class FeedbackAnswer(BaseModel):
    stored: int = Field(description="labels stored by this request")
    duplicates: list[str] = Field(
        description="ids already labelled (earlier, or earlier in this request): their first label stands, "
        "these were ignored"
    )
    labels: int = Field(description="labels stored in all")
    coverage: dict[str, dict[str, float | None]] = Field(
        description="coverage level -> {static, adaptive}: realized coverage over the labels so far"
    )


@dataclass(frozen=True)
class ApiModels:
    """The pydantic models of one service (one exported file)."""

    predict_row: type[BaseModel]
    explain_row: type[BaseModel]
    predict_input: type[IODescriptor]  # {"inputs": [predict_row, ...]}
    explain_input: type[IODescriptor]
    metadata_input: type[IODescriptor]  # {}
    feedback_input: type[IODescriptor]  # {"items": [{"id": ..., "label": ...}, ...]}
    prediction: type[BaseModel]
    explanation: type[BaseModel]
    model_info: type[BaseModel]
    coverage_description: str
    adaptive_description: str
    check_options: Callable[[float | None, bool], None]  # coverage, adaptive of a form request


def api_models(runtime: EnsembleRuntime, max_inputs: int, adaptive_refused: str | None = None) -> ApiModels:
    """The request/response models checking rows against `runtime`'s card, at most `max_inputs` per request;
    `adaptive_refused` says why rows may not ask for adaptive sets (None: they may)."""
    card = runtime.card
    shape = list(card.input_shape)
    classes = len(card.class_names)

    def raw_input(value: Any) -> np.ndarray:
        # The same numbers in the same float32 as `forde score` reads from a file (`array_from_json`).
        try:
            return runtime.validate_one(array_from_json(value))
        except InvalidInput as err:
            raise ValueError(str(err).removeprefix("input: ")) from None  # the error's location names the field

    def check_coverage(value: float | None) -> float | None:
        if value is not None:
            try:
                runtime.check_coverage(value)
            except InvalidInput as err:
                raise ValueError(str(err).removeprefix("coverage: ")) from None
        return value

    def check_adaptive(value: bool, coverage: float | None) -> bool:
        if value and adaptive_refused:
            raise ValueError(f"expected false: {adaptive_refused}")
        if value and coverage is None:
            raise ValueError("expected false without coverage: an adaptive set is at a coverage level; give one")
        return value

    def check_options(coverage: float | None, adaptive: bool) -> None:
        """The row options of a request that is not a JSON row (a form): InvalidArgument naming the field."""
        for field, check in (
            ("coverage", lambda: check_coverage(coverage)),
            ("adaptive", lambda: check_adaptive(adaptive, coverage)),
        ):
            try:
                check()
            except ValueError as err:
                raise InvalidArgument(f"{field}: {err}") from None

    def class_index(value: Any) -> int | None:
        if value is None or value == -1 and type(value) is int:
            return None
        if isinstance(value, str):
            if value not in card.class_names:
                raise ValueError(f"expected a class name from /metadata or an index, got unknown class {value!r}")
            return card.class_names.index(value)
        if type(value) is not int:  # strict: true is not class 1, nor 3.0 class 3
            raise ValueError(f"expected a class index (an integer) or a class name (a string), got {value!r}")
        if not 0 <= value < classes:
            raise ValueError(f"expected a class index in [0, {classes - 1}], got {value}")
        return value

    adaptive_description = (
        "with coverage: the adaptive set, whose threshold the labels sent to /feedback keep at the asked coverage "
        "under shift (adaptive conformal inference), instead of the exported set"
        + ("" if adaptive_refused is None else f"; refused here: {adaptive_refused}")
    )
    coverage_description = (
        "also return the conformal prediction set at this coverage: the classes that hold the true one with "
        "this probability on data like the validation split; one of "
        + ", ".join(f"{c:g}" for c in card.coverage_levels)
        if card.coverage_levels
        else "prediction sets: this model file has no conformal thresholds, so only null is accepted"
    )

    class PredictRow(BaseModel):
        # extra: a misspelt option is an error, not silently ignored; strict: "yes" is not a boolean
        model_config = ConfigDict(extra="forbid", strict=True)

        input: Annotated[list, _nested_numbers(shape, f"one raw input shaped {shape}: {card.input_space}")]
        members: bool = Field(False, description="also return every member's probabilities")
        coverage: float | None = Field(None, description=coverage_description)
        adaptive: bool = Field(False, description=adaptive_description)
        _position: int = PrivateAttr(0)
        _request: _Request | None = PrivateAttr(None)

        @field_validator("input")
        @classmethod
        def _check_input(cls, value: list) -> np.ndarray:
            return raw_input(value)

        @field_validator("coverage")
        @classmethod
        def _check_coverage(cls, value: float | None) -> float | None:
            return check_coverage(value)

        @field_validator("adaptive")
        @classmethod
        def _check_adaptive(cls, value: bool, info: ValidationInfo) -> bool:
            return check_adaptive(value, info.data.get("coverage"))

    target_schema = {
        "anyOf": [
            {"type": "integer", "minimum": -1, "maximum": classes - 1},
            {"type": "string", "enum": list(card.class_names)},
        ],
        "nullable": True,
        "description": "class index or name whose input gradient to return; null or -1: the ensemble's predicted class",
    }

    class ExplainRow(PredictRow):
        target: Annotated[int | None, WithJsonSchema(target_schema)] = None
        saliency_png: bool = Field(False, description="also return a PNG: input, mean saliency, each member's saliency")

        @field_validator("target", mode="before")
        @classmethod
        def _check_target(cls, value: Any) -> int | None:
            return class_index(value)

        @field_validator("saliency_png")
        @classmethod
        def _check_saliency(cls, value: bool) -> bool:
            if value and card.image is None:
                raise ValueError("expected false: this model's inputs are not images, so there is no saliency picture")
            return value

    rows = Field(min_length=1, max_length=max_inputs)

    class PredictInput(_Strict):
        inputs: Annotated[list[PredictRow], rows, AfterValidator(_one_request)]

    class ExplainInput(_Strict):
        inputs: Annotated[list[ExplainRow], rows]

    class MetadataInput(_Strict):
        pass

    label_schema = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": classes - 1},
            {"type": "string", "enum": list(card.class_names)},
        ],
        "description": "the true class: its index or its name",
    }

    class FeedbackItem(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        id: str = Field(min_length=1, max_length=64, description="the id of a served row")
        label: Annotated[int, WithJsonSchema(label_schema)]

        @field_validator("label", mode="before")
        @classmethod
        def _check_label(cls, value: Any) -> int:
            index = class_index(value)
            if index is None:
                raise ValueError(f"expected a class index in [0, {classes - 1}] or a class name, got {value!r}")
            return index

    class FeedbackInput(_Strict):
        items: Annotated[list[FeedbackItem], rows]

    prediction = create_model(
        "Prediction",
        __base__=_PredictionBase,
        __module__=__name__,
        id=(
            str | None,
            Field(
                None,
                description="this answer's id: send it back with the true label (POST /feedback); null when "
                "the server keeps no state",
            ),
        ),
        **{
            f.name: (f.annotation | None, Field(None, description=f.description))
            if f.on_request
            else (f.annotation, Field(description=f.description))
            for f in PREDICTION_FIELDS
        },
    )

    class Explanation(prediction):
        target: int = Field(description="class whose input gradients are returned")
        input_gradients: Annotated[
            list, _nested_numbers([card.members, *shape], "[members, *input_shape]: d member logit[target] / d input")
        ]
        mean_gradient: Annotated[list, _nested_numbers(shape, "[*input_shape]: the members' mean input gradient")]
        saliency_png: str | None = Field(
            None, description="base64 PNG: each member's input gradient over the input; null unless asked for"
        )

    class ModelInfo(BaseModel):
        model: str = Field(description="file name of the exported ensemble")
        class_names: list[str]
        input_shape: list[int]
        input_space: str = Field(description="what a raw input is")
        image: dict | None = Field(description="how an uploaded picture becomes an input; null: the model takes arrays")
        members: int
        method: str = Field(description="forde, de or external (fused from checkpoints)")
        structure: str = Field(description="independent members, or embedded: batchensemble, mc_dropout")
        parameters: int | None = Field(
            description="distinct trained parameters (weights the members share count once); null: not recorded"
        )
        layout: dict | None = Field(
            description="embedded ensembles: the graph layout chosen per graph (native, folded)"
        )
        precision: str = Field(description="the predict graph's arithmetic: float32, int8 or fp16")
        kernel: dict | None
        metrics: dict = Field(description="the run's clean test metrics (a value the file holds as NaN is null)")
        abstain_threshold: float | None = Field(
            description="abstain when mutual_information is above this; null: never (no validation data chose one)"
        )
        abstain_coverage: float | None
        abstain_target_risk: float | None
        temperature: float = Field(description="the member logits are divided by this before the softmax")
        calibration: dict | None = Field(description="temperature fit: NLL and ECE on the validation split")
        coverage_levels: list[float] = Field(description="levels a request may ask prediction sets for (coverage)")
        conformal_score: str | None = Field(description="score of the prediction sets: lac, aps or raps")
        max_inputs_per_request: int
        format_version: str

    return ApiModels(
        predict_row=PredictRow,
        explain_row=ExplainRow,
        predict_input=PredictInput,
        explain_input=ExplainInput,
        metadata_input=MetadataInput,
        feedback_input=FeedbackInput,
        prediction=prediction,
        explanation=Explanation,
        model_info=ModelInfo,
        coverage_description=coverage_description,
        adaptive_description=adaptive_description,
        check_options=check_options,
    )
