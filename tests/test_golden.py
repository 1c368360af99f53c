"""The committed default model answers fixed inputs exactly as pinned (tests/pin_golden.py).

A changed export, or a runtime that reads the same file differently, fails here. Classes and the
abstain decision must match exactly; probabilities to 1e-6 (another CPU's onnxruntime kernels may
round the last float32 bits differently, an export change moves them far more).
"""

import json

import numpy as np
import pytest

from forde_serve.runtime import EnsembleRuntime

from helpers import MODEL
from pin_golden import GOLDEN, answers, golden_inputs, sha256


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_the_committed_files_are_the_pinned_ones(golden):
    got = {p.name: sha256(p) for p in (MODEL, MODEL.with_name("digits.explain.onnx"))}
    assert got == golden["sha256"], "exported/ changed: if on purpose, re-pin with `python tests/pin_golden.py`"


def test_the_committed_model_gives_the_pinned_answers(golden):
    got = answers(EnsembleRuntime(MODEL, providers=["CPUExecutionProvider"]), golden_inputs())
    assert got["predicted_class"] == golden["predicted_class"]
    assert got["abstain"] == golden["abstain"]
    np.testing.assert_allclose(got["probs"], golden["probs"], atol=1e-6)
    np.testing.assert_allclose(got["mutual_information"], golden["mutual_information"], atol=1e-6)
    np.testing.assert_allclose(got["input_gradients_sum"], golden["input_gradients_sum"], rtol=1e-4, atol=1e-4)
