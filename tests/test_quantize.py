"""`forde export --quantize int8|fp16`: a lowered predict graph that keeps the file contract (checked
against PyTorch with its own tolerances, choices fitted on its own outputs), serves through the same
runtime, and stays within the stated band of float32 on the digits test split."""

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from forde_serve.calibration import member_probs
from forde_serve.conformal import set_coverage_and_size
from forde_serve.contract import ModelCard
from forde_serve.metrics import classification_metrics
from forde_serve.runtime import EnsembleRuntime
from forde_serve.validation import choose_on_validation

from helpers import invoke_forde, run_forde

slow = pytest.mark.slow  # trains (the session's quickstart run) and exports
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_bad_quantize_values_exit_2_with_one_line(tmp_path):
    def one_line_error(*args) -> str:  # the command in process (click's runner), as a user would meet it
        result = invoke_forde(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit) and len(lines) == 1, result.output
        return lines[0]

    line = one_line_error("export", tmp_path, "--out", tmp_path / "m.onnx", "--quantize", "int4")
    assert "--quantize: expected one of float32, int8, fp16, got 'int4'" in line
    fuse = ["fuse", tmp_path / "a.pt", "--arch", "cnn", "--input-shape", "1,8,8", "--out", tmp_path / "m.onnx"]
    line = one_line_error(*fuse, "--quantize", "int8")
    assert "--quantize int8: needs validation data" in line and "--validation" in line


def test_the_card_says_its_precision_and_files_without_it_read_float32():
    card = ModelCard(class_names=("a", "b"), input_shape=(4,), input_space="", image=None, members=2, method="de")
    assert card.precision == "float32" and "forde.precision" not in card.to_metadata("predict")
    int8 = ModelCard.from_metadata(replace(card, precision="int8").to_metadata("predict"))
    assert int8.precision == "int8" and int8.to_metadata("predict")["forde.precision"] == "int8"


def _grouped_graph(members: int = 2, channels: int = 4) -> onnx.ModelProto:
    """input [N, members * channels, 6, 6] -> grouped Conv -> Relu -> MaxPool -> grouped Conv -> mean -> output;
    the pooled tensor is an output too (something reads it whole)."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    wide = members * 2 * channels
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], group=members, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "w2"], ["c2"], group=members, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c2", "axes"], ["output"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "grouped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", members * channels, 6, 6])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", wide]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", wide, 3, 3]),
        ],
        [
            weight("w1", (wide, channels, 3, 3)),
            weight("b1", (wide,)),
            weight("w2", (wide, 2 * channels, 3, 3)),
            numpy_helper.from_array(np.array([2, 3]), "axes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_member_branches_compute_what_the_grouped_graph_computes():
    from training.export.quantize import member_branches

    model = _grouped_graph()
    x = {"input": np.random.default_rng(1).normal(size=(3, 8, 6, 6)).astype(np.float32)}
    want = _run(model, x)
    assert member_branches(model, 2) == 2
    ops = [n.op_type for n in model.graph.node]
    # Split once; Relu and MaxPool run per member; concatenated where something reads the whole tensor.
    assert (ops.count("Split"), ops.count("Conv"), ops.count("Relu"), ops.count("Concat")) == (1, 4, 2, 2)
    assert all(helper.get_attribute_value(a) == 1 for n in model.graph.node for a in n.attribute if a.name == "group")
    onnx.checker.check_model(model)
    for got, expected in zip(_run(model, x), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fold_temperature_divides_the_member_logits_and_everything_after():
    from training.export.quantize import fold_temperature

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["input"], ["member_logits"]),
            helper.make_node("Softmax", ["member_logits"], ["member_probs"], axis=-1),
        ],
        "heads",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 3])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 3])
            for n in ("member_logits", "member_probs")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    fold_temperature(model, 2.0)
    x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    logits, probs = _run(model, {"input": x})
    np.testing.assert_allclose(logits, x / 2, rtol=1e-6)
    np.testing.assert_allclose(probs, member_probs(x.astype(np.float64), 2.0), rtol=1e-5)
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    quantized.graph.node.append(helper.make_node("QuantizeLinear", ["member_logits", "s"], ["q"]))
    with pytest.raises(ValueError, match="member_logits' is quantized"):
        fold_temperature(quantized, 3.0)


@pytest.fixture(scope="module")
def lowered(quickstart_runs, tmp_path_factory):
    """The quickstart FoRDE run exported with the real `forde export --quantize int8` and `--quantize fp16`."""
    out = tmp_path_factory.mktemp("lowered")
    exports = {}
    for precision in ("int8", "fp16"):
        path = out / f"digits-{precision}.onnx"
        exports[precision] = (
            path,
            run_forde("export", quickstart_runs["forde"], "--out", path, "--quantize", precision),
        )
    return exports


@slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_lowered_export_passes_its_own_checks_and_says_its_precision(precision, lowered, digits_export):
    path, result = lowered[precision]
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(("✓", "✗"))]
    assert len(rows) == 15 and all(row.strip().startswith("✓") for row in rows), result.stdout
    assert f"{precision} predict graph:" in result.stdout
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    explain = {p.key: p.value for p in onnx.load(str(path).replace(".onnx", ".explain.onnx")).metadata_props}
    assert ModelCard.from_metadata(meta).precision == precision
    assert ModelCard.from_metadata(explain).precision == "float32"  # the gradients are float32's
    assert path.stat().st_size <= (0.4 if precision == "int8" else 0.6) * digits_export[0].stat().st_size


@slow
def test_the_int8_file_serves_through_the_runtime_and_runs_int8_convolutions(lowered, digits_split, tmp_path):
    path, _ = lowered["int8"]
    runtime = EnsembleRuntime(path)
    runtime.warm_up()
    x, y = digits_split["test"]
    out = runtime.explain(x[:16], coverage=0.9)
    assert out["input_gradients"].shape == (16, runtime.card.members, 1, 8, 8) and out["set_size"].shape == (16,)
    # What onnxruntime's CPU provider really runs: the quantized convolutions become QLinearConv.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 3 * runtime.card.members and ops.count("Conv") == 1  # the raw-input conv


@slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_the_lowered_file_s_choices_are_fitted_on_its_own_outputs(precision, lowered, digits_split, digits_export):
    card = EnsembleRuntime(lowered[precision][0]).card
    x, y = digits_split["val"]
    # The file divides its raw member logits by T; undone, they are what the choices were fitted on.
    raw = EnsembleRuntime(lowered[precision][0]).predict(x)["member_logits"].astype(np.float64) * card.temperature
    again = choose_on_validation(raw, y, score=card.conformal.score)
    assert again.temperature.temperature == pytest.approx(card.temperature, rel=1e-4)
    np.testing.assert_allclose(again.conformal.thresholds, card.conformal.thresholds, rtol=1e-4, atol=1e-6)
    assert again.abstention.threshold == pytest.approx(card.abstain_threshold, rel=1e-4, abs=1e-6)
    float32 = EnsembleRuntime(digits_export[0]).card
    assert card.temperature != float32.temperature  # not copied from the float32 fit


def _test_metrics(path, x, y) -> dict:
    runtime = EnsembleRuntime(path)
    out = runtime.predict(x)
    metrics = classification_metrics(out["member_probs"].astype(np.float64), y)
    metrics["coverage"], _ = set_coverage_and_size(runtime.prediction_sets(out, 0.9), y)
    return metrics


@slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_the_lowered_file_stays_within_the_stated_band_of_float32(precision, lowered, digits_export, digits_split):
    x, y = digits_split["test"]
    want = _test_metrics(digits_export[0], x, y)
    got = _test_metrics(lowered[precision][0], x, y)
    assert abs(got["accuracy"] - want["accuracy"]) <= 0.005, (got, want)
    assert abs(got["nll"] - want["nll"]) <= 0.05 * want["nll"], (got, want)
    assert 0.85 <= got["coverage"] <= 0.97, got


@slow
def test_fuse_quantizes_with_its_validation_data(quickstart_runs, tmp_path):
    """The run's members as plain checkpoints, fused by `forde fuse --quantize int8 --validation`."""
    from safetensors.torch import save_file

    from training.models import member_state_dict
    from training.run import load_run
    from training.splits import digits_split

    run = load_run(quickstart_runs["forde"])
    paths = []
    for m in range(run.ensemble.members):
        paths.append(tmp_path / f"member{m}.safetensors")
        # A plain member's state dict: the one-member ensemble's, without its member axis and normalization.
        state = {k.removeprefix("body."): v[0].contiguous() for k, v in member_state_dict(run.ensemble, m).items()}
        save_file({k: v for k, v in state.items() if k not in ("mean", "std")}, str(paths[-1]))
    x, y = digits_split(run.config.data.split_seed)["val"]
    np.savez(tmp_path / "val.npz", x=x, y=y)
    stats = [",".join(str(float(v)) for v in values) for values in (run.dataset.mean, run.dataset.std)]
    result = run_forde(
        "fuse", *paths, "--arch", "cnn", "--width", run.config.model.width, "--input-shape", "1,8,8",
        "--mean", stats[0], "--std", stats[1], "--validation", tmp_path / "val.npz", "--quantize", "int8",
        "--out", tmp_path / "fused.onnx",
    )  # fmt: skip
    assert "✗" not in result.stdout and "int8 predict graph" in result.stdout
    runtime = EnsembleRuntime(tmp_path / "fused.onnx")
    assert runtime.card.precision == "int8" and runtime.card.method == "external"


@slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDAExecutionProvider here (needs onnxruntime-gpu and a GPU)")
def test_the_fp16_file_runs_on_the_cuda_provider(tmp_path, digits_split):
    """fp16 is for the CUDA provider: the same file, on the GPU, within its stated tolerances of float32."""
    import torch

    from training.export import HeldOutOptions, export_validated
    from training.export.quantize import lowered_contract
    from training.models import build_ensemble

    torch.manual_seed(0)
    ensemble = build_ensemble("cnn", 4, (1, 8, 8), 10, [4.9], [6.0], width=16)
    card = ModelCard(
        class_names=tuple(map(str, range(10))), input_shape=(1, 8, 8), input_space="digits", image=None, members=4,
        method="de",
    )  # fmt: skip
    x, y = digits_split["val"]
    # T = 1 in both files, so that their outputs compare directly.
    same = {"validation": (torch.from_numpy(x), torch.from_numpy(y)), "options": HeldOutOptions(calibrate=False)}
    export_validated(ensemble, tmp_path / "f32.onnx", card, echo=lambda line: None, **same)
    export_validated(ensemble, tmp_path / "fp16.onnx", card, echo=lambda line: None, precision="fp16", **same)
    gpu = EnsembleRuntime(tmp_path / "fp16.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.card.precision == "fp16"
    x_test = digits_split["test"][0]
    got, want = gpu.predict(x_test), EnsembleRuntime(tmp_path / "f32.onnx").predict(x_test)
    for name, check in lowered_contract("fp16", 4).checks.items():
        if name in got:
            tolerance = check.atol + check.rtol * np.abs(want[name]).max()
            assert np.abs(got[name] - want[name]).max() <= tolerance, name
