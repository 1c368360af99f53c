"""Write the `/ui` page's committed pictures: its example digits and the README's screenshot.

    python tests/pin_ui_assets.py              # forde_serve/app/examples/*.png (needs scikit-learn)
    python tests/pin_ui_assets.py --screenshot  # also docs/ui.png: a real server, headless Chromium

The examples are test-split digits of the bundled model (the split `training/data.py` makes with
`split_seed` 0), drawn as a person would photograph them: dark ink on white, 64x64.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "forde_serve" / "app" / "examples"
SCREENSHOT = ROOT / "docs" / "ui.png"
# load_digits() index -> file; all four are in the test split. 1220 and 1174: the ensemble is sure;
# 1660: a 4 the members split on (it abstains, right answer); 1628: a 4 most members read as a 1.
PICKS = {1220: "digit-3.png", 1174: "digit-7.png", 1660: "split-4.png", 1628: "misread-4.png"}


def digit_png(array2d: np.ndarray, size: int = 64) -> bytes:
    """A raw 8x8 digit (0..16, ink high) as a PNG of dark ink on white, `size` pixels a side."""
    from PIL import Image

    ink = np.uint8(np.round(255 - array2d / 16 * 255))
    buffer = io.BytesIO()
    Image.fromarray(ink).resize((size, size), Image.NEAREST).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_examples() -> None:
    from sklearn.datasets import load_digits

    images = load_digits().images
    EXAMPLES.mkdir(exist_ok=True)
    for index, name in PICKS.items():
        (EXAMPLES / name).write_bytes(digit_png(images[index]))
        print(f"wrote {EXAMPLES / name}")


def write_screenshot() -> None:
    import tempfile

    from helpers import browser, start_server, stop_server, ui_open, ui_predict, ui_upload

    process, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as profile, browser(Path(profile)) as driver:
            ui_open(driver, url)
            ui_upload(driver, EXAMPLES / "split-4.png")
            ui_predict(driver, lambda texts: texts["label"].startswith("4 ("))
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, height + 140)  # the whole page; the window has a frame
            driver.save_screenshot(str(SCREENSHOT))
    finally:
        stop_server(process)
    from PIL import Image

    with Image.open(SCREENSHOT) as picture:
        picture.convert("RGB").quantize(colors=128).save(SCREENSHOT, optimize=True)
    print(f"wrote {SCREENSHOT} ({SCREENSHOT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    write_examples()
    if "--screenshot" in sys.argv[1:]:
        write_screenshot()
