"""The HTTP service: BentoML's real ASGI app in process (fast tier) and `bentoml serve` as a subprocess
with a real HTTP client (slow tier), the same assertions on both."""

import base64
import io
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

from forde_serve.runtime import EnsembleRuntime

from helpers import BLOCK_TORCH, MODEL, ROOT, copy_with_metadata, run_forde, start_server, stop_server

OUTPUTS = ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")


@pytest.fixture(scope="module")
def runtime():
    return EnsembleRuntime(MODEL)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32)[:, None], bunch.target


@pytest.fixture(scope="module")
def in_process():
    """BentoML's own HTTP app for the service (validation, error mapping, middleware), without a server."""
    from starlette.testclient import TestClient

    from forde_serve.app.service import FordeEnsemble

    with TestClient(FordeEnsemble.to_asgi()) as client:
        yield client


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
    for name in OUTPUTS:
        assert row[name] == pytest.approx(float(expected[name][i]), abs=1e-6)
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
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[["x"] * 8] * 8]}]}), 400, "non-numeric"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[[0] * 8] * 7 + [[0] * 3]]}]}), 400, "ragged"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[[True] * 8] * 8]}]}), 400, "expected numbers, got bool"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": [[["1.5"] * 8] * 8]}]}), 400, "expected numbers, got str"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": ROW, "member": True}]}), 400, "extra_forbidden"),
        (lambda c: _json(c, "predict", {"inputs": [{"input": ROW, "members": "maybe"}]}), 400, "valid boolean"),
        (
            lambda c: c.post("/predict_image", files={"image": ("a.txt", b"hello", "text/plain")}),
            400,
            "Invalid content type text/plain",
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
            400,
            "JSON",
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
        while b"request body" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "request body: expected at most" in answer
    assert httpx.post(f"{server}/predict", json={"inputs": [{"input": ROW}]}).status_code == 200


def _batches(url) -> tuple[float, float]:
    """(rows, batches) that went through adaptive batching so far, from BentoML's /metrics."""
    import re

    text = httpx.get(f"{url}/metrics").text
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
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "forde_ensemble").iterdir() if p.name != "latest"]
    src = bento / "src"
    assert (src / "exported" / "digits.onnx").is_file() and (src / "exported" / "digits.explain.onnx").is_file()
    assert (src / "forde_serve" / "app" / "service.py").is_file() and not (src / "training").exists()
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
    path = copy_with_metadata(MODEL, tmp_path, lambda p: p.update({"forde.image": "null"}))
    code = (
        "import pydantic, numpy as np\n"
        "from forde_serve.app.service import ExplainRow\n"
        "row = np.zeros((1, 8, 8)).tolist()\n"
        "assert ExplainRow(input=row).saliency_png is False\n"
        "try:\n"
        "    ExplainRow(input=row, saliency_png=True)\n"
        "except pydantic.ValidationError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ) | {"FORDE_MODEL": str(path)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saliency_png" in result.stdout and "inputs are not images" in result.stdout
