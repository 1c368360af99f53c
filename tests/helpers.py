"""Helpers the tests share: the real `forde` command, servers on free ports, model-file surgery,
fake dataset folders. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
FORDE = str(Path(sys.executable).with_name("forde"))
MODEL = ROOT / "exported" / "digits.onnx"  # the committed default model


def run_forde(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `forde` console script as a real process."""
    kwargs.setdefault("cwd", ROOT)
    result = subprocess.run([FORDE, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"forde {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def invoke_forde(*args):
    """Run `forde ARGS` in this process with click's test runner, from the repository root: the same
    group and commands as the console script (`run_forde`), without a new interpreter importing torch
    for every call. Returns click's Result (exit_code, stdout, stderr, exception)."""
    import contextlib

    from click.testing import CliRunner

    from forde_serve.app.cli import main

    with contextlib.chdir(ROOT):
        return CliRunner().invoke(main, [str(a) for a in args], prog_name="forde")


TINY = """
seed = 3
device = "cpu"
[model]
arch = "cnn"
width = 4
[ensemble]
method = "forde"
members = 3
[forde]
lengthscale = "{lengthscale}"
[optim]
epochs = {epochs}
lr = 0.05
"""


def epochs_checkpointed(run: Path) -> int:
    """Epochs finished in a run's last checkpoint (0 before the first one)."""
    from safetensors import safe_open

    path = run / "checkpoint.safetensors"
    if not path.exists():
        return 0
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["epoch"])


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env_extra: dict | None = None, timeout: float = 90.0, command: list[str] | None = None):
    """`bentoml serve` (or `command` + `--port N`) as a real subprocess on a free port; returns
    (process, base url) once /readyz answers."""
    import httpx

    port = free_port()
    # Its own BENTOML_HOME: every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it
    # starts, which would wipe the /metrics of any other server on the machine (another test's, too).
    home = tempfile.mkdtemp(prefix="forde-bentoml-home-")
    # Its own state too (labels, the shift alarm), unless the test shares one on purpose.
    state = str(Path(home) / "state")
    env = dict(os.environ) | {"FORDE_MODEL": str(MODEL), "BENTOML_HOME": home, "FORDE_STATE_DIR": state}
    env |= env_extra or {}
    command = command or [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "forde_serve.app.service:FordeEnsemble",
        "--host",
        "127.0.0.1",
    ]
    # The server's output (its log) goes to a file, not a pipe: nobody reads a pipe while the server runs,
    # and a full one would block the server. `process.log` is its path.
    with tempfile.NamedTemporaryFile(prefix="forde-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.log, process.home = Path(log.name), Path(home)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited: {process.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise AssertionError("bentoml serve did not become ready in time")


def kill_whole_server(process) -> None:
    """SIGKILL a server from `start_server` and every process under it, as a crash would, and wait until
    they are gone. A signal to its process group is not enough: BentoML's process manager starts each
    worker in a session of its own."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    for victim in (psutil.Process(process.pid), *children):  # the manager first: it cannot restart a worker
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"still running after SIGKILL: {alive}"


def stop_server(process) -> None:
    """Stop a server from `start_server` and everything left in its process group; remove its log and home."""
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the group: children that outlived their parent too
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.log.unlink(missing_ok=True)
    shutil.rmtree(process.home, ignore_errors=True)


# Put in front of `python -c` code: makes torch and torchvision unimportable in that process.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


def bare_card(input_shape, members, classes=10, abstain_threshold=1.0):
    """The least model card an export needs: classes "0".."9", an input shape, no validation choices."""
    from forde_serve.contract import Abstention, ModelCard, ValidationChoices

    return ModelCard(
        class_names=tuple(str(i) for i in range(classes)),
        input_shape=tuple(input_shape),
        input_space="test inputs",
        image=None,
        members=members,
        method="de",
        choices=ValidationChoices(abstention=Abstention(abstain_threshold)),
    )


def postgres_bindir() -> Path | None:
    """Debian's PostgreSQL server binaries (the newest version installed), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def new_postgres_database(server: str) -> str:
    """A new, empty database on the `postgres_server` fixture's server; its SQLAlchemy URL."""
    import sqlalchemy as sa

    name = f"forde_{os.getpid()}_{time.monotonic_ns()}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return f"{server}/{name}"


def without_ids(answer):
    """An answer (one row or a list of rows) without the `id` every served row carries: two answers to the
    same input differ only there."""
    if isinstance(answer, list):
        return [without_ids(row) for row in answer]
    return {k: v for k, v in answer.items() if k != "id"}


def nullable_fields(schema: dict, spec: dict) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Where each route's request and answer may hold null, by field path ("monitor answer: shift.fired_at"),
    as /schema.json says it (`anyOf [.., null]`, what BentoML's client reads) and as /docs.json says it
    (`nullable: true`, OpenAPI 3.0), walked through every nested object, list item and dict value."""
    components = spec.get("components", {}).get("schemas", {})

    def walk(node, path: str, found: set[str], in_spec: bool, defs: dict) -> None:
        if not isinstance(node, dict):
            return
        if node.get("nullable") if in_spec else {"type": "null"} in node.get("anyOf", []):
            found.add(path)
        if "$ref" in node:  # the spec's components, or a /schema.json root's own $defs
            walk(defs[node["$ref"].rsplit("/", 1)[-1]], path, found, in_spec, defs)
            return
        for option in node.get("anyOf", []):
            walk(option, path, found, in_spec, defs)
        for name, prop in (node.get("properties") or {}).items():
            walk(prop, f"{path}.{name}", found, in_spec, defs)
        for key, step in (("items", "[]"), ("additionalProperties", "{}")):
            walk(node.get(key), path + step, found, in_spec, defs)

    in_schema: dict[str, set[str]] = {}
    in_spec: dict[str, set[str]] = {}
    for route in schema["routes"]:
        operation = spec["paths"][route["route"]]["post"]
        sides = {
            "request": (route["input"], operation.get("requestBody", {}).get("content", {})),
            "answer": (route["output"], operation["responses"]["200"]["content"]),
        }
        for side, (client, content) in sides.items():
            key = f"{route['name']} {side}"
            walk(client, "", in_schema.setdefault(key, set()), False, client.get("$defs", {}))
            for media in content.values():
                walk(media["schema"], "", in_spec.setdefault(key, set()), True, components)
    return in_schema, in_spec


def in_process_app(service):
    """BentoML's ASGI app of `service` (a `make_service` class) for starlette's TestClient, without BentoML's
    own request metrics: those register once per process, so a second service's app would clash."""
    from _bentoml_impl.server.app import ServiceAppFactory

    service.inject_config()
    return ServiceAppFactory(service, is_main=True, enable_metrics=False)()


def copy_with_metadata(src, dst_dir, change):
    """Copy an exported pair to `dst_dir/m.onnx` with `change(props)` applied to both files' metadata."""
    import onnx

    dst = dst_dir / "m.onnx"
    for suffix in (".onnx", ".explain.onnx"):
        model = onnx.load(str(src.with_name(src.name.replace(".onnx", suffix))))
        props = {p.key: p.value for p in model.metadata_props}
        change(props)
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(dst.with_name(dst.name.replace(".onnx", suffix))))
    return dst


def write_cifar(root, name, train_sizes, test_size, classes):
    """A fake CIFAR folder in torchvision's python layout, random images and labels."""
    rng = np.random.default_rng(0)

    def batch(n, label_key):
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, n in enumerate(train_sizes, 1):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n, "labels"), protocol=2))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(test_size, "labels"), protocol=2))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(classes)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(sum(train_sizes), "fine_labels"), protocol=2))
        (folder / "test").write_bytes(pickle.dumps(batch(test_size, "fine_labels"), protocol=2))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(classes)]}))
    return folder


# The /ui page in a real browser (tests/test_ui.py, tests/pin_ui_assets.py): Debian's chromium + chromedriver.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    import shutil

    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    return f"{' and '.join(missing)} not on PATH (apt-get install chromium chromium-driver)" if missing else None


@contextlib.contextmanager
def browser(profile: Path):
    """Headless Chromium driven by Selenium 4, with a fresh profile in `profile`.

    The flags keep Chromium from reaching for the network (this machine has none, and Chromium
    stalls on connection attempts) and let it run as root in a container.
    """
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def ui_open(driver, url: str) -> None:
    """Open the /ui page and wait until its Predict button is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/ui")
    WebDriverWait(driver, 120).until(expected_conditions.element_to_be_clickable((By.ID, "forde-submit")))


def ui_tab(driver, name: str) -> None:
    """Open the input tab called `name` ("Draw" or "Upload"); a tab's contents are built when opened."""
    from selenium.webdriver.common.by import By

    (tab,) = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name]
    _click(driver, tab)


def _click(driver, element) -> None:
    """Click `element` once Gradio's loading overlay (its status tracker) no longer covers it."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.support.ui import WebDriverWait

    def clicked(_) -> bool:
        element.click()
        return True

    WebDriverWait(driver, 60, ignored_exceptions=(ElementClickInterceptedException,)).until(clicked)


def ui_upload(driver, path: Path) -> None:
    """Put the picture at `path` into the Upload tab's image (replacing any picture there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui_tab(driver, "Upload")
    for remove in driver.find_elements(By.CSS_SELECTOR, '#forde-input button[aria-label="Remove Image"]'):
        _click(driver, remove)
    file_input = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#forde-input input[type=file]")
    )
    file_input.send_keys(str(path))
    # The picture is uploaded once the component shows its Remove button.
    WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#forde-input button[aria-label="Remove Image"]')
    )


def ui_draw_one(driver) -> None:
    """Open the Draw tab and draw a vertical stroke (a "1") on the pad with pointer actions."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui_tab(driver, "Draw")
    canvas = WebDriverWait(driver, 30).until(
        lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#forde-draw canvas") if c.is_displayed()]
    )[0]
    strokes = ActionChains(driver).move_to_element_with_offset(canvas, 0, -100).click_and_hold()
    for _ in range(4):
        strokes = strokes.move_by_offset(0, 50)
    strokes.release().perform()


def ui_texts(driver) -> dict[str, str]:
    """The text of the page's answer fields, by elem_id without the `forde-` prefix."""
    from selenium.webdriver.common.by import By

    names = ("label", "message", "abstain", "uncertainty", "votes")
    return {name: driver.find_element(By.ID, f"forde-{name}").text.strip() for name in names}


def ui_predict(driver, done, timeout: float = 120) -> dict[str, str]:
    """Press Predict and wait until `done(texts)` holds for `ui_texts`; returns those texts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _click(driver, driver.find_element(By.ID, "forde-submit"))
    WebDriverWait(driver, timeout).until(lambda d: done(ui_texts(d)))
    return ui_texts(driver)


PICTURE_CLASSES = ("disc", "square", "triangle")


def draw_picture(shape: str, width: int, height: int, rng):
    """A PIL RGB picture of one coloured `shape` (disc, square, triangle) on a noisy background."""
    from PIL import Image, ImageDraw

    background = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(background)
    draw = ImageDraw.Draw(picture)
    side = min(width, height) * rng.uniform(0.5, 0.8)
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = [left, top, left + side, top + side]
    colour = {"disc": (230, 60, 40), "square": (40, 200, 60), "triangle": (60, 90, 240)}[shape]
    colour = tuple(int(c + rng.integers(-20, 21)) for c in colour)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left, top + side), (left + side, top + side), (left + side / 2, top)], fill=colour)
    return picture


def write_image_folder(root, counts=None, seed: int = 0, formats=("png", "jpg", "bmp", "webp")):
    """An image folder in torchvision's ImageFolder layout: root/<split>/<class>/NNN.<format>, drawn
    shapes at varied sizes and aspect ratios, formats taken in turn. `counts` maps split -> pictures
    per class (default: 12 train, 4 test; no val/)."""
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 12, "test": 4}
    for split, count in counts.items():
        for shape in PICTURE_CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                width, height = int(rng.integers(14, 48)), int(rng.integers(14, 48))
                suffix = formats[i % len(formats)]
                draw_picture(shape, width, height, rng).save(folder / f"{i:03d}.{suffix}")
    return root
