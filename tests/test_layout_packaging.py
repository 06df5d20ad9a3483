"""The repository root is on sys.path under ``python -m pytest`` and in a checkout: a top-level package there
shadows any installed distribution of that name (a top-level ``kernels/`` hid the PyPI ``kernels`` that
transformers >= 5.25 imports). Everything importable lives under ``moecompress/``."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_moecompress_is_a_top_level_package():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("__init__.py") if ".venv" not in p.parts]
    else:
        files = tracked.stdout.split()
    top = {f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/__init__.py")}
    assert top == {"moecompress"}, f"top-level packages besides moecompress shadow installed ones: {top}"


def test_every_subpackage_is_declared_for_a_wheel():
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "moecompress").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk - declared == set(), f"subpackages a wheel would miss: {sorted(on_disk - declared)}"


def test_transformers_imports_with_the_repo_on_sys_path():
    code = "import sys; sys.path.insert(0, %r); import transformers.modeling_utils" % str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
