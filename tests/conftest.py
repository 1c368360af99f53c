"""Fixtures: a tiny config, the quickstart runs and their export (trained once per session), the service
in process and behind a real server."""

import pytest

from helpers import MODEL, TINY, run_forde, start_server, stop_server


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
