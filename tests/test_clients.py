"""BentoML's own Python clients against a real server, as BentoML documents them: one keyword per
parameter, a `pathlib.Path` or a PIL image for the file parameter."""

import asyncio
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image

from forde_serve.app.ui import EXAMPLES
from forde_serve.images import image_to_input

from helpers import nullable_fields, without_ids

pytestmark = pytest.mark.slow

PNG = EXAMPLES / "digit-3.png"


@pytest.fixture(scope="module")
def client(server):
    with bentoml.SyncHTTPClient(server) as client:
        yield client


def test_json_endpoints_answer_through_the_sync_client_as_over_raw_http(client, server, digits):
    x, _ = digits
    rows = [{"input": x[i].tolist(), "members": i == 0, "coverage": 0.9 if i == 1 else None} for i in range(3)]
    raw = httpx.post(f"{server}/predict", json={"inputs": rows}).json()
    assert without_ids(client.predict(inputs=rows)) == without_ids(raw)
    explained = client.explain(inputs=[{"input": x[0].tolist(), "target": "3"}])
    raw_explained = httpx.post(f"{server}/explain", json={"inputs": [{"input": x[0].tolist(), "target": "3"}]})
    assert without_ids(explained) == without_ids(raw_explained.json())
    assert explained[0]["target"] == 3 and np.asarray(explained[0]["input_gradients"]).shape == (8, 1, 8, 8)
    assert client.metadata() == httpx.post(f"{server}/metadata", json={}).json()


@pytest.mark.parametrize("members", [False, True])
@pytest.mark.parametrize("coverage", [None, 0.9])
@pytest.mark.parametrize("kind", ["path", "pil"])
def test_predict_image_takes_a_path_or_a_pil_image(client, runtime, members, coverage, kind):
    picture = PNG if kind == "path" else Image.open(PNG)
    answer = client.predict_image(image=picture, members=members, coverage=coverage)
    expected = runtime.predict(image_to_input(PNG, runtime.card.image)[None], coverage=coverage)
    assert answer["predicted_class"] == int(expected["predicted_class"][0]) == 3
    np.testing.assert_allclose(answer["probs"], expected["probs"][0], rtol=1e-6)
    if members:
        np.testing.assert_allclose(answer["member_probs"], expected["member_probs"][0], rtol=1e-6)
    else:
        assert answer["member_probs"] is None
    if coverage is None:
        assert answer["prediction_set"] is None and answer["set_size"] is None
    else:
        in_set = np.flatnonzero(expected["prediction_set"][0])
        assert answer["prediction_set"] == [runtime.card.class_names[k] for k in in_set]
        assert answer["set_size"] == len(in_set)


def test_a_wrong_shape_is_the_server_s_400_not_a_client_side_crash(client):
    with pytest.raises(BentoMLException) as refused:
        client.predict(inputs=[{"input": [1, 2]}])
    assert refused.value.error_code == 400
    assert "inputs[0].input: expected shape [1, 8, 8], got [2]" in str(refused.value)
    with pytest.raises(BentoMLException, match="coverage: this model is calibrated for 0.8, 0.9, 0.95, 0.99"):
        client.predict_image(image=PNG, coverage=0.5)


def test_the_async_client_answers_the_same(server, client, digits):
    x, _ = digits

    async def every_endpoint():
        async with bentoml.AsyncHTTPClient(server) as asynchronous:
            predicted = await asynchronous.predict(inputs=[{"input": x[5].tolist()}])
            return (
                predicted,
                await asynchronous.explain(inputs=[{"input": x[5].tolist(), "target": 5}]),
                await asynchronous.predict_image(image=Path(PNG), members=True),
                await asynchronous.metadata(),
                await asynchronous.feedback(items=[{"id": predicted[0]["id"], "label": 5}]),
                await asynchronous.monitor(),
            )

    predicted, explained, pictured, card, stored, document = asyncio.run(every_endpoint())
    assert without_ids(predicted) == without_ids(client.predict(inputs=[{"input": x[5].tolist()}]))
    assert without_ids(explained) == without_ids(client.explain(inputs=[{"input": x[5].tolist(), "target": 5}]))
    assert without_ids(pictured) == without_ids(client.predict_image(image=PNG, members=True))
    assert card == client.metadata()
    assert stored["stored"] == 1 and stored["duplicates"] == [] and stored["labels"] == document["feedback"]["labels"]
    assert document["monitoring"] is True and document["shift"]["rows"] >= 3  # predict, explain, predict_image


def test_schema_json_and_docs_json_say_null_in_the_same_places(server):
    """The client reads /schema.json, Swagger and schemathesis /docs.json: both say where null is sent or
    taken, in every route's request and answer, nested models included."""
    schema = httpx.get(f"{server}/schema.json").json()
    spec = httpx.get(f"{server}/docs.json").json()
    declared = spec["components"]["schemas"]["Prediction"]["properties"]
    nullable_in_spec = {name for name, prop in declared.items() if prop.get("nullable")}
    assert nullable_in_spec == {"id", "member_probs", "prediction_set", "set_size"}  # id: null with monitoring off
    in_schema, in_spec = nullable_fields(schema, spec)
    assert in_schema == in_spec
    assert {".shift.fired_at", ".window.estimated_accuracy", ".feedback.adaptive"} <= in_schema["monitor answer"]


def test_feedback_and_monitor_through_the_client(client, digits):
    x, y = digits
    labelled = client.monitor()["feedback"]["labels"]  # the session's server: other tests label rows too
    answers = client.predict(inputs=[{"input": x[i].tolist()} for i in range(3)])
    stored = client.feedback(items=[{"id": a["id"], "label": int(y[i])} for i, a in enumerate(answers)])
    assert stored["stored"] == 3 and stored["duplicates"] == []
    again = client.feedback(items=[{"id": answers[0]["id"], "label": "4"}])  # a class name works too
    assert again["stored"] == 0 and again["duplicates"] == [answers[0]["id"]]
    document = client.monitor()
    assert document["monitoring"] is True and document["feedback"]["labels"] == labelled + 3
    with pytest.raises(BentoMLException, match=r"items\[0\].id: expected the id of a stored prediction"):
        client.feedback(items=[{"id": "no-such-id", "label": 1}])
