"""The HTTP service: an exported ensemble behind BentoML 1.4.

    bentoml serve                                         # from the repository root: exported/digits.onnx
    bentoml serve --arg model=path/to/NAME.onnx           # another exported ensemble (or FORDE_MODEL=...)
    forde serve path/to/NAME.onnx                         # the same, on 127.0.0.1, with checks first

`make_service(settings)` builds the service class for one exported file: it opens both graphs and
runs each once, so a missing or broken explain file stops the start instead of failing the first
`/explain` (BentoML answers `/readyz` only once this module has imported). The module-level
`FordeEnsemble` is the service for the settings of this process (`ServeSettings.load`: BentoML's
`--arg`s, the `FORDE_*` variables, the defaults); tests build services for other files in process.

Endpoints (POST, JSON): `predict` (adaptive batching), `explain`, `predict_image` (file upload),
`metadata`; BentoML's own `/readyz`, `/livez`, `/metrics`, the Swagger page at `/` and the OpenAPI
spec at `/docs.json` stay. What a request must look like on the wire, the one shape of every error
answer and the spec that says so live in `_edge.py`; the request and response models in
`schemas.py`; `/ui` (`ui.py`) is a page to try the model in a browser, on the same runtime.
"""

# No `from __future__ import annotations`: BentoML reads the API signatures' annotations as objects,
# and the models they name are built for each service inside `make_service`.

import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from pydantic import Field, Strict

from forde_serve import __version__
from forde_serve.app._edge import RequestEdge, quiet_caller_errors, refusal
from forde_serve.app._watch import Watch, adaptive_refusal, model_key
from forde_serve.app.schemas import FeedbackAnswer, MonitorDocument, MonitorInput, api_models, json_safe, unscorable
from forde_serve.app.settings import ServeSettings
from forde_serve.app.ui import mount_page
from forde_serve.contract import UNCERTAINTY, prediction_rows
from forde_serve.images import IMAGE_FORMATS, image_to_input
from forde_serve.monitoring.monitor import MonitorConfig
from forde_serve.runtime import EnsembleRuntime, InvalidInput, NonFiniteOutput
from forde_serve.saliency import saliency_png

__all__ = ["FordeEnsemble", "make_service", "open_runtime"]

# A list response's declared content type: without it BentoML works the media type out from the
# response model's JSON schema, built again for every response (measured: ~18% of the server's CPU
# under load). The spec still declares the full response schema.
_JSON = ContentType("application/json")
# The outputs a prediction set is made from: the probabilities, and what picks a Mondrian group.
SET_INPUTS = ("probs", *UNCERTAINTY)
_DESCRIPTION = (
    "Predictions with honest uncertainty from an exported ensemble (FoRDE or a deep ensemble): the "
    "ensemble's probabilities, how much its members disagree, conformal prediction sets and every "
    "member's input gradient. Every error answer has one shape, `ErrorBody`."
)


def _asks_reset(body: bytes) -> bool:
    """Whether a /monitor body asks to re-arm the alarm (a body that does not parse is the API's 400)."""
    try:
        return json.loads(body or b"{}").get("reset") is True
    except (ValueError, AttributeError):
        return False


def open_runtime(settings: ServeSettings) -> EnsembleRuntime:
    """The runtime over `settings.model`, both graphs opened and run once on a zero input (a broken
    or missing explain file raises ModelFileError here, not on the first request)."""
    runtime = EnsembleRuntime(
        settings.model,
        threads=settings.onnx_threads(),
        max_batch=max(settings.max_inputs, 1024),
        spin=settings.spin,
    )
    runtime.warm_up()
    return runtime


def make_service(settings: ServeSettings):
    """The BentoML service class answering with the exported file `settings.model`."""
    runtime = opened = open_runtime(settings)
    card = runtime.card
    models = api = api_models(runtime, settings.max_inputs, adaptive_refusal(runtime, settings.monitor))
    key = model_key(runtime.path)
    watching = MonitorConfig(
        delta=settings.delta, window=settings.window, gamma=settings.gamma, keep_inputs=settings.keep_inputs
    )
    this_process: dict = {}  # what the worker's service instance made, for the /ui page in the same process
    Prediction, Explanation, ModelInfo = models.prediction, models.explanation, models.model_info
    model_info = ModelInfo(
        model=runtime.path.name,
        class_names=list(card.class_names),
        input_shape=list(card.input_shape),
        input_space=card.input_space,
        image=None if card.image is None else card.image.to_metadata(),
        members=card.members,
        method=card.method,
        structure=card.structure,
        parameters=card.parameters,
        layout=json_safe(card.layout),
        precision=card.precision,
        kernel=json_safe(card.kernel),
        metrics=json_safe(card.metrics),
        abstain_threshold=json_safe(card.abstain_threshold),
        abstain_coverage=json_safe(card.choices.abstention.coverage),
        abstain_target_risk=json_safe(card.choices.abstention.target_risk),
        temperature=card.temperature,
        calibration=None if card.calibration is None else card.calibration.to_metadata(),
        coverage_levels=list(card.coverage_levels),
        conformal_score=None if card.conformal is None else card.conformal.score,
        max_inputs_per_request=settings.max_inputs,
        format_version=card.format_version,
    )

    def sets_of(out: dict[str, np.ndarray], coverages: list, skip=()) -> list[list[str] | None]:
        """Each row's prediction set (class names) at its own coverage level (None: not asked for). Rows of
        a batch may ask for different levels: one vectorized call per level present."""
        sets: list[list[str] | None] = [None] * len(coverages)
        for level in {c for c in coverages if c is not None}:
            rows = [i for i, c in enumerate(coverages) if c == level and i not in skip]
            if rows:
                chosen = {name: value[rows] for name, value in out.items() if name in SET_INPUTS}
                for i, mask in zip(rows, runtime.prediction_sets(chosen, level), strict=True):
                    sets[i] = [card.class_names[k] for k in np.flatnonzero(mask)]
        return sets

    def run(field: str, method, *args) -> dict[str, np.ndarray]:
        """`method(*args)` of the runtime, its refusals as BentoML's 4xx; rows whose outputs are not finite
        are named as rows of the request's `field`."""
        try:
            return method(*args)
        except NonFiniteOutput as err:
            raise unscorable(list(err.rows), field) from None
        except InvalidInput as err:
            raise refusal(err) from None

    @bentoml.service(
        name="FordeEnsemble",
        traffic={"timeout": 60, "max_concurrency": 256},
        workers=settings.workers,
    )
    class FordeEnsemble:
        """Robust predictions with honest uncertainty from an exported FoRDE (or deep) ensemble."""

        # The class's own, for callers in process (tests, the /ui page): `FordeEnsemble.inner.runtime`.
        runtime = opened
        models = api

        def __init__(self) -> None:
            # In the worker process: its store connection and its Prometheus metrics (module docstring of _watch)
            self.watch = Watch(self.runtime, watching, key) if settings.monitor else None
            this_process["watch"] = self.watch  # the /ui page's Monitor tab reads it

        def _answer(self, out: dict, rows: list, x: np.ndarray, skip=()) -> list:
            """The answer rows for `rows` (parsed request rows) of outputs `out`, with their ids and sets, the
            served rows recorded by the watch; rows in `skip` (not scorable) are neither answered nor recorded."""
            coverages = [row.coverage for row in rows]
            adaptives = [getattr(row, "adaptive", False) for row in rows]
            sets = sets_of(out, coverages, skip=set(skip))
            answer = prediction_rows(out, card.class_names, [row.members for row in rows], sets)
            kept = [i for i in range(len(rows)) if i not in set(skip)]
            if self.watch is None or not kept:
                return answer
            watched = {name: value[kept] for name, value in out.items()}
            served = self.watch.observe(watched, [coverages[i] for i in kept], [adaptives[i] for i in kept], x[kept])
            sizes: dict[str, list[int]] = {}
            for i, row in zip(kept, served, strict=True):
                answer[i]["id"] = row.id
                if row.adaptive_set is not None:
                    chosen = [card.class_names[k] for k in np.flatnonzero(row.adaptive_set)]
                    answer[i] |= {"prediction_set": chosen, "set_size": len(chosen)}
                if coverages[i] is not None:
                    sizes.setdefault(f"{coverages[i]:g}", []).append(answer[i]["set_size"])
            self.watch.metrics.observe_set_sizes(sizes)
            return answer

        @bentoml.api(
            batchable=settings.batching, max_batch_size=1024, max_latency_ms=10_000, input_spec=models.predict_input
        )
        def predict(self, inputs: list) -> Annotated[list[Prediction], _JSON]:
            """Class, probabilities, uncertainty and abstention for each input (adaptive batching)."""
            x = np.stack([row.input for row in inputs])
            try:
                out, unscored = self.runtime.predict(x), ()
            except NonFiniteOutput as err:
                out, unscored = err.outputs, err.rows
            answer: list = self._answer(out, inputs, x, skip=unscored)
            # `inputs` may hold the rows of several requests (adaptive batching): a row whose outputs are
            # not finite is answered by its request, which the response model refuses (`Prediction`), so
            # only that request fails; called with rows not parsed from a request, the whole call fails.
            for i in unscored:
                request = inputs[i]._request
                if request is None:
                    raise unscorable(list(unscored))
                request.unscorable.append(inputs[i]._position)
                answer[i] = request
            return answer

        @bentoml.api(input_spec=models.explain_input)
        def explain(self, inputs: list) -> Annotated[list[Explanation], _JSON]:
            """`predict` plus every member's input gradient for the predicted (or requested) class."""
            x = np.stack([row.input for row in inputs])
            targets = np.asarray([-1 if row.target is None else row.target for row in inputs], dtype=np.int64)
            out = run("inputs", self.runtime.explain, x, targets)
            chosen = np.where(targets < 0, out["predicted_class"], targets)
            answer = self._answer(out, inputs, x)
            for i, row in enumerate(inputs):
                grads = out["input_gradients"][i]
                figure = None
                if row.saliency_png:
                    png = saliency_png(
                        x[i], grads, out["member_probs"][i], card.class_names, int(chosen[i]), card.image
                    )
                    figure = base64.b64encode(png).decode()
                answer[i] |= {
                    "target": int(chosen[i]),
                    "input_gradients": grads.tolist(),
                    "mean_gradient": grads.mean(0, dtype=np.float64).tolist(),  # float64: a float32 sum can overflow
                    "saliency_png": figure,
                }
            return answer

        @bentoml.api
        def predict_image(
            self,
            image: Annotated[Path, Field(description=f"a picture ({', '.join(IMAGE_FORMATS)}), known by its content")],
            members: Annotated[bool, Strict(), Field(description="also return every member's probabilities")] = False,
            coverage: Annotated[float | None, Strict(), Field(description=models.coverage_description)] = None,
            adaptive: Annotated[bool, Strict(), Field(description=models.adaptive_description)] = False,
        ) -> Prediction:
            """An uploaded picture, converted to the model's input as its metadata says."""
            models.check_options(coverage, adaptive)
            try:
                x = image_to_input(image, card.image)
            except InvalidInput as err:
                raise refusal(err) from None
            out = run("image", self.runtime.predict, x[None])
            row = SimpleNamespace(members=members, coverage=coverage, adaptive=adaptive)
            return Prediction(**self._answer(out, [row], x[None])[0])

        @bentoml.api(input_spec=models.metadata_input)
        def metadata(self) -> ModelInfo:
            """The model card: classes, input shape, members, method, kernel, metrics, abstention, calibration."""
            return model_info

        @bentoml.api(input_spec=models.feedback_input)
        def feedback(self, items: list) -> FeedbackAnswer:
            """Store the true labels of served rows, by their ids: realized accuracy and coverage, and the
            adaptive sets' thresholds, follow them. The first label of an id stands; a repeat is reported as a
            duplicate and changes nothing. Needs the admin token when the server has one."""
            if self.watch is None:
                raise InvalidArgument("items: this server keeps no state (FORDE_MONITOR=0), so it takes no labels")
            result = self.watch.feedback([(item.id, item.label) for item in items])
            return FeedbackAnswer(
                stored=len(result.stored),
                duplicates=list(result.duplicates),
                labels=result.labels,
                coverage=result.coverage or {},
            )

        @bentoml.api(input_spec=MonitorInput)
        def monitor(self, reset: bool = False) -> MonitorDocument:
            """The shift alarm, label-free estimates over the newest rows, and what the labels say (GET, or
            POST {}); POST {"reset": true} re-arms the alarm against the exported reference (admin token)."""
            if reset:
                if self.watch is None:
                    raise InvalidArgument("reset: this server keeps no state (FORDE_MONITOR=0): there is no alarm")
                self.watch.reset()
            if self.watch is None:
                return MonitorDocument(monitoring=False, shift=None, window=None, feedback=None, stored=None)
            return MonitorDocument(monitoring=True, **json_safe(self.watch.snapshot()))

    info = {"title": "forde-serve", "version": __version__, "description": _DESCRIPTION}
    FordeEnsemble.add_asgi_middleware(
        RequestEdge,
        service=FordeEnsemble,
        max_body_bytes=settings.max_body_bytes,
        info=info,
        # the write paths (labels, the alarm's reset), refused there without the token when one is set
        guarded={"feedback": lambda body: True, "monitor": _asks_reset},
        token=settings.token(),
    )
    quiet_caller_errors()

    def snapshot() -> dict | None:
        watch = this_process.get("watch")
        return None if watch is None else json_safe(watch.snapshot())

    mount_page(FordeEnsemble, runtime, snapshot=snapshot)  # the /ui page, answering with this same runtime
    return FordeEnsemble


FordeEnsemble = make_service(ServeSettings.load())
