"""The exported file's contract (forde_serve.contract): one typed card, written and read back whole, and
one answer row that the HTTP service and batch scoring both follow."""

import math

import numpy as np
import onnx
import pytest

from forde_serve.calibration import TemperatureFit
from forde_serve.conformal import ConformalCalibration
from forde_serve.contract import (
    PREDICTION_FIELDS,
    Abstention,
    ImageSpec,
    ModelCard,
    ModelFileError,
    ValidationChoices,
    prediction_rows,
)
from forde_serve.runtime import EnsembleRuntime

from helpers import MODEL, ROOT


def _full_card() -> ModelCard:
    return ModelCard(
        class_names=("cat", "dog", "eel"),
        input_shape=(3, 12, 12),
        input_space="RGB floats in [0, 1]",
        image=ImageSpec(mode="RGB", size=(12, 12), scale=1 / 255, invert=False, resize=14),
        members=4,
        method="forde",
        kernel={"lengthscale": "pca", "alpha": 0.5, "every": 1, "batch": None, "strength": 1.0},
        training_config={"seed": 3, "data": {"dataset": "imagefolder", "image_size": 12}},
        metrics={"accuracy": 0.75, "nll": math.nan},
        choices=ValidationChoices(
            temperature=TemperatureFit(0.5, 0.9, 0.8, 0.1, 0.05),
            conformal=ConformalCalibration("aps", ((0.9, 0.7), (0.99, math.inf)), 40, 3),
            abstention=Abstention(0.25, 0.01, 0.6, 0.008),
        ),
    )


def test_a_card_round_trips_through_the_metadata_of_both_graphs():
    card = _full_card()
    for graph in ("predict", "explain"):
        meta = card.to_metadata(graph)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        assert ModelCard.graph_of(meta) == graph
        again = ModelCard.from_metadata(meta)
        # NaN != NaN, so the metrics are compared as the JSON they travel as
        assert again.metrics["accuracy"] == 0.75 and math.isnan(again.metrics["nll"])
        assert ModelCard.from_metadata(again.to_metadata(graph)).to_metadata(graph) == meta
        assert again.choices == card.choices and again.image == card.image and again.kernel == card.kernel
    bare = ModelCard(class_names=("a", "b"), input_shape=(4,), input_space="", image=None, members=2, method="de")
    assert ModelCard.from_metadata(bare.to_metadata("predict")) == bare
    assert bare.abstain_threshold == math.inf and bare.coverage_levels == () and bare.temperature == 1.0


def test_the_committed_file_reads_and_writes_back_byte_for_byte():
    for path in (MODEL, MODEL.with_name("digits.explain.onnx")):
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        card = ModelCard.from_metadata(props, str(path))
        assert card.to_metadata(ModelCard.graph_of(props)) == props
        assert card.image == ImageSpec(mode="L", size=(8, 8), scale=16 / 255, invert=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("forde.members"), "forde.members missing"),
        (lambda m: m.update({"forde.format_version": "7"}), "format version '7' is not one this forde-serve knows"),
        (
            lambda m: m.update({"forde.image": '{"mode": "CMYK", "size": [2, 2], "scale": 1, "invert": false}'}),
            "image.mode: expected 'L' or 'RGB', got 'CMYK'",
        ),
        (lambda m: m.update({"forde.image": '{"mode": "L"}'}), "image: expected the keys mode, size, scale, invert"),
        (lambda m: m.update({"forde.conformal": "{broken"}), "broken metadata"),
        (lambda m: m.update({"forde.abstain_threshold": "high"}), "broken metadata"),
    ],
)
def test_a_broken_card_names_the_file_and_what_is_wrong(change, message):
    meta = _full_card().to_metadata("predict")
    change(meta)
    with pytest.raises(ModelFileError, match="m.onnx") as err:
        ModelCard.from_metadata(meta, "m.onnx")
    assert message in str(err.value)


def test_every_answer_row_is_the_contract_s_row():
    from forde_serve.app.service import FordeEnsemble

    runtime = EnsembleRuntime(MODEL)
    x = np.random.default_rng(0).uniform(0, 16, (3, 1, 8, 8)).astype(np.float32)
    out = runtime.predict(x)
    rows = prediction_rows(out, runtime.card.class_names, [True, False, False], [["1", "7"], None, []])
    names = [f.name for f in PREDICTION_FIELDS]
    assert [list(r) for r in rows] == [names] * 3
    assert rows[0]["set_size"] == 2 and rows[1]["set_size"] is None and rows[2]["set_size"] == 0
    assert rows[0]["member_probs"] == out["member_probs"][0].tolist() and rows[1]["member_probs"] is None
    assert rows[1]["class_name"] == runtime.card.class_names[int(out["predicted_class"][1])]
    # the HTTP answer model is built from the same fields, with the same descriptions
    model = FordeEnsemble.inner.models.prediction
    assert list(model.model_fields) == ["id", *names]  # the service adds the id a label comes back with
    assert [model.model_fields[f.name].description for f in PREDICTION_FIELDS] == [
        f.description for f in PREDICTION_FIELDS
    ]
    assert [not model.model_fields[f.name].is_required() for f in PREDICTION_FIELDS] == [
        f.on_request for f in PREDICTION_FIELDS
    ]


def test_batch_scoring_writes_the_contract_s_row_as_columns(tmp_path):
    import pyarrow.parquet as pq

    from forde_serve.scoring import ScoreJob, score

    np.save(tmp_path / "x.npy", np.random.default_rng(1).uniform(0, 16, (5, 1, 8, 8)).astype(np.float32))
    for coverage, extra in ((None, ()), (0.9, ("prediction_set", "set_size"))):
        out = tmp_path / f"scores-{coverage}.parquet"
        score(ScoreJob(model=MODEL, input=tmp_path / "x.npy", out=out, coverage=coverage))
        names = [f.name for f in PREDICTION_FIELDS if not f.on_request] + list(extra)
        assert pq.read_table(out).column_names == ["row_id", *names]


def test_no_metadata_key_is_spelled_outside_the_contract():
    # Every writer and reader of the exported files goes through ModelCard: a metadata key written as a
    # string anywhere else would be a second copy of the contract, free to drift from it.
    import ast

    from forde_serve.contract import _KEY

    keys, root = set(_KEY.values()), ROOT
    found = []
    for folder in ("forde_serve", "training", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == root / "forde_serve" / "contract.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found
