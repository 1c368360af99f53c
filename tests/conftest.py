"""Shared fixtures: the real `forde` command, a tiny config, and quickstart runs trained once per session."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FORDE = str(Path(sys.executable).with_name("forde"))


def run_forde(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `forde` console script as a real process."""
    result = subprocess.run([FORDE, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"forde {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


TINY = """
seed = 3
device = "cpu"
[model]
arch = "cnn"
width = 4
[ensemble]
method = "forde"
members = 3
[forde]
lengthscale = "{lengthscale}"
[optim]
epochs = {epochs}
lr = 0.05
"""


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny digits config (3 members, width-4 CNN): a second per epoch or less."""

    def write(epochs=2, lengthscale="pca"):
        path = tmp_path / f"tiny-{lengthscale}-{epochs}.toml"
        path.write_text(TINY.format(epochs=epochs, lengthscale=lengthscale))
        return path

    return write


@pytest.fixture(scope="session")
def quickstart_runs(tmp_path_factory):
    """The README's quickstart for both methods, trained once per test session."""
    out = tmp_path_factory.mktemp("quickstart")
    runs = {}
    for method in ("forde", "de"):
        runs[method] = out / method
        run_forde("train", "training/configs/digits.toml", "--method", method, "--out", runs[method], "--quiet")
    return runs


def epochs_checkpointed(run: Path) -> int:
    """Epochs finished in a run's last checkpoint (0 before the first one)."""
    from safetensors import safe_open

    path = run / "checkpoint.safetensors"
    if not path.exists():
        return 0
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["epoch"])


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="session")
def digits_export(quickstart_runs, tmp_path_factory):
    """The quickstart FoRDE run exported once per session with the real `forde export`."""
    path = tmp_path_factory.mktemp("exported") / "digits.onnx"
    result = run_forde("export", quickstart_runs["forde"], "--out", path)
    return path, result.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_extra: dict | None = None, timeout: float = 90.0, command: list[str] | None = None):
    """`bentoml serve` (or `command` + `--port N`) as a real subprocess on a free port; returns
    (process, base url) once /readyz answers."""
    import os
    import time

    import httpx

    port = free_port()
    env = dict(os.environ) | {"FORDE_MODEL": str(ROOT / "exported" / "digits.onnx")} | (env_extra or {})
    command = command or [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "forde_serve.service:FordeEnsemble",
        "--host",
        "127.0.0.1",
    ]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise AssertionError("bentoml serve did not become ready in time")


def stop_server(process) -> None:
    import os
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def server():
    """The default exported model behind a real `bentoml serve`, once per session."""
    process, url = start_server()
    yield url
    stop_server(process)
