"""A non-editable install works: the wheel `pip install .` would install holds every product module, and each
imports from the wheel alone (no module importing something the wheel leaves out, such as the benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("engine", "app", "widgets")

IMPORT_ALL = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
failed = []
for name in sys.argv[2:]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    if not module.__file__.startswith(sys.argv[1]):
        failed.append(f"{name}: imported from {module.__file__}, not the wheel")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_the_wheel_holds_every_product_module_and_each_imports_from_it(tmp_path):
    # Built from a copy of what the sdist holds, so setuptools' build/ and egg-info stay out of the source tree;
    # --no-build-isolation: the venv's setuptools builds it, nothing is downloaded.
    source = tmp_path / "source"
    for package in PRODUCT:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("main.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("model_workbench-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)

    in_tree = sorted(p.relative_to(ROOT) for package in PRODUCT for p in (ROOT / package).rglob("*.py"))
    in_wheel = sorted(p.relative_to(site) for package in PRODUCT for p in (site / package).rglob("*.py"))
    assert in_wheel == in_tree
    assert (site / "main.py").is_file()
    assert not (site / "bench").exists() and not (site / "tests").exists()  # tools stay outside the package

    modules = [".".join(p.with_suffix("").parts).removesuffix(".__init__") for p in in_wheel if p.name != "__main__.py"]
    # From an empty folder, so the source tree is not importable by accident; offscreen for the Qt modules.
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(site), "main", *modules],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
