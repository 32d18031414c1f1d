"""The "Export as PyTorch script" dialog: a read-only, highlighted preview of train.py, Copy, and Save to a folder."""

from __future__ import annotations

import keyword
import re

from PySide6.QtCore import Qt
from PySide6.QtGui import (
    QColor,
    QFont,
    QFontDatabase,
    QGuiApplication,
    QSyntaxHighlighter,
    QTextCharFormat,
    QTextDocument,
)
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.catalog import BUNDLED
from engine.codegen import CodegenError, ExportedScript, generate, write_files
from engine.config import ProjectConfig
from widgets.folders import chosen_path, folder_dialog, remember_folder, remembered_folder, start_folder
from widgets.look import message_colour, ok_colour

OBJECT_NAMES = {
    "codegen.dialog": "the export-as-script dialog itself",
    "codegen.preview": "the generated train.py, read-only and highlighted",
    "codegen.weights_file": "writes the bundled weights next to the script instead of loading their package",
    "codegen.copy": "copies train.py to the clipboard",
    "codegen.save": "writes train.py, README.md and requirements.txt into a chosen folder",
    "codegen.close": "closes the dialog",
    "codegen.message": "what was written, or why the project cannot be exported",
}
FOLDER_KEY = "folders/codegen"


class PythonHighlighter(QSyntaxHighlighter):
    """Keywords, strings, comments and numbers of Python source, one line at a time (docstrings span lines)."""

    _TOKENS = re.compile(
        r"(?P<comment>#[^\n]*)"
        r"|(?P<string>[rfbu]*(\"\"\"|'''|\"[^\"\n]*\"|'[^'\n]*'))"
        r"|(?P<number>\b\d[\d_]*(\.\d+)?([eE][-+]?\d+)?\b)"
        r"|(?P<word>\b[A-Za-z_][A-Za-z0-9_]*\b)"
    )
    _IN_DOCSTRING = 1

    def __init__(self, document: QTextDocument) -> None:
        super().__init__(document)

        def fmt(colour: str, *, bold: bool = False, italic: bool = False) -> QTextCharFormat:
            f = QTextCharFormat()
            f.setForeground(QColor(colour))
            if bold:
                f.setFontWeight(QFont.Weight.Bold)
            f.setFontItalic(italic)
            return f

        self.formats = {
            "keyword": fmt("#7f3fbf", bold=True),
            "builtin": fmt("#2a6fb0"),
            "string": fmt("#2e8b57"),
            "comment": fmt("#808080", italic=True),
            "number": fmt("#b5651d"),
        }
        self.builtins = {"print", "len", "range", "sorted", "list", "dict", "set", "zip", "sum", "max", "min"}

    def highlightBlock(self, text: str) -> None:  # noqa: N802 - Qt's name
        start = 0
        self.setCurrentBlockState(0)
        if self.previousBlockState() == self._IN_DOCSTRING:
            end = text.find('"""')
            if end < 0:
                self.setFormat(0, len(text), self.formats["string"])
                self.setCurrentBlockState(self._IN_DOCSTRING)
                return
            self.setFormat(0, end + 3, self.formats["string"])
            start = end + 3
        for match in self._TOKENS.finditer(text, start):
            kind = match.lastgroup
            begin, length = match.start(), match.end() - match.start()
            if kind == "string" and match.group("string").lstrip("rfbu") in ('"""', "'''"):
                quote = match.group("string").lstrip("rfbu")
                close = text.find(quote, match.end())
                if close < 0:
                    self.setFormat(begin, len(text) - begin, self.formats["string"])
                    self.setCurrentBlockState(self._IN_DOCSTRING)
                    return
                self.setFormat(begin, close + 3 - begin, self.formats["string"])
                continue
            if kind == "word":
                word = match.group("word")
                if keyword.iskeyword(word):
                    self.setFormat(begin, length, self.formats["keyword"])
                elif word in self.builtins:
                    self.setFormat(begin, length, self.formats["builtin"])
            elif kind is not None:
                self.setFormat(begin, length, self.formats[kind])


class CodegenDialog(QDialog):
    """Shows the script generated from a project; Save writes it (and its README and requirements) to a folder."""

    def __init__(self, cfg: ProjectConfig, parent: QWidget | None = None, *, project_file: str | None = None):
        super().__init__(parent)
        self.setObjectName("codegen.dialog")
        self.setWindowTitle("Export as PyTorch script")
        self.cfg = cfg
        self.project_file = project_file
        self.exported: ExportedScript | None = None
        self.written: list[str] = []

        self.preview = QPlainTextEdit(self)
        self.preview.setObjectName("codegen.preview")
        self.preview.setReadOnly(True)
        self.preview.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.preview.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.highlighter = PythonHighlighter(self.preview.document())

        self.weights_file = QCheckBox("Write the bundled weights next to the script (no package needed)", self)
        self.weights_file.setObjectName("codegen.weights_file")
        self.weights_file.setVisible(cfg.model.weights == BUNDLED)
        self.weights_file.toggled.connect(self._on_weights_file_toggled)

        self.message = QLabel(self)
        self.message.setObjectName("codegen.message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.copy_button = QPushButton("&Copy", self)
        self.copy_button.setObjectName("codegen.copy")
        self.copy_button.clicked.connect(self.copy_script)
        self.save_button = QPushButton("&Save to folder...", self)
        self.save_button.setObjectName("codegen.save")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.close_button = QPushButton("Close", self)
        self.close_button.setObjectName("codegen.close")
        self.close_button.clicked.connect(self.reject)

        buttons = QHBoxLayout()
        buttons.addWidget(self.weights_file)
        buttons.addStretch(1)
        for b in (self.copy_button, self.save_button, self.close_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addWidget(self.preview, 1)
        layout.addWidget(self.message)
        layout.addLayout(buttons)
        self.resize(960, 720)
        self.regenerate()

    def regenerate(self) -> None:
        """Generate the script from the project; a setting that cannot be exported is said in the message."""
        try:
            self.exported = generate(self.cfg, bundled_weights="file" if self.weights_file.isChecked() else "package")
        except CodegenError as exc:
            self.exported = None
            self.preview.setPlainText("")
            self._say(str(exc), ok=False)
        else:
            self.preview.setPlainText(self.exported.script)
            self._say("")
        self.copy_button.setEnabled(self.exported is not None)
        self.save_button.setEnabled(self.exported is not None)

    def _on_weights_file_toggled(self, _checked: bool) -> None:
        self.regenerate()

    def copy_script(self) -> None:
        if self.exported is not None:
            QGuiApplication.clipboard().setText(self.exported.script)
            self._say("train.py copied to the clipboard", ok=True)

    def _on_save_clicked(self) -> None:
        start = start_folder(remembered_folder(FOLDER_KEY), self.project_file)
        chosen = chosen_path(folder_dialog(self, "Folder for train.py", start))
        if chosen:
            self.save_to(chosen)

    def save_to(self, folder: str) -> bool:
        """Write the files into folder (never over an existing train.py); says what happened in the message."""
        if self.exported is None:
            return False
        try:
            written = write_files(self.exported, folder)
        except (CodegenError, OSError) as exc:
            self._say(str(exc), ok=False)
            return False
        remember_folder(FOLDER_KEY, folder)
        self.written = [str(p) for p in written]
        self._say(f"Wrote {', '.join(p.name for p in written)} to {folder}", ok=True)
        return True

    def _say(self, text: str, ok: bool | None = None) -> None:
        self.message.setText(text)
        if ok is None:
            self.message.setStyleSheet("")
            return
        colour = (ok_colour if ok else message_colour)(self.palette())
        self.message.setStyleSheet(f"color: {colour.name()};")
