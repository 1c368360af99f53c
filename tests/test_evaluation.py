"""Robustness evaluation: the digits-C suite, the selective-prediction and OOD maths by hand,
`forde evaluate` on a run folder and on its export (they agree), CIFAR-C from a fake folder in
the published layout, and `forde compare`."""

import json

import numpy as np
import pytest
from PIL import Image

from forde_serve.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupted_versions
from forde_serve.runtime import EnsembleRuntime

from helpers import run_forde, write_cifar


@pytest.fixture(scope="module")
def images(digits):
    return digits[0][:200]


def test_digits_c_has_eleven_corruptions_at_five_severities_deterministically(images):
    sets = list(corrupted_versions(images, seed=3))
    assert tuple(CORRUPTIONS) == (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "motion_blur",
        "contrast",
        "brightness",
        "pixelate",
        "translate",
        "rotate",
        "occlusion",
    )
    assert len(sets) == 11 * 5
    for name, severity, x in sets:
        assert x.shape == images.shape and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 16.0, name
        assert np.array_equal(x, corrupt(images, name, severity, seed=3)), f"{name} {severity} not deterministic"
    for name in CORRUPTIONS:
        change = [np.abs(corrupt(images, name, s, seed=3) - images).mean() for s in SEVERITIES]
        assert change[0] > 0 and change[4] > change[0], f"{name}: severity 5 should change more than 1: {change}"
    assert not np.array_equal(
        corrupt(images, "gaussian_noise", 3, seed=0), corrupt(images, "gaussian_noise", 3, seed=1)
    )
    with pytest.raises(ValueError, match="expected one of"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity: expected 1 to 5, got 6"):
        corrupt(images, "contrast", 6)


@pytest.fixture(scope="module")
def reports(quickstart_runs, digits_export, tmp_path_factory):
    """`forde evaluate` on the quickstart FoRDE run folder (torch), its export (onnxruntime) and the DE run."""
    out = tmp_path_factory.mktemp("reports")
    rng = np.random.default_rng(0)
    np.save(out / "noise.npy", rng.uniform(0, 16, (100, 1, 8, 8)).astype(np.float32))
    paths = {"forde-run": quickstart_runs["forde"], "forde-onnx": digits_export[0], "de-run": quickstart_runs["de"]}
    results = {}
    for name, source in paths.items():
        results[name] = run_forde(
            "evaluate", source, "--out", out / name, "--gradient-rows", 100, "--ood", out / "noise.npy"
        )
    return out, results


@pytest.mark.slow
def test_report_folder_holds_metrics_markdown_and_figures(reports, quickstart_runs, digits_export, digits_split):
    out, results = reports
    folder = out / "forde-run"
    metrics = json.loads((folder / "metrics.json").read_text())
    keys = ("accuracy", "nll", "ece", "brier", "gradient_cosine_distance", "mutual_information")
    assert all(isinstance(metrics[k], float) for k in keys)
    assert all(isinstance(metrics["corrupted"][k], float) for k in keys)
    assert len(metrics["per_set"]) == 55 and set(metrics["per_severity"]) == {"1", "2", "3", "4", "5"}
    assert set(metrics["per_corruption"]) == set(CORRUPTIONS)
    # The corrupted block is the plain mean over the 55 sets.
    assert metrics["corrupted"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in metrics["per_set"]]))
    # At T = 1 the clean metrics are the ones training recorded (same test split, same maths); the
    # others are the ensemble as served, at the temperature chosen on the validation split.
    trained = json.loads((quickstart_runs["forde"] / "metrics.json").read_text())
    assert metrics["nll_uncalibrated"] == pytest.approx(trained["nll"], rel=1e-6)
    assert metrics["ece_uncalibrated"] == pytest.approx(trained["ece"], rel=1e-6)
    assert metrics["temperature"] > 0 and metrics["coverage_levels"] == [0.8, 0.9, 0.95, 0.99]
    for level in metrics["coverage_levels"]:
        assert (
            f"set_coverage@{level:g}" in metrics["corrupted"] and f"set_size@{level:g}" in metrics["per_severity"]["5"]
        )
    assert metrics["corrupted"]["accuracy"] < metrics["accuracy"]
    assert metrics["expected_entropy"] + metrics["mutual_information"] == pytest.approx(metrics["predictive_entropy"])
    assert 0.5 < metrics["ood"]["auroc_mutual_information"] <= 1.0
    # The share of the test split accepted at the threshold the validation split chose: what the run's
    # export accepts of it (no test digit's mutual information is within float32 rounding of the threshold)
    x, y = digits_split["test"]
    accepted = ~EnsembleRuntime(digits_export[0]).predict(x)["abstain"]
    assert metrics["abstain_coverage"] == np.mean(accepted) and 0 < accepted.sum() < len(y)

    report = (folder / "report.md").read_text()
    for figure in ("reliability.png", "severity.png", "risk_coverage.png", "saliency.png", "coverage.png"):
        assert f"]({figure})" in report
        with Image.open(folder / figure) as image:
            assert image.format == "PNG" and image.width > 300
    assert "| gaussian_noise |" in report and "epistemic (mutual information)" in report
    assert "## Calibration (temperature" in report and "## Conformal prediction sets (lac score)" in report
    assert f"| clean | {metrics['accuracy_uncalibrated']:.4f} | {metrics['accuracy']:.4f} | " in report
    assert "corrupted" in results["forde-run"].stdout and "report:" in results["forde-run"].stdout


@pytest.mark.slow
def test_the_export_s_set_coverage_is_what_its_runtime_serves(reports, digits_export, digits_split):
    out, _ = reports
    onnx = json.loads((out / "forde-onnx" / "metrics.json").read_text())
    runtime = EnsembleRuntime(digits_export[0])
    x, y = digits_split["test"]
    for level in runtime.card.coverage_levels:
        sets = runtime.predict(x, coverage=level)["prediction_set"]
        assert onnx[f"set_coverage@{level:g}"] == pytest.approx(sets[np.arange(len(y)), y].mean(), abs=1e-12)
        assert onnx[f"set_size@{level:g}"] == pytest.approx(sets.sum(1).mean(), abs=1e-12)


@pytest.mark.slow
def test_exported_file_and_run_folder_agree(reports):
    out, _ = reports
    run = json.loads((out / "forde-run" / "metrics.json").read_text())
    onnx = json.loads((out / "forde-onnx" / "metrics.json").read_text())
    assert onnx["source"]["engine"].startswith("the exported ONNX file")
    assert run["source"]["engine"].startswith("the PyTorch ensemble")
    # Same thresholds: the export's was chosen on the validation split exactly as evaluate does.
    assert onnx["abstain_threshold"] == pytest.approx(run["abstain_threshold"], rel=1e-4)
    assert onnx["temperature"] == pytest.approx(run["temperature"], rel=1e-4)
    keys = ("accuracy", "nll", "ece", "brier", "mutual_information", "gradient_cosine_distance", "aurc")
    for block in (lambda m: m, lambda m: m["corrupted"]):
        for key in (*keys, "nll_uncalibrated", "ece_uncalibrated"):
            assert block(onnx)[key] == pytest.approx(block(run)[key], rel=2e-3, abs=2e-4), key
        # A set is a threshold on a probability: float32 vs float64 may move one input of 360 across it.
        for level in run["coverage_levels"]:
            for key in (f"set_coverage@{level:g}", f"set_size@{level:g}"):
                assert block(onnx)[key] == pytest.approx(block(run)[key], abs=6e-3), key


@pytest.mark.slow
def test_compare_puts_reports_side_by_side(reports, tmp_path):
    out, _ = reports
    result = run_forde("compare", out / "de-run", out / "forde-run", "--out", tmp_path / "c.md")
    table = (tmp_path / "c.md").read_text()
    assert "| metric | de-run | forde-run | forde-run - de-run |" in table
    de = json.loads((out / "de-run" / "metrics.json").read_text())
    forde = json.loads((out / "forde-run" / "metrics.json").read_text())
    line = next(row for row in table.splitlines() if row.startswith("| corrupted accuracy |"))
    assert f"{forde['corrupted']['accuracy'] - de['corrupted']['accuracy']:+.4f}" in line
    assert "corrupted accuracy" in result.stdout

    one = run_forde("compare", out / "de-run", check=False)
    assert one.returncode == 2 and "at least two report folders" in one.stderr
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "metrics.json").write_text(json.dumps({"accuracy": "high", "corrupted": [1]}))
    table = run_forde("compare", out / "de-run", odd, "--out", tmp_path / "odd.md")
    assert "| clean accuracy |" in (tmp_path / "odd.md").read_text() and "n/a" in table.stdout

    missing = run_forde("compare", out / "de-run", tmp_path, check=False)
    assert missing.returncode == 2 and "not an evaluation report (no metrics.json)" in missing.stderr


def _write_cifar_c(root, per_severity: int, corruptions=("fog", "snow"), classes=10):
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    np.save(folder / "labels.npy", np.tile(rng.integers(0, classes, per_severity), 5).astype(np.uint8))
    for name in corruptions:
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8))
    return folder


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", [40] * 5, 30, 10)
    config = root / "tiny.toml"
    config.write_text(
        f'seed = 0\ndevice = "cpu"\n[model]\narch = "mlp"\nwidth = 8\n[data]\ndataset = "cifar10"\n'
        f'root = "{root}"\n[ensemble]\nmethod = "forde"\nmembers = 2\n[forde]\nlengthscale = "identity"\n'
        f"[optim]\nepochs = 1\nbatch_size = 32\n"
    )
    run_forde("train", config, "--out", root / "run", "--quiet")
    return root


@pytest.mark.slow
def test_cifar_c_from_a_folder_in_the_published_layout(cifar_run, tmp_path):
    import torch

    from training.run import load_run

    corrupted = _write_cifar_c(tmp_path, per_severity=6)
    run_forde(
        "evaluate",
        cifar_run / "run",
        "--data",
        "cifar10",
        "--data-root",
        cifar_run,
        "--corrupted-root",
        tmp_path,
        "--out",
        tmp_path / "report",
        "--quiet",
    )
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [(r["corruption"], r["severity"]) for r in metrics["per_set"]] == [
        (c, s) for c in ("fog", "snow") for s in range(1, 6)
    ]
    assert metrics["corrupted"]["nll"] == pytest.approx(np.mean([r["nll"] for r in metrics["per_set"]]))

    # One set by hand: snow at severity 3 is rows 12..17, HWC uint8 -> CHW floats in [0, 1].
    images = np.load(corrupted / "snow.npy")[12:18].transpose(0, 3, 1, 2) / 255.0
    labels = np.load(corrupted / "labels.npy")[12:18]
    ensemble = load_run(cifar_run / "run").ensemble.eval()
    with torch.no_grad():
        probs = ensemble(torch.tensor(images, dtype=torch.float32)).softmax(-1).mean(1).numpy()
    by_hand = float(np.mean(probs.argmax(1) == labels))
    row = next(r for r in metrics["per_set"] if (r["corruption"], r["severity"]) == ("snow", 3))
    assert row["accuracy"] == pytest.approx(by_hand)

    run_forde(
        "evaluate",
        cifar_run / "run",
        "--data",
        "cifar10",
        "--data-root",
        cifar_run,
        "--corrupted-root",
        tmp_path,
        "--per-severity",
        2,
        "--out",
        tmp_path / "small",
        "--quiet",
    )
    small = json.loads((tmp_path / "small" / "metrics.json").read_text())
    assert len(small["per_set"]) == 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (lambda c, t: [c / "run", "--data", "cifar10"], "--data-root: cifar10 is read from a local folder"),
        (lambda c, t: [c / "run", "--data", "digits"], "was trained on cifar10, got 'digits'"),
        (
            lambda c, t: [c / "run", "--data", "cifar10", "--data-root", c, "--corrupted-root", t],
            "CIFAR-10-C not found under",
        ),
        (lambda c, t: [t / "nope", "--data", "digits"], "does not exist"),
        (
            lambda c, t: [c / "run", "--data", "cifar10", "--data-root", c, "--split", "validation"],
            "CIFAR-C corrupts the test split only",
        ),
        (
            lambda c, t: ["exported/digits.onnx", "--ood", _save(t / "o.npy", np.zeros((3, 8, 8)))],
            "--ood: expected numbers shaped [n, 1, 8, 8]",
        ),
        (
            lambda c, t: ["exported/digits.onnx", "--ood", _save(t / "o.npy", np.full((3, 1, 8, 8), np.nan))],
            "--ood: expected finite float32 values",
        ),
    ],
)
def test_bad_evaluate_arguments_exit_2(cifar_run, tmp_path, args, message):
    result = run_forde("evaluate", *args(cifar_run, tmp_path), "--out", tmp_path / "r", check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def _save(path, array):
    np.save(path, array)
    return path


@pytest.mark.slow
def test_validation_split_for_choosing_settings_without_the_test_split(tmp_path):
    run_forde(
        "evaluate",
        "exported/digits.onnx",
        "--split",
        "validation",
        "--gradient-rows",
        0,
        "--out",
        tmp_path / "val",
        "--quiet",
    )
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert metrics["inputs"] == 180 and "validation split" in metrics["source"]["data"]
    assert metrics["gradient_cosine_distance"] is None and len(metrics["per_set"]) == 55


def test_the_saliency_grid_shows_one_input_of_each_class(runtime, digits):
    from forde_serve.evaluation import RuntimePredictor, evaluate

    x, y = digits[0][:120], digits[1][:120]
    evaluation = evaluate(RuntimePredictor(runtime), x, y, choices=runtime.card.choices, gradient_rows=8)
    first = [int(np.flatnonzero(y == c)[0]) for c in range(6)]  # classes 0..5, each one's first input
    np.testing.assert_array_equal(evaluation.saliency_inputs, x[first])
    assert evaluation.saliency_gradients.shape == (6, runtime.card.members, 1, 8, 8)
    np.testing.assert_allclose(evaluation.saliency_gradients, runtime.explain(x[first])["input_gradients"], rtol=1e-6)
    assert evaluation.metrics["accuracy_uncalibrated"] == 118 / 120  # the committed model at T = 1
    # golden, the committed model: 111 of these 120 accepted at its abstention threshold, 110 of them right
    metrics = evaluation.metrics
    assert (metrics["abstain_coverage"], metrics["accuracy_when_accepted"]) == (111 / 120, 110 / 111)


def test_report_md_shows_accuracy_at_t_1_beside_accuracy_as_served(runtime, digits, tmp_path):
    """Bundled digit 891 (a 2) is right at T = 1 and read as a 3 at the file's temperature, so on these 120
    digits the temperature costs one: report.md's calibration table shows both accuracies."""
    from forde_serve.calibration import member_probs
    from forde_serve.evaluation import RuntimePredictor, evaluate
    from forde_serve.report import write_report

    x, y = digits[0][840:960], digits[1][840:960]
    evaluation = evaluate(RuntimePredictor(runtime), x, y, choices=runtime.card.choices, gradient_rows=0)
    metrics = evaluation.metrics
    # recomputed from the members' logits at T = 1 (the graph divides them by the temperature)
    logits = runtime.predict(x)["member_logits"].astype(np.float64) * runtime.card.temperature
    assert metrics["accuracy_uncalibrated"] == np.mean(member_probs(logits).mean(1).argmax(1) == y) == 119 / 120
    assert metrics["accuracy"] == np.mean(runtime.predict(x)["predicted_class"] == y) == 118 / 120
    report = write_report(evaluation, tmp_path)["report.md"].read_text()
    assert "| | accuracy at T = 1 | accuracy as served | NLL at T = 1 | NLL as served |" in report
    assert "\n| clean | 0.9917 | 0.9833 | " in report
