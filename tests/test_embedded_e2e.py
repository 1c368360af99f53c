"""Embedded ensembles through the real `forde` command: trained, exported in both layouts (each checked
against PyTorch by the exporter itself), served by the runtime, evaluated with the diversity block."""

import json
import math

import numpy as np
import onnx
import pytest

from forde_serve.contract import ModelCard
from forde_serve.report import write_diversity_plane
from forde_serve.runtime import EnsembleRuntime

from helpers import read_metrics, run_forde

pytestmark = pytest.mark.slow  # trains, exports and evaluates


@pytest.fixture(scope="module")
def embedded_runs(tmp_path_factory):
    """FoRDE-BatchEnsemble and an MC-dropout DE, 3 members of the tiny CNN, 3 epochs, and a plain DE."""
    out = tmp_path_factory.mktemp("embedded")
    config = out / "tiny.toml"
    config.write_text(
        '\nseed = 3\ndevice = "cpu"\n[model]\narch = "cnn"\nwidth = 8\n[ensemble]\nmembers = 3\n'
        '[forde]\nlengthscale = "identity"\n[optim]\nepochs = 3\nlr = 0.05\n'
    )
    runs = {}
    for name, args in {
        "forde-batchensemble": ("--method", "forde", "--structure", "batchensemble"),
        "de-mc_dropout": ("--method", "de", "--structure", "mc_dropout"),
        "de": ("--method", "de"),
    }.items():
        runs[name] = out / name
        run_forde("train", config, *args, "--out", runs[name], "--quiet")
    return runs


def _card(path):
    return ModelCard.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props}, str(path))


def test_embedded_runs_share_their_weights(embedded_runs):
    independent = read_metrics(embedded_runs["de"])["parameters"]
    for name in ("forde-batchensemble", "de-mc_dropout"):
        metrics = read_metrics(embedded_runs[name])
        assert metrics["parameters"] <= 0.45 * independent, (name, metrics["parameters"], independent)
        log = [json.loads(line) for line in (embedded_runs[name] / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["ce"] < log[0]["ce"], (name, log)  # 3 epochs of a width-8 CNN: learning, not yet good
        config = json.loads((embedded_runs[name] / "config.json").read_text())
        assert config["ensemble"]["structure"] == name.split("-")[1]


@pytest.mark.parametrize("layout", ["native", "folded"])
def test_both_layouts_export_serve_and_answer_alike(embedded_runs, tmp_path, layout):
    run = embedded_runs["forde-batchensemble"]
    path = tmp_path / f"{layout}.onnx"
    result = run_forde("export", run, "--out", path, "--layout", layout)
    assert "✗" not in result.stdout  # every output within tolerance of the PyTorch ensemble (else exit 1)
    card = _card(path)
    assert card.structure == "batchensemble" and card.parameters == read_metrics(run)["parameters"]
    assert card.layout["predict"] == card.layout["explain"] == layout and card.layout["measured"] is None
    runtime = EnsembleRuntime(path)
    x = np.random.default_rng(0).uniform(0, 16, size=(16, 1, 8, 8)).astype(np.float32)
    out = runtime.predict(x)
    explained = runtime.explain(x)
    assert out["member_probs"].shape == (16, 3, 10) and explained["input_gradients"].shape == (16, 3, 1, 8, 8)
    # the members answer differently (they share W but not r, s and biases)
    assert not np.allclose(out["member_probs"][:, 0], out["member_probs"][:, 1], atol=1e-3)
    assert not np.allclose(explained["input_gradients"][:, 0], explained["input_gradients"][:, 1])


def test_native_files_are_smaller_and_auto_records_what_it_measured(embedded_runs, tmp_path):
    # One export with --layout auto writes and times both layouts (each is exported alone, and served, in
    # test_both_layouts_export_serve_and_answer_alike): the card records what it measured, sizes too.
    run_forde("export", embedded_runs["de-mc_dropout"], "--out", tmp_path / "auto.onnx", "--layout", "auto")
    card = _card(tmp_path / "auto.onnx")
    assert card.structure == "mc_dropout" and card.layout["provider"] == "CPUExecutionProvider"
    measured = card.layout["measured"]
    for graph in ("predict", "explain"):
        assert measured[graph]["native"]["bytes"] < measured[graph]["folded"]["bytes"]
    for graph in ("predict", "explain"):  # the rule: the lower geometric mean over the batches it timed
        times = {
            layout: math.prod(v for k, v in measured[graph][layout].items() if k.startswith("batch_"))
            for layout in ("native", "folded")
        }
        assert card.layout[graph] == min(times, key=times.get)
    served = EnsembleRuntime(tmp_path / "auto.onnx").predict(np.full((4, 1, 8, 8), 8.0, np.float32))
    assert not np.allclose(served["member_logits"][:, 0], served["member_logits"][:, 2])


def test_independent_members_have_no_layout_to_choose(embedded_runs, tmp_path):
    result = run_forde("export", embedded_runs["de"], "--out", tmp_path / "m.onnx", "--layout", "native", check=False)
    assert result.returncode == 2 and "independent members are written as one grouped graph" in result.stderr
    run_forde("export", embedded_runs["de"], "--out", tmp_path / "m.onnx")
    card = _card(tmp_path / "m.onnx")
    assert card.structure == "independent" and card.layout is None
    assert card.parameters == read_metrics(embedded_runs["de"])["parameters"]


def test_evaluate_writes_the_diversity_block_and_figures(quickstart_runs, embedded_runs, tmp_path):
    """The quickstart's deep ensemble (8 independent members, 30 epochs) beside the tiny FoRDE-BatchEnsemble."""
    reports = {"de": tmp_path / "de", "forde-batchensemble": tmp_path / "forde-batchensemble"}
    run_forde("evaluate", quickstart_runs["de"], "--out", reports["de"], "--quiet", "--gradient-rows", "50")
    run_forde(
        "evaluate",
        embedded_runs["forde-batchensemble"],
        "--out",
        reports["forde-batchensemble"],
        "--quiet",
        "--gradient-rows",
        "50",
    )
    de = json.loads((reports["de"] / "metrics.json").read_text())
    diversity = de["diversity"]
    disagreement = np.asarray(diversity["pairwise_disagreement"])
    assert disagreement.shape == (8, 8) and np.allclose(disagreement, disagreement.T)
    assert not disagreement.diagonal().any() and disagreement[~np.eye(8, dtype=bool)].min() > 0
    cosine = np.asarray(diversity["weight_cosine_similarity"])
    assert np.abs(cosine[~np.eye(8, dtype=bool)]).max() < 0.2  # independent members: near 0
    accuracy = np.asarray(diversity["accuracy_by_size"])
    assert accuracy[-1] == pytest.approx(de["accuracy"]) and diversity["nll_by_size"][-1] == pytest.approx(de["nll"])
    # The mean NLL over k-member subsets cannot rise with k (the NLL is convex in the averaged
    # probabilities); accuracy has no such law, and the last steps move by a few of the 360 test inputs
    # (seen: 0.9747 at 7 members, 0.9694 at 8), so it is held to a clear rise with no real fall.
    assert np.all(np.diff(diversity["nll_by_size"]) < 0)
    assert np.all(np.diff(accuracy) > -0.01) and accuracy[-1] > accuracy[0] + 0.01
    # trained members disagree more where the inputs are corrupted
    assert diversity["js_divergence"]["corrupted"] > diversity["js_divergence"]["clean"] > 0
    assert diversity["normalized_disagreement"] == pytest.approx(diversity["mean_disagreement"] / (1 - de["accuracy"]))
    assert diversity["trajectory"] == {"frames": 31, "probe_rows": 64, "split": "test"}
    assert de["parameters"] == read_metrics(quickstart_runs["de"])["parameters"]
    for figure in ("diversity_disagreement.png", "diversity_by_size.png", "trajectories_tsne.png"):
        assert (reports["de"] / figure).stat().st_size > 1000
    assert "## Diversity" in (reports["de"] / "report.md").read_text()
    embedded = json.loads((reports["forde-batchensemble"] / "metrics.json").read_text())
    assert embedded["source"]["structure"] == "batchensemble" and embedded["parameters"] < de["parameters"]
    assert embedded["diversity"]["trajectory"]["frames"] == 4
    plane = write_diversity_plane(list(reports.values()), tmp_path / "plane.png")
    assert plane is not None and plane.stat().st_size > 1000
    shown = run_forde("compare", *reports.values(), "--out", tmp_path / "comparison.md", "--figure", tmp_path / "p.png")
    assert "diversity-accuracy plane" in shown.stdout and (tmp_path / "p.png").stat().st_size > 1000
    compared = (tmp_path / "comparison.md").read_text()
    assert "| disagreement / (1 - accuracy) |" in compared and "| distinct trained parameters |" in compared


def test_an_exported_embedded_file_is_evaluated_through_the_runtime(embedded_runs, tmp_path):
    path = tmp_path / "be.onnx"
    run_forde("export", embedded_runs["forde-batchensemble"], "--out", path, "--layout", "native")
    run_forde("evaluate", path, "--out", tmp_path / "report", "--quiet", "--gradient-rows", "20")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["source"]["structure"] == "batchensemble"
    assert metrics["parameters"] == read_metrics(embedded_runs["forde-batchensemble"])["parameters"]
    # the weights and the trajectories are a run folder's; the predictions' measures are everyone's
    assert "weight_cosine_similarity" not in metrics["diversity"] and "trajectory" not in metrics["diversity"]
    assert len(metrics["diversity"]["accuracy_by_size"]) == 3
