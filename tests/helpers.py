"""Helpers the tests share: the real `forde` command, servers on free ports, model-file surgery,
fake dataset folders. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
FORDE = str(Path(sys.executable).with_name("forde"))
MODEL = ROOT / "exported" / "digits.onnx"  # the committed default model


def run_forde(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `forde` console script as a real process."""
    kwargs.setdefault("cwd", ROOT)
    result = subprocess.run([FORDE, *map(str, args)], capture_output=True, text=True, **kwargs)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_extra: dict | None = None, timeout: float = 90.0, command: list[str] | None = None):
    """`bentoml serve` (or `command` + `--port N`) as a real subprocess on a free port; returns
    (process, base url) once /readyz answers."""
    import httpx

    port = free_port()
    # Its own BENTOML_HOME: every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
    # starts, which would wipe the /metrics of any other server on the machine (another test's, too).
    home = tempfile.mkdtemp(prefix="forde-bentoml-home-")
    env = dict(os.environ) | {"FORDE_MODEL": str(MODEL), "BENTOML_HOME": home} | (env_extra or {})
    command = command or [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "forde_serve.app.service:FordeEnsemble",
        "--host",
        "127.0.0.1",
    ]
    # The server's output (its log) goes to a file, not a pipe: nobody reads a pipe while the server runs,
    # and a full one would block the server. `process.log` is its path.
    with tempfile.NamedTemporaryFile(prefix="forde-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.log, process.home = Path(log.name), Path(home)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited: {process.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise AssertionError("bentoml serve did not become ready in time")


def stop_server(process) -> None:
    """Stop a server from `start_server` and everything left in its process group; remove its log and home."""
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the group: children that outlived their parent too
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.log.unlink(missing_ok=True)
    shutil.rmtree(process.home, ignore_errors=True)


# Put in front of `python -c` code: makes torch and torchvision unimportable in that process.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


def copy_with_metadata(src, dst_dir, change):
    """Copy an exported pair to `dst_dir/m.onnx` with `change(props)` applied to both files' metadata."""
    import onnx

    dst = dst_dir / "m.onnx"
    for suffix in (".onnx", ".explain.onnx"):
        model = onnx.load(str(src.with_name(src.name.replace(".onnx", suffix))))
        props = {p.key: p.value for p in model.metadata_props}
        change(props)
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(dst.with_name(dst.name.replace(".onnx", suffix))))
    return dst


def write_cifar(root, name, train_sizes, test_size, classes):
    """A fake CIFAR folder in torchvision's python layout, random images and labels."""
    rng = np.random.default_rng(0)

    def batch(n, label_key):
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, n in enumerate(train_sizes, 1):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n, "labels"), protocol=2))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(test_size, "labels"), protocol=2))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(classes)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(sum(train_sizes), "fine_labels"), protocol=2))
        (folder / "test").write_bytes(pickle.dumps(batch(test_size, "fine_labels"), protocol=2))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(classes)]}))
    return folder
