"""The HTTP service: BentoML's real ASGI app in process (fast tier) and `bentoml serve` as a subprocess
with a real HTTP client (slow tier), the same assertions on both."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from forde_serve.images import image_to_input
from forde_serve.runtime import EnsembleRuntime

from helpers import BLOCK_TORCH, MODEL, ROOT, copy_with_metadata, run_forde, start_server, stop_server, without_ids

OUTPUTS = ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")


@pytest.fixture(params=["in-process", pytest.param("bentoml-serve", marks=pytest.mark.slow)])
def client(request):
    """An HTTP client of the service: the in-process app, or a real `bentoml serve` on a free port."""
    if request.param == "in-process":
        yield request.getfixturevalue("in_process")
        return
    with httpx.Client(base_url=request.getfixturevalue("server"), timeout=60) as http:
        yield http


def _assert_matches(row, expected, i):
    assert row["predicted_class"] == int(expected["predicted_class"][i])
    assert row["class_name"] == str(int(expected["predicted_class"][i]))
    np.testing.assert_allclose(row["probs"], expected["probs"][i], atol=1e-6)
    # A row may run in another batch than the runtime's call (adaptive batching), and onnxruntime's
    # kernels round differently per batch size; the temperature (1/T = 6.6 on the committed model)
    # scales those float32 differences before the entropies: measured up to 1.01e-6 on 64 rows.
    for name in OUTPUTS:
        assert row[name] == pytest.approx(float(expected[name][i]), abs=1e-5)
    assert row["abstain"] == bool(expected["abstain"][i])


def test_predict_equals_the_runtime(client, runtime, digits):
    x = digits[0][:5]
    response = client.post(
        "/predict", json={"inputs": [{"input": row.tolist(), "members": i == 0} for i, row in enumerate(x)]}
    )
    assert response.status_code == 200, response.text
    rows, expected = response.json(), runtime.predict(x)
    assert len(rows) == 5
    for i, row in enumerate(rows):
        _assert_matches(row, expected, i)
    np.testing.assert_allclose(rows[0]["member_probs"], expected["member_probs"][0], atol=1e-6)
    assert rows[1]["member_probs"] is None


def test_explain_returns_every_members_gradient(client, runtime, digits):
    x = digits[0][:2]
    body = {"inputs": [{"input": x[0].tolist(), "saliency_png": True}, {"input": x[1].tolist(), "target": "7"}]}
    response = client.post("/explain", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()
    expected = runtime.explain(x, target=[-1, 7])
    np.testing.assert_allclose(first["input_gradients"], expected["input_gradients"][0], atol=1e-5)
    np.testing.assert_allclose(second["input_gradients"], expected["input_gradients"][1], atol=1e-5)
    np.testing.assert_allclose(second["mean_gradient"], expected["input_gradients"][1].mean(0), atol=1e-5)
    assert (first["target"], second["target"]) == (first["predicted_class"], 7)
    picture = Image.open(io.BytesIO(base64.b64decode(first["saliency_png"])))
    assert picture.format == "PNG" and picture.width > 10 * picture.height / 2  # input, mean, 8 members
    assert second["saliency_png"] is None


def _png(array2d: np.ndarray, size: int = 64) -> bytes:
    """A digit as a person would photograph it: dark ink on white, larger than 8x8."""
    ink = np.uint8(255 - array2d / 16 * 255)
    buffer = io.BytesIO()
    Image.fromarray(ink).resize((size, size), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_image_converts_as_the_metadata_says(client, runtime, digits):
    x, labels = digits
    correct = 0
    for i in range(10):
        png = _png(x[i, 0])
        response = client.post("/predict_image", files={"image": ("d.png", png, "image/png")})
        assert response.status_code == 200, response.text
        picture = Image.open(io.BytesIO(png)).convert("L").resize((8, 8), Image.BILINEAR)
        converted = (255.0 - np.asarray(picture, dtype=np.float32)) * (16 / 255)
        expected = runtime.predict(converted[None, None])
        _assert_matches(response.json(), expected, 0)
        correct += response.json()["predicted_class"] == labels[i]
    assert correct >= 8


def test_metadata_is_the_model_card(client, runtime):
    card = client.post("/metadata", json={}).json()
    assert card["class_names"] == list(runtime.card.class_names) and card["input_shape"] == [1, 8, 8]
    assert (card["members"], card["method"]) == (8, "forde")
    assert card["abstain_threshold"] == runtime.card.abstain_threshold
    assert card["metrics"]["accuracy"] >= 0.95 and card["image"]["mode"] == "L"


@pytest.mark.slow
def test_builtin_endpoints_stay(server):
    assert httpx.get(f"{server}/readyz").status_code == 200
    assert httpx.get(f"{server}/livez").status_code == 200
    assert "bentoml_service_request" in httpx.get(f"{server}/metrics").text
    assert "/predict" in httpx.get(f"{server}/docs.json").json()["paths"]


ROW = np.zeros((1, 8, 8)).tolist()


def _raw_body(row_text: str) -> bytes:
    return b'{"inputs": [{"input": ' + row_text.encode() + b"}]}"


def _first_pixel(text: str) -> str:
    """An all-zero [1, 8, 8] row as JSON text whose first pixel is `text` (e.g. NaN, which json.dumps won't write)."""
    return "[[[" + text + ", 0" * 7 + "]" + ", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + "]]"


def _json(c, endpoint, body):
    return c.post(f"/{endpoint}", json=body)


def _raw(c, endpoint, content: bytes, content_type="application/json"):
    return c.post(f"/{endpoint}", content=content, headers={"content-type": content_type})


@pytest.mark.parametrize(
    "send,status,message",
    [
        (
            lambda c: _json(c, "predict", {"inputs": [{"input": np.zeros((8, 8)).tolist()}]}),
            400,
            "input: expected shape [1, 8, 8], got [8, 8]",
        ),
        (
            lambda c: _json(c, "predict", {"inputs": [{"input": [[["x"] * 8] * 8]}]}),
            400,
            "expected numbers, got strings",
        ),
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[[0] * 8] * 7 + [[0] * 3]]}]}), 400, "ragged"),
        (
            lambda c: _json(c, "predict", {"inputs": [{"input": [[[True] * 8] * 8]}]}),
            400,
            "inputs[0].input: expected numbers, got true/false",
        ),
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[["1.5"] * 8] * 8]}]}), 400, "expected numbers, got str"),
        (
            lambda c: _json(c, "predict", {"inputs": [{"input": ROW, "member": True}]}),
            400,
            "inputs[0].member: unknown field",
        ),
        (lambda c: _json(c, "predict", {"inputs": [{"input": ROW}], "coverage": 0.9}), 400, "coverage: unknown field"),
        (lambda c: _json(c, "explain", {"inputs": [{"input": ROW}], "target": 1}), 400, "target: unknown field"),
        (lambda c: _json(c, "metadata", {"verbose": True}), 400, "verbose: unknown field"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": ROW, "members": "maybe"}]}), 400, "valid boolean"),
        (
            lambda c: c.post("/predict_image", files={"image": ("a.txt", b"hello", "text/plain")}),
            400,
            "image: expected a PNG, JPEG, WEBP, BMP, TIFF or GIF picture, got data that does not decode",
        ),
        (
            lambda c: _raw(
                c, "predict", _raw_body("[[[NaN" + ", 0" * 7 + "]" + ", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + "]]")
            ),
            400,
            "expected finite float32 values",
        ),
        (
            lambda c: _raw(
                c, "predict", _raw_body("[[[1e999" + ", 0" * 7 + "]" + ", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + "]]")
            ),
            400,
            "expected finite float32 values",
        ),
        (
            lambda c: _raw(
                c, "predict", _raw_body("[[[1e39" + ", 0" * 7 + "]" + ", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + "]]")
            ),
            400,
            "beyond +-3.4e38",
        ),
        (lambda c: _json(c, "predict", {"inputs": []}), 400, "at least 1 item"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": ROW}] * 257}), 400, "at most 256 items"),
        (
            lambda c: _raw(c, "predict", b'{"inputs": ['),
            400,
            "Invalid JSON",
        ),
        (
            lambda c: _raw(c, "predict", b"inputs=1", "text/plain"),
            415,
            "/predict takes a JSON body (content-type: application/json), got text/plain",
        ),
        (lambda c: _json(c, "predict", {"inputs": "all of them"}), 400, "inputs"),
        (lambda c: _json(c, "explain", {"inputs": [{"input": ROW, "target": "cat"}]}), 400, "unknown class 'cat'"),
        (
            lambda c: _json(c, "explain", {"inputs": [{"input": ROW, "target": 10}]}),
            400,
            "class index in [0, 9], got 10",
        ),
        (
            lambda c: c.post("/predict_image", files={"image": ("x.png", b"\x89PNG not really", "image/png")}),
            400,
            "image: expected a PNG, JPEG",
        ),
    ],
)
def test_bad_input_is_a_4xx_that_names_it_and_the_server_keeps_serving(client, send, status, message):
    response = send(client)
    assert response.status_code == status, response.text
    assert message in response.text
    assert _json(client, "predict", {"inputs": [{"input": ROW}]}).status_code == 200


def test_oversized_image_is_refused(client):
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000), 255).save(buffer, format="PNG")  # compresses to a few KB
    response = client.post("/predict_image", files={"image": ("big.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 413 and "expected at most" in response.text
    assert _json(client, "predict", {"inputs": [{"input": ROW}]}).status_code == 200


@pytest.mark.slow
def test_oversized_body_is_refused_before_it_is_read(server):
    # As an `Expect: 100-continue` client does: headers first, then read the answer.
    parsed = urlparse(server)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = b""
        while b"expected at most" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "body: expected at most 8388608 bytes, got 100000000" in answer
    assert httpx.post(f"{server}/predict", json={"inputs": [{"input": ROW}]}).status_code == 200


def _batches(url) -> tuple[float, float]:
    """(rows, batches) that went through adaptive batching so far, from BentoML's /metrics."""
    with httpx.Client(base_url=url) as client:
        return _batch_counts(client)


def _batch_counts(client) -> tuple[float, float]:
    """(rows, batches) that went through adaptive batching so far, from the service's /metrics."""
    import re

    text = client.get("/metrics").text
    rows = sum(
        float(v)
        for v in re.findall(
            r'^bentoml_service_adaptive_batch_size_sum\{[^}]*method_name="predict"[^}]*\} (\S+)', text, re.M
        )
    )
    count = sum(
        float(v)
        for v in re.findall(
            r'^bentoml_service_adaptive_batch_size_count\{[^}]*method_name="predict"[^}]*\} (\S+)', text, re.M
        )
    )
    return rows, count


@pytest.mark.slow
def test_64_concurrent_clients_each_get_their_own_answer(server, runtime, digits):
    x = digits[0][:64]
    expected = runtime.predict(x)
    rows_before, batches_before = _batches(server)

    def call(i):
        with httpx.Client(timeout=60) as client:
            return i, client.post(f"{server}/predict", json={"inputs": [{"input": x[i].tolist()}]})

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(call, range(64)))
    for i, response in answers:
        assert response.status_code == 200, response.text
        rows = response.json()
        assert len(rows) == 1
        _assert_matches(rows[0], expected, i)
    rows_after, batches_after = _batches(server)
    assert rows_after - rows_before == 64
    assert batches_after - batches_before < 64, "no two requests were batched together"


@pytest.mark.slow
def test_bentoml_build_packs_the_model_and_no_torch(tmp_path):
    env = dict(os.environ) | {
        "BENTOML_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # a user's own export left in exported/ (as a README example once did) must not ride along
    decoy = ROOT / "exported" / "left-here.onnx"
    decoy.write_bytes(b"not packed")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bentoml", "build"], cwd=ROOT, env=env, capture_output=True, text=True
        )
    finally:
        decoy.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "forde_ensemble").iterdir() if p.name != "latest"]
    src = bento / "src"
    assert sorted(p.name for p in (src / "exported").iterdir()) == ["digits.explain.onnx", "digits.onnx"]
    assert (src / "forde_serve" / "app" / "service.py").is_file() and not (src / "training").exists()
    assert (src / "forde_serve" / "app" / "examples" / "digit-3.png").is_file()  # the /ui page's examples
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements
    # the packed source serves without torch: import the service module there with torch blocked
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_TORCH + "import forde_serve.app.service as s; "
            "print(s.__file__); print(s.FordeEnsemble.inner().runtime.card.members)",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        env=dict(os.environ) | {"PYTHONPATH": str(src)},
    )
    assert check.returncode == 0, check.stderr[-2000:]
    module_file, members = check.stdout.split()
    assert module_file.startswith(str(src)) and members == "8"


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [["-m", "bentoml", "serve"], ["forde", "serve", "exported/digits.onnx"]],
    ids=["readme-bentoml-serve", "forde-serve"],
)
def test_the_documented_ways_to_start_the_server(command):
    executable = [sys.executable] if command[0] == "-m" else [str(Path(sys.executable).with_name("forde"))]
    process, url = start_server(
        command=executable + command[command[0] != "-m" :],
        env_extra={"FORDE_MODEL": ""} if command[0] == "-m" else None,
    )
    try:
        card = httpx.post(f"{url}/metadata", json={}, timeout=30).json()
        assert card["model"] == "digits.onnx" and card["members"] == 8
    finally:
        stop_server(process)


def test_forde_serve_refuses_a_bad_model_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"junk")
    result = run_forde("serve", tmp_path / "m.onnx", check=False)
    assert result.returncode == 2 and "is not a loadable ONNX model" in result.stderr


def test_saliency_is_refused_for_models_without_images(tmp_path):
    import pydantic

    from forde_serve.app.schemas import api_models

    path = copy_with_metadata(MODEL, tmp_path, lambda p: p.update({"forde.image": "null"}))
    explain_row = api_models(EnsembleRuntime(path), max_inputs=8).explain_row
    row = np.zeros((1, 8, 8)).tolist()
    assert explain_row(input=row).saliency_png is False
    with pytest.raises(pydantic.ValidationError, match="inputs are not images") as refused:
        explain_row(input=row, saliency_png=True)
    assert refused.value.errors()[0]["loc"] == ("saliency_png",)


# What a fuzzer and a browser found: wrong answers, 5xx, a spec that lied.


def _strict_json(response):
    """The body as JSON, refusing the bare NaN / Infinity that Python's json would accept."""

    def refuse(token):
        raise AssertionError(f"bare {token} in a JSON body: {response.text[:300]}")

    return json.loads(response.text, parse_constant=refuse)


def _assert_error_shape(response, status, *fragments):
    """One error shape for every endpoint and every 4xx: {"error": sentence, "detail": [{field, message}]}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = _strict_json(response)
    assert isinstance(body, dict) and set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], list) and body["detail"], body
    assert all(set(p) == {"field", "message"} and all(isinstance(v, str) for v in p.values()) for p in body["detail"])
    for fragment in fragments:
        assert fragment in body["error"], body
    assert "/tmp" not in response.text and "bentoml-request" not in response.text  # no server paths
    return body


def _still_serving(client):
    assert _json(client, "predict", {"inputs": [{"input": ROW}]}).status_code == 200


def test_values_that_overflow_inside_the_graph_are_a_400_naming_the_rows(client):
    # 3e38 is a finite float32, but the graph's arithmetic overflows on it into NaN.
    overflow = _strict_json_row("3e38")
    rows = [{"input": ROW}, {"input": overflow}, {"input": ROW}, {"input": overflow}]
    for endpoint in ("predict", "explain"):
        response = _raw(client, endpoint, json.dumps({"inputs": rows}).encode())
        _assert_error_shape(response, 400, "inputs", "row(s) 1, 3", "not finite")
    _still_serving(client)


def _count_batches(client, monkeypatch):
    """A function giving (rows, graph calls) of `/predict` since now: from /metrics of a real server; in
    process, where BentoML's metrics are not set up, by watching the service's runtime (nothing replaced)."""
    if client.base_url.host != "testserver":
        rows, calls = _batch_counts(client)
        return lambda: tuple(after - before for after, before in zip(_batch_counts(client), (rows, calls), strict=True))
    from forde_serve.app.service import FordeEnsemble

    runtime = FordeEnsemble.inner.runtime
    sizes, predict = [], runtime.predict

    def watched(x):
        sizes.append(len(x))
        return predict(x)

    monkeypatch.setattr(runtime, "predict", watched)
    return lambda: (sum(sizes), len(sizes))


def _strict_json_row(first_pixel: str):
    return json.loads(_first_pixel(first_pixel))


def test_one_callers_overflow_does_not_fail_another_callers_batch(client, runtime, digits, monkeypatch):
    """Adaptive batching runs concurrent requests as one graph call: a row that overflows must fail its own
    request only. Whether requests share a batch is up to BentoML's timing, so bursts are sent until one did."""
    x = digits[0][:24]
    expected = runtime.predict(x)
    overflow = _strict_json_row("3e38")

    def call(i):
        row = overflow if i % 4 == 1 else x[i].tolist()
        return i, client.post("/predict", json={"inputs": [{"input": row}]})

    for _ in range(5):
        batches = _count_batches(client, monkeypatch)
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(24)))
        for i, response in answers:
            if i % 4 == 1:
                _assert_error_shape(response, 400, "row(s) 0")
            else:
                assert response.status_code == 200, response.text
                row = _strict_json(response)[0]
                assert row["predicted_class"] == int(expected["predicted_class"][i])
                np.testing.assert_allclose(row["probs"], expected["probs"][i], atol=1e-5)
        rows, calls = batches()
        assert rows == 24
        if calls < 24:
            return
    pytest.fail("in five bursts of 24 concurrent requests no two were batched together: nothing was tested")


@pytest.mark.parametrize("digits_count", [39, 309, 400, 4000])
def test_a_huge_integer_pixel_is_a_400_naming_the_field(client, digits_count):
    response = _raw(client, "predict", _raw_body(_first_pixel("9" * digits_count)))
    _assert_error_shape(response, 400, "inputs[0].input", "expected finite float32 values")
    _still_serving(client)


def test_an_integer_too_long_to_parse_is_a_400_at_its_place_in_the_body(client):
    # pydantic's JSON parser, like Python's int(), stops at 4300 digits: the body itself is refused
    response = _raw(client, "predict", _raw_body(_first_pixel("9" * 5000)))
    _assert_error_shape(response, 400, "body: Invalid JSON: number out of range at line 1 column")
    _still_serving(client)


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart/form-data body: parts are (field name, file name or None for a text field, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


ENDPOINTS = ("predict", "explain", "predict_image", "metadata")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=not-the-one-used"],
)
def test_multipart_without_a_usable_boundary_is_a_4xx_on_every_endpoint(client, endpoint, content_type):
    body = _multipart("the-one-used", [("image", "d.png", _png(np.zeros((8, 8))))])
    response = _raw(client, endpoint, body, content_type)
    if endpoint == "predict_image":
        _assert_error_shape(response, 400, "multipart")
    else:  # a JSON endpoint: the media type is the mistake
        _assert_error_shape(response, 415, "application/json")
    _still_serving(client)


@pytest.mark.parametrize(
    "send,status,fragments",
    [
        # an image posted to an endpoint that takes JSON
        (lambda c: c.post("/predict", files={"image": ("d.png", _png(np.zeros((8, 8))), "image/png")}), 415, []),
        (lambda c: _raw(c, "predict", _png(np.zeros((8, 8))), "image/png"), 415, ["image/png"]),
        (lambda c: _raw(c, "explain", b"input=1", "application/x-www-form-urlencoded"), 415, []),
        # the wrong field name, a text part where a file is expected, no file at all
        (
            lambda c: c.post("/predict_image", files={"picture": ("d.png", _png(np.zeros((8, 8))), "image/png")}),
            400,
            ["picture", "image"],
        ),
        (lambda c: _raw(c, "predict_image", _multipart("b", [("image", None, b"d.png")]), _MP), 400, ["image", "file"]),
        (lambda c: _raw(c, "predict_image", _multipart("b", [("members", None, b"true")]), _MP), 400, ["image"]),
        (
            lambda c: _raw(c, "predict_image", _multipart("b", [("members", "m.json", b"true")] + _IMG), _MP),
            400,
            ["members"],
        ),
        (lambda c: _raw(c, "predict_image", _multipart("b", _IMG + _IMG), _MP), 400, ["image", "2"]),
        # JSON, or a form, where a picture is expected
        (lambda c: _json(c, "predict_image", {"image": "d.png"}), 415, ["multipart/form-data"]),
        (lambda c: _raw(c, "predict_image", b"image=d.png", "application/x-www-form-urlencoded"), 415, []),
    ],
)
def test_the_wrong_kind_of_body_is_a_4xx_that_says_what_the_endpoint_takes(client, send, status, fragments):
    response = send(client)
    _assert_error_shape(response, status, *fragments)
    _still_serving(client)


_MP = "multipart/form-data; boundary=b"
_IMG = [("image", "d.png", _png(np.zeros((8, 8))))]


@pytest.fixture
def url_trap():
    """A local HTTP server that counts the requests it gets: the service must never fetch a client's URL."""
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            self.wfile.write(_png(np.zeros((8, 8))))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/digit.png", hits
    server.shutdown()


def test_urls_sent_by_a_client_are_never_fetched(client, url_trap):
    url, hits = url_trap
    attempts = [
        client.post("/predict_image", data={"image": url}),
        _raw(client, "predict_image", _multipart("b", [("image", None, url.encode())]), _MP),
        _json(client, "predict_image", {"image": url}),
        _raw(client, "predict_image", url.encode(), "text/plain"),
        _raw(client, "predict_image", f"image={url}".encode(), "application/x-www-form-urlencoded"),
        _raw(client, "predict", url.encode(), "text/plain"),
    ]
    for response in attempts:
        assert 400 <= response.status_code < 500, response.text
    assert hits == []
    _still_serving(client)


def _encoded(array2d: np.ndarray, format: str, **options) -> bytes:
    ink = np.uint8(255 - array2d / 16 * 255)
    buffer = io.BytesIO()
    Image.fromarray(ink).resize((32, 32), Image.NEAREST).save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "format,options", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("GIF", {})]
)
@pytest.mark.parametrize("filename", ["digit", "digit.bin", "digit.png"])
def test_the_image_type_comes_from_the_content_not_the_name_or_declared_type(
    client, runtime, digits, format, options, filename
):
    x = digits[0][3, 0]
    data = _encoded(x, format, **options)
    response = client.post("/predict_image", files={"image": (filename, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    reference = _encoded(x, "PNG")
    expected = client.post("/predict_image", files={"image": ("d.png", reference, "image/png")}).json()
    assert without_ids(_strict_json(response)) == without_ids(expected)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bomb(width: int, height: int, text_bytes: int = 0) -> bytes:
    """A few KB of PNG that claims `width` x `height` pixels, or carries a zTXt chunk inflating to `text_bytes`."""
    import struct
    import zlib

    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    text = _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * text_bytes, 9)) if text_bytes else b""
    data = _png_chunk(b"IDAT", zlib.compress(b"\x00" + b"\xff" * width))
    return b"\x89PNG\r\n\x1a\n" + header + text + data + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data",
    [_png_bomb(20000, 20000), _png_bomb(60000, 60000), _png_bomb(8, 1, text_bytes=32 * 1024 * 1024)],
    ids=["400-megapixels", "3600-megapixels", "inflating-text-chunk"],
)
def test_a_decompression_bomb_is_a_413(client, data):
    response = client.post("/predict_image", files={"image": ("bomb.png", data, "image/png")})
    _assert_error_shape(response, 413, "image")
    _still_serving(client)


def test_an_undecodable_upload_does_not_leak_server_paths(client):
    for data in (b"\x89PNG not really", b"GIF89a" + b"\x00" * 20, _encoded(np.zeros((8, 8)), "PNG")[:60]):
        response = client.post("/predict_image", files={"image": ("x.png", data, "image/png")})
        _assert_error_shape(response, 400, "image")
    _still_serving(client)


@pytest.mark.parametrize(
    "endpoint,row,field",
    [
        ("predict", {"members": "yes"}, "members"),
        ("predict", {"members": 1}, "members"),
        ("explain", {"saliency_png": 1}, "saliency_png"),
        ("explain", {"target": True}, "target"),
        ("explain", {"target": 3.0}, "target"),
    ],
)
def test_booleans_and_integers_are_strict(client, endpoint, row, field):
    response = _json(client, endpoint, {"inputs": [{"input": ROW} | row]})
    _assert_error_shape(response, 400, f"inputs[0].{field}")
    _still_serving(client)


def test_a_members_form_field_must_be_a_boolean(client):
    png = _png(np.zeros((8, 8)))
    for value in ("yes", "1", '"true"'):
        response = client.post("/predict_image", files={"image": ("d.png", png, "image/png")}, data={"members": value})
        _assert_error_shape(response, 400, "members")
    answer = client.post("/predict_image", files={"image": ("d.png", png, "image/png")}, data={"members": "true"})
    assert answer.status_code == 200 and len(answer.json()["member_probs"]) == 8


def test_every_error_has_one_shape(client):
    """The body of every 4xx, from whichever layer refused the request, has the same two keys."""
    cases = [
        (client.get("/predict"), 405),
        (_json(client, "predict", {"inputs": [{"input": ROW, "member": True}]}), 400),
        (_json(client, "predict", {"inputs": []}), 400),
        (_raw(client, "predict", b'{"inputs": ['), 400),
        (_json(client, "explain", {"inputs": [{"input": ROW, "target": "cat"}]}), 400),
        (client.post("/predict_image", files={"image": ("x.png", b"junk", "image/png")}), 400),
        (client.post("/predict_image", files={"image": ("x.png", _png_bomb(20000, 20000), "image/png")}), 413),
        (_raw(client, "metadata", b"[1, 2]"), 400),
    ]
    for response, status in cases:
        _assert_error_shape(response, status)


def test_the_openapi_spec_describes_what_the_service_does(client):
    spec = client.get("/docs.json").json()
    schemas = spec["components"]["schemas"]
    error = schemas["ErrorBody"]
    assert error["properties"]["detail"]["type"] == "array" and "error" in error["required"]
    for path in ("/predict", "/explain", "/predict_image", "/metadata"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "413", "415"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }, (path, status)
        assert "404" not in responses
    # member_probs is null unless asked for; saliency_png is null unless asked for
    assert schemas["Prediction"]["properties"]["member_probs"]["nullable"] is True
    assert schemas["Explanation"]["properties"]["saliency_png"]["nullable"] is True
    form = spec["paths"]["/predict_image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["additionalProperties"] is False and form["required"] == ["image"]
    image_answer = spec["paths"]["/predict_image"]["post"]["responses"]["200"]["content"]["application/json"]
    assert image_answer["schema"] == {"$ref": "#/components/schemas/Prediction"}
    # an input is described with its shape, so a client (or a fuzzer) can build a valid one
    row = schemas["PredictRow"]["properties"]["input"]
    assert (row["minItems"], row["maxItems"], row["items"]["minItems"], row["items"]["items"]["maxItems"]) == (
        1,
        1,
        8,
        8,
    )
    assert row["items"]["items"]["items"]["type"] == "number"
    assert schemas["PredictRow"]["properties"]["members"]["type"] == "boolean"


def test_a_refused_request_is_logged_on_one_line_a_server_error_keeps_its_traceback():
    """The filter on BentoML's request logger, on the records BentoML writes ("Exception on %s [%s]")."""
    import logging
    import sys

    import pydantic
    from bentoml.exceptions import InvalidArgument

    from forde_serve.app import service  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bentoml._internal.server.http_app")

    def record_of(error):
        try:
            raise error
        except Exception:
            record = logger.makeRecord(logger.name, logging.ERROR, "x", 1, "Exception on %s [%s]", ("/p", "POST"), None)
            record.exc_info = sys.exc_info()
        assert all(f.filter(record) for f in logger.filters)
        return record

    try:
        pydantic.TypeAdapter(bool, config={"strict": True}).validate_python("yes")
    except pydantic.ValidationError as err:
        validation = err
    for error, expected in (
        (validation, "Refused /p [POST]: body: Input should be a valid boolean"),
        (InvalidArgument("inputs: expected more"), "Refused /p [POST]: inputs: expected more"),
    ):
        record = record_of(error)
        assert record.getMessage() == expected and record.exc_info is None and record.levelname == "WARNING"
    record = record_of(ValueError("a bug"))
    assert record.getMessage() == "Exception on /p [POST]" and record.exc_info[0] is ValueError
    assert record.levelname == "ERROR"


def test_coverage_returns_the_runtimes_prediction_sets_as_class_names(client, runtime, digits):
    x = digits[0][:6]
    rows = [{"input": row.tolist(), "coverage": 0.9 if i % 2 else 0.99} for i, row in enumerate(x)]
    rows[0].pop("coverage")  # rows of one request may ask for different levels, or none
    response = client.post("/predict", json={"inputs": rows})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert answers[0]["prediction_set"] is None and answers[0]["set_size"] is None
    for i in range(1, 6):
        expected = runtime.predict(x[i : i + 1], coverage=rows[i]["coverage"])
        members = np.flatnonzero(expected["prediction_set"][0])
        assert answers[i]["prediction_set"] == [runtime.card.class_names[k] for k in members]
        assert answers[i]["set_size"] == int(expected["set_size"][0]) == len(members)
    explained = client.post("/explain", json={"inputs": [{"input": x[1].tolist(), "coverage": 0.95}]})
    assert explained.status_code == 200, explained.text
    expected = runtime.predict(x[1:2], coverage=0.95)["prediction_set"][0]
    assert explained.json()[0]["prediction_set"] == [runtime.card.class_names[k] for k in np.flatnonzero(expected)]
    assert explained.json()[0]["set_size"] == int(expected.sum())
    image = client.post(
        "/predict_image", files={"image": ("d.png", _png(x[1, 0]), "image/png")}, data={"coverage": "0.8"}
    )
    assert image.status_code == 200, image.text
    pictured = image_to_input(io.BytesIO(_png(x[1, 0])), runtime.card.image)
    expected = runtime.predict(pictured[None], coverage=0.8)["prediction_set"][0]
    assert image.json()["prediction_set"] == [runtime.card.class_names[k] for k in np.flatnonzero(expected)]
    assert image.json()["set_size"] == int(expected.sum())


@pytest.mark.parametrize("endpoint", ["/predict", "/explain", "/predict_image"])
def test_an_unknown_coverage_level_is_a_400_listing_the_stored_ones(client, digits, endpoint):
    x = digits[0][0]
    if endpoint == "/predict_image":
        response = client.post(
            "/predict_image", files={"image": ("d.png", _png(x[0]), "image/png")}, data={"coverage": "0.5"}
        )
    else:
        response = client.post(endpoint, json={"inputs": [{"input": x.tolist(), "coverage": 0.5}]})
    assert response.status_code == 400
    assert "coverage" in response.text and "0.8, 0.9, 0.95, 0.99" in response.text and "0.5" in response.text
    assert client.post("/predict", json={"inputs": [{"input": x.tolist()}]}).status_code == 200  # still serving


@pytest.mark.slow
def test_a_file_exported_before_prediction_sets_serves_as_before_and_refuses_coverage(tmp_path, runtime, digits):
    old = copy_with_metadata(
        MODEL, tmp_path, lambda props: [props.pop(key, None) for key in ("forde.calibration", "forde.conformal")]
    )
    process, url = start_server({"FORDE_MODEL": str(old)})
    try:
        x = digits[0][:3]
        plain = httpx.post(f"{url}/predict", json={"inputs": [{"input": row.tolist()} for row in x]}, timeout=60)
        assert plain.status_code == 200, plain.text
        for i, row in enumerate(plain.json()):
            _assert_matches(row, runtime.predict(x), i)  # the same graphs: only the metadata is older
            assert row["prediction_set"] is None
        asked = httpx.post(f"{url}/predict", json={"inputs": [{"input": x[0].tolist(), "coverage": 0.9}]}, timeout=60)
        assert asked.status_code == 400 and "no conformal thresholds" in asked.text
        card = httpx.post(f"{url}/metadata", json={}, timeout=60).json()
        assert card["coverage_levels"] == [] and card["temperature"] == 1.0
    finally:
        stop_server(process)
