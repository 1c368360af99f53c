"""The service is built from a model path by `make_service`, validated once: any exported file can be
served in process, and a file whose explain graph does not work stops the start, not a request."""

import json
import shutil

import numpy as np
import pytest
from starlette.testclient import TestClient

from forde_serve.app.service import FordeEnsemble, make_service
from forde_serve.app.settings import ServeSettings, SettingsError
from forde_serve.contract import ModelFileError

from helpers import MODEL, copy_with_metadata, in_process_app, nullable_fields, run_forde

ROW = np.zeros((1, 8, 8)).tolist()


def test_any_exported_file_is_served_in_process(tmp_path):
    names = [f"class-{i}" for i in range(10)]
    path = copy_with_metadata(MODEL, tmp_path, lambda p: p.update({"forde.class_names": json.dumps(names)}))
    service = make_service(ServeSettings(model=path, max_inputs=3))
    with TestClient(in_process_app(service)) as client:
        answer = client.post("/predict", json={"inputs": [{"input": ROW}] * 3})
        assert answer.status_code == 200 and answer.json()[0]["class_name"] in names
        too_many = client.post("/predict", json={"inputs": [{"input": ROW}] * 4})
        assert too_many.status_code == 400 and "at most 3" in too_many.json()["error"]
        card = client.post("/metadata", json={}).json()
        assert card["class_names"] == names and card["max_inputs_per_request"] == 3 and card["model"] == "m.onnx"
        explained = client.post("/explain", json={"inputs": [{"input": ROW, "target": "class-4"}]})
        assert explained.status_code == 200 and explained.json()[0]["target"] == 4


@pytest.mark.parametrize("damage", ["missing", "junk"])
def test_a_model_without_a_working_explain_graph_does_not_start(tmp_path, damage):
    path = tmp_path / "m.onnx"
    shutil.copy(MODEL, path)
    explain = tmp_path / "m.explain.onnx"
    if damage == "junk":
        explain.write_bytes(b"not an onnx file")
    with pytest.raises(ModelFileError, match="m.explain.onnx"):
        make_service(ServeSettings(model=path))
    result = run_forde("serve", path, check=False)
    assert result.returncode == 2 and "m.explain.onnx" in result.stderr and "Traceback" not in result.stderr


def test_settings_come_from_arguments_over_variables_over_defaults(tmp_path):
    assert ServeSettings.load(arguments={}, environ={}) == ServeSettings()
    environ = {"FORDE_MAX_INPUTS": "12", "FORDE_WORKERS": "2", "FORDE_BATCHING": "0"}
    settings = ServeSettings.load(arguments={"max_inputs": "30"}, environ=environ)
    assert (settings.max_inputs, settings.workers, settings.batching) == (30, 2, False)
    assert settings.onnx_threads() >= 1 and ServeSettings(threads=3, workers=2).onnx_threads() == 3
    assert ServeSettings.load(arguments={}, environ=settings.environment()) == settings


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        ({}, {"FORDE_MAX_INPUTS": "lots"}, "FORDE_MAX_INPUTS: input should be a valid integer"),
        ({"workers": "0"}, {}, "--arg workers: input should be greater than or equal to 1, got '0'"),
        ({"wokers": "2"}, {}, "--arg wokers: not a forde-serve setting; expected one of model, max_inputs"),
        ({}, {"FORDE_BATCHING": "sometimes"}, "FORDE_BATCHING: input should be a valid boolean"),
    ],
)
def test_a_bad_setting_is_one_sentence_naming_where_it_came_from(arguments, environ, message):
    with pytest.raises(SettingsError) as refused:
        ServeSettings.load(arguments=arguments, environ=environ)
    assert str(refused.value).startswith(message), str(refused.value)


def test_forde_serve_checks_its_settings_before_starting(tmp_path):
    result = run_forde("serve", env=_env(FORDE_MAX_INPUTS="lots"), check=False)
    assert result.returncode == 2 and result.stderr.startswith("Error: FORDE_MAX_INPUTS: input should be a valid")


def _env(**variables):
    import os

    return dict(os.environ) | variables


@pytest.fixture(scope="module")
def guarded_client(tmp_path_factory):
    service = make_service(ServeSettings(admin_token="let-me-in"))
    with TestClient(in_process_app(service)) as client:
        yield client


def test_with_a_token_the_write_paths_answer_401_without_it_and_work_with_it(guarded_client):
    client = guarded_client
    row = client.post("/predict", json={"inputs": [{"input": ROW}]}).json()[0]  # predictions need no token
    body = {"items": [{"id": row["id"], "label": 1}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "let-me-in"}):
        refused = client.post("/feedback", json=body, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["detail"][0]["field"] == "authorization"
        assert "Authorization: Bearer <FORDE_ADMIN_TOKEN>" in refused.json()["error"]
        assert client.post("/monitor", json={"reset": True}, headers=headers).status_code == 401
    assert client.get("/monitor").status_code == 200 and client.post("/monitor", json={}).status_code == 200
    stored = client.post("/feedback", json=body, headers={"Authorization": "Bearer let-me-in"})
    assert stored.status_code == 200 and stored.json()["stored"] == 1
    reset = client.post("/monitor", json={"reset": True}, headers={"Authorization": "Bearer let-me-in"})
    assert reset.status_code == 200 and reset.json()["shift"]["alarm"] is False


def test_a_reset_without_a_shift_reference_is_the_api_s_400(tmp_path):
    bare = copy_with_metadata(MODEL, tmp_path, lambda props: props.pop("forde.shift_reference"))
    with TestClient(in_process_app(make_service(ServeSettings(model=bare)))) as client:
        assert client.get("/monitor").json()["shift"] is None
        reset = client.post("/monitor", json={"reset": True})
        assert reset.status_code == 400 and "no validation reference" in reset.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/feedback", {}, 400, "items: Field required"),
        ("/feedback", {"items": []}, 400, "items: List should have at least 1 item"),
        ("/feedback", {"items": [{"id": "x"}]}, 400, "items[0].label: Field required"),
        ("/feedback", {"items": [{"id": "x", "label": True}]}, 400, "items[0].label: expected a class index"),
        ("/feedback", {"items": [{"id": "x", "label": 10}]}, 400, "items[0].label: expected a class index in [0, 9]"),
        ("/feedback", {"items": [{"id": "", "label": 1}]}, 400, "items[0].id: String should have at least 1"),
        ("/feedback", {"items": [{"id": "x", "label": 1, "why": "?"}]}, 400, "items[0].why: unknown field"),
        ("/feedback", {"items": [{"id": "never-served", "label": 1}]}, 400, "items[0].id: expected the id of"),
        ("/monitor", {"reset": "yes"}, 400, "reset: Input should be a valid boolean"),
        ("/monitor", {"verbose": True}, 400, "verbose: unknown field"),
    ],
)
def test_bad_input_to_feedback_and_monitor_is_a_4xx_in_the_one_shape(in_process, path, body, status, fragment):
    response = in_process.post(path, json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "detail"} and fragment in answer["error"], answer
    assert in_process.post("/predict", json={"inputs": [{"input": ROW}]}).status_code == 200  # still serving


def test_the_swagger_page_loads_nothing_from_elsewhere_and_the_spec_is_the_project_s(in_process):
    import re

    from forde_serve import __version__

    page = in_process.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("./static_content/") for s in sources), sources
    assert "googletagmanager" not in page.text and "http" not in page.text.replace("http-equiv", "")
    for asset in sources:
        assert in_process.get(asset.removeprefix(".")).status_code == 200, asset  # served by this server
    info = in_process.get("/docs.json").json()["info"]
    assert info["title"] == "forde-serve" and info["version"] == __version__
    assert "BentoML" not in info["description"] and "ErrorBody" in info["description"]
    spec = in_process.get("/docs.json").json()
    assert spec["components"]["schemas"]["PredictInput"]["additionalProperties"] is False
    assert "get" in spec["paths"]["/monitor"] and "401" in spec["paths"]["/feedback"]["post"]["responses"]


def test_schema_json_and_docs_json_say_null_in_the_same_places_in_every_model(in_process):
    """BentoML's client reads /schema.json (null as `anyOf [.., null]`), Swagger and schemathesis /docs.json
    (OpenAPI 3.0's `nullable: true`): every route's request and answer, nested models and list items
    included, may hold null in the same fields by both."""
    schema = in_process.get("/schema.json").json()
    in_schema, in_spec = nullable_fields(schema, in_process.get("/docs.json").json())
    assert set(in_schema) == {f"{api} {side}" for api in FordeEnsemble.apis for side in ("request", "answer")}
    for route in sorted(in_schema):
        assert in_schema[route] == in_spec[route], route
    # the fields the client once read as plain numbers, lists or integers
    assert in_schema["monitor answer"] >= {
        ".shift",
        ".shift.fired_at",
        ".window.estimated_accuracy",
        ".window.mean_mutual_information",
        ".window.abstain_rate",
        ".feedback.accuracy",
        ".feedback.adaptive",
    }
    assert ".inputs[].target" in in_schema["explain request"] and ".coverage" in in_schema["predict_image request"]
    assert {"[].member_probs", "[].prediction_set"} <= in_schema["predict answer"]
    assert '"nullable"' not in json.dumps(schema), "/schema.json says null as anyOf [.., null], which the client reads"
