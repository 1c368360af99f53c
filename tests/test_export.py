"""The exporter: one fused graph, a symbolic batch axis, exact in-graph gradients, complete metadata."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from forde_serve.contract import EXPLAIN_OUTPUTS, PREDICT_OUTPUTS, ModelCard
from forde_serve.metrics import validation_abstention
from forde_serve.runtime import EnsembleRuntime
from training.export import ExportContract, OutputCheck, ToleranceError, export_ensemble
from training.models import build_ensemble
from training.models.layers import FusedConv2d, FusedLinear
from training.run import load_run

from helpers import bare_card, run_forde

pytestmark = pytest.mark.slow  # trains, exports or runs several processes


def _ops(path):
    return [node for node in onnx.load(str(path)).graph.node]


def test_export_prints_a_passing_check_for_every_output(digits_export):
    path, stdout = digits_export
    for name in EXPLAIN_OUTPUTS:
        assert f"✓ explain  {name}" in stdout
    for name in PREDICT_OUTPUTS:
        assert f"✓ predict  {name}" in stdout
    assert "✗" not in stdout
    assert path.stat().st_size + path.with_name("digits.explain.onnx").stat().st_size < 5_000_000


def test_members_are_fused_not_copied(digits_export, quickstart_runs):
    path, _ = digits_export
    ensemble = load_run(quickstart_runs["forde"]).ensemble
    conv_layers = sum(isinstance(m, FusedConv2d) for m in ensemble.modules())
    predict = [n for n in _ops(path) if n.op_type == "Conv"]
    assert len(predict) == conv_layers == 4

    def groups(nodes):
        return sorted({a.name: a.i for a in n.attribute}["group"] for n in nodes)

    # each Conv runs all 8 members as one grouped convolution, except the first: every member reads
    # the same input, so it is one dense convolution with all members' output channels (layout.py)
    assert groups(predict) == [1, 8, 8, 8]
    assert not any(n.op_type == "Expand" for n in _ops(path))
    explain = _ops(path.with_name("digits.explain.onnx"))
    # forward convolutions plus one backward convolution each (stride 1: a Conv with the kernel
    # flipped; strided: a ConvTranspose), every one of them over all members at once; the input
    # layer's gradient (one input channel per member) is a depthwise Conv over every member's
    # 16 gradient channels and a sum
    convolutions = [n for n in explain if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convolutions) == 2 * conv_layers
    assert groups(convolutions) == [1, 8, 8, 8, 8, 8, 8, 8 * 16]
    assert not any(n.op_type in ("Loop", "Scan", "If") for n in explain)


def test_strided_backward_convolutions_are_conv_transpose(untrained_exports):
    ensemble = build_ensemble("resnet18", 2, (3, 32, 32), 10, [0.5] * 3, [0.25] * 3)
    strided = sum(isinstance(m, FusedConv2d) and m.stride == (2, 2) for m in ensemble.modules())
    conv_layers = sum(isinstance(m, FusedConv2d) for m in ensemble.modules())
    assert sum(n.op_type == "Conv" for n in _ops(untrained_exports["resnet18"]["predict"])) == conv_layers == 20
    explain = _ops(untrained_exports["resnet18"]["explain"])
    assert sum(n.op_type == "ConvTranspose" for n in explain) == strided == 6
    assert sum(n.op_type == "Conv" for n in explain) == 2 * conv_layers - strided


def test_batch_axis_is_symbolic(digits_export):
    path, _ = digits_export
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    runtime = EnsembleRuntime(path)
    x = np.random.default_rng(0).uniform(0, 16, (4096, 1, 8, 8)).astype(np.float32)
    big = runtime.predict(x)
    one = runtime.predict(x[:1])
    assert big["probs"].shape == (4096, 10)
    np.testing.assert_allclose(one["probs"][0], big["probs"][0], atol=1e-6)
    assert runtime.explain(x[:1])["input_gradients"].shape == (1, 8, 1, 8, 8)


def test_metadata_holds_what_a_server_needs(digits_export, quickstart_runs, digits_split):
    path, _ = digits_export
    run = quickstart_runs["forde"]
    card = EnsembleRuntime(path).card
    for graph, file in (("predict", path), ("explain", path.with_name("digits.explain.onnx"))):
        props = {p.key: p.value for p in onnx.load(str(file)).metadata_props}
        assert ModelCard.graph_of(props) == graph
        assert ModelCard.from_metadata(props) == card  # both files carry the whole card
        assert props == card.to_metadata(graph)  # and nothing else
    assert card.class_names == tuple(str(i) for i in range(10)) and card.input_shape == (1, 8, 8)
    assert (card.members, card.method) == (8, "forde")
    assert card.kernel["lengthscale"] == "identity"
    assert card.training_config == json.loads((run / "config.json").read_text())
    assert card.metrics == json.loads((run / "metrics.json").read_text())
    # distinct trained parameters, as training counted them; independent members have no layout to record
    assert card.structure == "independent" and card.parameters == card.metrics["parameters"] and card.layout is None
    rule = card.choices.abstention
    # the rule the export chose on the validation split (through PyTorch), chosen again from what the
    # exported file answers on that split: the same share accepted, the same errors among them
    x, y = digits_split["val"]
    again = validation_abstention(EnsembleRuntime(path).predict(x)["member_probs"].astype(np.float64), y, 0.01)
    assert rule.target_risk == 0.01 and 0 < rule.coverage < 1 and 0 <= rule.validation_risk <= 0.01
    assert (rule.coverage, rule.validation_risk) == (again["coverage"], again["risk"])
    assert rule.threshold == pytest.approx(again["threshold"], rel=1e-5)
    assert card.calibration is not None and card.conformal is not None
    assert "0 to 16" in card.input_space


def _directional_check(runtime, x, targets, h):
    """Central differences of the predict graph's member logits along each member's own gradient
    direction u = g / |g|, against |g| from the explain graph; returns the relative error of every
    (input, member) pair.

    Along u the derivative is largest, so float32 noise matters least, and the check still sees
    any error e in g: the finite difference measures <g_true, u>, which equals |g| only when
    g = g_true (e orthogonal to g_true shows up as a relative error of about |e|^2 / |g|^2, a
    scrambled or transposed map as far more). Random directions, on a ReLU network with this
    many kinks, sit at a float32 noise floor of a few percent and would test little. A ReLU kink
    within +-h of an input can still put one pair a percent or two off (the exporter's own check
    allows such outliers for the same reason), so callers bound the median tightly and the worst
    loosely: a wrong map is off on every pair, by far more.
    """
    gradients = runtime.explain(x, targets)["input_gradients"].astype(np.float64)  # [B, M, ...]
    batch, members = gradients.shape[:2]
    norms = np.linalg.norm(gradients.reshape(batch, members, -1), axis=-1)
    rows = np.arange(batch)
    errors = []
    for m in range(members):
        direction = gradients[:, m] / norms[:, m].reshape(-1, *[1] * (x.ndim - 1))
        plus = runtime.predict((x + h * direction).astype(np.float32))["member_logits"][rows, m, targets]
        minus = runtime.predict((x - h * direction).astype(np.float32))["member_logits"][rows, m, targets]
        numeric = (plus.astype(np.float64) - minus) / (2 * h)
        errors.append(np.abs(numeric - norms[:, m]) / norms[:, m])
    return np.concatenate(errors)


@pytest.fixture(scope="module")
def untrained_exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("untrained")
    paths = {}
    for arch, shape, members in (("mlp", (1, 8, 8), 3), ("resnet18", (3, 32, 32), 2)):
        torch.manual_seed(0)
        channels = shape[0]
        ensemble = build_ensemble(arch, members, shape, 10, [0.5] * channels, [0.25] * channels, width=16)
        with torch.no_grad():  # settle batch-norm statistics, as any trained model has them
            ensemble.train()
            for _ in range(30):
                ensemble(torch.rand(32, *shape))
        x = torch.rand(6, *shape)
        card = bare_card(shape, members)
        paths[arch] = export_ensemble(
            ensemble, out / f"{arch}.onnx", card, x, torch.full((6,), -1), echo=lambda s: None
        )
    return paths


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("arch", ["cnn", "mlp", "resnet18"])
def test_gradients_match_finite_differences(arch, batch, digits_export, untrained_exports):
    rng = np.random.default_rng(batch)
    if arch == "cnn":  # the trained quickstart ensemble, on real digits-range inputs
        runtime, x, h = EnsembleRuntime(digits_export[0]), rng.uniform(0, 16, (batch, 1, 8, 8)), 1e-3
    else:
        runtime = EnsembleRuntime(untrained_exports[arch]["predict"])
        x, h = rng.uniform(0, 1, (batch, *runtime.card.input_shape)), 1e-3
    targets = rng.integers(0, 10, batch)
    errors = _directional_check(runtime, x, targets, h)
    assert np.median(errors) < 2e-3 and errors.max() < 5e-2, errors


def test_mlp_graph_uses_one_matmul_per_layer(untrained_exports):
    ensemble = build_ensemble("mlp", 3, (1, 8, 8), 10, [0.5], [0.25], width=16)
    layers = sum(isinstance(m, FusedLinear) for m in ensemble.modules())
    assert sum(n.op_type == "MatMul" for n in _ops(untrained_exports["mlp"]["predict"])) == layers


def test_the_gradient_references_are_torch_float32_and_float64_and_the_ensemble_stays_float32():
    # At a ReLU kink float32 rounding picks a side, and onnxruntime's picks no less rightly than
    # torch's: the export check takes both torch's float32 gradient and a float64 copy's (an export was
    # refused once over a map 5% off the one and 2e-7 off the other, the other way round another time).
    from training.export.exporter import _reference
    from training.forde import member_input_gradients

    torch.manual_seed(0)
    ensemble = build_ensemble("cnn", 2, (1, 8, 8), 10, [0.5], [0.25], width=8).eval()
    x, target = torch.rand(5, 1, 8, 8) * 16, torch.tensor([-1, 3, -1, 0, 9])
    reference = _reference(ensemble, x, target, temperature=0.5)
    assert next(ensemble.parameters()).dtype == torch.float32  # the caller's ensemble is not converted
    chosen = torch.from_numpy(np.where(target.numpy() < 0, reference["probs"].argmax(1), target.numpy()))
    exact = build_ensemble("cnn", 2, (1, 8, 8), 10, [0.5], [0.25], width=8).double()
    exact.load_state_dict(ensemble.state_dict())
    for model, z, got in (
        (ensemble, x, reference["input_gradients"][0]),
        (exact, x.double(), reference["input_gradients"][1]),
    ):
        _, want = member_input_gradients(model.eval(), model.normalize(z), chosen)
        np.testing.assert_array_equal(got, (want / model.std / 0.5).double().numpy())
    assert reference["input_gradients"][1].dtype == np.float64


def test_a_failed_check_removes_the_files_and_lists_every_failure(tmp_path):
    torch.manual_seed(0)
    ensemble = build_ensemble("mlp", 2, (1, 8, 8), 10, [0.0], [1.0], width=8)
    checks = ExportContract().checks | {
        "probs": OutputCheck("max_abs", atol=-1.0),
        "input_gradients": OutputCheck("gradient_maps", rtol=-1.0),
    }
    strict = ExportContract(checks=checks)
    with pytest.raises(ToleranceError) as err:
        export_ensemble(
            ensemble,
            tmp_path / "m.onnx",
            bare_card((1, 8, 8), 2),
            torch.rand(4, 1, 8, 8),
            torch.full((4,), -1),
            contract=strict,
            echo=lambda s: None,
        )
    message = str(err.value)
    assert "probs" in message and "input_gradients" in message and len(err.value.failures) == 3  # 2 probs, 1 grads
    assert err.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_corrupt_runs_are_named(quickstart_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart_runs["de"], run)
    (run / "metrics.json").write_text("{not json")
    result = run_forde("export", run, "--out", tmp_path / "m.onnx", check=False)
    assert result.returncode == 2 and "metrics.json is broken" in result.stderr
    (run / "members.safetensors").unlink()
    result = run_forde("export", run, "--out", tmp_path / "m.onnx", check=False)
    assert result.returncode == 2 and "no members.safetensors" in result.stderr
    assert not (tmp_path / "m.onnx").exists()
