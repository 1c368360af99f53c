"""Training end to end: the quickstart's targets, the run folder, resume after a real SIGKILL."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.config import load_config
from training.run import RunError, load_run
from training.trainer import train

from helpers import FORDE, ROOT, epochs_checkpointed, read_metrics, run_forde, write_cifar

pytestmark = pytest.mark.slow  # trains, exports or runs several processes

METRIC_KEYS = {
    "accuracy",
    "nll",
    "ece",
    "brier",
    "gradient_cosine_distance",
    "mutual_information",
    "calibrated",
    "parameters",
}


def test_quickstart_reaches_the_targets(quickstart_runs):
    forde, de = read_metrics(quickstart_runs["forde"]), read_metrics(quickstart_runs["de"])
    assert forde["accuracy"] >= 0.95 and de["accuracy"] >= 0.95, (forde, de)
    # The paper's diversity measure: FoRDE spreads the members' input gradients apart.
    assert forde["gradient_cosine_distance"] > de["gradient_cosine_distance"], (forde, de)


def test_run_folder_holds_everything(quickstart_runs):
    run = quickstart_runs["forde"]
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "dataset.json",
        "members.safetensors",
        "checkpoint.safetensors",
        "train_log.jsonl",
        "metrics.json",
        "trajectory.safetensors",
    } <= names
    assert not any(n.endswith(".tmp") for n in names)
    metrics = read_metrics(run)
    assert set(metrics) == METRIC_KEYS and set(metrics["calibrated"]) == {"temperature", "accuracy", "nll", "ece"}
    config = load_config(run / "config.json")
    assert config.ensemble.method == "forde" and config.ensemble.members == 8
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == list(range(1, config.optim.epochs + 1))
    assert {"ce", "repulsion", "bandwidth", "lr", "seconds"} <= set(log[0])
    assert log[-1]["ce"] < log[0]["ce"] and log[0]["repulsion"] > 0
    de_log = [json.loads(line) for line in (quickstart_runs["de"] / "train_log.jsonl").read_text().splitlines()]
    assert de_log[0]["repulsion"] is None
    weights = load_file(str(run / "members.safetensors"))
    assert weights["body.1.weight"].shape[0] == 8  # stacked [M, ...]
    trained = {key: w for key, w in weights.items() if key not in ("mean", "std")}  # the CNN's other tensors
    assert read_metrics(run)["parameters"] == sum(w.numel() for w in trained.values())
    # every member's probabilities on the first 64 test inputs, before training and after each epoch
    probs = load_file(str(run / "trajectory.safetensors"))["probs"]
    assert probs.shape == (config.optim.epochs + 1, 8, 64, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_loaded_run_reproduces_its_metrics(quickstart_runs):
    from training.data import load_dataset
    from training.evaluation import clean_metrics

    loaded = load_run(quickstart_runs["de"])
    data = load_dataset(loaded.config.data)
    again = clean_metrics(loaded.ensemble, data.test.x, data.test.y, (data.val.x, data.val.y))
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(loaded.metrics[key], rel=1e-5, abs=1e-7)


def test_pca_basis_is_saved_with_the_run(tmp_path, tiny_config):
    run_forde("train", tiny_config(epochs=1, lengthscale="pca"), "--out", tmp_path / "run", "--quiet")
    pca = load_file(str(tmp_path / "run" / "pca.safetensors"))
    assert pca["eigenvectors"].shape == (64, 64) and pca["eigenvalues"].shape == (64,)
    assert (pca["eigenvalues"][:-1] >= pca["eigenvalues"][1:]).all()
    with safe_open(str(tmp_path / "run" / "pca.safetensors"), "pt") as f:
        assert f.metadata()["centred"] == "false"  # `pca` is the reference's uncentred basis


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_config):
    config = tiny_config(epochs=10, lengthscale="pca")
    run_forde("train", config, "--out", tmp_path / "straight", "--quiet")

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [FORDE, "train", str(config), "--out", str(killed), "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while epochs_checkpointed(killed) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = epochs_checkpointed(killed)
    assert 3 <= done < 10 and not (killed / "members.safetensors").exists(), "the kill came too late to test"

    resumed = run_forde("train", "--resume", killed)
    assert f"after epoch {done}/10" in resumed.stderr
    straight, again = (
        load_file(str(tmp_path / "straight/members.safetensors")),
        load_file(str(killed / "members.safetensors")),
    )
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert read_metrics(killed) == read_metrics(tmp_path / "straight")
    trajectories = [load_file(str(run / "trajectory.safetensors"))["probs"] for run in (killed, tmp_path / "straight")]
    assert trajectories[0].shape[0] == 11 and torch.equal(*trajectories)  # one frame per epoch, none redone twice
    epochs = [json.loads(line)["epoch"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 11))  # nothing lost, nothing duplicated


def test_a_new_run_never_overwrites_an_old_one(tmp_path, tiny_config):
    run_forde("train", tiny_config(epochs=1), "--out", tmp_path / "run", "--quiet")
    again = run_forde("train", tiny_config(epochs=1), "--out", tmp_path / "run", check=False)
    assert again.returncode == 2 and "already holds a training run" in again.stderr


def test_broken_run_folders_name_the_file(tmp_path, tiny_config):
    run = tmp_path / "run"
    run_forde("train", tiny_config(epochs=1), "--out", run, "--quiet")
    load_run(run)
    (run / "members.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunError, match="members.safetensors is not a readable safetensors file"):
        load_run(run)
    (run / "members.safetensors").unlink()
    with pytest.raises(RunError, match="no members.safetensors"):
        load_run(run)
    (run / "dataset.json").write_text("{")
    (run / "config.json").unlink()
    with pytest.raises(RunError, match="config.json is missing"):
        load_run(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, tiny_config):
    result = run_forde("train", tiny_config(epochs=1), "--device", "cuda", "--out", tmp_path / "r", check=False)
    assert result.returncode == 2 and "no usable CUDA device" in result.stderr


def test_cifar_pipeline_with_augmentation_on_a_fake_folder(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", [30] * 5, 20, 10)
    config = load_config(ROOT / "training/configs/cifar10_resnet18.toml").model_copy(deep=True)
    data = config.model_dump()
    data["model"] = {"arch": "cnn", "width": 4}
    data["data"]["root"] = str(tmp_path / "data")
    data["ensemble"]["members"] = 2
    data["optim"]["epochs"] = 1
    data["forde"] = {"lengthscale": "tuned", "alpha": 0.5, "every": 2, "batch": 16}
    from training.config import TrainConfig

    metrics = train(TrainConfig.model_validate(data), tmp_path / "run", progress=False)
    assert set(metrics) == METRIC_KEYS
    assert (tmp_path / "run/pca.safetensors").exists()
    info = json.loads((tmp_path / "run/dataset.json").read_text())
    assert info["input_shape"] == [3, 32, 32] and len(info["class_names"]) == 10


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(RunError, match="not a training run folder"):
        train(load_config(ROOT / "training/configs/digits.toml"), tmp_path, resume=True, progress=False)


def test_a_rising_training_loss_is_said():
    from training.trainer import _rising_loss

    falling = [{"ce": c} for c in (2.0, 1.2, 0.9, 0.8)]
    assert _rising_loss(falling, 0.05) is None
    rising = [{"ce": c} for c in (1.27, 2.66, 4.02)]  # an image-folder run once printed this, without a word
    assert _rising_loss(rising, 0.1).startswith("the training loss is rising (cross-entropy 1.270 -> 2.660 -> 4.020")
    noisy = [{"ce": c} for c in (1.0, 0.5, 0.52, 0.55)]  # up twice, but within 25% of the lowest: noise
    assert _rising_loss(noisy, 0.05) is None
