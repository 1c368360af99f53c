"""EnsembleRuntime: the one object over an exported file (real onnxruntime sessions, no torch inside).

Most tests run on the committed model (fast tier); one compares a fresh export with its PyTorch run."""

import shutil

import numpy as np
import pytest

from forde_serve.metrics import uncertainty
from forde_serve.runtime import EnsembleRuntime, InvalidInput, ModelFileError, NonFiniteOutput, array_from_json

from helpers import MODEL, copy_with_metadata


@pytest.mark.slow
def test_predictions_equal_the_torch_ensemble(digits_export, quickstart_runs, digits_split):
    import torch

    from training.run import load_run

    runtime = EnsembleRuntime(digits_export[0])
    run = load_run(quickstart_runs["forde"])
    x, y = digits_split["test"]
    got = runtime.predict(x)
    with torch.no_grad():
        # the export bakes the temperature fitted on validation data into the graph
        member_probs = (run.ensemble(torch.from_numpy(x)) / runtime.card.temperature).softmax(-1).double().numpy()
    assert runtime.card.temperature != 1.0
    np.testing.assert_allclose(got["member_probs"], member_probs, atol=1e-5)
    np.testing.assert_allclose(got["probs"], member_probs.mean(1), atol=1e-5)
    for name, value in uncertainty(member_probs).items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, err_msg=name)
    accuracy = np.mean(got["predicted_class"] == y)
    assert accuracy == pytest.approx(np.mean(member_probs.mean(1).argmax(1) == y), abs=1e-9)
    assert accuracy == pytest.approx(run.metrics["accuracy"], abs=0.02)  # temperature scaling rarely flips an argmax
    np.testing.assert_array_equal(got["abstain"], got["mutual_information"] > runtime.card.abstain_threshold)
    np.testing.assert_allclose(got["confidence"], got["probs"].max(1))


def test_explain_targets(runtime, digits_split):
    x = digits_split["test"][0][:5]
    default = runtime.explain(x)
    predicted = runtime.explain(x, target=[-1] * 5)
    np.testing.assert_array_equal(default["input_gradients"], predicted["input_gradients"])
    chosen = (default["predicted_class"] + 1) % 10
    other = runtime.explain(x, target=chosen)
    assert not np.allclose(other["input_gradients"], default["input_gradients"])
    np.testing.assert_array_equal(
        runtime.explain(x, target=3)["input_gradients"], runtime.explain(x, target=[3] * 5)["input_gradients"]
    )
    np.testing.assert_allclose(other["probs"], default["probs"])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda x: x[0], "input: expected shape [batch, 1, 8, 8], got [1, 8, 8]"),
        (lambda x: x.reshape(2, 64), "input: expected shape [batch, 1, 8, 8], got [2, 64]"),
        (lambda x: x > 3, "input: expected numbers (float32), got dtype bool"),
        (lambda x: np.full(x.shape, "a"), "input: expected numbers (float32), got dtype <U1"),
        (lambda x: np.where(np.arange(2)[:, None, None, None] == 1, np.nan, x), "beyond +-3.4e38 in row(s) 1"),
        (lambda x: x * np.inf, "expected finite float32 values"),
        (lambda x: x[:0], "got an empty batch"),
        (lambda x: np.zeros((5000, 1, 8, 8)), "expected at most 4096 inputs per call, got 5000"),
    ],
)
def test_bad_inputs_are_named(runtime, make, message):
    x = np.ones((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(InvalidInput) as err:
        runtime.predict(make(x))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "target,message",
    [
        ([0, 10], "target: expected class indices in [0, 9] or -1"),
        ([0, -2], "got [-2]"),
        ([0], "target: expected 2 class indices (int), got shape [1]"),
        ([0.5, 1.0], "dtype float64"),
    ],
)
def test_bad_targets_are_named(runtime, target, message):
    with pytest.raises(InvalidInput) as err:
        runtime.explain(np.ones((2, 1, 8, 8), dtype=np.float32), target)
    assert message in str(err.value)


def test_integer_inputs_are_accepted_as_numbers(runtime, digits_split):
    x = digits_split["test"][0][:3]
    np.testing.assert_array_equal(runtime.predict(x.astype(np.int64))["probs"], runtime.predict(x)["probs"])


def test_unknown_format_version_is_refused(tmp_path):
    path = copy_with_metadata(MODEL, tmp_path, lambda p: p.update({"forde.format_version": "99"}))
    with pytest.raises(ModelFileError, match="format version '99' is not one this forde-serve knows"):
        EnsembleRuntime(path)


def test_missing_metadata_is_refused(tmp_path):
    path = copy_with_metadata(MODEL, tmp_path, lambda p: p.pop("forde.abstain_threshold"))
    with pytest.raises(ModelFileError, match="forde.abstain_threshold missing"):
        EnsembleRuntime(path)


def test_broken_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        EnsembleRuntime(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="is not a loadable ONNX model"):
        EnsembleRuntime(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="expected NAME.onnx"):
        EnsembleRuntime(tmp_path / "model.pt")
    shutil.copy(MODEL, tmp_path / "alone.onnx")  # the explain twin is missing
    alone = EnsembleRuntime(tmp_path / "alone.onnx")
    alone.predict(np.ones((1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ModelFileError, match="alone.explain.onnx' does not exist"):
        alone.explain(np.ones((1, 1, 8, 8), dtype=np.float32))


def test_providers_are_checked():
    with pytest.raises(ValueError, match="TensorrtExecutionProvider not available in this onnxruntime; available:"):
        EnsembleRuntime(MODEL, providers=["TensorrtExecutionProvider"])
    assert EnsembleRuntime(MODEL, providers=["CPUExecutionProvider"]).providers == ["CPUExecutionProvider"]


def test_the_committed_default_model_serves(digits_split):
    runtime = EnsembleRuntime(MODEL)
    assert (runtime.card.method, runtime.card.members) == ("forde", 8)
    x, y = digits_split["test"]
    got = runtime.predict(x)
    assert np.mean(got["predicted_class"] == y) >= 0.95
    assert runtime.explain(x[:2])["input_gradients"].shape == (2, 8, 1, 8, 8)


def test_cuda_that_cannot_start_falls_back_with_one_warning(monkeypatch, caplog):
    # MOCK: no GPU on this machine. onnxruntime is made to list the CUDA provider (as the GPU
    # build does on a machine where CUDA cannot start); the real session then runs on the CPU.
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with caplog.at_level("WARNING", logger="forde_serve.runtime"):
        runtime = EnsembleRuntime(MODEL)
    assert runtime.providers == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "CUDAExecutionProvider is installed but could not start; running on CPUExecutionProvider"
    ]
    assert runtime.predict(np.ones((1, 1, 8, 8), dtype=np.float32))["probs"].shape == (1, 10)


def test_validate_one_checks_a_single_input(runtime):
    row = np.ones((1, 8, 8))
    assert runtime.validate_one(row).dtype == np.float32 and runtime.validate_one(row).shape == (1, 8, 8)
    with pytest.raises(InvalidInput, match=r"input: expected shape \[1, 8, 8\], got \[8, 8\]"):
        runtime.validate_one(row[0])
    with pytest.raises(InvalidInput, match=r"beyond \+-3.4e38$"):  # finite in float64, not in float32
        runtime.validate_one(np.full((1, 8, 8), 1e39))
    with pytest.raises(InvalidInput, match="beyond .* in row\\(s\\) 0"):
        runtime.validate(np.full((1, 1, 8, 8), 1e39))


def test_outputs_that_are_not_finite_are_refused_naming_the_rows(runtime):
    # 3e38 is a finite float32: the input check lets it through, and the graph overflows on it.
    x = np.ones((4, 1, 8, 8), dtype=np.float32)
    x[1, 0, 2, 2] = x[3, 0, 0, 0] = 3e38
    for call in (runtime.predict, runtime.explain):
        with pytest.raises(NonFiniteOutput) as err:
            call(x)
        assert err.value.rows == (1, 3)
        assert isinstance(err.value, InvalidInput) and "row(s) 1, 3" in str(err.value)
        # the rows that did compute are handed over, so a batch caller need not run them again
        assert np.isfinite(err.value.outputs["probs"][[0, 2]]).all()
        np.testing.assert_array_equal(err.value.outputs["probs"][[0, 2]], call(x[[0, 2]])["probs"])


def test_numbers_from_json_round_once_to_float32():
    # 2**60 + 2**36 + 1 lies just above the midpoint between two float32 neighbours; through float64 it
    # loses its last bit, lands on the midpoint, and ties to the even (lower) one.
    big = 2**60 + 2**36 + 1
    got = array_from_json([[big, -big, 0.1, 3, 2**24 + 1]]).astype(np.float32)
    direct = np.array([big, -big], dtype=np.int64).astype(np.float32)
    np.testing.assert_array_equal(got[0, :2], direct)
    assert got[0, 0] == np.float32(2**60 + 2**37) and got[0, 2] == np.float32(0.1) and got[0, 4] == 2**24
    with pytest.raises(InvalidInput, match="expected numbers, got true/false"):
        array_from_json([[1, True]])
    with pytest.raises(InvalidInput, match="got ragged lists"):
        array_from_json([[1, 2], [3]])
    huge = array_from_json([[10**400, -(10**309), 2**128 - 2**103]]).astype(np.float32)  # the last rounds up
    assert np.isinf(huge).all()
