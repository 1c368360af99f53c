"""The exporter's checks, on the committed model file with one thing broken at a time (no torch export)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from forde_serve.contract import EXPLAIN_OUTPUTS, INPUT, PREDICT_OUTPUTS, TARGET
from training.export.checks import (
    ExportContract,
    ExportValidationError,
    OutputCheck,
    OutputNamesError,
    ShapeError,
    ToleranceError,
    validate_files,
)

from helpers import MODEL

EXPLAIN = MODEL.with_name("digits.explain.onnx")


def _feeds(batch: int = 4) -> dict:
    x = np.random.default_rng(0).uniform(0, 16, (batch, 1, 8, 8)).astype(np.float32)
    return {"predict": {INPUT: x}, "explain": {INPUT: x, TARGET: np.full(batch, -1, np.int64)}}


def _reference(feeds: dict) -> dict:
    """The committed files' own outputs: every value check passes, so only the broken part fails."""
    session = ort.InferenceSession(str(EXPLAIN), providers=["CPUExecutionProvider"])
    return dict(zip(EXPLAIN_OUTPUTS, session.run(None, feeds["explain"]), strict=True))


def _broken_copy(tmp_path, change) -> dict:
    model = onnx.load(str(MODEL))
    change(model.graph)
    onnx.save(model, str(tmp_path / "m.onnx"))
    return {"predict": tmp_path / "m.onnx"}


def test_the_committed_files_pass_and_print_one_line_per_output():
    feeds, lines = _feeds(), []
    validate_files({"predict": MODEL, "explain": EXPLAIN}, feeds, _reference(feeds), ExportContract(), lines.append)
    assert len(lines) == len(PREDICT_OUTPUTS) + len(EXPLAIN_OUTPUTS) and all(
        line.lstrip().startswith("✓") for line in lines
    )


def test_a_fixed_batch_axis_is_a_shape_error(tmp_path):
    def fix_batch(graph):
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4

    feeds = _feeds(4)
    with pytest.raises(ShapeError, match="input has a fixed batch axis 4, expected a symbolic 'batch'"):
        validate_files(_broken_copy(tmp_path, fix_batch), feeds, _reference(feeds), ExportContract(), print)


def test_a_renamed_output_is_an_output_names_error(tmp_path):
    def rename(graph):
        old = graph.output[0].name
        graph.output[0].name = "probabilities"
        for node in graph.node:
            node.output[:] = ["probabilities" if o == old else o for o in node.output]
            node.input[:] = ["probabilities" if i == old else i for i in node.input]

    feeds = _feeds()
    with pytest.raises(OutputNamesError, match="outputs are \\['probabilities'"):
        validate_files(_broken_copy(tmp_path, rename), feeds, _reference(feeds), ExportContract(), print)


def test_values_off_is_a_tolerance_error_and_mixed_kinds_the_base_class(tmp_path):
    feeds = _feeds()
    reference = _reference(feeds) | {"mutual_information": _reference(feeds)["mutual_information"] + 0.01}
    lines = []
    with pytest.raises(ToleranceError) as err:
        validate_files({"predict": MODEL}, feeds, reference, ExportContract(), lines.append)
    assert err.value.failures == ("digits.onnx: mutual_information max |diff| 0.01 (allowed 0.0001)",)
    assert any(line.lstrip().startswith("✗ predict  mutual_information") for line in lines)

    def fix_batch(graph):
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4

    with pytest.raises(ExportValidationError) as err:
        validate_files(_broken_copy(tmp_path, fix_batch), feeds, reference, ExportContract(), print)
    assert type(err.value) is ExportValidationError  # a shape and a value failed: the common base class
    assert any("fixed batch axis" in f for f in err.value.failures)
    assert any("mutual_information max |diff|" in f for f in err.value.failures)


def test_gradient_maps_allow_a_few_kink_outliers_but_not_a_wrong_map():
    feeds = _feeds(8)
    reference = _reference(feeds)
    grads = reference["input_gradients"].copy()  # [8, 8, 1, 8, 8]: 64 maps
    grads[0, 0] *= 1.02  # one map 2% off: a ReLU kink on the other side
    check = {"input_gradients": OutputCheck("gradient_maps", rtol=1e-3)}
    contract = ExportContract(checks=ExportContract().checks | check)
    validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": grads}, contract, print)
    grads[:, :] = np.roll(grads, 1, axis=-1)  # every map shifted by a pixel: a wrong graph
    with pytest.raises(ToleranceError, match="input_gradients"):
        validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": grads}, contract, print)


def test_each_gradient_map_is_measured_against_the_closest_reference():
    # The exporter gives torch's float32 and float64 gradients: a map at a ReLU kink may match either.
    feeds = _feeds(8)
    reference = _reference(feeds)
    right = reference["input_gradients"]
    off = right.copy()
    off[:, :4] *= 1.2  # half the maps 20% off in one reference: far past the kink allowance alone
    check = {"input_gradients": OutputCheck("gradient_maps", rtol=1e-3)}
    contract = ExportContract(checks=ExportContract().checks | check)
    with pytest.raises(ToleranceError, match="input_gradients"):
        validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": off}, contract, print)
    lines = []
    validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": (off, right)}, contract, lines.append)
    assert any("✓ explain  input_gradients" in line for line in lines)
    both_off = right.copy()
    both_off[:, 4:] *= 1.2  # the other half off in the other: every map still has one reference it matches
    validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": (off, both_off)}, contract, print)
    with pytest.raises(ToleranceError, match="input_gradients"):
        validate_files({"explain": EXPLAIN}, feeds, reference | {"input_gradients": (off, off * 1.1)}, contract, print)
