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


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="session")
def digits_export(quickstart_runs, tmp_path_factory):
    """The quickstart FoRDE run exported once per session with the real `forde export`."""
    path = tmp_path_factory.mktemp("exported") / "digits.onnx"
    result = run_forde("export", quickstart_runs["forde"], "--out", path)
    return path, result.stdout
