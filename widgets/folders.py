"""Where file dialogs start: the folder the user most likely wants, and the last one used for each kind of file."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QFileDialog, QWidget


def start_folder(*candidates: str | os.PathLike | None) -> str:
    """The first candidate that is an existing folder (a file stands for its folder); else the home folder.

    Never the process's working folder: a desktop app is started from wherever its launcher was, which
    says nothing about where the user's files are.
    """
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_file():
            path = path.parent
        if path.is_absolute() and path.is_dir():
            return str(path)
    return str(Path.home())


def remembered_folder(key: str) -> str | None:
    """The folder last used for this kind of file, in this session or an earlier one (QSettings key)."""
    value = QSettings().value(key, "")
    return str(value) if value else None


def remember_folder(key: str, path: str | os.PathLike) -> None:
    """Remember the folder of a chosen file (or the chosen folder itself) for the next dialog of its kind."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    QSettings().setValue(key, str(folder.resolve()))


def folder_dialog(parent: QWidget, title: str, start: str) -> QFileDialog:
    """A dialog that picks a folder, not yet shown: its directory() says where it will open."""
    dialog = QFileDialog(parent, title, start)
    dialog.setFileMode(QFileDialog.FileMode.Directory)
    dialog.setOption(QFileDialog.Option.ShowDirsOnly, True)
    return dialog


def open_file_dialog(parent: QWidget, title: str, start: str, name_filter: str) -> QFileDialog:
    """A dialog that picks one existing file, not yet shown: its directory() says where it will open."""
    dialog = QFileDialog(parent, title, start, name_filter)
    dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
    return dialog


def chosen_path(dialog: QFileDialog) -> str | None:
    """Show the dialog (modal) and return what the user chose, or None when cancelled. The dialog is deleted
    afterwards, on the GUI thread (widgets/lifetime.py says why): make a new one for each question."""
    try:
        if dialog.exec() != QFileDialog.DialogCode.Accepted:
            return None
        files = dialog.selectedFiles()
        return files[0] if files else None
    finally:
        dialog.deleteLater()
