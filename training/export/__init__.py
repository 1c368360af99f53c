"""Fuse a trained ensemble into one batched ONNX graph (`NAME.onnx`), plus a twin that explains
itself (`NAME.explain.onnx`), both checked against PyTorch before they are kept."""

from training.export.checks import (
    ExportContract,
    ExportError,
    ExportValidationError,
    OutputCheck,
    OutputNamesError,
    ShapeError,
    ToleranceError,
)
from training.export.exporter import HeldOutOptions, export_ensemble, export_run, export_validated
from training.export.graphs import write_predict_graph

__all__ = [
    "ExportContract",
    "ExportError",
    "ExportValidationError",
    "HeldOutOptions",
    "OutputCheck",
    "OutputNamesError",
    "ShapeError",
    "ToleranceError",
    "export_ensemble",
    "export_run",
    "export_validated",
    "write_predict_graph",
]
