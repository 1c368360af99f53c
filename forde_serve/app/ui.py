"""The `/ui` page: try an exported ensemble in a browser and see what its members think.

Draw a digit (grayscale models) or upload a picture, press Predict, and the page shows the
ensemble's answer, every member's vote, how uncertain the ensemble is and why, whether it would
abstain, the conformal prediction set (files with conformal thresholds), and where each member
looks (the saliency figure of `forde_serve.saliency`, the same one `/explain` returns).

Built with Gradio 6 and mounted by the BentoML service on the SAME `EnsembleRuntime` as
`/predict` and `/explain`: one model in memory, no HTTP round trip. `answer(runtime, x)` is what
the Predict button computes, callable without a browser.
"""

from __future__ import annotations

import html
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forde_serve.errors import FordeError
from forde_serve.images import image_to_input
from forde_serve.runtime import EnsembleRuntime, InvalidInput
from forde_serve.saliency import saliency_png

__all__ = [
    "EXAMPLES",
    "PATH",
    "EmptyDrawing",
    "PageAnswer",
    "answer",
    "build_page",
    "drawing_to_input",
    "mount_page",
    "upload_to_input",
]

PATH = "/ui"
EXAMPLES = Path(__file__).with_name("examples")  # test-split digits for the bundled model (tests/pin_ui_assets.py)
_EXAMPLES = (
    ("digit-3.png", "a clear 3"),
    ("digit-7.png", "a clear 7"),
    ("split-4.png", "a 4 the members split on"),
    ("misread-4.png", "a 4 that looks like a 1"),
)
_CANVAS = 280  # drawing pad pixels per side
_INK_BELOW = 200  # a flattened drawing pixel darker than this (0..255) is ink
_MARGIN = 0.08  # of the cropped square's side, kept blank around the ink


class EmptyDrawing(InvalidInput):
    """A Predict press with nothing drawn on the pad."""


@dataclass(frozen=True)
class PageAnswer:
    """Everything the page shows for one input."""

    label: str  # the top class and its probability, e.g. "7 (0.93)"
    predicted_class: int
    confidence: float
    abstain: bool
    probabilities_png: bytes  # bar chart: the ensemble's class probabilities, each member's as dots
    votes_html: str  # the members' votes, one card each
    uncertainty_md: str  # predictive entropy, mutual information, vote disagreement, each explained
    abstain_md: str  # starts with "abstain" or "answer", then the threshold
    prediction_set_md: str  # "" when the file has no conformal thresholds or no coverage was asked
    saliency_png: bytes  # forde_serve.saliency's figure for the predicted class


def answer(runtime: EnsembleRuntime, x: np.ndarray, coverage: float | None = None) -> PageAnswer:
    """One raw input `[*input_shape]` -> what the page shows; `coverage` picks the prediction set's
    level (snapped to the nearest of `runtime.card.coverage_levels`; ignored when there are none)."""
    card = runtime.card
    out = runtime.explain(np.asarray(x)[None])  # predict's outputs plus the gradients, in one call
    predicted, confidence = int(out["predicted_class"][0]), float(out["confidence"][0])
    member_probs = out["member_probs"][0]  # [M, classes]
    return PageAnswer(
        label=f"{card.class_names[predicted]} ({confidence:.2f})",
        predicted_class=predicted,
        confidence=confidence,
        abstain=bool(out["abstain"][0]),
        probabilities_png=_probabilities_png(out["probs"][0], member_probs, card.class_names),
        votes_html=_votes_html(member_probs, predicted, card.class_names),
        uncertainty_md=_uncertainty_md(out, len(card.class_names), card.members),
        abstain_md=_abstain_md(float(out["mutual_information"][0]), bool(out["abstain"][0]), card),
        prediction_set_md=_prediction_set(runtime, x, coverage),
        saliency_png=saliency_png(
            np.asarray(x), out["input_gradients"][0], member_probs, card.class_names, predicted, card.image
        ),
    )


def upload_to_input(card, path: str | Path | None) -> np.ndarray:
    """An uploaded picture -> the model's raw input, exactly as `/predict_image` converts it."""
    if path is None:
        raise InvalidInput("image: expected an uploaded picture, got none (choose a file or click an example)")
    return image_to_input(path, card.image, field="image")


def drawing_to_input(card, path: str | Path | None) -> np.ndarray:
    """The drawing pad's picture -> the model's raw input.

    The strokes are flattened onto white and cropped to a square around the ink (digits were
    written to fill their box), then converted exactly as `/predict_image` converts an upload.
    """
    from PIL import Image

    if path is None:
        raise EmptyDrawing("drawing: expected strokes on the pad, got an empty pad (draw a digit first)")
    with Image.open(path) as picture:
        flat = Image.new("RGBA", picture.size, "white")
        flat.alpha_composite(picture.convert("RGBA"))
    grey = np.asarray(flat.convert("L"))
    rows, columns = np.nonzero(grey < _INK_BELOW)
    if len(rows) == 0:
        raise EmptyDrawing("drawing: expected strokes on the pad, got an empty pad (draw a digit first)")
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    side = int(max(bottom - top, right - left) / (1 - 2 * _MARGIN))
    square = Image.new("L", (side, side), 255)
    square.paste(
        Image.fromarray(grey[top:bottom, left:right]),
        ((side - (right - left)) // 2, (side - (bottom - top)) // 2),
    )
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    buffer.seek(0)
    return image_to_input(buffer, card.image, field="drawing")


def _prediction_set(runtime: EnsembleRuntime, x: np.ndarray, coverage: float | None) -> str:
    """The prediction set of one raw input at the calibrated level nearest `coverage`, as Markdown
    ("" when the file has no conformal thresholds or no coverage was asked)."""
    levels = runtime.card.coverage_levels
    if coverage is None or not levels:
        return ""
    level = _nearest_level(levels, coverage)
    sets = runtime.predict(np.asarray(x)[None], coverage=level)
    return _prediction_set_md(runtime.card.class_names, sets["prediction_set"][0], level, coverage)


def _nearest_level(levels: tuple[float, ...], coverage: float) -> float:
    return min(levels, key=lambda level: abs(level - coverage))


def _prediction_set_md(class_names, in_set: np.ndarray, level: float, asked: float) -> str:
    members = [class_names[c] for c in np.flatnonzero(in_set)]
    shown = ", ".join(members) if members else "empty"
    note = f" (the calibrated level nearest to {asked:.2f})" if abs(level - asked) > 1e-9 else ""
    if len(members) == 1:
        meaning = "one class: the ensemble is sure enough to name a single answer at this coverage."
    elif not members:
        meaning = "no class reaches the threshold at this coverage: the input looks unlike the calibration data."
    else:
        meaning = f"{len(members)} classes: at this coverage the ensemble cannot narrow it down further."
    return (
        f"**Prediction set at {level:.0%} coverage{note}: {{{shown}}}**\n\n"
        f"The set holds the true class for about {level:.0%} of inputs like the calibration data. "
        f"Here it has {meaning}"
    )


def _uncertainty_md(out: dict[str, np.ndarray], classes: int, members: int) -> str:
    entropy = float(out["predictive_entropy"][0])
    information = float(out["mutual_information"][0])
    disagreement = float(out["vote_disagreement"][0])
    dissenting = round(disagreement * members)
    return (
        f"- **Predictive entropy {entropy:.3f} nats**: total uncertainty of the averaged answer; 0 when all "
        f"probability is on one class, {np.log(classes):.2f} (ln {classes}) when it is spread evenly.\n"
        f"- **Mutual information {information:.3f} nats**: how much the members disagree (what the ensemble "
        "does not know); 0 when every member gives the same probabilities, high when the answer depends on "
        "which member you ask.\n"
        f"- **Vote disagreement {disagreement:.2f}** ({dissenting} of {members} members): the share of members "
        "whose own top class is not the ensemble's."
    )


def _abstain_md(information: float, abstain: bool, card) -> str:
    rule = card.choices.abstention
    threshold = rule.threshold
    chosen = ""
    if rule.target_risk is not None and rule.coverage is not None:
        chosen = (
            f" The threshold was chosen on validation data so that accepted answers are wrong at most "
            f"{rule.target_risk:.0%} of the time; it accepted {rule.coverage:.1%} of them."
        )
    if abstain:
        return (
            f"**abstain**: mutual information {information:.3f} is above this model's threshold "
            f"{threshold:.3f}: the members disagree too much to trust the answer; a careful system would "
            f"pass this input to a person.{chosen}"
        )
    return (
        f"**answer**: mutual information {information:.3f} is at or below this model's threshold "
        f"{threshold:.3f}: the members agree enough to give the answer.{chosen}"
    )


def _votes_html(member_probs: np.ndarray, predicted: int, class_names) -> str:
    votes = member_probs.argmax(axis=1)
    agree = int((votes == predicted).sum())
    others = sorted({class_names[v] for v in votes if v != predicted})
    dissent = f"; {len(votes) - agree} vote otherwise ({', '.join(others)})" if others else ""
    cards = []
    for m, vote in enumerate(votes):
        colour = "#2e7d32" if vote == predicted else "#e65100"
        cards.append(
            f'<div class="forde-vote" style="border:2px solid {colour};border-radius:6px;padding:3px 5px;'
            f'text-align:center;min-width:50px">'
            f'<div style="font-size:0.8em">member {m + 1}</div>'
            f'<div style="font-size:1.6em;font-weight:bold;color:{colour}">{html.escape(class_names[vote])}</div>'
            f'<div style="font-size:0.8em">p = {member_probs[m, vote]:.2f}</div></div>'
        )
    return (
        f"<p><b>{agree} of {len(votes)}</b> members vote <b>{html.escape(class_names[predicted])}</b>"
        f"{html.escape(dissent)}. Each card: the member's own top class and its probability "
        "(green: agrees with the ensemble, orange: dissents).</p>"
        f'<div style="display:flex;flex-wrap:wrap;gap:6px">{"".join(cards)}</div>'
    )


def _probabilities_png(probs: np.ndarray, member_probs: np.ndarray, class_names) -> bytes:
    """Bars: the ensemble's probability per class; dots: each member's."""
    from matplotlib.figure import Figure

    classes = np.arange(len(class_names))
    figure = Figure(figsize=(max(4.0, 0.45 * len(classes) + 1.2), 2.6), layout="tight")
    axis = figure.add_subplot()
    axis.bar(classes, probs, color="#90caf9", edgecolor="#1565c0", label="ensemble (mean of members)")
    jitter = np.linspace(-0.25, 0.25, len(member_probs)) if len(member_probs) > 1 else np.zeros(1)
    for m, row in enumerate(member_probs):
        axis.scatter(classes + jitter[m], row, s=10, color="black", zorder=3, label="each member" if m == 0 else None)
    axis.set_xticks(classes, [str(name) for name in class_names], fontsize=8)
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("probability", fontsize=8)
    axis.tick_params(axis="y", labelsize=8)
    axis.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


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


def build_page(runtime: EnsembleRuntime, title: str | None = None):
    """The Gradio `Blocks` of the page, answering with `runtime` (no server started)."""
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
        if card.image is None:
            gr.Markdown(
                "This model takes arrays, not pictures, so there is nothing to draw or upload here. "
                "Send it inputs with `POST /predict` (see `/docs`)."
            )
            return page

        source = gr.State("draw" if drawable else "upload")
        last_input = gr.State(None)
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
                        value=_nearest_level(card.coverage_levels, 0.9),
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

        outputs = [message, label, abstain, prediction_set, uncertainty, votes, probabilities, saliency, last_input]

        def on_predict(chosen, drawn, uploaded, level):
            try:
                if chosen == "draw":
                    x = drawing_to_input(card, _composite_path(drawn))
                else:
                    x = upload_to_input(card, _file_path(uploaded))
                page_answer = answer(runtime, x, level)
            except FordeError as err:
                return [f"**Could not predict.** {err}", "## –", "", "", "", "", None, None, None]
            return [
                "",
                f"## {page_answer.label}",
                page_answer.abstain_md,
                page_answer.prediction_set_md,
                page_answer.uncertainty_md,
                page_answer.votes_html,
                _picture(page_answer.probabilities_png),
                _picture(page_answer.saliency_png),
                x,
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

            def on_coverage(x, level):
                return "" if x is None else _prediction_set(runtime, x, level)

            coverage.release(on_coverage, inputs=[last_input, coverage], outputs=prediction_set)
    return page


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


def mount_page(service, runtime: EnsembleRuntime, path: str = PATH) -> None:
    """Mount the page on a BentoML `service` at `path`, answering with `runtime`.

    Gradio is imported and the page built on the first request to `path`, not here: importing
    Gradio takes seconds, which every process that imports the service (the CLI, batch jobs,
    tests) would otherwise pay, and a server whose users never open the page never loads it.
    """
    service.mount_asgi_app(_LazyPage(runtime, path), path=path, name="forde_ui")


class _LazyPage:
    """ASGI app: the Gradio page, built on its first request."""

    def __init__(self, runtime: EnsembleRuntime, path: str):
        self._runtime, self._path = runtime, path
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

            page = build_page(self._runtime)
            # Gradio 6 sets its theme and page config in its own mount (skipping it answers the page
            # with a 500); mounting once on a throwaway app fills them in (checked with Gradio 6.31 and BentoML 1.4.39).
            gr.mount_gradio_app(FastAPI(), page, path=self._path, footer_links=[], show_error=True)
            page.root_path = self._path
            # A few page predictions at a time: the page is for trying, the HTTP API keeps the CPU.
            page.queue(default_concurrency_limit=2)
            app = gr.routes.App.create_app(page)
            self._page, self._app = page, app
