"""What an export promises and how the written files are checked against PyTorch.

The contract (opset, batch axis, one `OutputCheck` per output) is one small object; validation
checks names, then shapes (including a batch axis that must stay symbolic), then values, prints
one line per output with its difference and tolerance, and raises ONE error listing every
failure. The error's class says which kind of check failed (`OutputNamesError`, `ShapeError`,
`ToleranceError`; `ExportValidationError` when several kinds did), so a caller can decide what
is fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from forde_serve.contract import EXPLAIN_OUTPUTS, PREDICT_OUTPUTS
from forde_serve.errors import FordeError

__all__ = [
    "ExportContract",
    "ExportError",
    "ExportValidationError",
    "OutputCheck",
    "OutputNamesError",
    "ShapeError",
    "ToleranceError",
    "validate_files",
]


class ExportError(FordeError, RuntimeError):
    """The ensemble could not be written as the contract asks (e.g. an op with no ONNX equivalent)."""


class ExportValidationError(ExportError):
    """The written files do not compute what the PyTorch ensemble computes; lists every failure."""

    exit_code = 1  # not the caller's mistake: the exporter got something wrong

    def __init__(self, message: str, failures: tuple[str, ...] = ()):
        super().__init__(message)
        self.failures = failures


class OutputNamesError(ExportValidationError):
    """An output is missing, extra or out of the contract's order."""


class ShapeError(ExportValidationError):
    """An output has the wrong shape, or the batch axis of an input or output is not symbolic."""


class ToleranceError(ExportValidationError):
    """An output's values differ from PyTorch's by more than its tolerance."""


@dataclass(frozen=True)
class OutputCheck:
    """How one output is compared with the PyTorch reference.

    max_abs: max |got - want| <= atol + rtol * max |want|.
    gradient_maps: the relative L2 error of every (input, member) map `[batch, members, ...]` must
    stay under rtol, except a share of outliers (ReLU kinks, see ExportContract) under a looser limit;
    with several references (a tuple), each map is measured against the closest.
    """

    kind: Literal["max_abs", "gradient_maps"] = "max_abs"
    atol: float = 0.0
    rtol: float = 0.0


@dataclass(frozen=True)
class ExportContract:
    """How the ensemble is exported and how closely the files must match PyTorch."""

    opset: int = 18
    batch_axis: str = "batch"
    checks: dict[str, OutputCheck] = field(
        default_factory=lambda: {
            "probs": OutputCheck("max_abs", atol=1e-4),
            "member_logits": OutputCheck("max_abs", atol=1e-3, rtol=1e-4),
            "member_probs": OutputCheck("max_abs", atol=1e-4),
            "predictive_entropy": OutputCheck("max_abs", atol=1e-4),
            "expected_entropy": OutputCheck("max_abs", atol=1e-4),
            "mutual_information": OutputCheck("max_abs", atol=1e-4),
            "vote_disagreement": OutputCheck("max_abs", atol=1e-6),
            "input_gradients": OutputCheck("gradient_maps", rtol=1e-3),
        }
    )
    # A ReLU network's gradient jumps where a unit sits at its kink, and float32 rounding decides
    # the side: a few member gradients may differ by a few percent (torch itself does, float32 vs
    # float64). A wrong graph is off on every input, so a small share of such outliers is allowed.
    # One kink's jump has no bound; seen: 5.07% on an untrained ResNet18 BatchEnsemble, where moving
    # the input by 1e-6 moved torch's own float64 gradient by the same 5.07% (so 5% refused a right file).
    gradient_outlier_share: float = 0.25
    gradient_outlier_limit: float = 0.1


@dataclass(frozen=True)
class _Row:
    graph: str
    name: str
    difference: float
    tolerance: float
    passed: bool
    note: str


def _max_abs(got: np.ndarray, want: np.ndarray, check: OutputCheck) -> tuple[float, float, bool, str]:
    difference = float(np.max(np.abs(got - want))) if got.size else 0.0
    tolerance = check.atol + check.rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
    return difference, tolerance, difference <= tolerance, "max |diff|"


def _gradient_maps(
    got: np.ndarray, wants: tuple[np.ndarray, ...], check: OutputCheck, contract: ExportContract
) -> tuple[float, float, bool, str]:
    count = got.shape[0] * got.shape[1]
    relative = np.min(
        [
            np.linalg.norm((got - want).reshape(count, -1), axis=1)
            / (np.linalg.norm(want.reshape(count, -1), axis=1) + 1e-12)
            for want in wants
        ],
        axis=0,
    )
    outliers = int(np.sum(relative > check.rtol))
    allowed_outliers = max(1, int(contract.gradient_outlier_share * count))
    passed = outliers <= allowed_outliers and float(relative.max()) <= contract.gradient_outlier_limit
    if outliers == 0:
        return float(relative.max()), check.rtol, passed, "max rel L2"
    median = float(np.median(relative))
    note = (
        f"{outliers}/{count} maps over {check.rtol:g} (worst {relative.max():.2e}, at most {allowed_outliers} "
        f"within {contract.gradient_outlier_limit:g} allowed: ReLU kinks); median rel L2"
    )
    return median, check.rtol, passed and median <= check.rtol, note


def validate_files(
    paths: dict[str, Path],
    feeds: dict[str, dict[str, np.ndarray]],
    reference: dict[str, np.ndarray | tuple[np.ndarray, ...]],
    contract: ExportContract,
    echo: Callable[[str], None] = print,
) -> None:
    """Run each file (`paths`: graph kind -> file) on its `feeds` in onnxruntime and compare every
    output with `reference` (output name -> expected array, or for a gradient-maps check a tuple of
    equally right arrays, each map measured against the closest). Raises one error listing all failures."""
    import onnxruntime as ort

    failures: list[tuple[type[ExportValidationError], str]] = []
    rows: list[_Row] = []
    for graph, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = PREDICT_OUTPUTS if graph == "predict" else EXPLAIN_OUTPUTS
        got_names = tuple(o.name for o in session.get_outputs())
        if got_names != names:
            failures.append((OutputNamesError, f"{path.name}: outputs are {list(got_names)}, expected {list(names)}"))
            continue
        for arg in (*session.get_inputs(), *session.get_outputs()):
            if not isinstance(arg.shape[0], str):
                failures.append(
                    (
                        ShapeError,
                        f"{path.name}: {arg.name} has a fixed batch axis {arg.shape[0]}, expected a "
                        f"symbolic '{contract.batch_axis}' (export with a dynamic batch dimension)",
                    )
                )
        for name, got in zip(names, session.run(None, feeds[graph]), strict=True):
            wants = reference[name] if isinstance(reference[name], tuple) else (reference[name],)
            want = wants[0]
            if got.shape != want.shape:
                failures.append(
                    (ShapeError, f"{path.name}: {name} has shape {list(got.shape)}, expected {list(want.shape)}")
                )
                continue
            check = contract.checks[name]
            if check.kind == "gradient_maps":
                difference, tolerance, passed, note = _gradient_maps(got, wants, check, contract)
            else:
                difference, tolerance, passed, note = _max_abs(got, want, check)
            rows.append(_Row(graph, name, difference, tolerance, passed, note))
            if not passed:
                failures.append(
                    (ToleranceError, f"{path.name}: {name} {note} {difference:.3g} (allowed {tolerance:.3g})")
                )
    for row in rows:
        echo(
            f"  {'✓' if row.passed else '✗'} {row.graph:<8} {row.name:<20} {row.note} {row.difference:.2e}  "
            f"(tolerance {row.tolerance:.2e})"
        )
    if failures:
        kinds = {kind for kind, _ in failures}
        kind = kinds.pop() if len(kinds) == 1 else ExportValidationError
        messages = tuple(message for _, message in failures)
        raise kind("exported files do not match the PyTorch ensemble:\n  " + "\n  ".join(messages), messages)
