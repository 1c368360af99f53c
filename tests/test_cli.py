"""The `forde` command as a user meets it: help that teaches, one-line errors with exit code 2."""

import ast
import tomllib

import pytest

from forde_serve import __version__
from forde_serve.report import FIGURES

from helpers import MODEL, ROOT, invoke_forde, run_forde


def test_help_explains_every_option():
    text = run_forde("train", "--help").stdout
    for option in ("--out", "--resume", "--method", "--members", "--epochs", "--seed", "--device", "--quiet"):
        assert option in text
    assert "forde train training/configs/digits.toml" in run_forde("--help").stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train"], "missing CONFIG"),
        (["train", "no/such.toml"], "does not exist"),
        (["train", "training/configs/digits.toml", "--members", "0"], "0 is not in the range x>=1"),
        (["train", "training/configs/digits.toml", "--members", "1"], "FoRDE repels members"),
        (["train", "training/configs/digits.toml", "--method", "svgd"], "'svgd' is not one of 'forde', 'de'"),
        (
            ["train", "training/configs/digits.toml", "--resume", "runs/x"],
            "--resume continues a run with its own config",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = invoke_forde(*args)  # in process; test_bad_config_file_is_one_line runs the real console script
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert message in result.stderr


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 0\nmomentum = 1.5\n")
    result = run_forde("train", bad, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "optim.lr" in lines[0] and "optim.momentum" in lines[0]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "python3 -m venv .venv && .venv/bin/pip install -e '.[train,dev]' && .venv/bin/pytest"
    assert f"```bash\n{command}\n```" in readme
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_an_unwritable_out_is_one_line_with_exit_2(tmp_path, tiny_config):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run_forde("train", tiny_config(epochs=1), "--out", tmp_path / "run", "--quiet")
    for args in (
        ["train", "training/configs/digits.toml", "--out", blocker / "run"],
        ["export", tmp_path / "run", "--out", blocker / "m.onnx"],
    ):
        result = run_forde(*args, check=False)
        assert result.returncode == 2, result.stderr
        assert str(blocker) in result.stderr and "Traceback" not in result.stderr


def test_forde_serve_on_a_port_in_use_is_one_line_with_exit_2():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_forde("serve", "--port", port, check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--port: {port} on 127.0.0.1 is already in use" in lines[0], result.stderr


def test_outputs_respect_the_umask(tmp_path):
    """Files written atomically get the permissions any new file gets (0666 less the umask), not mkstemp's 0600.
    The commands run in this process (click's runner), under the umask set here."""
    import os
    import stat

    import numpy as np
    from click.testing import CliRunner

    from forde_serve.app.cli import main

    np.save(tmp_path / "x.npy", np.ones((3, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "bad.npy", np.full((2, 1, 8, 8), np.nan, dtype=np.float32))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text('{"accuracy": 0.5, "nll": 1.0}')
    for umask in (0o022, 0o027):
        out = tmp_path / f"umask-{umask:o}"
        previous = os.umask(umask)
        try:
            for args in (
                ["score", MODEL, tmp_path / "x.npy", "--out", out / "s.parquet", "--explain", "--quiet"],
                ["score", MODEL, tmp_path / "bad.npy", "--out", out / "bad.csv", "--quiet"],
                ["compare", tmp_path / "a", tmp_path / "b", "--out", out / "c.md"],
            ):
                result = CliRunner().invoke(main, list(map(str, args)))
                assert result.exit_code in (0, 3), result.output
        finally:
            os.umask(previous)
        written = sorted(p for p in out.rglob("*") if p.is_file())
        assert [p.name for p in written] == ["bad.csv", "bad.errors.csv", "c.md", "s.gradients.npy", "s.parquet"]
        for path in written:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))


def test_compare_without_out_prints_and_writes_nothing(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text('{"accuracy": 0.5, "nll": 1.0}')
    result = run_forde("compare", tmp_path / "a", tmp_path / "b", check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_export_and_evaluate_outputs_respect_the_umask(tmp_path, tiny_config):
    import os
    import stat

    run_forde("train", tiny_config(epochs=1), "--out", tmp_path / "run", "--quiet")

    def umask_027():
        os.umask(0o027)

    run_forde("export", tmp_path / "run", "--out", tmp_path / "out" / "m.onnx", preexec_fn=umask_027)
    run_forde(
        "evaluate",
        tmp_path / "out" / "m.onnx",
        "--out",
        tmp_path / "out" / "report",
        "--gradient-rows",
        "8",
        "--quiet",
        preexec_fn=umask_027,
    )
    written = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert {"m.onnx", "m.explain.onnx", "metrics.json", "report.md"} <= {p.name for p in written}
    assert any(p.suffix == ".png" for p in written)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path.name, oct(path.stat().st_mode))


def test_evaluate_help_and_docs_name_every_figure_the_report_writes():
    # every figure file the report modules name must be one of FIGURES (write_report refuses others)
    named = set()
    for module in ("report.py", "diversity_report.py"):
        tree = ast.parse((ROOT / "forde_serve" / module).read_text())
        named |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".png")
        }
    assert named == set(FIGURES), f"figures the report names but FIGURES does not: {named ^ set(FIGURES)}"
    assert {"diversity_disagreement.png", "diversity_by_size.png", "trajectories_tsne.png"} <= set(FIGURES)
    help_text = run_forde("evaluate", "--help").stdout
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    for figure in FIGURES:
        assert f" {figure} " in help_text, f"forde evaluate --help does not name {figure}"
        assert f"`{figure}`" in docs, f"docs/evaluation.md does not name {figure}"


def test_the_version_is_written_once_and_forde_says_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "forde_serve.__version__"}
    # the installed package's metadata, which `pip install -e .` took from forde_serve.__version__
    assert run_forde("--version").stdout.split() == ["forde,", "version", __version__]
