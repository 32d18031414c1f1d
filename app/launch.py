"""Starting the desktop app: is there a display, can Qt's platform plugin load, and which apt line fixes it if not."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # Qt loads when the window is made, after the display was checked
    from PySide6.QtWidgets import QApplication

# Qt's xcb plugin links these at load time; Qt aborts with a cryptic "could not load the Qt platform plugin"
# when one is missing. Debian/Ubuntu package names follow from the library's soname (see debian_package).
XCB_LIBRARIES = (
    "libxcb-cursor.so.0",
    "libxcb-icccm.so.4",
    "libxcb-keysyms.so.1",
    "libxcb-image.so.0",
    "libxcb-render-util.so.0",
    "libxcb-xkb.so.1",
    "libxkbcommon-x11.so.0",
    "libxcb-randr.so.0",
    "libxcb-shape.so.0",
    "libxcb-xinerama.so.0",
    "libxcb-util.so.1",
    "libxkbcommon.so.0",
    "libX11-xcb.so.1",
    "libfontconfig.so.1",
    "libEGL.so.1",
    "libGL.so.1",
)


def debian_package(soname: str) -> str:
    """The Debian/Ubuntu package that ships a library: libxcb-icccm.so.4 -> libxcb-icccm4, libdbus-1.so.3 -> libdbus-1-3."""
    match = re.match(r"^(lib[^/]+?)\.so\.(\d+)", soname)
    if not match:
        return soname
    base, major = match.group(1).lower(), match.group(2)
    return f"{base}-{major}" if base[-1].isdigit() else f"{base}{major}"


def missing_from_ldd(output: str) -> list[str]:
    """Sonames that `ldd` reports as 'not found', in order, without repeats."""
    missing = []
    for line in output.splitlines():
        match = re.match(r"\s*(\S+)\s+=>\s+not found", line)
        if match and match.group(1) not in missing:
            missing.append(match.group(1))
    return missing


def xcb_plugin() -> Path | None:
    import PySide6

    plugin = Path(PySide6.__file__).parent / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return plugin if plugin.exists() else None


def missing_xcb_libraries() -> list[str]:
    """Libraries Qt's xcb platform plugin needs that this machine lacks (empty when it can load, or off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    plugin = xcb_plugin()
    ldd = shutil.which("ldd")
    if plugin is None or ldd is None:
        return []
    found = []
    for target in (plugin, *sorted(plugin.parents[2].joinpath("lib").glob("libQt6XcbQpa.so*"))[:1]):
        result = subprocess.run([ldd, str(target)], capture_output=True, text=True, check=False)
        found += [name for name in missing_from_ldd(result.stdout) if name not in found]
    return found


def apt_line(sonames: list[str]) -> str:
    return "sudo apt-get install " + " ".join(dict.fromkeys(debian_package(s) for s in sonames))


def display_problem() -> str | None:
    """Why a window cannot open here, in a sentence; None when it can (or another platform was chosen)."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith("xcb"):
        return None  # offscreen, wayland, vnc...: the user chose; Qt reports its own problems
    if not sys.platform.startswith("linux"):
        return None
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return "no display found (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    if os.environ.get("WAYLAND_DISPLAY") and not os.environ.get("DISPLAY"):
        return None  # Qt uses its wayland plugin, which does not need the xcb libraries
    missing = missing_xcb_libraries()
    if missing:
        return (
            "Qt's xcb platform plugin cannot load: missing "
            + ", ".join(missing)
            + ".\nInstall them with:\n    "
            + apt_line(missing)
        )
    return None


def prefer_serial_painting() -> None:
    """QT_NO_GUI_THREADPOOL=1 unless set (Qt reads any value as set); effective only before Qt first paints.

    Qt's raster engine hands every fill of 96 or more scanlines to a pool of one thread per CPU and waits for them:
    a plot's grid line or axis 100 pixels tall, a progress bar's frame. While a run trains on every core, each such
    line wakes the pool's threads, which take a core from the training threads (whose team then waits at its next
    barrier), and the GUI thread waits until they get one. Measured on this project's 2-CPU machine, a run of the
    app-overhead benchmark (6 each way): the pool's two threads woke 6,500-7,700 times; without the pool the
    process made 33,600 voluntary context switches a run instead of 40,000 (the headless run: 33,000), and the GUI
    thread used 0.25 s of CPU instead of 0.28 s (a thin line is cheaper drawn in place than handed over).
    """
    os.environ.setdefault("QT_NO_GUI_THREADPOOL", "1")


def application() -> QApplication:
    """The process's QApplication, made as the app makes it (see prefer_serial_painting); the existing one if any."""
    prefer_serial_painting()
    from PySide6.QtWidgets import QApplication

    return cast("QApplication", QApplication.instance()) or QApplication(sys.argv[:1])


def run_app(project: str | None) -> int:
    """Open the main window on a project (a path, or the last/default project) and run the event loop."""
    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow, default_project

    QApplication.setOrganizationName("ModelWorkbench")
    QApplication.setApplicationName("Model Workbench")
    app = application()
    window = MainWindow(background_catalog=True, settle=True)
    window.open_initial_project(project or window.last_project() or str(default_project()))
    window.show()
    code = app.exec()
    # Closed, the window is deleted here, on the GUI thread; left to the interpreter's last garbage collections,
    # it could be deleted from another thread (widgets/lifetime.py says why that must not happen).
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    return code
