"""The `/ui` page: try an exported ensemble in a browser and see what its members think.

Draw a digit (grayscale models) or upload a picture, press Predict, and the page shows the
ensemble's answer, every member's vote, how uncertain the ensemble is and why, whether it would
abstain, the conformal prediction set (files with conformal thresholds), and where each member
looks (the saliency figure of `forde_serve.saliency`, the same one `/explain` returns).

Built with Gradio 6 and mounted by the BentoML service on the SAME `EnsembleRuntime` as
`/predict` and `/explain`: one model in memory, no HTTP round trip. `answer(runtime, x)` is what
the Predict button computes (`_page_answer.py`), callable without a browser.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

from forde_serve.app._page_answer import answer, drawing_to_input, nearest_level, prediction_set_md, upload_to_input
from forde_serve.app._page_monitor import monitor_tab
from forde_serve.errors import FordeError
from forde_serve.runtime import EnsembleRuntime

__all__ = ["EXAMPLES", "PATH", "build_page", "mount_page"]

PATH = "/ui"
EXAMPLES = Path(__file__).with_name("examples")  # test-split digits for the bundled model (tests/pin_ui_assets.py)
_EXAMPLES = (
    ("digit-3.png", "a clear 3"),
    ("digit-7.png", "a clear 7"),
    ("split-4.png", "a 4 the members split on"),
    ("misread-4.png", "a 4 that looks like a 1"),
)
_CANVAS = 280  # drawing pad pixels per side


def _picture(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png))


def _file_path(payload) -> str | None:
    """The server-side path of a Gradio file payload (dict or FileData), or None."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
    return path or None


_INTRO = """# Try the ensemble: {name}

This model is an ensemble of **{members} networks** (method: **{method}**) that answer together.
{method_note} Give it an input and see not just the answer, but **how much the members agree**,
whether the ensemble would rather **abstain**, and **where each member looks**.
"""

_METHOD_NOTES = {
    "forde": "They were trained with FoRDE, which pushes the members to rely on different input "
    "features, so their disagreement is a useful warning.",
    "de": "They were trained as a deep ensemble: the same recipe from different random starts.",
}


def build_page(runtime: EnsembleRuntime, title: str | None = None, snapshot: Callable[[], dict | None] | None = None):
    """The Gradio `Blocks` of the page, answering with `runtime` (no server started); `snapshot()` gives
    the /monitor document of the server (None, or no `snapshot`: the server keeps no state)."""
    import gradio as gr

    card = runtime.card
    name = title or runtime.path.name
    drawable = card.image is not None and card.image.mode == "L"
    bundled_digits = card.image is not None and card.image.size == (8, 8) and card.class_names == tuple("0123456789")

    with gr.Blocks(title=f"forde-serve: {name}", analytics_enabled=False) as page:
        gr.Markdown(
            _INTRO.format(
                name=name, members=card.members, method=card.method, method_note=_METHOD_NOTES.get(card.method, "")
            )
        )
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                if card.image is None:
                    gr.Markdown(
                        "This model takes arrays, not pictures, so there is nothing to draw or upload here. "
                        "Send it inputs with `POST /predict` (see `/docs`)."
                    )
                else:
                    _predict_tab(gr, runtime, drawable, bundled_digits)
            with gr.Tab("Monitor", id="monitor"):
                monitor_tab(gr, snapshot)
    return page


def _predict_tab(gr, runtime: EnsembleRuntime, drawable: bool, bundled_digits: bool) -> None:
    """The Predict tab: draw or upload, press Predict, see the ensemble's answer (a picture model)."""
    card = runtime.card
    source = gr.State("draw" if drawable else "upload")
    last_outputs = gr.State(None)  # the set outputs of the last Predict press
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 1. Give it an input")
            with gr.Tabs():
                if drawable:
                    with gr.Tab("Draw", id="draw") as draw_tab:
                        drawing = gr.Sketchpad(
                            # A white background: the pad opens with the brush in hand, ink on paper.
                            value=_blank_canvas(),
                            label="Draw one digit, large, filling the pad",
                            canvas_size=(_CANVAS, _CANVAS),
                            fixed_canvas=True,
                            brush=gr.Brush(default_size=22, colors=["#000000"], color_mode="fixed"),
                            layers=False,
                            transforms=(),
                            image_mode="RGBA",
                            type="filepath",
                            format="png",
                            elem_id="forde-draw",
                        )
                else:
                    drawing = gr.State(None)
                with gr.Tab("Upload", id="upload") as upload_tab:
                    upload = gr.Image(
                        label="A picture (PNG or JPEG)",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        format="png",
                        elem_id="forde-input",
                    )
                    if bundled_digits and EXAMPLES.is_dir():
                        gr.Examples(
                            examples=[[str(EXAMPLES / file)] for file, _ in _EXAMPLES],
                            example_labels=[label for _, label in _EXAMPLES],
                            inputs=[upload],
                            label="Examples: digits from the test split, which the model never saw",
                        )
            gr.Markdown(_conversion_note(card))
            submit = gr.Button("Predict", variant="primary", elem_id="forde-submit")
            message = gr.Markdown("", elem_id="forde-message")
        with gr.Column(scale=1):
            gr.Markdown("### 2. The ensemble's answer")
            label = gr.Markdown("## –", elem_id="forde-label")
            abstain = gr.Markdown("", elem_id="forde-abstain")
            if card.coverage_levels:
                coverage = gr.Slider(
                    minimum=min(card.coverage_levels),
                    maximum=max(card.coverage_levels),
                    value=nearest_level(card.coverage_levels, 0.9),
                    step=0.01,
                    label="Coverage of the prediction set",
                    info="How often the set must hold the true class; higher coverage, larger sets.",
                    elem_id="forde-coverage",
                )
                prediction_set = gr.Markdown("", elem_id="forde-set")
            else:
                coverage, prediction_set = gr.State(None), gr.State("")
            gr.Markdown("### How uncertain, and why")
            uncertainty = gr.Markdown("", elem_id="forde-uncertainty")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 3. Every member's vote")
            votes = gr.HTML("", elem_id="forde-votes")
        with gr.Column(scale=1):
            gr.Markdown("### Class probabilities")
            probabilities = gr.Image(
                label="Class probabilities: bars = the ensemble, dots = each member",
                show_label=False,
                type="pil",
                format="png",
                interactive=False,
                buttons=["download"],
                elem_id="forde-probabilities",
            )
    gr.Markdown(
        "### 4. Where each member looks\n"
        "Each panel is the input with one member's input gradient on top: how that member's score for "
        "the ensemble's answer changes when a pixel changes. Members that look at different pixels "
        "and still agree make a sturdier answer."
    )
    saliency = gr.Image(
        label="Saliency per member",
        show_label=False,
        type="pil",
        format="png",
        interactive=False,
        buttons=["download", "fullscreen"],
        elem_id="forde-saliency",
    )

    outputs = [message, label, abstain, prediction_set, uncertainty, votes, probabilities, saliency, last_outputs]

    def on_predict(chosen, drawn, uploaded, level):
        try:
            if chosen == "draw":
                x = drawing_to_input(card, _composite_path(drawn))
            else:
                x = upload_to_input(card, _file_path(uploaded))
            page_answer = answer(runtime, x, level)
        except FordeError as err:
            return [f"**Could not predict.** {err}", "## –", "", "", "", "", None, None, None]
        # the slider's sets come from these probabilities, not from running the graph again
        return [
            "",
            f"## {page_answer.label}",
            page_answer.abstain_md,
            page_answer.prediction_set_md,
            page_answer.uncertainty_md,
            page_answer.votes_html,
            _picture(page_answer.probabilities_png),
            _picture(page_answer.saliency_png),
            page_answer.set_outputs,
        ]

    # preprocess=False: the handler decodes the files itself, so a file that is not a picture gets
    # this package's one-sentence message instead of Gradio's decoding error. Gradio still checks
    # that every path is one of its own uploads.
    submit.click(
        on_predict,
        inputs=[source, drawing, upload, coverage],
        outputs=outputs,
        preprocess=False,
        api_visibility="private",
    )
    if drawable:
        draw_tab.select(lambda: "draw", outputs=source, queue=False, api_visibility="private")
    upload_tab.select(lambda: "upload", outputs=source, queue=False, api_visibility="private")
    if card.coverage_levels:

        def on_coverage(outputs, level):
            return "" if outputs is None else prediction_set_md(runtime, outputs, level)

        coverage.release(on_coverage, inputs=[last_outputs, coverage], outputs=prediction_set)


def _blank_canvas():
    from PIL import Image

    return Image.new("RGB", (_CANVAS, _CANVAS), "white")


def _composite_path(payload) -> str | None:
    """The flattened picture of a Sketchpad payload, or None when nothing was drawn."""
    if payload is None:
        return None
    composite = payload.get("composite") if isinstance(payload, dict) else getattr(payload, "composite", None)
    return _file_path(composite)


def _conversion_note(card) -> str:
    spec = card.image
    height, width = spec.size
    colour = "grayscale" if spec.mode == "L" else spec.mode
    inverted = ", inverted (dark ink becomes high values)" if spec.invert else ""
    return (
        f"Your picture is converted as `/predict_image` converts an upload: {colour}, resized to "
        f"{width}x{height}{inverted}. A drawing is first cropped to a square around the ink."
    )


def mount_page(
    service, runtime: EnsembleRuntime, path: str = PATH, snapshot: Callable[[], dict | None] | None = None
) -> None:
    """Mount the page on a BentoML `service` at `path`, answering with `runtime`.

    Gradio is imported and the page built on the first request to `path`, not here: importing
    Gradio takes seconds, which every process that imports the service (the CLI, batch jobs,
    tests) would otherwise pay, and a server whose users never open the page never loads it.
    """
    service.mount_asgi_app(_LazyPage(runtime, path, snapshot), path=path, name="forde_ui")


class _LazyPage:
    """ASGI app: the Gradio page, built on its first request."""

    def __init__(self, runtime: EnsembleRuntime, path: str, snapshot: Callable[[], dict | None] | None):
        self._runtime, self._path, self._snapshot = runtime, path, snapshot
        self._page = self._app = None
        self._building = threading.Lock()
        self._started = False

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            import anyio

            # In a worker thread: the event loop keeps answering /predict while Gradio loads.
            await anyio.to_thread.run_sync(self._build)
        if not self._started:
            # Gradio's queue runs in the serving event loop; a mounted app gets no startup event of
            # its own, so start it here, once, as bentoml.gradio's startup hook does.
            self._started = True
            self._page.run_startup_events()
            await self._page.run_extra_startup_events()
        await self._app(scope, receive, send)

    def _build(self) -> None:
        with self._building:
            if self._app is not None:
                return
            import gradio as gr
            from fastapi import FastAPI

            page = build_page(self._runtime, snapshot=self._snapshot)
            # Gradio 6 sets its theme and page config in its own mount (skipping it answers the page
            # with a 500); mounting once on a throwaway app fills them in (checked with Gradio 6.31 and BentoML 1.4.39).
            gr.mount_gradio_app(FastAPI(), page, path=self._path, footer_links=[], show_error=True)
            page.root_path = self._path
            # A few page predictions at a time: the page is for trying, the HTTP API keeps the CPU.
            page.queue(default_concurrency_limit=2)
            app = gr.routes.App.create_app(page)
            self._page, self._app = page, app
