"""Fixtures: a tiny config, the quickstart runs and their export (trained once per session), the service
in process and behind a real server."""

import os
import tempfile

import pytest

from helpers import MODEL, TINY, run_forde, start_server, stop_server


def pytest_configure(config):
    # The servers and monitors the tests start keep their state here, never in the user's ~/.local/state.
    os.environ.setdefault("FORDE_STATE_DIR", tempfile.mkdtemp(prefix="forde-test-state-"))


@pytest.fixture(scope="session")
def runtime():
    """The committed default model, exported/digits.onnx, in the serving runtime."""
    from forde_serve.runtime import EnsembleRuntime

    return EnsembleRuntime(MODEL)


@pytest.fixture(scope="session")
def digits():
    """All 1797 bundled digits: raw inputs [N, 1, 8, 8] float32 (0..16) and labels [N] (scikit-learn, no torch)."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32)[:, None], bunch.target


@pytest.fixture(scope="session")
def digits_split():
    """The project's fixed split of the digits, {"train", "val", "test"} -> (x, y) numpy, without torch
    (training.splits, the indices training.data uses)."""
    from training.splits import digits_split

    return digits_split()


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


@pytest.fixture(scope="session")
def digits_export(quickstart_runs, tmp_path_factory):
    """The quickstart FoRDE run exported once per session with the real `forde export`."""
    path = tmp_path_factory.mktemp("exported") / "digits.onnx"
    result = run_forde("export", quickstart_runs["forde"], "--out", path)
    return path, result.stdout


@pytest.fixture(scope="session")
def in_process():
    """BentoML's own HTTP app for the service (validation, error mapping, middleware), without a server.
    One per session: BentoML registers its Prometheus metrics once per process."""
    from starlette.testclient import TestClient

    from forde_serve.app.service import FordeEnsemble

    with TestClient(FordeEnsemble.to_asgi()) as client:
        yield client


@pytest.fixture(scope="session")
def server():
    """The default exported model behind a real `bentoml serve`, once per session."""
    process, url = start_server()
    yield url
    stop_server(process)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on a free port, its data and socket in a temp dir (as the `postgres` user
    when the tests run as root: postgres refuses root); yields an admin URL (new_postgres_database makes
    a database on it)."""
    import pwd
    import shutil
    import subprocess
    from pathlib import Path

    from helpers import free_port, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (Debian: apt-get install -y postgresql)")
    as_user = []
    root = Path(tempfile.mkdtemp(prefix="forde-pg-"))
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root, and there is no `postgres` user to run the PostgreSQL server as")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = free_port()
    data = root / "data"

    def run(*command):
        result = subprocess.run([*as_user, *map(str, command)], capture_output=True, text=True)
        assert result.returncode == 0, f"{command[0]} failed: {result.stdout}{result.stderr}"

    try:
        run(bindir / "initdb", "-D", data, "-U", "forde", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w", "-t", "60", "start")
        yield f"postgresql+psycopg://forde@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
