"""A BentoML service with forde-serve's `/predict` request and response schema that does no work.

benchmarks/bench_http.py serves it beside the real service to measure BentoML's own per-request
ceiling on the same machine: the same JSON body parsed into the same shapes, the same answer
serialized, no model, no input checks.

    bentoml serve noop_service:NoopEnsemble --working-dir benchmarks
"""

from __future__ import annotations

import os
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

BATCHING = os.environ.get("FORDE_BATCHING", "1") != "0"
CLASSES = int(os.environ.get("NOOP_CLASSES", "10"))


class PredictRow(BaseModel):
    input: list[list[list[float]]]
    members: bool = False
    coverage: float | None = None


class Prediction(BaseModel):
    predicted_class: int
    class_name: str
    confidence: float
    probs: list[float]
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float
    vote_disagreement: float
    abstain: bool
    member_probs: list[list[float]] | None = None
    prediction_set: list[str] | None = None
    set_size: int | None = None


_ANSWER = Prediction(
    predicted_class=0,
    class_name="0",
    confidence=1.0 / CLASSES,
    probs=[1.0 / CLASSES] * CLASSES,
    predictive_entropy=0.0,
    expected_entropy=0.0,
    mutual_information=0.0,
    vote_disagreement=0.0,
    abstain=False,
)


@bentoml.service(traffic={"timeout": 60, "max_concurrency": 256}, workers=1)
class NoopEnsemble:
    @bentoml.api(batchable=BATCHING, max_batch_size=1024, max_latency_ms=10_000)
    def predict(
        self, inputs: Annotated[list[PredictRow], Field(min_length=1, max_length=256)]
    ) -> Annotated[list[Prediction], ContentType("application/json")]:
        # The declared content type spares BentoML a JSON-schema build per response (its best configuration).
        return [_ANSWER] * len(inputs)
