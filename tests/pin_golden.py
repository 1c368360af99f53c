"""Pin the committed model's answers on fixed inputs into tests/golden/digits.json.

    python tests/pin_golden.py        # after re-exporting exported/digits.onnx on purpose

test_golden.py then checks the committed files against these values, so an export that changes
by accident (or a runtime that reads it differently) is noticed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "exported" / "digits.onnx"
GOLDEN = ROOT / "tests" / "golden" / "digits.json"


def golden_inputs() -> np.ndarray:
    """The first 8 bundled digits, a blank image and a saturated one: `[10, 1, 8, 8]` raw pixel counts."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:8].astype(np.float32)[:, None]
    return np.concatenate([digits, np.zeros((1, 1, 8, 8), np.float32), np.full((1, 1, 8, 8), 16, np.float32)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def answers(runtime, x: np.ndarray) -> dict:
    out = runtime.predict(x)
    return {
        "predicted_class": out["predicted_class"].tolist(),
        "abstain": out["abstain"].tolist(),
        "probs": np.round(out["probs"].astype(np.float64), 7).tolist(),
        "mutual_information": np.round(out["mutual_information"].astype(np.float64), 7).tolist(),
        "input_gradients_sum": np.round(runtime.explain(x)["input_gradients"].sum(axis=(2, 3, 4)), 5).tolist(),
    }


def main() -> None:
    from forde_serve.runtime import EnsembleRuntime

    runtime = EnsembleRuntime(MODEL, providers=["CPUExecutionProvider"])
    golden = {
        "sha256": {p.name: sha256(p) for p in (MODEL, MODEL.with_name("digits.explain.onnx"))},
        **answers(runtime, golden_inputs()),
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"pinned {GOLDEN}")


if __name__ == "__main__":
    main()
