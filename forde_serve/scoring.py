"""Offline batch scoring of an exported ensemble, on this machine or on a Ray cluster.

The input is cut into parts of `part_rows` rows. Each part is scored in batches through the one
`EnsembleRuntime`, written to `OUTPUT.parts/part-K.parquet` with an atomic rename, and only then
recorded in `OUTPUT.parts/manifest.json`. Running the same command again after a kill skips the
recorded parts and redoes the rest, so the final output (parts concatenated in order, then the
parts folder removed) holds every input row exactly once. Rows that cannot be scored are listed
in `OUTPUT.errors.csv` instead of stopping the job.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forde_serve._io import atomic_path, atomic_write_text
from forde_serve._ray_engine import import_ray, score_parts_on_ray
from forde_serve._sources import InputFileError, open_source
from forde_serve.contract import PREDICTION_FIELDS, UNCERTAINTY
from forde_serve.errors import FordeError
from forde_serve.runtime import NOT_FINITE, NOT_FINITE_OUTPUTS, EnsembleRuntime, NonFiniteOutput, finite_float32_rows

__all__ = ["ENGINES", "InputFileError", "ScoreJob", "ScoreSummary", "ScoringError", "score"]

OUTPUT_SUFFIXES = (".parquet", ".csv")
# Where the parts are scored: this process, or Ray Data actors (forde_serve._ray_engine).
ENGINES = ("local", "ray")
# The contract's answer row, as columns (each member's probabilities stay an HTTP option).
SCORED_FIELDS = tuple(f.name for f in PREDICTION_FIELDS if f.name != "member_probs")


class ScoringError(FordeError, ValueError):
    """A scoring job that cannot start as asked (output in the way, parts of another job, no Ray)."""


@dataclass(frozen=True)
class ScoreJob:
    """One `forde score` command, validated: what to score with what, and where the results go."""

    model: Path
    input: Path
    out: Path  # NAME.parquet or NAME.csv
    key: str | None = None  # array name in a .npz / column of a .parquet input
    explain: bool = False  # also write every member's input gradient to NAME.gradients.npy
    batch_size: int = 256
    part_rows: int = 8192
    coverage: float | None = None  # also write each row's conformal prediction set at this level

    def __post_init__(self):
        if self.out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ScoringError(f"--out: expected a .parquet or .csv file name, got {str(self.out)!r}")
        if self.batch_size < 1 or self.part_rows < 1:
            raise ScoringError(f"batch size and part rows must be positive, got {self.batch_size} and {self.part_rows}")

    @property
    def parts_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    @property
    def errors_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}.errors.csv")

    @property
    def gradients_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}.gradients.npy")


@dataclass
class ScoreSummary:
    """What a finished job did: rows in, scored, failed, abstained, mean uncertainty, time."""

    rows: int
    scored: int = 0
    failed: int = 0
    abstained: int = 0
    mean_mutual_information: float = float("nan")
    mean_predictive_entropy: float = float("nan")
    rows_this_run: int = 0  # rows scored by this invocation (fewer after a resume)
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else float("nan")


def score(
    job: ScoreJob,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    on_rows: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Score `job.input` into `job.out`, resuming an interrupted run of the same job.

    `on_rows(done, total)` is called as rows finish (for a progress bar). Raises ModelFileError,
    InputFileError or ScoringError before anything is written when the job cannot run.
    """
    started = time.perf_counter()
    if engine not in ENGINES:
        raise ScoringError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray":
        import_ray()  # before anything is written
    runtime = EnsembleRuntime(job.model, max_batch=job.batch_size)
    if job.explain:
        runtime.require_explain()
    if job.coverage is not None:
        runtime.check_coverage(job.coverage)  # a level the file does not hold: one line, before anything is written
    source = open_source(job.input, runtime.card, job.key)
    manifest = _Manifest.open(job, _identity(job, source), source.rows, overwrite)
    pending = [k for k in range(manifest.parts) if k not in manifest.done]
    if job.explain and manifest.fresh:
        gradients = np.lib.format.open_memmap(
            job.parts_dir / "gradients.npy",
            mode="w+",
            dtype=np.float32,
            shape=(source.rows, runtime.card.members, *runtime.card.input_shape),
        )
        del gradients  # created sparse; parts fill their rows

    already = sum(manifest.done[k]["rows"] for k in manifest.done)
    progress = _Progress(on_rows, already, source.rows)
    if engine == "local":
        scorer = _PartScorer(job, runtime=runtime, source=source)
        for k in pending:
            manifest.record(k, scorer.score_part(k, progress.advance))
    else:

        def finished(part: int, rows: int, failed: int) -> None:
            manifest.record(part, {"rows": rows, "failed": failed})
            progress.advance(rows)

        score_parts_on_ray(_PartScorer, {"job": job, "threads": 1}, pending, address, workers, finished)
    summary = _finish(job, manifest, runtime.card.class_names, source)
    summary.rows_this_run = progress.done - already
    summary.seconds = time.perf_counter() - started
    return summary


class _Progress:
    def __init__(self, callback, done: int, total: int):
        self.callback, self.done, self.total = callback, done, total
        self.advance(0)

    def advance(self, rows: int) -> None:
        self.done += rows
        if self.callback is not None:
            self.callback(self.done, self.total)


def _identity(job: ScoreJob, source) -> dict:
    """What makes two runs the same job: the model's bytes, the input as found, and the part size."""
    digest = hashlib.sha256()
    with job.model.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if job.input.is_dir():
        files = sorted(p for p in job.input.rglob("*") if p.is_file())
        stamp = hashlib.sha256(
            json.dumps(
                [(p.relative_to(job.input).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            ).encode()
        ).hexdigest()
    else:
        stat = job.input.stat()
        stamp = f"{stat.st_size}-{stat.st_mtime_ns}"
    return {
        "model_sha256": digest.hexdigest(),
        "input": str(job.input.resolve()),
        "input_stamp": stamp,
        "key": job.key,
        "rows": source.rows,
        "part_rows": job.part_rows,
        "explain": job.explain,
        "coverage": job.coverage,
        "output": job.out.suffix.lower(),
    }


class _Manifest:
    """`OUTPUT.parts/manifest.json`: the job's identity and the parts finished so far."""

    def __init__(self, path: Path, identity: dict, done: dict[int, dict]):
        self.path, self.identity, self.done = path, identity, done
        self.parts = -(-identity["rows"] // identity["part_rows"])
        self.fresh = not done

    @classmethod
    def open(cls, job: ScoreJob, identity: dict, rows: int, overwrite: bool) -> _Manifest:
        path = job.parts_dir / "manifest.json"
        if overwrite:
            shutil.rmtree(job.parts_dir, ignore_errors=True)
            for stale in (job.out, job.errors_path, job.gradients_path):
                stale.unlink(missing_ok=True)
        if path.exists():
            saved = json.loads(path.read_text())
            changed = [k for k in identity if saved["identity"].get(k) != identity[k]]
            if changed:
                raise ScoringError(
                    f"{job.parts_dir} holds parts of a different job ({', '.join(changed)} changed); "
                    "run the same command to resume it, or pass --overwrite to start over"
                )
            return cls(path, identity, {int(k): v for k, v in saved["done"].items()})
        if job.out.exists():
            raise ScoringError(f"--out: {job.out} already exists; pass --overwrite to replace it")
        if rows == 0:
            raise InputFileError(f"{job.input}: expected at least one row, got none")
        job.parts_dir.mkdir(parents=True, exist_ok=True)
        manifest = cls(path, identity, {})
        manifest._save()
        return manifest

    def record(self, part: int, result: dict) -> None:
        self.done[part] = result
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps({"identity": self.identity, "done": self.done}, indent=1))


def _part_path(job: ScoreJob, part: int, kind: str = "parquet") -> Path:
    return job.parts_dir / (f"part-{part:06d}.parquet" if kind == "parquet" else f"part-{part:06d}.errors.json")


class _PartScorer:
    """Scores whole parts: read a batch, drop bad rows, run the runtime, append to the part file.

    Also the Ray actor: Ray Data calls it with batches of part numbers (see `_score_on_ray`).
    """

    def __init__(self, job: ScoreJob, runtime: EnsembleRuntime | None = None, source=None, threads: int | None = None):
        self.job = job
        self.runtime = runtime or EnsembleRuntime(job.model, max_batch=job.batch_size, threads=threads)
        self.source = source or open_source(job.input, self.runtime.card, job.key)
        self._class_names = np.asarray(self.runtime.card.class_names, dtype=object)
        self._named_rows = self.source.row_ids(0, 0).dtype == object  # image files: row ids are names

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for k in batch["part"]:
            try:
                results.append(self.score_part(int(k)) | {"problem": ""})
            except InputFileError as err:  # returned, not raised: Ray's wrappers would lose its type and words
                results.append({"rows": 0, "failed": 0, "problem": str(err)})
        return {
            "part": batch["part"],
            **{key: np.array([r[key] for r in results]) for key in ("rows", "failed", "problem")},
        }

    def score_part(self, part: int, advance: Callable[[int], None] | None = None) -> dict:
        import pyarrow.parquet as pq

        job = self.job
        start = part * job.part_rows
        stop = min(self.source.rows, start + job.part_rows)
        gradients = np.lib.format.open_memmap(job.parts_dir / "gradients.npy", mode="r+") if job.explain else None
        errors: list[dict] = []
        with atomic_path(_part_path(job, part)) as tmp:
            writer = None
            for first in range(start, stop, job.batch_size):
                last = min(stop, first + job.batch_size)
                x, bad = self.source.read(first, last)
                x, finite = finite_float32_rows(x)
                for r in np.flatnonzero(~finite):
                    bad.setdefault(int(r), f"input: {NOT_FINITE}")
                ok = np.ones(len(x), dtype=bool)
                ok[list(bad)] = False
                out = self._run(x, ok, bad) if ok.any() else None
                if out is not None and job.coverage is not None:
                    out["prediction_set"] = self.runtime.prediction_sets(out, job.coverage)
                ids = self.source.row_ids(first, last)
                errors += [{"row": first + r, "row_id": _plain(ids[r]), "reason": bad[r]} for r in sorted(bad)]
                table = _table(
                    out, ids[ok], np.flatnonzero(ok) + first, self._class_names, self._named_rows, job.coverage
                )
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                if gradients is not None:
                    block = np.full((last - first, *gradients.shape[1:]), np.nan, dtype=np.float32)
                    if out is not None:
                        block[ok] = out["input_gradients"]
                    gradients[first:last] = block
                if advance is not None:
                    advance(last - first)
            writer.close()
            if gradients is not None:
                gradients.flush()
                del gradients
            atomic_write_text(_part_path(job, part, "errors"), json.dumps(errors))
        return {"rows": stop - start, "failed": len(errors)}

    def _run(self, x: np.ndarray, ok: np.ndarray, bad: dict[int, str]) -> dict[str, np.ndarray] | None:
        """Outputs for the rows of `x` marked `ok`. Rows whose outputs come out NaN or infinite join `bad`
        (and leave `ok`) rather than the results: the rest of the batch is kept, not run again."""
        positions = np.flatnonzero(ok)
        try:
            return self.runtime.explain(x[ok]) if self.job.explain else self.runtime.predict(x[ok])
        except NonFiniteOutput as err:
            for r in err.rows:
                bad[int(positions[r])] = f"input: {NOT_FINITE_OUTPUTS}"
            ok[positions[list(err.rows)]] = False
            keep = np.ones(len(positions), dtype=bool)
            keep[list(err.rows)] = False
            return {name: value[keep] for name, value in err.outputs.items()} if keep.any() else None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _table(
    out: dict[str, np.ndarray] | None,
    row_ids: np.ndarray,
    rows: np.ndarray,
    class_names: np.ndarray,
    image_rows: bool,
    coverage: float | None = None,
):
    """One output row per scored input (the schema is the same when nothing in the batch scored);
    with `coverage`, `prediction_set` (class names) and `set_size` too."""
    import pyarrow as pa

    classes = len(class_names)
    if out is None:
        out = {
            "predicted_class": np.zeros(0, np.int64),
            "confidence": np.zeros(0, np.float32),
            "probs": np.zeros((0, classes), np.float32),
            "abstain": np.zeros(0, bool),
        }
        out |= {k: np.zeros(0, np.float32) for k in UNCERTAINTY}
        out["prediction_set"] = np.zeros((0, classes), bool)
    columns = {}
    if image_rows:
        columns["row"] = pa.array(rows, pa.int64())
        columns["row_id"] = pa.array(list(row_ids), pa.string())
    else:
        columns["row_id"] = pa.array(row_ids, pa.int64())
    predicted = out["predicted_class"].astype(np.int32)
    column = {
        "predicted_class": lambda: pa.array(predicted),
        "class_name": lambda: pa.array(class_names[predicted].tolist(), pa.string()),
        "confidence": lambda: pa.array(out["confidence"].astype(np.float32)),
        "probs": lambda: pa.FixedSizeListArray.from_arrays(pa.array(out["probs"].astype(np.float32).ravel()), classes),
        **{name: (lambda name=name: pa.array(out[name].astype(np.float32))) for name in UNCERTAINTY},
        "abstain": lambda: pa.array(out["abstain"].astype(bool)),
        "prediction_set": lambda: pa.array(
            [class_names[row].tolist() for row in out["prediction_set"]], pa.list_(pa.string())
        ),
        "set_size": lambda: pa.array(out["prediction_set"].sum(axis=1).astype(np.int32)),
    }
    for name in SCORED_FIELDS:
        if name in ("prediction_set", "set_size") and coverage is None:
            continue
        columns[name] = column[name]()
    return pa.table(columns)


def _finish(job: ScoreJob, manifest: _Manifest, class_names, source) -> ScoreSummary:
    """Concatenate the parts in order into OUTPUT (atomically), gather errors, drop the parts."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    summary = ScoreSummary(rows=source.rows)
    mi_sum = pe_sum = 0.0
    errors: list[dict] = []
    csv_out = job.out.suffix.lower() == ".csv"
    with atomic_path(job.out) as tmp:
        writer = None
        for k in range(manifest.parts):
            table = pq.read_table(_part_path(job, k))
            errors += json.loads(_part_path(job, k, "errors").read_text())
            summary.scored += table.num_rows
            summary.abstained += int(np.count_nonzero(table["abstain"].to_numpy(zero_copy_only=False)))
            mi_sum += float(np.sum(table["mutual_information"].to_numpy(), dtype=np.float64))
            pe_sum += float(np.sum(table["predictive_entropy"].to_numpy(), dtype=np.float64))
            if csv_out:
                table = _flat_probs(table, class_names)
                writer = writer or pacsv.CSVWriter(str(tmp), table.schema)
            else:
                writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        writer.close()
    summary.failed = len(errors)
    if summary.scored:
        summary.mean_mutual_information = mi_sum / summary.scored
        summary.mean_predictive_entropy = pe_sum / summary.scored
    summary.outputs["scores"] = str(job.out)
    if errors:
        with atomic_path(job.errors_path) as tmp, tmp.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=["row", "row_id", "reason"])
            out.writeheader()
            out.writerows(errors)
        summary.outputs["errors"] = str(job.errors_path)
    else:
        job.errors_path.unlink(missing_ok=True)
    if job.explain:
        if (job.parts_dir / "gradients.npy").exists():  # absent when a kill came after this move
            (job.parts_dir / "gradients.npy").replace(job.gradients_path)
        summary.outputs["gradients"] = str(job.gradients_path)
    shutil.rmtree(job.parts_dir)
    return summary


def _flat_probs(table, class_names):
    """CSV has no list type: `probs` becomes one `prob_<class>` column per class, and `prediction_set`
    a JSON list of class names (unambiguous whatever the names hold)."""
    import pyarrow as pa

    probs = table["probs"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, len(class_names))
    at = table.schema.get_field_index("probs")
    table = table.remove_column(at)
    for i, name in enumerate(class_names):
        table = table.add_column(at + i, f"prob_{name}", pa.array(probs[:, i]))
    if "prediction_set" in table.column_names:
        at = table.schema.get_field_index("prediction_set")
        sets = [json.dumps(names) for names in table["prediction_set"].to_pylist()]
        table = table.set_column(at, "prediction_set", pa.array(sets, pa.string()))
    return table
