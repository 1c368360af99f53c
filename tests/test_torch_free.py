"""forde_serve never imports torch, and never names training, not even lazily: the torch-side commands
join the `forde` group through entry points."""

import ast
import subprocess
import sys

from helpers import BLOCK_TORCH, ROOT


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, cwd=ROOT)


def test_inference_package_imports_without_torch():
    result = _run("""
import pkgutil, importlib, forde_serve
for info in pkgutil.walk_packages(forde_serve.__path__, 'forde_serve.'):
    importlib.import_module(info.name)
assert 'torch' not in sys.modules
print('ok')
""")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_cli_without_torch_explains_what_to_install():
    result = _run("""
from forde_serve.app.cli import main
sys.argv = ['forde', 'train', 'training/configs/digits.toml']
main()
""")
    assert result.returncode == 2, result.stderr
    assert "needs the training extra" in result.stderr and "forde-serve[train]" in result.stderr
    assert "Traceback" not in result.stderr


def test_forde_help_lists_the_torch_side_commands_without_importing_torch():
    result = _run("""
from forde_serve.app.cli import main
sys.argv = ['forde', '--help']
try:
    main()
except SystemExit as end:
    assert end.code == 0
assert 'torch' not in sys.modules
""")
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "fuse", "evaluate", "score", "serve", "compare"):
        assert f"  {command} " in result.stdout


def _imported_roots(nodes) -> set[str]:
    modules = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in nodes if isinstance(node, ast.ImportFrom)}
    return {m.split(".")[0] for m in modules}


def test_forde_serve_never_names_training_not_even_lazily():
    # The same promise as the import-linter contracts in pyproject.toml (which have no ignores), checked
    # from the source here too: every import statement, at any depth, and every string naming the package.
    for path in sorted((ROOT / "forde_serve").rglob("*.py")):
        text = path.read_text()
        everywhere = _imported_roots(list(ast.walk(ast.parse(text))))
        assert "torch" not in everywhere, path
        assert "training" not in everywhere, f"{path.relative_to(ROOT)} imports training"
        assert 'import_module("training' not in text and '"training.' not in text, path


def test_batch_scoring_runs_without_torch_and_ray_is_optional(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((5, 1, 8, 8), np.float32))
    no_ray = BLOCK_TORCH.replace("('torch', 'torchvision')", "('torch', 'torchvision', 'ray')")
    code = """
from forde_serve.app.cli import main
sys.argv = ['forde', 'score', 'exported/digits.onnx', {x!r}, '--out', {out!r}, '--quiet', *{extra!r}]
try:
    main()
finally:
    assert 'torch' not in sys.modules and 'ray' not in sys.modules
"""

    def score(extra, out):
        return subprocess.run(
            [sys.executable, "-c", no_ray + code.format(x=str(tmp_path / "x.npy"), out=str(out), extra=extra)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    local = score([], tmp_path / "local.parquet")
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "local.parquet").exists()
    ray = score(["--engine", "ray"], tmp_path / "ray.parquet")
    assert ray.returncode == 2
    assert "--engine ray needs Ray, which is not installed: pip install 'forde-serve[ray]'" in ray.stderr
    assert not (tmp_path / "ray.parquet.parts").exists()
