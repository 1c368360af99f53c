"""`forde serve` as an operator meets it: a real server process, its children, its port and its log."""

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from helpers import FORDE, start_server, stop_server

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found += map(int, children)
            queue += map(int, children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_forde_serve_stops_every_child_and_frees_the_port(signum):
    process, url = start_server(command=[FORDE, "serve"])
    try:
        children = _descendants(process.pid)
        assert children, "expected BentoML's worker process below forde serve"
        assert httpx.post(f"{url}/metadata", json={}, timeout=30).status_code == 200
        os.kill(process.pid, signum)  # the one process a supervisor knows about, not its group
        assert process.wait(timeout=60) in (0, -signum, 128 + signum)
        deadline = time.monotonic() + 30
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "children outlived forde serve"
        port = int(url.rsplit(":", 1)[1])
        assert _port_is_free(port)
    finally:
        stop_server(process)


def test_caller_mistakes_are_logged_on_one_line():
    process, url = start_server(command=[FORDE, "serve"])
    try:
        for body in ({"inputs": [{"input": [[0] * 8] * 8}]}, {"inputs": []}, {"inputs": [{"input": 1, "x": 2}]}):
            assert httpx.post(f"{url}/predict", json=body, timeout=30).status_code == 400
        files = {"image": ("x.png", b"not a picture", "image/png")}
        assert httpx.post(f"{url}/predict_image", files=files, timeout=30).status_code == 400
        text = {"content-type": "text/plain"}  # refused before BentoML parses it
        assert httpx.post(f"{url}/predict", content=b"{}", headers=text, timeout=30).status_code == 415
        time.sleep(1)  # let the worker flush its log
        log = process.log.read_text()
        refused = [line for line in log.splitlines() if "Refused" in line]
        assert len(refused) == 5, log[-3000:]
        assert "Traceback" not in log and "Exception on" not in log, log[-3000:]
        assert "inputs[0].input: expected shape [1, 8, 8], got [8, 8]" in refused[0]
    finally:
        stop_server(process)
