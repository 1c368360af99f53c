"""The /ui page (forde_serve/app/ui.py): what the Predict button computes, called on the real runtime
(fast tier), and the page itself in headless Chromium against a real `forde serve` (slow tier)."""

import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from forde_serve.app._page_answer import EmptyDrawing, answer, drawing_to_input, prediction_set_md, upload_to_input
from forde_serve.app.ui import EXAMPLES, build_page
from forde_serve.conformal import ConformalCalibration
from forde_serve.images import image_to_input
from forde_serve.runtime import EnsembleRuntime, InvalidInput

from helpers import (
    FORDE,
    MODEL,
    ROOT,
    browser,
    browser_missing,
    start_server,
    stop_server,
    ui_draw_one,
    ui_open,
    ui_predict,
    ui_tab,
    ui_upload,
)

LABEL = re.compile(r"^(\S+) \((\d\.\d\d)\)$")  # "7 (0.93)"


def _expected_label(runtime, x) -> str:
    out = runtime.predict(x[None])
    return f"{runtime.card.class_names[int(out['predicted_class'][0])]} ({float(out['confidence'][0]):.2f})"


# Pinned from a real run of the committed model on the committed examples (tests/pin_ui_assets.py).
EXAMPLE_ANSWERS = {
    "digit-3.png": ("3", False),
    "digit-7.png": ("7", False),
    "split-4.png": ("4", True),
    "misread-4.png": ("1", True),
}


def test_the_examples_convert_as_predict_image_does_and_answer_as_pinned(runtime):
    for name, (label, abstain) in EXAMPLE_ANSWERS.items():
        x = upload_to_input(runtime.card, EXAMPLES / name)
        np.testing.assert_array_equal(x, image_to_input(EXAMPLES / name, runtime.card.image))
        out = runtime.predict(x[None])
        assert (runtime.card.class_names[int(out["predicted_class"][0])], bool(out["abstain"][0])) == (label, abstain)


@pytest.mark.parametrize("name", ["digit-7.png", "misread-4.png"])  # a sure answer, an abstention
def test_the_page_answer_is_the_runtimes(runtime, name):
    x = upload_to_input(runtime.card, EXAMPLES / name)
    page = answer(runtime, x)
    out = runtime.predict(x[None])
    assert page.label == _expected_label(runtime, x)
    assert (page.label.split(" ")[0], page.abstain) == EXAMPLE_ANSWERS[name]
    assert page.abstain_md.startswith("**abstain**" if page.abstain else "**answer**")
    assert f"{runtime.card.abstain_threshold:.3f}" in page.abstain_md
    assert f"{float(out['mutual_information'][0]):.3f}" in page.uncertainty_md
    assert f"{float(out['predictive_entropy'][0]):.3f}" in page.uncertainty_md
    votes = out["member_probs"][0].argmax(1)
    assert page.votes_html.count('class="forde-vote"') == runtime.card.members
    assert f"<b>{int((votes == page.predicted_class).sum())} of {runtime.card.members}</b>" in page.votes_html
    assert page.prediction_set_md == ""  # no coverage asked for
    for png in (page.probabilities_png, page.saliency_png):
        assert png.startswith(b"\x89PNG")


def test_a_predict_press_runs_one_graph_and_the_slider_none(runtime, monkeypatch):
    """The press runs the explain graph once (predict's outputs and the gradients together); the
    prediction set, at the press and at every slider move, comes from the probabilities it gave."""
    calls = []
    for name in ("predict", "explain"):
        method = getattr(runtime, name)
        monkeypatch.setattr(runtime, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    x = upload_to_input(runtime.card, EXAMPLES / "split-4.png")
    page = answer(runtime, x, coverage=0.9)
    assert calls == ["explain"]
    for level in (0.8, 0.9, 0.95, 0.99):
        expected = runtime.prediction_sets({k: v[None] for k, v in page.set_outputs.items()}, level)[0]
        names = [runtime.card.class_names[k] for k in np.flatnonzero(expected)]
        shown = prediction_set_md(runtime, page.set_outputs, level)
        assert f"coverage: {{{', '.join(names) if names else 'empty'}}}**" in shown, shown
    assert prediction_set_md(runtime, page.set_outputs, 0.9) in page.prediction_set_md
    assert calls == ["explain"]
    monkeypatch.undo()
    served = runtime.predict(x[None], coverage=0.9)["prediction_set"][0]
    assert np.array_equal(runtime.prediction_sets({k: v[None] for k, v in page.set_outputs.items()}, 0.9)[0], served)


def _pad(stroke_columns: slice, transparent: bool) -> Image.Image:
    """A 280x280 drawing pad with a black vertical stroke, on white or on a transparent canvas."""
    canvas = np.zeros((280, 280, 4), np.uint8) if transparent else np.full((280, 280, 4), 255, np.uint8)
    canvas[40:240, stroke_columns] = (0, 0, 0, 255)
    return Image.fromarray(canvas, "RGBA")


def test_a_drawing_is_cropped_around_its_ink_then_converted_like_an_upload(runtime, tmp_path):
    inputs = []
    for i, (columns, transparent) in enumerate([(slice(120, 160), False), (slice(20, 60), True)]):
        path = tmp_path / f"pad{i}.png"
        _pad(columns, transparent).save(path)
        inputs.append(drawing_to_input(runtime.card, path))
    # where on the pad the stroke was, and whether the pad was transparent, does not matter
    np.testing.assert_array_equal(inputs[0], inputs[1])
    assert inputs[0].shape == (1, 8, 8) and inputs[0].max() > 8 and inputs[0][:, :, 0].max() == 0
    assert answer(runtime, inputs[0]).label.startswith("1 (")


def test_bad_pictures_get_a_message_that_names_them(runtime, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (280, 280), (255, 255, 255, 255)).save(blank)
    for empty in (None, blank):
        with pytest.raises(EmptyDrawing, match="^drawing: expected strokes on the pad, got an empty pad"):
            drawing_to_input(runtime.card, empty)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    with pytest.raises(InvalidInput, match="^image: expected a PNG, JPEG, WEBP, BMP, TIFF or GIF picture"):
        upload_to_input(runtime.card, junk)
    with pytest.raises(InvalidInput, match="^image: expected an uploaded picture, got none"):
        upload_to_input(runtime.card, None)


def test_the_page_builds_with_its_fields_and_shows_coverage_only_when_the_file_has_it(runtime):
    def elem_ids(page) -> set[str]:
        return {c.get("props", {}).get("elem_id") for c in page.get_config_file()["components"]} - {None}

    fields = {"forde-input", "forde-draw", "forde-submit", "forde-label", "forde-uncertainty", "forde-abstain"}
    fields |= {"forde-saliency", "forde-votes", "forde-probabilities", "forde-message"}
    without_sets = EnsembleRuntime(MODEL)
    without_sets.card = replace(without_sets.card, choices=replace(without_sets.card.choices, conformal=None))
    fields_without = elem_ids(build_page(without_sets))
    assert fields <= fields_without and "forde-coverage" not in fields_without
    with_sets = EnsembleRuntime(MODEL)
    levels = ((0.8, 0.5), (0.9, 0.6), (0.95, 0.7), (0.99, 0.9))
    conformal = ConformalCalibration("lac", levels, 180, 10)
    with_sets.card = replace(with_sets.card, choices=replace(with_sets.card.choices, conformal=conformal))
    assert {"forde-coverage", "forde-set"} <= elem_ids(build_page(with_sets))


def test_the_service_loads_gradio_only_when_the_page_is_first_opened():
    code = "import sys, forde_serve.app.service; print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]


# --- the page in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    """`forde serve` with the committed model, as a user starts it (Gradio's uploads kept in a tmp dir)."""
    reason = browser_missing()
    if reason:
        pytest.skip(f"browser tests need headless Chromium: {reason}")
    process, url = start_server(
        command=[FORDE, "serve", str(MODEL), "--host", "127.0.0.1"],
        env_extra={"GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))},
        timeout=240,
    )
    yield url
    stop_server(process)


@pytest.fixture
def driver(page_server, tmp_path):
    with browser(tmp_path / "chromium-profile") as driver:
        ui_open(driver, page_server)
        yield driver


def _answered(texts) -> bool:
    return bool(LABEL.match(texts["label"]))


@pytest.mark.slow
def test_upload_then_drawing_in_a_browser(driver, runtime, tmp_path):
    from selenium.webdriver.common.by import By

    # an upload: the page shows the runtime's answer for the picture converted as /predict_image does
    ui_upload(driver, EXAMPLES / "digit-7.png")
    texts = ui_predict(driver, lambda t: t["label"].startswith("7 ("))
    assert texts["label"] == _expected_label(runtime, upload_to_input(runtime.card, EXAMPLES / "digit-7.png"))
    assert texts["abstain"].split(":")[0] in ("answer", "abstain")
    assert f"threshold {runtime.card.abstain_threshold:.3f}" in texts["abstain"]
    for measure in ("Predictive entropy", "Mutual information", "Vote disagreement"):
        assert measure in texts["uncertainty"]
    assert f"of {runtime.card.members}" in texts["votes"] and texts["message"] == ""
    saliency = driver.find_elements(By.CSS_SELECTOR, "#forde-saliency img")
    assert saliency and "/gradio_api/file=" in saliency[0].get_attribute("src")
    # the committed file has conformal thresholds: the slider starts at 90% and the set is the runtime's
    x = upload_to_input(runtime.card, EXAMPLES / "digit-7.png")
    in_set = runtime.predict(x[None], coverage=0.9)["prediction_set"][0]
    shown = ", ".join(runtime.card.class_names[c] for c in np.flatnonzero(in_set)) or "empty"
    assert f"Prediction set at 90% coverage: {{{shown}}}" in driver.find_element(By.ID, "forde-set").text

    # a drawing: strokes made with the pointer, and the answer comes from them, not from the upload
    ui_draw_one(driver)
    texts = ui_predict(driver, lambda t: _answered(t) and not t["label"].startswith("7 ("))
    assert texts["label"].startswith("1 ("), texts
    driver.save_screenshot(str(tmp_path / "ui.png"))
    assert (tmp_path / "ui.png").stat().st_size > 10_000


@pytest.mark.slow
def test_an_invalid_upload_shows_a_message_and_the_page_keeps_working(driver, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    ui_upload(driver, junk)
    texts = ui_predict(driver, lambda t: t["message"] != "")
    assert "image: expected a PNG, JPEG, WEBP, BMP, TIFF or GIF picture" in texts["message"] and texts["label"] == "–"

    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000), 255).save(huge)  # 20 Mpx, a small file
    ui_upload(driver, huge)
    texts = ui_predict(driver, lambda t: "pixels" in t["message"])
    assert "expected at most 16777216 pixels, got 5000x4000" in texts["message"]

    ui_tab(driver, "Draw")  # nothing drawn yet
    texts = ui_predict(driver, lambda t: "drawing" in t["message"])
    assert "drawing: expected strokes on the pad" in texts["message"]

    ui_upload(driver, EXAMPLES / "digit-3.png")
    texts = ui_predict(driver, lambda t: _answered(t) and t["message"] == "")
    assert texts["label"].startswith("3 (")


@pytest.mark.slow
def test_the_monitor_tab_shows_the_server_s_alarm_window_and_labels(driver, page_server, digits):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    x, y = digits
    answers = httpx.post(f"{page_server}/predict", json={"inputs": [{"input": r.tolist()} for r in x[:6]]}).json()
    labels = [{"id": a["id"], "label": int(label)} for a, label in zip(answers, y[:6], strict=True)]
    assert httpx.post(f"{page_server}/feedback", json={"items": labels}).status_code == 200
    document = httpx.get(f"{page_server}/monitor").json()

    ui_tab(driver, "Monitor")

    def shown(d):
        texts = {k: d.find_element(By.ID, f"forde-monitor-{k}").text for k in ("shift", "window", "feedback")}
        return texts if "labels" in texts["feedback"] and "rows" in texts["window"] else None

    texts = WebDriverWait(driver, 60).until(shown)  # the tab fills itself within a few seconds
    assert f"Over the newest {document['window']['rows']} rows, without labels" in texts["window"]
    accuracy = document["feedback"]["accuracy"]
    assert f"{document['feedback']['labels']} labels: realized accuracy {accuracy:.3f}" in texts["feedback"]
    if document["shift"] is None:
        assert "no validation reference" in texts["shift"]
    else:
        assert ("ALARM" in texts["shift"]) == document["shift"]["alarm"] and "threshold 100" in texts["shift"]
    assert "estimated accuracy" in texts["window"] and "realized accuracy" in texts["feedback"]
