"""The saliency figure (forde_serve/saliency.py): one readable panel per member, drawn from hand-made
gradients whose right picture is known, and from the committed model's real gradients."""

import io

import numpy as np
import pytest
from PIL import Image

from forde_serve.contract import ImageSpec
from forde_serve.runtime import EnsembleRuntime
from forde_serve.saliency import saliency_figure, saliency_png

from helpers import MODEL

DIGITS = ImageSpec(mode="L", size=(8, 8), scale=16 / 255, invert=True)  # the bundled model's image spec
CLASSES = [str(c) for c in range(10)]


def _hand_made(members: int = 3, channels: int = 1):
    """An 8x8 input, member m's gradient +1 on pixel (m, m) and -0.5 on (7, m) (m mod 7); votes 2, 0, 2, ..."""
    x = np.zeros((channels, 8, 8), np.float32)
    x[:, 2:6, 3] = 16.0  # a stroke
    gradients = np.zeros((members, channels, 8, 8), np.float32)
    member_probs = np.full((members, 10), 0.02, np.float32)
    for m in range(members):
        gradients[m, :, m % 7, m % 7] = 1.0 / channels
        gradients[m, :, 7, m % 7] = -0.5 / channels
        member_probs[m, 2 if m % 2 == 0 else 0] = 0.82  # 0.82 + 9 * 0.02 = 1
    return x, gradients, member_probs


def _images(figure):
    return [axis for axis in figure.axes if axis.images]


def test_one_panel_per_member_titled_with_its_own_vote():
    x, gradients, member_probs = _hand_made(members=3)
    figure = saliency_figure(x, gradients, member_probs, CLASSES, target=2, image=DIGITS)
    titles = [axis.get_title() for axis in _images(figure)]
    # input, members' mean, then members 1..3 voting 2, 0, 2 with probability 0.82 each
    assert titles[0] == "input"
    assert titles[1] == "mean of members\nensemble: 2 (0.55)"  # mean of 0.82, 0.02, 0.82 = 0.553
    assert titles[2:] == ["member 1\nsays 2 (0.82)", "member 2\nsays 0 (0.82)", "member 3\nsays 2 (0.82)"]
    assert "class 2" in figure.get_suptitle() and "darker (more ink)" in figure.get_suptitle()


def test_colours_are_centred_at_zero_shared_and_unblurred():
    x, gradients, member_probs = _hand_made(members=3)
    figure = saliency_figure(x, gradients, member_probs, CLASSES, target=2, image=DIGITS)
    panels = _images(figure)
    (colorbar_axis,) = [axis for axis in figure.axes if not axis.images]
    assert "d logit[2] / d pixel" in colorbar_axis.get_ylabel()
    low, high = colorbar_axis.get_ylim()
    assert (low, high) == pytest.approx((-1.0, 1.0))  # symmetric around 0, the largest |gradient| is 1
    for axis in panels:
        assert all(image.get_interpolation() == "nearest" for image in axis.images)
    # member 1's overlay: red and opaque at (0, 0) where its gradient is +1, blue at (7, 0) (-0.5),
    # fully clear where the gradient is 0
    overlay = panels[2].images[1].get_array()
    red, blue = overlay[0, 0], overlay[7, 0]
    assert red[0] > red[2] and red[3] == pytest.approx(0.95)
    assert blue[2] > blue[0] and 0 < blue[3] < red[3]
    assert overlay[4, 4, 3] == 0.0
    # the input in grey as a person sees the digit: ink (16) dark, paper (0) light
    grey = panels[0].images[0].get_array()
    assert grey[3, 3] < 0.5 < grey[0, 0]


def test_rgb_inputs_say_how_channels_were_combined():
    x, gradients, member_probs = _hand_made(members=2, channels=3)
    spec = ImageSpec(mode="RGB", size=(8, 8), scale=1 / 255, invert=False)
    figure = saliency_figure(x / 16, gradients, member_probs, CLASSES, target=0, image=spec)
    assert "sum over its 3 channels" in figure.get_suptitle() and "brighter" in figure.get_suptitle()
    panels = _images(figure)
    assert panels[0].images[0].get_array().shape == (8, 8, 3)  # the input panel keeps its colours
    # the summed channels give member 1 the same +1 at (0, 0) as the one-channel case
    (colorbar_axis,) = [axis for axis in figure.axes if not axis.images]
    assert colorbar_axis.get_ylim() == pytest.approx((-1.0, 1.0))


def test_many_members_wrap_into_rows():
    x, gradients, member_probs = _hand_made(members=12)
    figure = saliency_figure(x, gradients, member_probs, CLASSES, target=2, image=DIGITS)
    panels = _images(figure)
    assert len(panels) == 14
    rows = {round(axis.get_position().y0, 3) for axis in panels}
    assert len(rows) == 2


def test_png_of_the_committed_models_real_gradients():
    runtime = EnsembleRuntime(MODEL)
    x = _hand_made()[0][None]  # a stroke, a valid raw input
    out = runtime.explain(x)
    png = saliency_png(
        x[0], out["input_gradients"][0], out["member_probs"][0], runtime.card.class_names, 0, runtime.card.image
    )
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    # 10 panels (input, mean, 8 members) in one row: much wider than tall, big enough to read
    assert picture.width > 5 * picture.height and picture.height >= 200


def test_shapes_that_do_not_fit_are_refused():
    x, gradients, member_probs = _hand_made(members=3)
    with pytest.raises(ValueError, match="gradients"):
        saliency_figure(x, gradients[:, :, :4], member_probs, CLASSES, target=2)
    with pytest.raises(ValueError, match="member_probs"):
        saliency_figure(x, gradients, member_probs[:2], CLASSES, target=2)
