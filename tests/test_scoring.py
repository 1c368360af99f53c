"""`forde score` as a real process: every input kind, bad rows, explain, resume after SIGKILL,
bounded memory on an input far larger than the process, and Ray on a real local instance."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from forde_serve.runtime import EnsembleRuntime

from helpers import FORDE, ROOT, bare_card, run_forde

MODEL = ROOT / "exported" / "digits.onnx"
UNCERTAINTY = ("predictive_entropy", "expected_entropy", "mutual_information", "vote_disagreement")
NOT_FINITE = "expected finite float32 values"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """All digits as raw inputs, three rows broken (NaN, infinity, float32 overflow), saved as .npy."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float64)[:, None]
    x[7, 0, 3, 3] = np.nan
    x[100, 0, 0, 0] = np.inf
    x[1500] = 1e39
    path = tmp_path_factory.mktemp("inputs") / "digits.npy"
    np.save(path, x)
    return path, x


def _score(*args, expect=0) -> subprocess.CompletedProcess:
    result = run_forde("score", *map(str, args), "--quiet", check=False)
    assert result.returncode == expect, result.stderr
    return result


def _errors(path):
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def test_scores_equal_the_runtime_and_bad_rows_go_to_the_errors_file(rows, runtime, tmp_path):
    path, x = rows
    result = _score(MODEL, path, "--out", tmp_path / "s.parquet", "--part-rows", 500, expect=3)
    assert "3 of 1797 rows could not be scored" in result.stderr

    table = pq.read_table(tmp_path / "s.parquet")
    good = np.setdiff1d(np.arange(len(x)), [7, 100, 1500])
    assert table["row_id"].to_pylist() == good.tolist()
    expected = runtime.predict(x[good].astype(np.float32))
    assert np.array_equal(table["predicted_class"].to_numpy(), expected["predicted_class"])
    assert table["class_name"].to_pylist() == [runtime.card.class_names[i] for i in expected["predicted_class"]]
    probs = np.stack(table["probs"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs, expected["probs"], atol=1e-6)
    for name in (*UNCERTAINTY, "confidence"):
        np.testing.assert_allclose(table[name].to_numpy(), expected[name], atol=1e-5)
    assert np.array_equal(table["abstain"].to_numpy(zero_copy_only=False), expected["abstain"])

    errors = _errors(tmp_path / "s.errors.csv")
    assert [e["row_id"] for e in errors] == ["7", "100", "1500"]
    assert all(NOT_FINITE in e["reason"] for e in errors)
    assert not (tmp_path / "s.parquet.parts").exists()


def test_every_input_kind_gives_the_same_rows(rows, tmp_path):
    path, x = rows
    x = x[:600].copy()
    x[7] = 0  # keep only finite rows: this test is about readers
    x[100] = 0
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.savez(tmp_path / "stored.npz", x=x)
    np.savez_compressed(tmp_path / "packed.npz", images=x.astype(np.float32), labels=np.arange(600))
    nested = pa.array([row[0].tolist() for row in x.astype(np.float32)])  # list<list<float>>, [8][8]
    pq.write_table(pa.table({"id": np.arange(600), "pixels": nested}), tmp_path / "nested.parquet", row_group_size=97)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), 64)
    pq.write_table(pa.table({"input": flat, "pixels": nested}), tmp_path / "flat.parquet", row_group_size=250)

    runs = {
        "npy": [tmp_path / "x.npy"],
        "stored npz": [tmp_path / "stored.npz"],
        "compressed npz": [tmp_path / "packed.npz", "--key", "images"],
        "nested parquet column": [tmp_path / "nested.parquet", "--key", "pixels"],
        "flat parquet 'input' column": [tmp_path / "flat.parquet"],
    }
    reference = None
    for name, args in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.parquet"
        _score(MODEL, *args, "--out", out, "--part-rows", 128, "--batch-size", 50)
        table = pq.read_table(out)
        reference = reference or table
        assert table.equals(reference), name

    _score(MODEL, tmp_path / "x.npy", "--out", tmp_path / "x.csv", "--part-rows", 128, "--batch-size", 50)
    import csv

    with (tmp_path / "x.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 600
    probs = np.stack(reference["probs"].to_numpy(zero_copy_only=False))
    got = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in csv_rows])
    np.testing.assert_allclose(got, probs, rtol=1e-6)
    assert [r["class_name"] for r in csv_rows] == reference["class_name"].to_pylist()


def test_bad_parquet_rows_are_listed_not_fatal(tmp_path, runtime):
    good = [float(i % 17) for i in range(64)]
    column = pa.array([good, good[:10], None, good[:63] + [None], good], pa.list_(pa.float64()))
    pq.write_table(pa.table({"input": column}), tmp_path / "p.parquet")
    _score(MODEL, tmp_path / "p.parquet", "--out", tmp_path / "p.parquet.out.parquet", expect=3)
    table = pq.read_table(tmp_path / "p.parquet.out.parquet")
    assert table["row_id"].to_pylist() == [0, 4]
    reasons = {int(e["row"]): e["reason"] for e in _errors(tmp_path / "p.parquet.out.errors.csv")}
    assert reasons == {
        1: "input: expected 64 numbers (1x8x8), got 10",
        2: "input: expected 64 numbers (1x8x8), got null",
        3: "input: expected 64 numbers (1x8x8), got nulls among them",
    }


@pytest.mark.slow
def test_image_folder_matches_the_http_endpoint(tmp_path, server, rows):
    from sklearn.datasets import load_digits

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    images = load_digits().images
    # Dark ink on white, 4x the size: how a photographed digit arrives.
    for i in range(4):
        Image.fromarray(np.uint8(255 - images[i] * 255 / 16)).resize((32, 32)).save(folder / f"{i}.png")
    Image.fromarray(np.uint8(255 - images[9] * 255 / 16)).save(folder / "more" / "nine.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "README.txt").write_text("not an image, not a row")

    _score(MODEL, folder, "--out", tmp_path / "photos.parquet", "--explain", expect=3)
    table = pq.read_table(tmp_path / "photos.parquet")
    assert table["row_id"].to_pylist() == ["0.png", "1.png", "2.png", "3.png", "more/nine.jpg"]
    assert table["row"].to_pylist() == [0, 1, 2, 3, 5]  # broken.png sorts to row 4
    errors = _errors(tmp_path / "photos.errors.csv")
    assert [(e["row"], e["row_id"]) for e in errors] == [("4", "broken.png")]
    assert "does not decode" in errors[0]["reason"]

    for row in table.to_pylist():
        with (folder / row["row_id"]).open("rb") as f:
            answer = httpx.post(
                f"{server}/predict_image", files={"image": (row["row_id"], f, "image/png")}, timeout=30
            ).json()
        assert answer["predicted_class"] == row["predicted_class"]
        np.testing.assert_allclose(answer["probs"], row["probs"], atol=1e-6)
        np.testing.assert_allclose(answer["mutual_information"], row["mutual_information"], atol=1e-6)

    gradients = np.load(tmp_path / "photos.gradients.npy")
    assert gradients.shape == (6, 8, 1, 8, 8)
    assert np.isnan(gradients[4]).all() and np.isfinite(np.delete(gradients, 4, axis=0)).all()


def test_explain_writes_gradients_aligned_by_row(rows, runtime, tmp_path):
    path, x = rows
    _score(MODEL, path, "--out", tmp_path / "e.parquet", "--explain", "--part-rows", 300, "--batch-size", 64, expect=3)
    gradients = np.load(tmp_path / "e.gradients.npy", mmap_mode="r")
    assert gradients.shape == (len(x), 8, 1, 8, 8)
    assert all(np.isnan(gradients[r]).all() for r in (7, 100, 1500))
    good = np.setdiff1d(np.arange(len(x)), [7, 100, 1500])[::7]
    expected = runtime.explain(x[good].astype(np.float32))["input_gradients"]
    np.testing.assert_allclose(gradients[good], expected, rtol=1e-4, atol=1e-5)


def _manifest_parts(parts_dir) -> int:
    try:
        return len(json.loads((parts_dir / "manifest.json").read_text())["done"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_gives_every_row_exactly_once(rows, tmp_path):
    _, x = rows
    big = np.concatenate([x] * 25)  # 44925 rows, 75 of them not finite
    np.save(tmp_path / "big.npy", big)
    args = [MODEL, tmp_path / "big.npy", "--out", tmp_path / "killed.parquet", "--part-rows", 500, "--batch-size", 100]

    process = subprocess.Popen(
        [FORDE, "score", *map(str, args), "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parts = tmp_path / "killed.parquet.parts"
    deadline = time.monotonic() + 120
    while _manifest_parts(parts) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "scoring finished before it could be killed; make the input bigger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = _manifest_parts(parts)
    assert 8 <= finished_before < 90 and not (tmp_path / "killed.parquet").exists()

    _score(*args, expect=3)
    _score(
        MODEL,
        tmp_path / "big.npy",
        "--out",
        tmp_path / "whole.parquet",
        "--part-rows",
        500,
        "--batch-size",
        100,
        expect=3,
    )
    resumed, whole = pq.read_table(tmp_path / "killed.parquet"), pq.read_table(tmp_path / "whole.parquet")
    assert resumed.equals(whole)
    ids = resumed["row_id"].to_numpy()
    assert len(ids) == len(big) - 75 and np.array_equal(ids, np.unique(ids))
    assert (tmp_path / "killed.errors.csv").read_text() == (tmp_path / "whole.errors.csv").read_text()
    assert len(_errors(tmp_path / "killed.errors.csv")) == 75


def _peak_rss_mib(*args) -> tuple[float, subprocess.CompletedProcess]:
    """Run `forde score ARGS` in a child and return its peak resident memory (MiB)."""
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr); "
        "sys.exit(r.returncode)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, FORDE, "score", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return int(result.stdout.split()[-1]) / 1024, result


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A real export of a small untrained MLP ensemble over 256 KiB inputs [16, 64, 64] (no image metadata)."""
    import torch

    from training.export import export_ensemble
    from training.models import build_ensemble

    torch.manual_seed(0)
    shape = (16, 64, 64)
    ensemble = build_ensemble("mlp", 2, shape, 10, [0.5] * 16, [0.25] * 16, width=8)
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    card = bare_card(shape, 2, abstain_threshold=0.1)
    export_ensemble(ensemble, path, card, torch.rand(4, *shape), torch.full((4,), -1), echo=lambda s: None)
    return path


@pytest.mark.slow
def test_memory_follows_the_batch_not_the_input(wide_model, tmp_path):
    rows = 4096  # 4096 x 256 KiB = 1 GiB of input
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, 16, 64, 64))
    block = np.random.default_rng(0).random((256, 16, 64, 64), dtype=np.float32)
    for start in range(0, rows, 256):
        big[start : start + 256] = block
    big.flush()
    del big
    np.save(tmp_path / "small.npy", block[:32])

    baseline, result = _peak_rss_mib(
        wide_model, tmp_path / "small.npy", "--out", tmp_path / "small.parquet", "--batch-size", 16
    )
    assert result.returncode == 0, result.stderr
    peak, result = _peak_rss_mib(
        wide_model, tmp_path / "big.npy", "--out", tmp_path / "big.parquet", "--batch-size", 16, "--part-rows", 1024
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(tmp_path / "big.parquet").num_rows == rows
    allowed = baseline + 64  # MiB: a 1 GiB input may add no more than this over a 32-row one
    print(f"peak RSS: {peak:.0f} MiB for 1 GiB input, {baseline:.0f} MiB for 32 rows")
    assert peak < allowed, f"peak {peak:.0f} MiB for a 1024 MiB input; a 32-row input peaked at {baseline:.0f} MiB"


@pytest.mark.slow
def test_ray_engine_gives_the_same_rows_as_the_local_engine(rows, tmp_path):
    path, _ = rows
    common = ["--part-rows", 400, "--batch-size", 100]
    _score(MODEL, path, "--out", tmp_path / "local.parquet", *common, expect=3)
    result = run_forde(
        "score", MODEL, path, "--out", tmp_path / "ray.parquet", *common, "--engine", "ray", "--workers", 2, check=False
    )
    assert result.returncode == 3, result.stderr
    assert pq.read_table(tmp_path / "ray.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
    assert (tmp_path / "ray.errors.csv").read_text() == (tmp_path / "local.errors.csv").read_text()
    assert "rows/s" in result.stdout and "abstained" in result.stdout

    # An input that breaks under an actor stops the job with the same one line as the local engine.
    broken = _corrupted_npz(tmp_path / "broken.npz")
    for engine in ("local", "ray"):
        result = run_forde(
            "score",
            MODEL,
            broken,
            "--out",
            tmp_path / f"broken-{engine}.parquet",
            "--part-rows",
            2000,
            "--engine",
            engine,
            "--workers",
            2,
            check=False,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "broken.npz[a]: unreadable at row" in result.stderr and "Traceback" not in result.stderr


def _corrupted_npz(path):
    """A compressed .npz whose header reads fine and whose data stops inflating half-way."""
    np.savez_compressed(path, a=np.random.default_rng(0).random((20000, 1, 8, 8)).astype(np.float32) * 16)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 2000):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "nope.onnx", d / "x.npy", []), "does not exist"),
        (lambda d: (_write(d / "junk.onnx", b"junk"), d / "x.npy", []), "not a loadable ONNX model"),
        (lambda d: (MODEL, d / "missing.npy", []), "missing.npy' does not exist"),
        (
            lambda d: (MODEL, _save(d / "shape.npy", np.zeros((3, 8, 8))), []),
            "expected shape [rows, 1, 8, 8] for this model, got [3, 8, 8]",
        ),
        (
            lambda d: (MODEL, _save(d / "text.npy", np.array([["a"] * 64])), []),
            "expected numbers (float32), got dtype <U1",
        ),
        (lambda d: (MODEL, _write(d / "bad.npy", b"\x93NUMPY garbage"), []), "not a readable .npy array"),
        (lambda d: (MODEL, _write(d / "x.txt", b"1 2 3"), []), "expected a .npy, .npz or .parquet file"),
        (lambda d: (MODEL, d / "x.npy", ["--key", "a"]), "--key: a .npy file holds one array"),
        (lambda d: (MODEL, _savez(d / "two.npz"), []), "holds arrays ['a', 'b']; choose one with --key"),
        (
            lambda d: (MODEL, _savez(d / "two.npz"), ["--key", "c"]),
            "--key: ",
        ),
        (lambda d: (MODEL, _save(d / "empty.npy", np.zeros((0, 1, 8, 8))), []), "expected at least one row, got none"),
        (lambda d: (MODEL, d / "x.npy", ["--out", d / "s.txt"]), "--out: expected a .parquet or .csv file name"),
        (lambda d: (MODEL, d / "x.npy", ["--engine", "spark"]), "Invalid value for '--engine'"),
        (lambda d: (MODEL, d / "x.npy", ["--batch-size", "0"]), "Invalid value for '--batch-size'"),
        (
            lambda d: (MODEL, _mkdir(d / "nothing"), []),
            "expected pictures in this folder (.png .jpg .jpeg .webp .bmp .tif .tiff .gif files), found none",
        ),
    ],
)
def test_bad_arguments_and_files_exit_2_with_the_reason(tmp_path, make, message):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    model, data, extra = make(tmp_path)
    out = [] if "--out" in extra else ["--out", tmp_path / "s.parquet"]
    result = run_forde("score", model, data, *out, *extra, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.parquet").exists()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _save(path, array):
    np.save(path, array)
    return path


def _savez(path):
    np.savez(path, a=np.zeros((2, 1, 8, 8)), b=np.zeros(3))
    return path


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.slow
def test_an_array_model_refuses_an_image_folder(wide_model, tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    result = run_forde("score", wide_model, tmp_path, "--out", tmp_path / "s.parquet", check=False)
    assert result.returncode == 2 and "this model takes arrays, not images" in result.stderr


def test_existing_output_and_other_jobs_parts_are_not_clobbered(rows, tmp_path):
    path, _ = rows
    out = tmp_path / "s.parquet"
    _score(MODEL, path, "--out", out, expect=3)
    again = run_forde("score", MODEL, path, "--out", out, check=False)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    _score(MODEL, path, "--out", out, "--overwrite", expect=3)

    # Parts left by a killed job with another part size belong to that job.
    (tmp_path / "t.parquet.parts").mkdir()
    (tmp_path / "t.parquet.parts" / "manifest.json").write_text(json.dumps({"identity": {"part_rows": 3}, "done": {}}))
    other = run_forde("score", MODEL, path, "--out", tmp_path / "t.parquet", check=False)
    assert other.returncode == 2 and "holds parts of a different job" in other.stderr


def _score_here(model, data, out, **options):
    """The scorer itself, in this process (the `forde` command around it is tested above)."""
    from forde_serve.scoring import ScoreJob, score

    return score(ScoreJob(model=model, input=data, out=out, **options))


def test_rows_whose_outputs_overflow_go_to_the_errors_file(tmp_path):
    # 3e38 is a finite float32 (it passes the input check) on which the graph overflows into NaN.
    x = np.ones((6, 1, 8, 8), dtype=np.float32)
    x[2, 0, 4, 4] = x[5, 0, 0, 0] = 3e38
    np.save(tmp_path / "x.npy", x)
    summary = _score_here(MODEL, tmp_path / "x.npy", tmp_path / "s.parquet", batch_size=4, explain=True)
    assert (summary.scored, summary.failed) == (4, 2)
    table = pq.read_table(tmp_path / "s.parquet")
    assert table["row_id"].to_pylist() == [0, 1, 3, 4]
    for name in ("confidence", *UNCERTAINTY):
        assert np.isfinite(table[name].to_numpy()).all(), name
    errors = _errors(tmp_path / "s.errors.csv")
    assert [e["row_id"] for e in errors] == ["2", "5"] and all("not finite" in e["reason"] for e in errors)
    gradients = np.load(tmp_path / "s.gradients.npy")
    assert np.isnan(gradients[[2, 5]]).all() and np.isfinite(gradients[[0, 1, 3, 4]]).all()


def test_the_summary_gives_one_throughput_figure(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((300, 1, 8, 8), dtype=np.float32))
    result = run_forde("score", MODEL, tmp_path / "x.npy", "--out", tmp_path / "s.parquet", "--batch-size", 50)
    assert result.stdout.count("rows/s") == 1, result.stdout


def _scored_input(path, rows) -> np.ndarray:
    """The float32 batch `forde score` feeds the graph for `path`'s rows (its reader, then its cast)."""
    from forde_serve._sources import open_source
    from forde_serve.runtime import finite_float32_rows

    x, errors = open_source(path, EnsembleRuntime(MODEL).card).read(0, rows)
    assert not errors
    return finite_float32_rows(x)[0]


def _served_input(rows) -> np.ndarray:
    """The float32 batch the HTTP service feeds the graph for these JSON rows (its request model's parse)."""
    from forde_serve.app.service import FordeEnsemble

    predict_row = FordeEnsemble.inner.models.predict_row
    return np.stack([predict_row.model_validate_json(json.dumps({"input": row})).input for row in rows])


def _http_scores(client, rows) -> dict[str, np.ndarray]:
    """POST rows (nested lists of Python numbers) in ONE request; the answer's numbers as float32, as sent."""
    response = client.post("/predict", json={"inputs": [{"input": row} for row in rows]})
    assert response.status_code == 200, response.text
    answer = response.json()
    out = {"probs": np.array([r["probs"] for r in answer], dtype=np.float32)}
    for name in ("confidence", *UNCERTAINTY):
        out[name] = np.array([r[name] for r in answer], dtype=np.float32)
    return out


def test_scores_equal_the_http_service_to_the_last_bit(in_process, tmp_path):
    """`forde score` and the HTTP service turn the same numbers into the same float32 input, so the same
    rows scored in the same batch give the same bits (onnxruntime's results for a row can differ in the last
    bits with the batch it runs in, so the job runs the rows as one batch, as the one HTTP request does)."""
    rng = np.random.default_rng(0)
    decimals = np.round(rng.random((40, 1, 8, 8)) * 16, 3)  # 0.001 steps: not exactly representable
    integers = rng.integers(0, 17, (40, 1, 8, 8))
    integers[:, 0, 0, 0] = 2**60 + 2**36 + 1  # through float64 this rounds twice, to the other float32 neighbour
    integers[:, 0, 7, 7] = rng.integers(2**53, 2**62, 40)
    cases = {
        "float64 decimals": (decimals, decimals.tolist()),
        "float32": (decimals.astype(np.float32), decimals.astype(np.float32).tolist()),
        "int64 beyond 2**53": (integers, integers.tolist()),
    }
    for name, (array, as_json) in cases.items():
        np.save(tmp_path / "x.npy", array)
        # the same float32 input tensor: what the scorer reads and casts, what the service parses
        assert np.array_equal(_scored_input(tmp_path / "x.npy", len(array)), _served_input(as_json)), name
        out = tmp_path / f"{name.replace(' ', '_')}.parquet"
        _score_here(MODEL, tmp_path / "x.npy", out, batch_size=len(array))
        table = pq.read_table(out)
        scored = {key: table[key].to_numpy() for key in ("confidence", *UNCERTAINTY)}
        scored["probs"] = np.stack(table["probs"].to_numpy(zero_copy_only=False))
        served = _http_scores(in_process, as_json)
        for key, value in scored.items():
            np.testing.assert_array_equal(served[key], value, err_msg=f"{name}: {key}")
    # A Parquet column of the same integers is read as the .npy is (int64, not through float64).
    column = pa.array([row.ravel().tolist() for row in integers], pa.list_(pa.int64()))
    pq.write_table(pa.table({"input": column}), tmp_path / "ints.parquet")
    assert np.array_equal(_scored_input(tmp_path / "ints.parquet", 40), _served_input(integers.tolist()))


def test_image_folders_take_every_format_by_suffix_and_decode_by_content(runtime, tmp_path):
    from sklearn.datasets import load_digits

    from forde_serve.images import image_to_input

    ink = np.uint8(255 - load_digits().images[5] * 255 / 16)
    picture = Image.fromarray(ink).resize((24, 24), Image.NEAREST)
    saved = {"a.png": "PNG", "b.WEBP": "WEBP", "c.bmp": "BMP", "d.tif": "TIFF", "e.tiff": "TIFF", "f.gif": "GIF"}
    saved |= {"g.jpg": "PNG", "h.jpeg": "JPEG"}  # a .jpg holding a PNG decodes as the PNG it is
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name, format in saved.items():
        picture.save(folder / name, format=format, **({"lossless": True} if format == "WEBP" else {}))
    picture.save(folder / "no-suffix", format="PNG")  # not picked up: a folder scan goes by suffix
    (folder / "notes.txt").write_text("not a picture")
    _score_here(MODEL, folder, tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    assert table["row_id"].to_pylist() == sorted(saved)
    expected = runtime.predict(np.stack([image_to_input(folder / n, runtime.card.image) for n in sorted(saved)]))
    np.testing.assert_allclose(np.stack(table["probs"].to_numpy(zero_copy_only=False)), expected["probs"], atol=1e-6)
    assert len(set(table["predicted_class"].to_pylist()[:6])) == 1  # the lossless ones are one picture


def test_coverage_adds_the_prediction_set_columns(rows, runtime, tmp_path):
    path, x = rows
    _score(MODEL, path, "--out", tmp_path / "s.parquet", "--coverage", 0.9, expect=3)
    table = pq.read_table(tmp_path / "s.parquet")
    good = table["row_id"].to_numpy()
    expected = runtime.predict(x[good].astype(np.float32), coverage=0.9)
    names = runtime.card.class_names
    want = [[names[k] for k in np.flatnonzero(row)] for row in expected["prediction_set"]]
    assert table["prediction_set"].to_pylist() == want
    assert np.array_equal(table["set_size"].to_numpy(), expected["set_size"])
    _score(MODEL, path, "--out", tmp_path / "s.csv", "--coverage", 0.9, expect=3)
    with open(tmp_path / "s.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [json.loads(r["prediction_set"]) for r in csv_rows] == want  # CSV: a JSON list per row

    refused = run_forde("score", MODEL, path, "--out", tmp_path / "t.parquet", "--coverage", 0.5, check=False)
    assert refused.returncode == 2 and "0.8, 0.9, 0.95, 0.99" in refused.stderr
    assert not (tmp_path / "t.parquet").exists()
