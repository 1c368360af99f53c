"""Your own pictures end to end, through the real commands: train FoRDE (and DE) on a drawn image
folder, export, serve, upload pictures of several sizes and formats, score a folder, evaluate the
test split with the RGB corruption suite (run folder and export agree), compare, resume after a
real SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from forde_serve.contract import ImageSpec
from forde_serve.images import image_to_input
from forde_serve.runtime import EnsembleRuntime

from helpers import (
    FORDE,
    PICTURE_CLASSES,
    ROOT,
    draw_picture,
    epochs_checkpointed,
    read_metrics,
    run_forde,
    start_server,
    stop_server,
    write_image_folder,
)

pytestmark = pytest.mark.slow  # trains, exports, serves

# The members' architecture: one line to change for a fused torchvision model
# (e.g. 'arch = "torchvision:resnet18"').
MODEL_TOML = 'arch = "torchvision:resnet18"'

CONFIG = """
seed = 0
device = "cpu"
[model]
{model}
[data]
dataset = "imagefolder"
root = "{root}"
image_size = {size}
[ensemble]
method = "{method}"
members = 2
[forde]
lengthscale = "pca"
[optim]
epochs = {epochs}
batch_size = {batch}
lr = 0.05
"""


def _config(path, root, method="forde", size=16, epochs=1, batch=8):
    path.write_text(CONFIG.format(model=MODEL_TOML, root=root, method=method, size=size, epochs=epochs, batch=batch))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A drawn image folder (3 classes, train/ and test/, no val/), FoRDE and DE runs of one epoch,
    and the FoRDE run exported."""
    out = tmp_path_factory.mktemp("pictures")
    root = write_image_folder(out / "folder", {"train": 12, "test": 4})
    runs = {}
    for method in ("forde", "de"):
        runs[method] = out / method
        run_forde("train", _config(out / f"{method}.toml", root, method), "--out", runs[method], "--quiet")
    model = out / "pictures.onnx"
    run_forde("export", runs["forde"], "--out", model)
    return {"root": root, "runs": runs, "model": model, "out": out}


def _upload_pictures(folder):
    """New pictures, not in the training folder: varied sizes and aspect ratios, PNG, JPEG, BMP, WEBP."""
    rng = np.random.default_rng(42)
    folder.mkdir()
    paths = []
    for i, (width, height, suffix) in enumerate(
        [(16, 16, "png"), (40, 23, "jpg"), (23, 61, "bmp"), (100, 100, "webp"), (19, 30, "png"), (64, 20, "jpg")]
    ):
        path = folder / f"{i}.{suffix}"
        draw_picture(PICTURE_CLASSES[i % 3], width, height, rng).save(path)
        paths.append(path)
    return paths


def test_served_pictures_get_the_runtime_s_answers(trained, tmp_path):
    runtime = EnsembleRuntime(trained["model"])
    card = runtime.card
    assert card.input_shape == (3, 16, 16) and card.class_names == tuple(sorted(PICTURE_CLASSES))
    assert card.image == ImageSpec(mode="RGB", size=(16, 16), scale=1 / 255, invert=False, resize=18)
    assert card.image.to_metadata() == {  # as the file stores it
        "mode": "RGB",
        "size": [16, 16],
        "scale": 1 / 255,
        "invert": False,
        "resize": 18,
        "crop": [16, 16],
        "interpolation": "bilinear",
    }
    assert set(card.metrics) >= {"accuracy", "nll", "gradient_cosine_distance"}
    paths = _upload_pictures(tmp_path / "uploads")
    expected = runtime.predict(np.stack([image_to_input(p, card.image) for p in paths]))
    process, url = start_server(command=[FORDE, "serve", str(trained["model"]), "--host", "127.0.0.1"])
    try:
        for i, path in enumerate(paths):
            with path.open("rb") as f:
                kind = {"png": "png", "jpg": "jpeg", "bmp": "bmp", "webp": "webp"}[path.suffix[1:]]
                response = httpx.post(
                    f"{url}/predict_image", files={"image": (path.name, f, f"image/{kind}")}, timeout=30
                )
            assert response.status_code == 200, (path.name, response.text)
            answer = response.json()
            assert answer["predicted_class"] == int(expected["predicted_class"][i]), path.name
            assert answer["class_name"] == card.class_names[answer["predicted_class"]]
            np.testing.assert_allclose(answer["probs"], expected["probs"][i], atol=1e-6, err_msg=path.name)
            assert answer["mutual_information"] == pytest.approx(float(expected["mutual_information"][i]), abs=1e-6)
    finally:
        stop_server(process)

    # The same pictures in a folder, scored offline: the same numbers (PNG and JPEG, which scoring reads).
    run_forde("score", trained["model"], tmp_path / "uploads", "--out", tmp_path / "scores.parquet", "--quiet")
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    scored = {row["row_id"]: row for row in rows}
    assert {"0.png", "1.jpg"} <= set(scored)
    for i, path in enumerate(paths):
        if path.name in scored:
            np.testing.assert_allclose(scored[path.name]["probs"], expected["probs"][i], atol=1e-6)


def test_evaluate_run_folder_and_export_agree_and_compare(trained):
    out, root = trained["out"], trained["root"]
    reports = {
        "forde-run": trained["runs"]["forde"],
        "forde-onnx": trained["model"],
        "de-run": trained["runs"]["de"],
    }
    for name, source in reports.items():
        run_forde(
            "evaluate", source, "--data", "imagefolder", "--data-root", root, "--out", out / name,
            "--gradient-rows", 6, "--quiet",
        )  # fmt: skip
    run = json.loads((out / "forde-run" / "metrics.json").read_text())
    onnx = json.loads((out / "forde-onnx" / "metrics.json").read_text())
    assert run["inputs"] == 12 and len(run["per_set"]) == 75 and set(run["per_severity"]) == {"1", "2", "3", "4", "5"}
    assert "imagefolder test split + the RGB corruption suite" in run["source"]["data"]
    # At T = 1 the clean metrics are the ones training recorded (same test pictures, same transform,
    # same maths); the others are the ensemble as served, at its fitted temperature.
    trained_metrics = read_metrics(trained["runs"]["forde"])
    for key in ("nll", "ece"):
        assert run[f"{key}_uncalibrated"] == pytest.approx(trained_metrics[key], rel=1e-5), key
    assert onnx["temperature"] == pytest.approx(run["temperature"], rel=1e-4)
    assert onnx["abstain_threshold"] == pytest.approx(run["abstain_threshold"], rel=1e-4)
    for block in (lambda m: m, lambda m: m["corrupted"]):
        for key in ("accuracy", "nll", "ece", "brier", "mutual_information", "gradient_cosine_distance", "aurc"):
            assert block(onnx)[key] == pytest.approx(block(run)[key], rel=2e-3, abs=2e-4), key

    table = run_forde("compare", out / "de-run", out / "forde-run", "--out", out / "c.md")
    assert "| metric | de-run | forde-run | forde-run - de-run |" in (out / "c.md").read_text()
    assert "corrupted accuracy" in table.stdout

    # Without test/, evaluate says so (the validation split is still there to measure).
    from training.evaluation import EvaluationError, EvaluationJob, evaluate_job

    no_test = out / "no-test"
    shutil.copytree(root, no_test)
    shutil.rmtree(no_test / "test")
    job = EvaluationJob(trained["model"], data="imagefolder", data_root=str(no_test))
    with pytest.raises(EvaluationError, match=r"--split test: .*no-test has no test split \(no test/ folder"):
        evaluate_job(job)


def test_a_broken_picture_stops_training_before_it_starts(tmp_path):
    root = write_image_folder(tmp_path / "folder", {"train": 3}, formats=("png",))
    (root / "train" / "square" / "torn.jpg").write_bytes(b"\xff\xd8 torn off")
    result = run_forde("train", _config(tmp_path / "c.toml", root), "--out", tmp_path / "run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train/square/torn.jpg: expected a readable picture" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    """Streamed, augmented training (random resized crops and flips) resumes to the same weights; the
    folder has no val/ (held out from train/) and no test/ (no test metrics)."""
    root = write_image_folder(tmp_path / "folder", {"train": 8}, formats=("png",))
    config = _config(tmp_path / "c.toml", root, size=8, epochs=8, batch=4)
    run_forde("train", config, "--out", tmp_path / "straight", "--quiet")
    assert set(read_metrics(tmp_path / "straight")) == {"parameters"}  # no test split: no test metrics

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [FORDE, "train", str(config), "--out", str(killed), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while epochs_checkpointed(killed) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = epochs_checkpointed(killed)
    assert 2 <= done < 8 and not (killed / "members.safetensors").exists(), "the kill came too late to test"

    resumed = run_forde("train", "--resume", killed)
    assert f"after epoch {done}/8" in resumed.stderr
    straight, again = load_file(tmp_path / "straight/members.safetensors"), load_file(killed / "members.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    epochs = [json.loads(line)["epoch"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
