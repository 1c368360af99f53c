"""The HTTP service: an exported FoRDE ensemble behind BentoML 1.4.

    bentoml serve                                  # from the repository root: exported/digits.onnx
    FORDE_MODEL=path/to/NAME.onnx bentoml serve    # another exported ensemble

Settings (environment): FORDE_MODEL, FORDE_MAX_INPUTS (rows per request, 256),
FORDE_MAX_BODY_BYTES (8 MiB), FORDE_BATCHING (1; 0 turns adaptive batching off).

Endpoints (POST, JSON): `predict` (adaptive batching), `explain`, `predict_image` (file
upload), `metadata`; BentoML's own `/readyz`, `/livez`, `/metrics` and `/docs` stay. `/ui` is a
page to try the model in a browser (forde_serve/app/ui.py), on the same runtime.
Every row is validated when its request is parsed, before it can join a batch, so one
caller's bad input never fails another caller's request.
"""

from __future__ import annotations

import base64
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from pydantic import BaseModel, ConfigDict, Field, field_validator

from forde_serve.app.ui import mount_page
from forde_serve.images import ImageTooLarge, image_to_input
from forde_serve.runtime import EnsembleRuntime, InvalidInput
from forde_serve.saliency import saliency_png

__all__ = ["FordeEnsemble"]

MODEL_ENV = "FORDE_MODEL"  # path of the exported NAME.onnx to serve
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "exported" / "digits.onnx"
MAX_INPUTS = int(os.environ.get("FORDE_MAX_INPUTS", "256"))  # rows per request
MAX_BODY_BYTES = int(os.environ.get("FORDE_MAX_BODY_BYTES", str(8 * 1024 * 1024)))
BATCHING = os.environ.get("FORDE_BATCHING", "1") != "0"  # adaptive batching of predict (0: off)

MODEL_PATH = Path(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
# The one runtime of this process, opened at import: the request models below check each row at
# parse time with its rules (shape, finiteness), and the service answers with its sessions.
RUNTIME = EnsembleRuntime(MODEL_PATH, max_batch=max(MAX_INPUTS, 1024))
_CARD = RUNTIME.card
_SHAPE = list(_CARD.input_shape)


def _raw_input(value: Any) -> np.ndarray:
    """Check one row at parse time and hand on the float32 array built for the check."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected a nested list of numbers shaped {_SHAPE}, got ragged or non-numeric lists"
        ) from None
    # JSON-specific: numpy would read true as 1 and "1.5" as 1.5; refuse rather than guess.
    kinds = {type(v) for v in np.asarray(value, dtype=object).ravel()} - {int, float}
    if kinds:
        raise ValueError(f"expected numbers, got {', '.join(sorted(k.__name__ for k in kinds))} values")
    try:
        return RUNTIME.validate_one(array)
    except InvalidInput as err:
        raise ValueError(str(err)) from None


def _class_index(value: int | str | None) -> int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, str):
        if value not in _CARD.class_names:
            raise ValueError(f"expected a class name from /metadata or an index, got unknown class {value!r}")
        return _CARD.class_names.index(value)
    if not 0 <= value < len(_CARD.class_names):
        raise ValueError(f"expected a class index in [0, {len(_CARD.class_names) - 1}], got {value}")
    return value


class PredictRow(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored

    input: list = Field(description=f"one raw input, nested lists shaped {_SHAPE}: {_CARD.input_space}")
    members: bool = Field(False, description="also return every member's probabilities")

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: list) -> np.ndarray:
        return _raw_input(value)


class ExplainRow(PredictRow):
    target: int | str | None = Field(
        None, description="class index or name whose input gradient to return; default: the ensemble's predicted class"
    )
    saliency_png: bool = Field(False, description="also return a PNG: input, mean saliency, each member's saliency")

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: int | str | None) -> int | None:
        return _class_index(value)

    @field_validator("saliency_png")
    @classmethod
    def _check_saliency(cls, value: bool) -> bool:
        if value and _CARD.image is None:
            raise ValueError("expected false: this model's inputs are not images, so there is no saliency picture")
        return value


class Prediction(BaseModel):
    predicted_class: int
    class_name: str
    confidence: float = Field(description="the ensemble's probability of its predicted class")
    probs: list[float] = Field(description="mean of the members' softmaxes, one per class")
    predictive_entropy: float = Field(description="total uncertainty, nats")
    expected_entropy: float = Field(description="aleatoric uncertainty, nats")
    mutual_information: float = Field(description="epistemic uncertainty (members disagreeing), nats")
    vote_disagreement: float = Field(description="fraction of members whose top class differs from the ensemble's")
    abstain: bool = Field(description="mutual_information is above the model's abstention threshold")
    member_probs: list[list[float]] | None = None


class Explanation(Prediction):
    target: int = Field(description="class whose input gradients are returned")
    input_gradients: list = Field(description="[members, *input_shape]: d member logit[target] / d input")
    mean_gradient: list = Field(description="[*input_shape]: the members' mean input gradient")
    saliency_png: str | None = Field(None, description="base64 PNG: input, mean gradient, each member's gradient")


def _rows(out: dict[str, np.ndarray], members: list[bool]) -> list[dict]:
    rows = []
    for i, with_members in enumerate(members):
        index = int(out["predicted_class"][i])
        rows.append(
            {
                "predicted_class": index,
                "class_name": _CARD.class_names[index],
                "confidence": float(out["confidence"][i]),
                "probs": out["probs"][i].tolist(),
                **{
                    k: float(out[k][i])
                    for k in ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")
                },
                "abstain": bool(out["abstain"][i]),
                "member_probs": out["member_probs"][i].tolist() if with_members else None,
            }
        )
    return rows


def _saliency_png(x: np.ndarray, gradients: np.ndarray, member_probs: np.ndarray, target: int) -> str:
    """forde_serve.saliency's figure for one row (input, mean gradient, each member's), base64 PNG."""
    figure = saliency_png(x, gradients, member_probs, _CARD.class_names, target, _CARD.image)
    return base64.b64encode(figure).decode()


class _BodyLimit:
    """ASGI middleware: refuse request bodies over MAX_BODY_BYTES with 413 before parsing them."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                return await self._refuse(send, f"{int(length)}")
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body here, up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(send, "more")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, got: str):
        body = f'{{"error": "request body: expected at most {self.max_bytes} bytes, got {got}"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@bentoml.service(traffic={"timeout": 60, "max_concurrency": 256}, workers=1)
class FordeEnsemble:
    """Robust predictions with honest uncertainty from an exported FoRDE (or deep) ensemble."""

    def __init__(self) -> None:
        self.runtime = RUNTIME

    @bentoml.api(batchable=BATCHING, max_batch_size=1024, max_latency_ms=10_000)
    def predict(
        self, inputs: Annotated[list[PredictRow], Field(min_length=1, max_length=MAX_INPUTS)]
    ) -> list[Prediction]:
        """Class, probabilities, uncertainty and abstention for each input (adaptive batching)."""
        x = np.stack([row.input for row in inputs])
        return _rows(self._run(self.runtime.predict, x), [row.members for row in inputs])

    @bentoml.api
    def explain(
        self, inputs: Annotated[list[ExplainRow], Field(min_length=1, max_length=MAX_INPUTS)]
    ) -> list[Explanation]:
        """`predict` plus every member's input gradient for the predicted (or requested) class."""
        x = np.stack([row.input for row in inputs])
        targets = np.asarray([-1 if row.target is None else row.target for row in inputs], dtype=np.int64)
        out = self._run(self.runtime.explain, x, targets)
        chosen = np.where(targets < 0, out["predicted_class"], targets)
        rows = _rows(out, [row.members for row in inputs])
        for i, row in enumerate(inputs):
            grads = out["input_gradients"][i]
            rows[i] |= {
                "target": int(chosen[i]),
                "input_gradients": grads.tolist(),
                "mean_gradient": grads.mean(0).tolist(),
                "saliency_png": _saliency_png(x[i], grads, out["member_probs"][i], int(chosen[i]))
                if row.saliency_png
                else None,
            }
        return rows

    @bentoml.api
    def predict_image(self, image: Annotated[Path, ContentType("image/*")], members: bool = False) -> Prediction:
        """An uploaded PNG/JPEG, converted to the model's input as its metadata says."""
        x = self._image_to_input(image)
        return Prediction(**_rows(self._run(self.runtime.predict, x[None]), [members])[0])

    @bentoml.api
    def metadata(self) -> dict:
        """The model card: classes, input shape, members, method, kernel, metrics, abstention."""
        card = _CARD
        return {
            "model": MODEL_PATH.name,
            "class_names": list(card.class_names),
            "input_shape": list(card.input_shape),
            "input_space": card.input_space,
            "image": card.image,
            "members": card.members,
            "method": card.method,
            "kernel": card.kernel,
            "metrics": card.metrics,
            "abstain_threshold": card.abstain_threshold,
            "abstain_coverage": card.abstain_coverage,
            "abstain_target_risk": card.abstain_target_risk,
            "max_inputs_per_request": MAX_INPUTS,
            "format_version": card.format_version,
        }

    @staticmethod
    def _run(method, *args) -> dict[str, np.ndarray]:
        try:
            return method(*args)
        except InvalidInput as err:
            raise InvalidArgument(str(err)) from None

    def _image_to_input(self, path: Path) -> np.ndarray:
        try:
            return image_to_input(path, _CARD.image)
        except ImageTooLarge as err:
            raise BentoMLException(str(err), error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
        except InvalidInput as err:
            raise InvalidArgument(str(err)) from None


FordeEnsemble.add_asgi_middleware(_BodyLimit)
mount_page(FordeEnsemble, RUNTIME)  # the /ui page, answering with this same runtime
