"""Schema-driven fuzzing: schemathesis 4 reads the service's own OpenAPI spec (GET /docs.json) and throws
generated requests, valid and invalid, at every operation of a real `forde serve`. Every answer must be a
4xx or a 200, declared for its operation, of the declared media type and matching the declared schema."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FORDE, start_server, stop_server

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"
EXAMPLES = 25  # cases per operation and phase: the whole test takes about a minute on 2 cores


def test_schemathesis_finds_nothing(tmp_path):
    process, url = start_server(command=[FORDE, "serve"])
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{url}/docs.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                "0",
                "--workers",
                "1",
                "--report-dir",
                str(tmp_path),
            ],
            cwd=tmp_path,  # schemathesis keeps a .schemathesis/ folder where it runs
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        # 6 APIs (predict, explain, predict_image, metadata, feedback, monitor), GET /monitor, BentoML's 4 GETs
        assert "Tested: 11" in result.stdout, result.stdout[-3000:]
        log = process.log.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        stop_server(process)
