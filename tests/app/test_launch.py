"""Starting the app: the display check, the xcb library check and its apt line, and the headless fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_the_real_plugin_is_checked_with_ldd():
    plugin = launch.xcb_plugin()
    assert plugin is not None and plugin.name == "libqxcb.so"
    result = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=False)
    assert launch.missing_xcb_libraries() == launch.missing_from_ldd(result.stdout) or set(
        launch.missing_from_ldd(result.stdout)
    ) <= set(launch.missing_xcb_libraries())


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
