"""A screenshot of the main window during a real run of the default project, for the README (make screenshot)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0] if argv else "docs/main_window.png").resolve()
    from PySide6.QtCore import QCoreApplication, QEvent, QSettings
    from PySide6.QtWidgets import QApplication

    from app.launch import application

    with tempfile.TemporaryDirectory() as tmp:
        # A private copy of the default project, so its runs and the window's settings stay out of the repo.
        QApplication.setOrganizationName("ModelWorkbenchScreenshot")
        QApplication.setApplicationName("ModelWorkbenchScreenshot")
        QSettings.setDefaultFormat(QSettings.Format.IniFormat)
        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tmp)
        app = application()
        from app.main_window import MainWindow
        from engine.config import load_project

        cfg = load_project(REPO / "examples" / "default.json")
        project = Path(tmp) / "default.json"
        shutil.copy(REPO / "examples" / "default.json", project)
        window = MainWindow()
        window.open_project(str(project))
        window.state.set("data.path", str(cfg.resolve(cfg.data.path)))
        if cfg.train.phases:  # into the last phase, so the plots show the phase boundary and both phases
            epochs_shown = sum(p.epochs for p in cfg.train.phases[:-1]) + 0.6
        else:
            window.state.set("train.epochs", 2)
            epochs_shown = 1.6
        window.save_project()
        window.resize(1280, 800)
        window.show()
        started: list[Any] = []
        window.controller.run_started.connect(started.append)
        window.train()
        # Wait until every plot has something to show: over half an epoch of the last phase, or of the second epoch.
        deadline = time.monotonic() + 15 * 60
        while time.monotonic() < deadline and (
            not started or (window.controller.current_step() or 0) < epochs_shown * started[0]["batches_per_epoch"]
        ):
            app.processEvents()
            time.sleep(0.02)
        for _ in range(50):
            app.processEvents()
            time.sleep(0.02)
        target.parent.mkdir(parents=True, exist_ok=True)
        window.grab().save(str(target))
        window.controller.stop()
        window.controller.wait(120000)
        window.state._set_dirty(False)
        window.close()
        # Deleted here on the GUI thread, not by a later garbage collection on another (widgets/lifetime.py).
        window.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
