"""One runtime object over an exported ensemble: the HTTP service, batch scoring and evaluation
all go through `EnsembleRuntime`, so a number means the same everywhere. numpy + onnxruntime only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from forde_serve.conformal import ConformalError, prediction_sets
from forde_serve.contract import (
    EXPLAIN_OUTPUTS,
    INPUT,
    PREDICT_OUTPUTS,
    TARGET,
    ModelCard,
    ModelFileError,
    explain_path,
)
from forde_serve.errors import FordeError

__all__ = [
    "EnsembleRuntime",
    "InvalidInput",
    "ModelCard",
    "ModelFileError",
    "NOT_FINITE",
    "NOT_FINITE_OUTPUTS",
    "NonFiniteOutput",
    "array_from_json",
    "finite_float32_rows",
]

log = logging.getLogger(__name__)

NOT_FINITE = "expected finite float32 values, got NaN, infinity or a value beyond +-3.4e38"
NOT_FINITE_OUTPUTS = (
    "expected values the model can compute with, got values on which its arithmetic overflows: "
    "its outputs are not finite (NaN or infinity)"
)


def finite_float32_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`array` as float32, `[batch]` mask of rows whose values are all finite in float32).

    Cast first: 1e39 is finite as float64 and infinite in the model's float32.
    """
    with np.errstate(over="ignore"):  # the overflow is what the mask reports
        array = array.astype(np.float32, copy=False)
    return array, np.isfinite(array.reshape(len(array), -1)).all(axis=1)


def array_from_json(value: Any, field: str = "input") -> np.ndarray:
    """Nested lists of numbers as JSON parsing gives them (Python int and float) -> a float64 array
    whose float32 cast holds, for every number, the float32 nearest to it.

    That is what a `.npy`, `.npz` or Parquet file of the same numbers gives the scorer (numpy casts
    int64 and float64 straight to float32), so HTTP and `forde score` feed the graph the same bits.
    Integers beyond 2**53 are rounded to float32 here in exact arithmetic: through float64 they would
    be rounded twice, and can land on the other neighbour. Integers beyond float32's range (a
    309-digit one included) become infinity, which the finiteness check then refuses. Booleans,
    strings, null and ragged lists raise InvalidInput (numpy would read true as 1 and "1.5" as 1.5).
    """
    try:
        objects = np.array(value, dtype=object)
    except ValueError:  # numpy refuses some ragged nestings outright
        raise InvalidInput(f"{field}: expected nested lists of numbers, got ragged lists") from None
    kinds = set(map(type, objects.flat))
    if list in kinds:  # a ragged nesting: numpy kept the too-short or too-long lists whole
        raise InvalidInput(f"{field}: expected nested lists of numbers, got ragged lists")
    if kinds - {int, float}:
        names = sorted(_JSON_NAMES.get(kind, kind.__name__) for kind in kinds - {int, float})
        raise InvalidInput(f"{field}: expected numbers, got {', '.join(names)}")
    if int not in kinds:
        return objects.astype(np.float64)
    try:
        numbers = objects.astype(np.float64)
    except OverflowError:  # an integer past float64's range
        return np.array([_nearest_float32(v) if type(v) is int else v for v in objects.flat]).reshape(objects.shape)
    beyond = np.flatnonzero(np.abs(numbers) > 2**53)
    if len(beyond):
        flat, exact = numbers.reshape(-1), objects.reshape(-1)
        for i in beyond:
            if type(exact[i]) is int:
                flat[i] = _nearest_float32(exact[i])
    return numbers


_JSON_NAMES = {bool: "true/false", str: "strings", type(None): "null", dict: "objects"}


def _nearest_float32(value: int) -> float:
    """The float32 nearest to the integer `value` (ties to even), as a float; infinity past float32's range."""
    magnitude = abs(value)
    excess = magnitude.bit_length() - 24  # float32 keeps 24 significant bits
    if excess > 0:
        kept, dropped = divmod(magnitude, 1 << excess)
        half = 1 << (excess - 1)
        if dropped > half or (dropped == half and kept & 1):
            kept += 1
        magnitude = kept << excess
    nearest = math.inf if magnitude >= 1 << 128 else float(magnitude)  # exact: at most 24 significant bits
    return -nearest if value < 0 else nearest


class InvalidInput(FordeError, ValueError):
    """A caller's input that does not fit the model; the message names the field, expected and got."""


class NonFiniteOutput(InvalidInput):
    """Inputs whose outputs came out NaN or infinite: finite float32 values on which the graph's
    arithmetic overflows (e.g. 3e38). The request's fault unless proven otherwise.

    `rows` are the offending positions in the batch; `outputs` holds the whole batch's outputs, so a
    caller scoring many rows can keep the finite ones without running the graph again.
    """

    def __init__(self, message: str, rows: Sequence[int], outputs: dict[str, np.ndarray]):
        super().__init__(message)
        self.rows = tuple(int(r) for r in rows)
        self.outputs = outputs


def _open_session(path: Path, providers: Sequence[str], options: ort.SessionOptions) -> ort.InferenceSession:
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except (
        RuntimeError,
        _ort_errors.Fail,
        _ort_errors.InvalidProtobuf,
        _ort_errors.InvalidGraph,
        _ort_errors.NoSuchFile,
        _ort_errors.InvalidArgument,
    ) as err:
        raise ModelFileError(f"{path} is not a loadable ONNX model: {str(err).splitlines()[0]}") from None


def _choose_providers(requested: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if requested is not None:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(
                f"providers: {', '.join(missing)} not available in this onnxruntime; available: {', '.join(available)}"
            )
        return list(requested)
    # CUDA only where the GPU build is installed; CPU-only builds never try (and never log) it.
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


class EnsembleRuntime:
    """An exported ensemble (`NAME.onnx` + `NAME.explain.onnx`) ready to answer.

    `predict(x)` and `explain(x, target)` take raw inputs `[batch, *input_shape]` and return
    the contract's outputs (docs/design.md section 3) plus `predicted_class`, `confidence` and
    `abstain`, all batch first.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        max_batch: int = 4096,
        spin: bool = True,
    ):
        """`threads`: intra-op threads (default: onnxruntime's choice); `max_batch`: inputs per call;
        `spin=False` lets idle worker threads sleep instead of spin-waiting, for processes that
        share their cores with other work (costs a little latency)."""
        self.path = Path(path)
        self.max_batch = max_batch
        try:
            self.explain_path = Path(explain_path(str(self.path)))
        except ValueError as err:
            raise ModelFileError(str(err)) from None
        options = ort.SessionOptions()
        # Fatal only: a CUDA provider that cannot start would otherwise print its load errors;
        # the fallback is reported below, once, in plain words.
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._options = options
        self._providers = _choose_providers(providers)
        self._predict = _open_session(self.path, self._providers, options)
        self.card = ModelCard.from_metadata(self._predict.get_modelmeta().custom_metadata_map, str(self.path))
        self._check_io(self._predict, [INPUT], PREDICT_OUTPUTS, self.path)
        if "CUDAExecutionProvider" in self._providers and "CUDAExecutionProvider" not in self.providers:
            log.warning(
                "CUDAExecutionProvider is installed but could not start; running on %s", ", ".join(self.providers)
            )

    @property
    def providers(self) -> list[str]:
        """The execution providers the predict session really runs on."""
        return self._predict.get_providers()

    def require_explain(self) -> None:
        """Open the explain graph now rather than on first use; raises ModelFileError if it can't be."""
        self._explain  # noqa: B018 (opening is the point)

    def warm_up(self) -> None:
        """Open both graphs and run each once on a zero input, so that a server reports ready only with
        graphs that answer (and the first caller does not pay for onnxruntime's first run). Raises
        ModelFileError naming the file whose graph does not run."""
        x = np.zeros((1, *self.card.input_shape), dtype=np.float32)
        for path, session, feed in (
            (self.path, self._predict, {INPUT: x}),
            (self.explain_path, self._explain, {INPUT: x, TARGET: np.full(1, -1, dtype=np.int64)}),
        ):
            try:
                session.run(None, feed)
            except (RuntimeError, _ort_errors.Fail, _ort_errors.InvalidArgument) as err:
                raise ModelFileError(f"{path}: its graph does not run ({str(err).splitlines()[0]})") from None

    @cached_property
    def _explain(self) -> ort.InferenceSession:
        session = _open_session(self.explain_path, self._providers, self._options)
        self._check_io(session, [INPUT, TARGET], EXPLAIN_OUTPUTS, self.explain_path)
        return session

    def _check_io(self, session: ort.InferenceSession, inputs: list[str], outputs: tuple[str, ...], path: Path) -> None:
        got_in = [i.name for i in session.get_inputs()]
        got_out = tuple(o.name for o in session.get_outputs())
        if got_in != inputs or got_out != outputs:
            raise ModelFileError(
                f"{path}: graph inputs {got_in} / outputs {list(got_out)} do not follow the "
                f"contract (inputs {inputs}, outputs {list(outputs)})"
            )
        shape = session.get_inputs()[0].shape[1:]
        if [int(d) for d in shape] != list(self.card.input_shape):
            raise ModelFileError(
                f"{path}: graph input shape {shape} disagrees with its metadata {list(self.card.input_shape)}"
            )

    def validate(self, x, field: str = "input") -> np.ndarray:
        """Check a batch of raw inputs and return it as float32 `[batch, *input_shape]`."""
        array = self._numbers(x, field)
        expected = list(self.card.input_shape)
        if array.ndim != len(expected) + 1 or list(array.shape[1:]) != expected:
            raise InvalidInput(
                f"{field}: expected shape [batch, {', '.join(map(str, expected))}], got {list(array.shape)}"
            )
        if len(array) == 0:
            raise InvalidInput(f"{field}: expected at least one input, got an empty batch")
        if len(array) > self.max_batch:
            raise InvalidInput(f"{field}: expected at most {self.max_batch} inputs per call, got {len(array)}")
        return self._finite_float32(array, field, batched=True)

    def validate_one(self, x, field: str = "input") -> np.ndarray:
        """Check one raw input `[*input_shape]` and return it as float32 (the service's per-row check)."""
        array = self._numbers(x, field)
        if list(array.shape) != list(self.card.input_shape):
            raise InvalidInput(f"{field}: expected shape {list(self.card.input_shape)}, got {list(array.shape)}")
        return self._finite_float32(array[None], field, batched=False)[0]

    @staticmethod
    def _numbers(x, field: str) -> np.ndarray:
        array = np.asarray(x)
        if array.dtype.kind not in "fiu":
            raise InvalidInput(f"{field}: expected numbers (float32), got dtype {array.dtype}")
        return array

    @staticmethod
    def _finite_float32(array: np.ndarray, field: str, batched: bool) -> np.ndarray:
        array, finite = finite_float32_rows(array)
        if not finite.all():
            where = f" in row(s) {', '.join(map(str, np.flatnonzero(~finite)[:10]))}" if batched else ""
            raise InvalidInput(f"{field}: {NOT_FINITE}{where}")
        return np.ascontiguousarray(array)

    def _target(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full(batch, -1, dtype=np.int64)
        array = np.asarray(target)
        if array.ndim == 0:
            array = np.full(batch, int(array))
        if array.shape != (batch,) or array.dtype.kind not in "iu":
            raise InvalidInput(
                f"target: expected {batch} class indices (int), got shape {list(array.shape)} dtype {array.dtype}"
            )
        classes = len(self.card.class_names)
        if ((array < -1) | (array >= classes)).any():
            raise InvalidInput(
                f"target: expected class indices in [0, {classes - 1}] or -1 (the prediction), "
                f"got {array[(array < -1) | (array >= classes)][:5].tolist()}"
            )
        return array.astype(np.int64)

    def _finish(self, names: tuple[str, ...], values: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(zip(names, values, strict=True))
        out["predicted_class"] = out["probs"].argmax(1)
        out["confidence"] = out["probs"].max(1)
        out["abstain"] = out["mutual_information"] > self.card.abstain_threshold
        finite = np.logical_and.reduce([np.isfinite(v.reshape(len(v), -1)).all(axis=1) for v in values])
        if not finite.all():
            rows = np.flatnonzero(~finite)
            listed = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
            raise NonFiniteOutput(f"input: {NOT_FINITE_OUTPUTS} in row(s) {listed}", rows, out)
        return out

    def prediction_sets(self, out: Mapping[str, np.ndarray], coverage: float) -> np.ndarray:
        """Conformal prediction sets `[batch, classes]` (bool) of outputs `out` (`probs` `[batch, classes]`
        and, for a file whose sets are group-conditional, the uncertainty output that picks each row's
        group, `[batch]`) at a stored `coverage` level (`card.coverage_levels`)."""
        self.check_coverage(coverage)
        conformal = self.card.conformal
        groups = out[conformal.group_score] if conformal.groups else None
        return prediction_sets(out["probs"], conformal, coverage, groups)

    def check_coverage(self, coverage: float) -> None:
        """Raise InvalidInput unless this file has conformal thresholds for `coverage`."""
        if self.card.conformal is None:
            raise InvalidInput(
                f"coverage: this model file has no conformal thresholds, so it gives no prediction sets (got "
                f"{coverage!r}); re-export it with a current `forde export` (or `forde fuse --validation`)"
            )
        try:
            self.card.conformal.threshold(coverage)
        except ConformalError as err:
            raise InvalidInput(str(err)) from None

    def _with_sets(self, out: dict[str, np.ndarray], coverage: float | None) -> dict[str, np.ndarray]:
        if coverage is not None:
            out["prediction_set"] = self.prediction_sets(out, coverage)
            out["set_size"] = out["prediction_set"].sum(axis=1)
        return out

    def predict(self, x, coverage: float | None = None) -> dict[str, np.ndarray]:
        """Raw inputs `[batch, *input_shape]` -> outputs, each `[batch, ...]`; with `coverage` also
        `prediction_set` `[batch, classes]` (bool) and `set_size` `[batch]`.

        Raises InvalidInput for inputs that do not fit (or a coverage level the file does not hold),
        and its subclass NonFiniteOutput (naming the rows) when any output comes out NaN or infinite."""
        batch = self.validate(x)
        if coverage is not None:
            self.check_coverage(coverage)  # before the model runs
        return self._with_sets(self._finish(PREDICT_OUTPUTS, self._predict.run(None, {INPUT: batch})), coverage)

    def explain(self, x, target=None, coverage: float | None = None) -> dict[str, np.ndarray]:
        """`predict` plus `input_gradients` `[batch, members, *input_shape]` of each member's logit of
        `target` (`[batch]` class indices; None or -1 = the ensemble's predicted class)."""
        batch = self.validate(x)
        if coverage is not None:
            self.check_coverage(coverage)
        feed = {INPUT: batch, TARGET: self._target(target, len(batch))}
        return self._with_sets(self._finish(EXPLAIN_OUTPUTS, self._explain.run(None, feed)), coverage)
