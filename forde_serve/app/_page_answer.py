"""What one Predict press on the /ui page computes, without a browser: the picture (a drawing or an
upload) converted as `/predict_image` converts an upload, then ONE graph call (explain: predict's
outputs and the gradients together), and everything the page shows made from its outputs.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forde_serve.contract import UNCERTAINTY
from forde_serve.images import image_to_input
from forde_serve.runtime import EnsembleRuntime, InvalidInput
from forde_serve.saliency import saliency_png

__all__ = [
    "EmptyDrawing",
    "PageAnswer",
    "answer",
    "drawing_to_input",
    "nearest_level",
    "prediction_set_md",
    "upload_to_input",
]

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
    # the outputs a prediction set is made from, this input's: `probs` [classes] and its uncertainty (the
    # coverage slider's sets are made from them)
    set_outputs: dict


def answer(runtime: EnsembleRuntime, x: np.ndarray, coverage: float | None = None) -> PageAnswer:
    """One raw input `[*input_shape]` -> what the page shows; `coverage` picks the prediction set's
    level (snapped to the nearest of `runtime.card.coverage_levels`; ignored when there are none)."""
    card = runtime.card
    out = runtime.explain(np.asarray(x)[None])  # predict's outputs plus the gradients, in one call
    predicted, confidence = int(out["predicted_class"][0]), float(out["confidence"][0])
    member_probs = out["member_probs"][0]  # [M, classes]
    set_outputs = {name: out[name][0] for name in ("probs", *UNCERTAINTY)}
    return PageAnswer(
        label=f"{card.class_names[predicted]} ({confidence:.2f})",
        predicted_class=predicted,
        confidence=confidence,
        abstain=bool(out["abstain"][0]),
        probabilities_png=_probabilities_png(out["probs"][0], member_probs, card.class_names),
        votes_html=_votes_html(member_probs, predicted, card.class_names),
        uncertainty_md=_uncertainty_md(out, len(card.class_names), card.members),
        abstain_md=_abstain_md(float(out["mutual_information"][0]), bool(out["abstain"][0]), card),
        prediction_set_md=prediction_set_md(runtime, set_outputs, coverage),
        saliency_png=saliency_png(
            np.asarray(x), out["input_gradients"][0], member_probs, card.class_names, predicted, card.image
        ),
        set_outputs=set_outputs,
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


def prediction_set_md(runtime: EnsembleRuntime, outputs: dict, coverage: float | None) -> str:
    """The prediction set of one input at the calibrated level nearest `coverage`, as Markdown ("" when the
    file has no conformal thresholds or no coverage was asked). `outputs`: the input's `probs` `[classes]`
    and uncertainty (`PageAnswer.set_outputs`). No graph runs: the set comes from what the Predict press
    already has."""
    levels = runtime.card.coverage_levels
    if coverage is None or not levels:
        return ""
    level = nearest_level(levels, coverage)
    in_set = runtime.prediction_sets({name: np.asarray(value)[None] for name, value in outputs.items()}, level)[0]
    return _prediction_set_md(runtime.card.class_names, in_set, level, coverage)


def nearest_level(levels: tuple[float, ...], coverage: float) -> float:
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
