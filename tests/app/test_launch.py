"""Starting the app: the display check, the xcb library check and its apt line, and the headless fallback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import launch

REPO = Path(__file__).resolve().parents[2]


def test_debian_package_names_follow_the_soname():
    assert launch.debian_package("libxcb-cursor.so.0") == "libxcb-cursor0"
    assert launch.debian_package("libxcb-icccm.so.4") == "libxcb-icccm4"
    assert launch.debian_package("libxkbcommon-x11.so.0") == "libxkbcommon-x11-0"
    assert launch.debian_package("libX11-xcb.so.1") == "libx11-xcb1"
    assert launch.debian_package("libdbus-1.so.3") == "libdbus-1-3"


def test_missing_libraries_are_read_from_ldd_and_named_in_one_apt_line():
    ldd = (
        "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibxcb-cursor.so.0 => not found\n"
        "\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f)\n\tlibxcb-icccm.so.4 => not found\n"
        "\tlibxcb-cursor.so.0 => not found\n"
    )
    missing = launch.missing_from_ldd(ldd)
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4"]
    assert launch.apt_line(missing) == "sudo apt-get install libxcb-cursor0 libxcb-icccm4"


RECORDED = Path(__file__).parent / "ldd"  # this machine's ldd output for the plugin and its XcbQpa library, with
# the two libraries a fresh Ubuntu desktop lacks (libxcb-cursor0, libxcb-icccm4) shown as ldd shows a missing one


def _recorded_ldd(folder: Path, outputs: dict[str, str]) -> Path:
    """An `ldd` that prints the recorded output for the file it is given and notes which files it was asked about."""
    folder.mkdir()
    for name, text in outputs.items():
        (folder / f"{name}.txt").write_text(text)
    script = folder / "ldd"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> "{folder}/asked"\n'
        f'recorded="{folder}/$(basename "$1").txt"\n'
        '[ -f "$recorded" ] || { echo "ldd: $1: nothing recorded" >&2; exit 1; }\n'
        'cat "$recorded"\n'
    )
    script.chmod(0o755)
    return folder


def test_the_plugin_and_its_xcb_library_are_checked_with_ldd_and_the_missing_ones_named_once(tmp_path, monkeypatch):
    plugin = launch.xcb_plugin()
    assert plugin is not None and plugin.name == "libqxcb.so"  # the installed PySide6 has the xcb plugin
    outputs = {p.stem: p.read_text() for p in RECORDED.glob("*.txt")}
    assert sorted(outputs) == ["libQt6XcbQpa.so.6", "libqxcb.so"]
    fake = _recorded_ldd(tmp_path / "missing", outputs)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)

    assert launch.missing_xcb_libraries() == ["libxcb-cursor.so.0", "libxcb-icccm.so.4"]  # in both outputs: once
    assert [Path(line).name for line in (fake / "asked").read_text().split()] == ["libqxcb.so", "libQt6XcbQpa.so.6"]
    problem = launch.display_problem()
    assert problem is not None
    assert "missing libxcb-cursor.so.0, libxcb-icccm.so.4" in problem
    assert problem.endswith("sudo apt-get install libxcb-cursor0 libxcb-icccm4")

    # The same machine once the packages are installed: ldd finds every library, and the window can open.
    installed = r"\1 => /lib/x86_64-linux-gnu/\1 (0x00007f0000000000)"
    found = {name: re.sub(r"(\S+) => not found", installed, text) for name, text in outputs.items()}
    monkeypatch.setenv("PATH", f"{_recorded_ldd(tmp_path / 'found', found)}:{os.environ['PATH']}")
    assert launch.missing_xcb_libraries() == []
    assert launch.display_problem() is None


def test_no_display_is_named(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert "no display" in launch.display_problem()
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert launch.display_problem() is None


def test_without_a_display_main_says_so_and_runs_the_project_headless(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), str(tmp_path / "missing.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert "cannot open a window: no display found" in result.stderr
    assert "headless" in result.stderr
    assert "missing.json" in result.stderr and "does not exist" in result.stderr
    assert result.returncode == 2


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_main_sets_passive_openmp_waiting_before_torch_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, main; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "False"]  # set while PyTorch is still unimported, so libgomp reads it


def test_the_app_deletes_its_closed_window_on_the_gui_thread_before_it_returns(qtbot, tiny_project):
    """run_app itself, in this process: the window is closed as the user closes it, and run_app deletes it on the
    GUI thread before returning, instead of leaving it to a later garbage collection on any thread."""
    import gc
    import threading

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from widgets.tasks import running_tasks

    app = QApplication.instance()
    seen: dict = {"destroyed": [], "closed": False}

    def close_when_ready() -> None:
        shown = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        if not shown or shown[0].backbone is None or running_tasks():
            QTimer.singleShot(20, close_when_ready)
            return
        window = shown[0]
        window.destroyed.connect(
            lambda *_: seen["destroyed"].append(threading.current_thread() is threading.main_thread())
        )
        seen["closed"] = window.close()

    QTimer.singleShot(0, close_when_ready)
    safety = QTimer()  # a failure ends the event loop instead of hanging the test
    safety.setSingleShot(True)
    safety.timeout.connect(app.quit)
    safety.start(120000)
    try:
        assert launch.run_app(str(tiny_project)) == 0
    finally:
        safety.stop()
        gc.unfreeze()  # run_app settles the heap (gc.freeze) as the app does
    assert seen["closed"], "the window was not closed within 120 s"
    assert seen["destroyed"] == [True]


# Paints a progress bar and a plot-sized image with tall vertical lines (each 500 scanlines: Qt hands a fill of 96
# or more to its GUI thread pool), then prints how many of the pool's threads ("Thread (pooled)") the process has.
_POOL_PROBE = r"""
import os, sys
sys.path.insert(0, os.getcwd())
from PySide6.QtGui import QImage, QPainter, QPen, QColor
from PySide6.QtWidgets import QApplication, QProgressBar
if sys.argv[1] == "app":
    from app.launch import application
    app = application()
else:
    app = QApplication(sys.argv[:1])
bar = QProgressBar()
bar.resize(600, 500)
bar.setValue(40)
bar.grab()
image = QImage(600, 600, QImage.Format.Format_ARGB32_Premultiplied)
painter = QPainter(image)
painter.setPen(QPen(QColor("black"), 1))
for x in range(0, 600, 20):
    painter.drawLine(x, 0, x, 500)
painter.end()
names = []
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{tid}/comm") as fh:
        names.append(fh.read().strip())
print(sum(name == "Thread (pooled)" for name in names))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_the_apps_painting_wakes_no_qt_gui_thread_pool():
    """The app's QApplication paints in the GUI thread: no pool thread is started by fills that Qt would otherwise
    hand to its GUI thread pool (they took cores from training, see prefer_serial_painting). The same painting
    with a plain QApplication starts pool threads, so the probe sees them where they exist."""
    env = {k: v for k, v in os.environ.items() if k != "QT_NO_GUI_THREADPOOL"}
    env["QT_QPA_PLATFORM"] = "offscreen"
    counts = {}
    for how in ("app", "plain"):
        out = subprocess.run(
            [sys.executable, "-c", _POOL_PROBE, how], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        counts[how] = int(out.stdout.split()[-1])
    if counts["plain"] == 0:  # this Qt build or machine paints without the pool anyway: nothing to tell apart
        pytest.skip("Qt started no GUI pool thread even for a plain QApplication here")
    assert counts["app"] == 0
