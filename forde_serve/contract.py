"""The contract of an exported ensemble (DESIGN.md section 5): tensor names, shapes, metadata keys.

The exporter (torch side) writes files to this contract and the runtime reads them by it,
so both import the names from here.
"""

from __future__ import annotations

__all__ = [
    "EXPLAIN_OUTPUTS",
    "FORMAT_VERSION",
    "INPUT",
    "METADATA_KEYS",
    "PREDICT_OUTPUTS",
    "TARGET",
    "explain_path",
]

FORMAT_VERSION = "1"

INPUT = "input"  # float32 [batch, *input_shape], raw input space (normalization is in the graph)
TARGET = "target"  # int64 [batch], class whose input gradient to return; -1 = the ensemble's prediction

PREDICT_OUTPUTS = (
    "probs",  # [batch, classes] mean of member softmaxes
    "member_logits",  # [batch, members, classes]
    "member_probs",  # [batch, members, classes]
    "predictive_entropy",  # [batch] total uncertainty, nats
    "expected_entropy",  # [batch] aleatoric, nats
    "mutual_information",  # [batch] epistemic = total - aleatoric, nats
    "vote_disagreement",  # [batch] fraction of members whose top class differs from the ensemble's
)
EXPLAIN_OUTPUTS = PREDICT_OUTPUTS + (
    "input_gradients",  # [batch, members, *input_shape] d member_logits[b, m, target_b] / d input[b]
)

# metadata_props of both files; values are strings, JSON where structured.
METADATA_KEYS = {
    "format_version": "forde.format_version",
    "graph": "forde.graph",  # predict | explain
    "class_names": "forde.class_names",  # JSON list
    "input_shape": "forde.input_shape",  # JSON list, without the batch axis
    "input_space": "forde.input_space",  # what a raw input is, in words
    "image": "forde.image",  # JSON or null: how an uploaded image becomes an input (mode, size, scale, invert)
    "members": "forde.members",
    "method": "forde.method",  # forde | de
    "kernel": "forde.kernel",  # JSON: lengthscale, alpha, every, batch
    "training_config": "forde.training_config",  # JSON: the resolved TrainConfig
    "metrics": "forde.metrics",  # JSON: the run's clean test metrics
    "abstain_threshold": "forde.abstain_threshold",  # abstain when mutual_information > this
    "abstain_target_risk": "forde.abstain_target_risk",
    "abstain_coverage": "forde.abstain_coverage",  # fraction of validation inputs accepted
    "abstain_validation_risk": "forde.abstain_validation_risk",  # error rate among them
    # JSON (calibration.TemperatureFit) or absent: the temperature the member logits were divided by
    # inside both graphs, fitted on the validation split, with NLL/ECE there before and after.
    "calibration": "forde.calibration",
    # JSON (conformal.ConformalCalibration) or absent: split-conformal thresholds per coverage level,
    # on the calibrated probabilities of the validation split. Absent: no prediction sets.
    "conformal": "forde.conformal",
}


def explain_path(predict_path: str) -> str:
    """`NAME.onnx` -> `NAME.explain.onnx`."""
    if not predict_path.endswith(".onnx") or predict_path.endswith(".explain.onnx"):
        raise ValueError(f"model path: expected NAME.onnx (the predict graph), got {predict_path!r}")
    return predict_path[: -len(".onnx")] + ".explain.onnx"
