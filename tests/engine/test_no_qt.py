"""The engine runs where Qt is not installed: importing all of it loads no Qt module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QT = ("PySide6", "PyQt5", "PyQt6", "shiboken6", "pyqtgraph", "qtpy")


def test_importing_every_engine_module_loads_no_qt():
    modules = sorted(p.stem for p in (ROOT / "engine").glob("*.py") if p.stem != "__main__")
    code = (
        "import sys\n"
        + "".join(f"import engine.{m}\n" for m in modules)
        + f"bad = [m for m in sys.modules if m.split('.')[0] in {QT!r}]\nprint(bad)\nsys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(modules) >= 10


def test_no_engine_source_names_a_qt_package():
    for path in (ROOT / "engine").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in QT:
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path} imports {name}"
