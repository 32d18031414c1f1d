"""The main window: the project's panels in docks and tabs, the menus, and the wiring to the training controller."""

from __future__ import annotations

import gc
import hashlib
import html
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Slot
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence, QTextCursor
from PySide6.QtWidgets import (
    QDialog,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.training import TrainingController
from engine.config import ConfigError, Problem, ProjectConfig, load_project, run_epochs
from engine.events import progress_kind
from engine.run_files import PROJECT_FILE, is_completed, is_run_dir, last_written, project_runs
from engine.text import readable
from widgets.folders import start_folder
from widgets.lifetime import collect_on_gui_thread, delete_on_close, forget_when_destroyed
from widgets.state import ProjectState
from widgets.tasks import Task, hold_new_tasks, run_task, start_held_tasks

if TYPE_CHECKING:
    from widgets.backbone_panel import BackbonePanel
    from widgets.codegen_dialog import CodegenDialog
    from widgets.export_dialog import ExportDialog
    from widgets.sweep_dialog import SweepDialog

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_RECENT = 10

OBJECT_NAMES = {
    "main.window": "the main window",
    "main.tabs": "the central tabs: Run, Evaluation, Try it, Runs",
    "main.setup_tabs": "the setup tabs: Dataset, Backbone, Layers, Training",
    "main.setup_dock": "dock holding the setup tabs",
    "main.scroll.dataset": "scroll area around the dataset panel",
    "main.scroll.backbone": "scroll area around the backbone panel",
    "backbone.loading": "shown in the Backbone tab while the app starts: PyTorch, torchvision and timm load in "
    "the background, then the catalog replaces it",
    "main.scroll.layers": "scroll area around the layers panel",
    "main.scroll.training": "scroll area around the training panel",
    "main.scroll.evaluation": "scroll area around the evaluation panel",
    "main.scroll.try_it": "scroll area around the Try it panel",
    "main.checkpoints_dock": "dock holding the run's checkpoints",
    "main.log_dock": "dock holding the log",
    "log.view": "the log: messages from the app, the data scan and the trainer",
    "log.clear": "clears the log",
    "action.new": "File > New project (Ctrl+N)",
    "action.open": "File > Open project... (Ctrl+O)",
    "action.save": "File > Save project (Ctrl+S)",
    "action.save_as": "File > Save project as... (Ctrl+Shift+S)",
    "action.open_sample": "File > Open sample dataset (the bundled digits)",
    "action.open_run": "File > Open run folder... (its curves and checkpoints)",
    "action.export": "File > Export model... (Ctrl+E)",
    "action.codegen": "File > Export as PyTorch script...: the project as a plain train.py",
    "action.quit": "File > Quit (Ctrl+Q)",
    "menu.recent_projects": "File > Recent projects",
    "action.train": "Run > Train (F5, Ctrl+R)",
    "action.train_from_weights": "Run > Train from the current weights (a new run initialised from them)",
    "action.stop": "Run > Stop (Shift+F5, Ctrl+.)",
    "action.resume": "Run > Resume the current run from its last checkpoint",
    "action.evaluate": "Run > Evaluate the current model (Ctrl+Shift+E)",
    "action.check": "Run > Check project: list every problem before training",
    "action.sweep": "Run > Sweep...: search project fields with an Optuna study, trials as run folders",
    "action.reset_layout": "View > Reset layout",
    "main.stop_confirm": "asks before closing the window while a training run or a sweep is going: stop it and "
    "close, or keep it running",
    "action.about": "Help > About",
}


def default_project() -> Path:
    return REPO / "examples" / "default.json"


def settle_heap() -> None:
    """Take what start-up created (PyTorch, torchvision, timm, the catalog) out of the garbage collector's scans.

    A full collection walks every tracked object: with those loaded, some 440,000 objects and about 200 ms with
    the GIL held, which froze the window whenever one fell during a run. Frozen objects are never scanned
    again; what runs create later is collected as usual. Only the app's own start-up does this
    (MainWindow(settle=True)).
    """
    gc.collect()
    gc.freeze()


def _load_catalog() -> int:
    """On a worker thread: import what the backbone catalog needs (PyTorch, torchvision, timm) and list it once."""
    from engine.catalog import list_backbones

    return len(list_backbones())


class MainWindow(QMainWindow):
    """Model Workbench's window. One ProjectState and one TrainingController; panels bind to the state."""

    def __init__(
        self,
        state: ProjectState | None = None,
        controller: TrainingController | None = None,
        *,
        background_catalog: bool = False,
        settle: bool = False,
    ):
        """background_catalog: show the window first and build the Backbone tab once PyTorch, torchvision and
        timm are imported on a worker thread (the catalog needs them; they take seconds to import). The app
        starts this way; tests and embedders get every panel at once.

        settle: once the catalog is there, take start-up's objects out of the garbage collector's scans
        (settle_heap). The app does; a process that builds many windows (the tests) should not."""
        super().__init__()
        # Cyclic garbage is collected on this thread only while the window lives (widgets/lifetime.py): a
        # collection on a worker thread that deletes widgets deadlocks with the GUI thread.
        self._gc_timer = collect_on_gui_thread(self)
        if background_catalog:
            # Background work starts from the event loop, once the window is on screen (_start_loading_catalog):
            # a worker thread importing PyTorch competes for the GIL with the GUI thread building the window.
            hold_new_tasks()
        from widgets.checkpoints_panel import CheckpointsPanel
        from widgets.dataset_panel import DatasetPanel
        from widgets.evaluation_panel import EvaluationPanel
        from widgets.layers_panel import LayersPanel
        from widgets.log_tabs import LogTabs
        from widgets.run_view import RunView
        from widgets.runs_view import RunsView
        from widgets.training_panel import TrainingPanel
        from widgets.try_it import TryItPanel

        self.setObjectName("main.window")
        self._busy: set[str] = set()  # work other than a run that holds the machine (see set_busy)
        self.state = state or ProjectState(parent=self)
        self.controller = controller or TrainingController(self)
        self.current_checkpoint: str | None = None
        self.current_run_dir: str | None = None
        self.last_error_box: QMessageBox | None = None
        self.export_dialog: ExportDialog | None = None
        self.codegen_dialog: CodegenDialog | None = None
        self.sweep_dialog: SweepDialog | None = None
        self._closing = False
        self._num_outputs: int | None = None

        self.dataset = DatasetPanel(self.state)
        self.backbone: BackbonePanel | None = None  # once the catalog is loaded
        self._catalog_task: Task | None = None
        self.layers = LayersPanel(self.state)
        self.training = TrainingPanel(self.state)
        self.run_view = RunView()
        self.checkpoints = CheckpointsPanel()
        self.evaluation = EvaluationPanel()
        self.try_it = TryItPanel()
        self.runs_view = RunsView()

        self.setup_tabs = QTabWidget()
        self.setup_tabs.setObjectName("main.setup_tabs")
        self.setup_tabs.setDocumentMode(True)
        panel: QWidget | None
        for panel, title in (
            (self.dataset, "Dataset"),
            (self.backbone, "Backbone"),
            (self.layers, "Layers"),
            (self.training, "Training"),
        ):
            if panel is None:
                panel = QLabel("Loading the backbone catalog (PyTorch, torchvision and timm)…")
                panel.setObjectName("backbone.loading")
                panel.setAlignment(Qt.AlignmentFlag.AlignCenter)
                panel.setWordWrap(True)
            self.setup_tabs.addTab(self._scrolled(panel, title.lower()), title)

        self.tabs = QTabWidget()
        self.tabs.setObjectName("main.tabs")
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.run_view, "Run")
        self.tabs.addTab(self._scrolled(self.evaluation, "evaluation"), "Evaluation")
        self.tabs.addTab(self._scrolled(self.try_it, "try_it"), "Try it")
        self.tabs.addTab(self.runs_view, "Runs")
        self.setCentralWidget(self.tabs)

        self._open_progress: str | None = None  # the kind of progress line the Log tab ends with, still going
        self.log_view = QPlainTextEdit()
        self.log_view.setObjectName("log.view")
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        clear = QPushButton("Clear")
        clear.setObjectName("log.clear")
        clear.clicked.connect(self.log_view.clear)
        log_box = QWidget()
        log_layout = QVBoxLayout(log_box)
        log_layout.setContentsMargins(4, 4, 4, 4)
        log_layout.addWidget(self.log_view)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(clear)
        log_layout.addLayout(row)

        self.setup_dock = self._dock("Setup", "main.setup_dock", self.setup_tabs, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.checkpoints_dock = self._dock(
            "Checkpoints", "main.checkpoints_dock", self.checkpoints, Qt.DockWidgetArea.BottomDockWidgetArea
        )
        self.log_tabs = LogTabs(log_box)
        self.log_dock = self._dock("Log", "main.log_dock", self.log_tabs, Qt.DockWidgetArea.BottomDockWidgetArea)
        # The setup dock keeps the window's full height; checkpoints and log share a tabbed dock under the plots.
        self.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.tabifyDockWidget(self.checkpoints_dock, self.log_dock)
        self.checkpoints_dock.raise_()
        self._default_layout = self.saveState()

        self._settle = settle
        if background_catalog:
            self.state.catalog_checks = False
            QTimer.singleShot(0, self._start_loading_catalog)
        else:
            self._on_catalog_loaded(None)
        self._build_actions()
        self._build_menus()
        self._connect()
        self._update_dialog_folders()
        self.setAcceptDrops(True)
        self.resize(1280, 800)
        self._restore_layout()
        self._update_title()
        self._update_actions()
        self.statusBar().showMessage("Ready", 3000)

    # -- construction --------------------------------------------------------------------------
    def _start_loading_catalog(self) -> None:
        start_held_tasks()
        if not self._closing:
            self._catalog_task = run_task(
                "backbone catalog",
                _load_catalog,
                on_result=self._on_catalog_loaded,
                on_error=self._on_catalog_failed,
                parent=self,
            )

    def _on_catalog_loaded(self, _result: object) -> None:
        """Build the Backbone tab (its catalog lists every torchvision and timm model)."""
        from widgets.backbone_panel import BackbonePanel

        self._catalog_task = None
        if self._closing:
            return
        if not self.state.catalog_checks:  # the project opened meanwhile was checked without the catalog
            self.state.catalog_checks = True
            problems = self.state.problems(check_paths=False)
            if problems:
                self.show_error("Project problems", "\n".join(f"• {p}" for p in problems))
        self.backbone = BackbonePanel(self.state)
        scroll = self.findChild(QScrollArea, "main.scroll.backbone")
        assert scroll is not None  # made with the tabs
        scroll.setWidget(self.backbone)  # the loading label is deleted
        self.training.refresh_devices()  # PyTorch is loaded now: say which devices this machine has
        if self._settle:
            settle_heap()

    def _on_catalog_failed(self, exc: BaseException, tb: str) -> None:
        self._catalog_task = None
        self.log(tb)
        label = self.findChild(QLabel, "backbone.loading")
        if label is not None:
            label.setText(
                f"The backbone catalog could not be loaded: {type(exc).__name__}: {exc}\n"
                "The other panels work; see the log for details."
            )

    @staticmethod
    def _scrolled(panel: QWidget, name: str) -> QScrollArea:
        """A panel in a scroll area, so a small screen or a short dock never squeezes it below its minimum."""
        scroll = QScrollArea()
        scroll.setObjectName(f"main.scroll.{name}")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(panel)
        return scroll

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
            | QDockWidget.DockWidgetFeature.DockWidgetClosable
        )
        self.addDockWidget(area, dock)
        return dock

    def _action(self, name: str, text: str, slot, shortcuts=(), tip: str = "") -> QAction:
        action = QAction(text, self)
        action.setObjectName(name)
        if shortcuts:
            action.setShortcuts([QKeySequence(s) for s in shortcuts])
        action.setStatusTip(tip or OBJECT_NAMES.get(name, ""))
        action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        K = QKeySequence.StandardKey
        self.act_new = self._action("action.new", "&New project", self.new_project, [K.New])
        self.act_open = self._action("action.open", "&Open project...", self._on_open_triggered, [K.Open])
        self.act_save = self._action("action.save", "&Save project", self.save_project, [K.Save])
        self.act_save_as = self._action(
            "action.save_as", "Save project &as...", self._on_save_as_triggered, ["Ctrl+Shift+S"]
        )
        self.act_open_sample = self._action(
            "action.open_sample", "Open sample &dataset (digits)", self.dataset.open_sample
        )
        self.act_open_run = self._action("action.open_run", "Open &run folder...", self._on_open_run_triggered)
        self.act_export = self._action("action.export", "&Export model...", self.open_export_dialog, ["Ctrl+E"])
        self.act_codegen = self._action("action.codegen", "Export as PyTorch &script...", self.open_codegen_dialog)
        self.act_quit = self._action("action.quit", "&Quit", self.close, [K.Quit, "Ctrl+Q"])
        self.act_train = self._action("action.train", "&Train", self.train, ["F5", "Ctrl+R"])
        self.act_train_from = self._action(
            "action.train_from_weights", "Train from current &weights", self.train_from_current_weights
        )
        self.act_stop = self._action("action.stop", "&Stop", self.stop, ["Shift+F5", "Ctrl+."])
        self.act_resume = self._action("action.resume", "&Resume", self.resume_current_run)
        self.act_evaluate = self._action(
            "action.evaluate", "E&valuate current model", self.evaluate_current, ["Ctrl+Shift+E"]
        )
        self.act_check = self._action("action.check", "&Check project", self.check_project, ["Ctrl+Shift+K"])
        self.act_sweep = self._action("action.sweep", "S&weep...", self.open_sweep_dialog)
        self.act_reset_layout = self._action("action.reset_layout", "Reset &layout", self.reset_layout)
        self.act_about = self._action("action.about", "&About Model Workbench", self._on_about_triggered)

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addActions([self.act_new, self.act_open])
        self.recent_menu = QMenu("Open &recent", self)
        self.recent_menu.setObjectName("menu.recent_projects")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addMenu(self.recent_menu)
        file_menu.addActions([self.act_save, self.act_save_as])
        file_menu.addSeparator()
        file_menu.addActions([self.act_open_sample, self.act_open_run, self.act_export, self.act_codegen])
        file_menu.addSeparator()
        file_menu.addAction(self.act_quit)
        run_menu = bar.addMenu("&Run")
        run_menu.addActions([self.act_train, self.act_train_from, self.act_stop, self.act_resume])
        run_menu.addSeparator()
        run_menu.addActions([self.act_evaluate, self.act_check])
        run_menu.addSeparator()
        run_menu.addAction(self.act_sweep)
        view_menu = bar.addMenu("&View")
        for dock in (self.setup_dock, self.checkpoints_dock, self.log_dock):
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        view_menu.addAction(self.act_reset_layout)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.act_about)

    def _connect(self) -> None:
        s, c = self.state, self.controller
        s.dirty_changed.connect(self._update_title)
        s.file_changed.connect(self._update_title)
        s.file_changed.connect(self._update_dialog_folders)
        s.changed.connect(self._on_state_changed)
        s.refused.connect(self._on_field_refused)

        c.logged.connect(self.log)
        c.logged.connect(self.run_view.on_logged)
        c.launched.connect(self.log_tabs.on_launched)
        c.rank_logged.connect(self.log_tabs.on_rank_logged)
        c.run_started.connect(self.run_view.on_run_started)
        c.run_started.connect(self._on_run_started)
        c.batch_finished.connect(self.run_view.on_batch_finished)
        c.epoch_finished.connect(self.run_view.on_epoch_finished)
        c.epoch_finished.connect(self._on_epoch_finished)
        c.run_finished.connect(self.run_view.on_run_finished)
        c.run_finished.connect(self._on_run_finished)
        c.running_changed.connect(self.run_view.on_running_changed)
        c.running_changed.connect(self.checkpoints.on_running_changed)
        c.running_changed.connect(self.training.on_running_changed)
        self.training.finder_running_changed.connect(lambda busy: self.set_busy("the learning-rate finder", busy))
        c.running_changed.connect(self._update_actions)
        c.errored.connect(self._on_training_errored)

        self.run_view.train_requested.connect(self.train)
        self.run_view.stop_requested.connect(self.stop)
        self.run_view.resume_requested.connect(self.resume_current_run)

        self.dataset.scanned.connect(self._on_dataset_scanned)
        self.dataset.logged.connect(self.log)
        self.checkpoints.restore_requested.connect(self.use_checkpoint)
        self.checkpoints.resume_requested.connect(self.resume_from)
        self.checkpoints.run_opened.connect(self._on_run_opened)
        self.evaluation.logged.connect(self.log)
        # Relabel / exclude on any image the evaluation views show, kept in the project (Dataset > Corrections).
        self.evaluation.browser.make_actions = self._sample_corrections
        self.evaluation.browser.corrections = self.dataset.corrections
        self.dataset.corrections.train_requested.connect(self.train)
        self.runs_view.open_project_requested.connect(self.open_run_project)
        self.runs_view.resume_requested.connect(self._on_runs_resume_requested)
        self.runs_view.logged.connect(self.log)

    def _sample_corrections(self, dialog: QDialog) -> QWidget:
        from widgets.corrections_panel import SampleCorrections

        names = getattr(dialog, "class_names", [])
        return SampleCorrections(self.dataset.corrections, list(names))

    # -- projects ------------------------------------------------------------------------------
    def open_initial_project(self, path: str) -> None:
        """The project the app starts on; a bad file is reported and an empty project is opened instead."""
        if not self.open_project(path):
            self.new_project(ask=False)

    def new_project(self, ask: bool = True) -> bool:
        if ask and not self._may_discard_changes():
            return False
        self._remember_shown_run()
        self.state.replace(ProjectConfig())
        self._show_project_run()
        self.log("New project")
        return True

    def open_project(self, path: str, *, ask: bool = True) -> bool:
        """Open a project file; a bad file is reported (nothing the user had changes)."""
        if ask and not self._may_discard_changes():
            return False
        leaving = self.state.file, self.current_run_dir
        try:
            self.state.open(path)
        except ConfigError as exc:
            self.show_error("Cannot open project", str(exc))
            self._forget_recent(path)
            return False
        self._remember_shown_run(*leaving)
        self._remember_recent(self.state.file)
        self.log(f"Opened project {self.state.file}")
        self._show_project_run()
        return True

    def open_run_project(self, run_dir: str) -> bool:
        """Make a run's project (its project.json, as run: paths absolute) the window's project, unsaved, and show
        the run. Save asks where to keep it, so the run folder's own record is never overwritten."""
        if self.controller.is_running():
            self.show_error("Cannot open a run's project now", "A run is training; stop it or wait for its end.")
            return False
        file = Path(run_dir) / PROJECT_FILE
        if not self._may_discard_changes():
            return False
        try:
            cfg = load_project(file, check_paths=False, check_catalog=self.state.catalog_checks)
        except ConfigError as exc:
            self.show_error("Cannot open the run's project", f"{file}:\n{exc}")
            return False
        self._remember_shown_run()
        self.state.replace(cfg, None, dirty=True)
        self.log(f"Opened the project of run {run_dir}: unsaved, Save asks where to keep it")
        self.checkpoints.open_run_dir(run_dir)
        return True

    @Slot(str)
    def _on_runs_resume_requested(self, checkpoint: str) -> None:
        self.resume_from(checkpoint, None)  # to the epochs its run was started with

    def _show_project_run(self) -> None:
        """Show the project's work as it was left: the run shown when it was last saved or closed, unless the
        project ran again since (from here or the command line); else its newest run; else no run."""
        if self.controller.is_running():
            return  # the live run stays in view; its own project is the one that trains
        cfg = self.state.config
        runs = project_runs(cfg.resolve(cfg.output.dir), cfg.name) if self.state.file else []
        run = runs[-1] if runs else None
        remembered, at = self._shown_run_of(self.state.file)
        if remembered and is_run_dir(remembered) and (run is None or last_written(run) <= at):
            run = Path(remembered)
        if run is None or not self.checkpoints.open_run_dir(run):
            self._set_current_run(None)
            self.run_view.show_no_run()

    @staticmethod
    def _shown_run_key(project_file: str) -> str:
        # One key per project file; a digest, because QSettings keys cannot hold every character of a path.
        return "shown_runs/" + hashlib.sha1(str(Path(project_file).resolve()).encode()).hexdigest()[:20]

    def _shown_run_of(self, project_file: str) -> tuple[str | None, float]:
        """The run folder shown when this project was last saved or left, and when that was."""
        if not project_file:
            return None, 0.0
        value = QSettings().value(self._shown_run_key(project_file))
        try:
            run_dir, at = value
            return str(run_dir), float(at)
        except (TypeError, ValueError):
            return None, 0.0

    def _remember_shown_run(self, project_file: str | None = None, run_dir: str | None = None) -> None:
        """Remember which run the project shows (default: the open project and its current run)."""
        if project_file is None:
            project_file, run_dir = self.state.file, self.current_run_dir
        if project_file and run_dir:
            QSettings().setValue(self._shown_run_key(project_file), [str(run_dir), str(time.time())])

    def save_project(self) -> bool:
        if not self.state.file:
            return self._on_save_as_triggered()
        return self._save_to(self.state.file)

    def save_project_as(self, path: str) -> bool:
        return self._save_to(path)

    def _save_to(self, path: str) -> bool:
        try:
            saved = self.state.save(path)
        except (OSError, ConfigError) as exc:
            self.show_error("Cannot save project", f"{path}: {getattr(exc, 'strerror', None) or exc}")
            return False
        self._remember_recent(str(saved))
        self._remember_shown_run()
        self.statusBar().showMessage(f"Saved {saved}", 4000)
        return True

    @Slot()
    def _on_open_triggered(self) -> None:
        start = str(Path(self.state.file).parent) if self.state.file else str(REPO / "examples")
        path, _ = QFileDialog.getOpenFileName(self, "Open project", start, "Project files (*.json)")
        if path:
            self.open_project(path)

    @Slot()
    def _on_save_as_triggered(self) -> bool:
        # Beside the project, else where the last project was (not the folder the app was started from).
        recent = self.recent_projects()
        start = self.state.file or str(
            Path(start_folder(recent[0] if recent else None)) / f"{self.state.config.name or 'project'}.json"
        )
        path, _ = QFileDialog.getSaveFileName(self, "Save project as", start, "Project files (*.json)")
        if not path:
            return False
        if not path.lower().endswith(".json"):
            path += ".json"
        return self.save_project_as(path)

    def _may_discard_changes(self) -> bool:
        if not self.state.dirty:
            return True
        answer = self._ask_save_changes()
        if answer == QMessageBox.StandardButton.Save:
            return self.save_project()
        return answer == QMessageBox.StandardButton.Discard

    def _ask_save_changes(self) -> QMessageBox.StandardButton:
        name = Path(self.state.file).name if self.state.file else "the new project"
        return QMessageBox.question(
            self,
            "Unsaved changes",
            f"Save the changes to {name}?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Save,
        )

    def recent_projects(self) -> list[str]:
        value = QSettings().value("recent_projects", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else []

    def last_project(self) -> str | None:
        for path in self.recent_projects():
            if Path(path).is_file():
                return path
        return None

    def _remember_recent(self, path: str) -> None:
        if not path:
            return
        items = [path] + [p for p in self.recent_projects() if p != path]
        QSettings().setValue("recent_projects", items[:MAX_RECENT])

    def _forget_recent(self, path: str) -> None:
        resolved = str(Path(path).resolve())
        QSettings().setValue("recent_projects", [p for p in self.recent_projects() if p not in (path, resolved)])

    @Slot()
    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_projects()
        if not recent:
            none = self.recent_menu.addAction("(no recent projects)")
            none.setEnabled(False)
            return
        for i, path in enumerate(recent):
            action = self.recent_menu.addAction(f"&{i + 1} {path}" if i < 9 else path)
            action.setObjectName(f"menu.recent_projects.{i}")
            action.triggered.connect(lambda _checked=False, p=path: self.open_project(p))

    # -- training ------------------------------------------------------------------------------
    def set_busy(self, what: str, busy: bool) -> None:
        """Work other than a run holds the machine (`what` names it, e.g. "the learning-rate finder"): training
        waits for it, so two jobs never compete for the same cores."""
        if busy:
            self._busy.add(what)
        else:
            self._busy.discard(what)
        training = self.controller.is_running()
        self.run_view.train_button.setEnabled(not self._busy and not training)
        self.training.on_running_changed(training or "the sweep" in self._busy)  # the finder waits for a sweep
        self._update_actions()

    def _refuse_busy(self, action: str) -> None:
        what = " and ".join(sorted(self._busy))
        self.show_error(f"{what[:1].upper()}{what[1:]} is running", f"Stop {what} or wait for it to end to {action}.")

    def _ready_to_train(self) -> bool:
        """A project that can start: valid, and saved somewhere so its run folder has a home."""
        if self.controller.is_running():
            self.log("A run is already going.")
            return False
        if self._busy:
            self._refuse_busy("train")
            return False
        problems = self.state.problems(check_paths=True)
        if problems:
            self.show_error("The project cannot train yet", "\n".join(f"• {p}" for p in problems))
            return False
        if not self.state.file:
            self.log("Save the project first: its run folders are created beside the project file.")
            if not self._on_save_as_triggered():
                return False
        return True

    @Slot()
    def train(self) -> bool:
        if not self._ready_to_train():
            return False
        self.run_view_reset()
        return self.controller.start(self.state.snapshot())

    @Slot()
    def train_from_current_weights(self) -> bool:
        """A new run of the project, its model initialised from the current checkpoint's weights."""
        if not self.current_checkpoint:
            self.show_error("No weights to start from", "Train a model or choose a checkpoint first.")
            return False
        if not self._ready_to_train():
            return False
        self.run_view_reset()
        return self.controller.start(self.state.snapshot(), init_from=self.current_checkpoint)

    def run_view_reset(self) -> None:
        self.tabs.setCurrentWidget(self.run_view)

    @Slot()
    def stop(self) -> None:
        self.controller.stop()

    @Slot()
    def resume_current_run(self) -> bool:
        """Continue the current run from its last checkpoint, to the project's epoch count if that is higher."""
        if not self.current_run_dir:
            self.show_error("Nothing to resume", "Open a run folder or select a checkpoint to resume from.")
            return False
        last = Path(self.current_run_dir) / "checkpoints" / "last.pt"
        if not last.is_file():
            self.show_error("Nothing to resume", f"{last} does not exist: this run saved no checkpoint yet.")
            return False
        from engine.runs import read_metrics

        rows = read_metrics(self.current_run_dir)
        done = max((int(r.get("epoch", 0)) for r in rows), default=0)
        wanted = run_epochs(self.state.config)  # a run in phases: the phases' epochs together
        if wanted <= done and is_completed(self.current_run_dir):
            # Said here, before anything starts: the run would refuse, and its refusal read as a failed run.
            where = "the last phase's epochs" if self.state.config.train.phases else "Epochs"
            self.show_error(
                "The run has finished",
                f"{Path(self.current_run_dir).name} trained all its {done} epoch(s). To train it further, raise "
                f"{where} in the Training panel above {done} and press Resume, or choose a checkpoint in the "
                "Checkpoints panel and use Resume from here with a new total.",
            )
            return False
        return self.resume_from(str(last), wanted if wanted > done else None)

    @Slot(str, int)
    def resume_from(self, checkpoint: str, epochs: int | None = None) -> bool:
        if self.controller.is_running():
            self.log("A run is already going.")
            return False
        if self._busy:
            self._refuse_busy("resume")
            return False
        self.run_view_reset()
        return self.controller.resume(checkpoint, epochs)

    @Slot(dict)
    def _on_run_started(self, info: dict) -> None:
        self._set_current_run(info["run_dir"])

    @Slot(dict)
    def _on_epoch_finished(self, metrics: dict) -> None:
        self.checkpoints.refresh()
        last = metrics.get("last_checkpoint")
        if last and Path(last).is_file():
            self._set_current_checkpoint(last, announce=False)

    @Slot(dict)
    def _on_run_finished(self, result: dict) -> None:
        if result.get("run_dir"):
            self._set_current_run(result["run_dir"], pick_checkpoint=True)
        self.checkpoints.refresh()
        self._update_actions()
        if result.get("status") == "completed" and self.current_checkpoint and not self._closing:
            self.evaluation.set_checkpoint(self.current_checkpoint)
            self.evaluation.evaluate()

    @Slot(str)
    def _on_training_errored(self, message: str) -> None:
        if not self._closing:
            self.show_error("Training stopped with an error", message)

    def _set_current_run(self, run_dir: str | None, *, pick_checkpoint: bool = False) -> None:
        self.current_run_dir = run_dir
        self.checkpoints.set_run_dir(run_dir)
        if run_dir is None:
            self._set_current_checkpoint(None, announce=False)
        elif pick_checkpoint:
            # The model to try and export is the run's result: final, else the best so far (an interrupted
            # run), else its last; Resume always continues from last.pt whatever is shown.
            folder = Path(run_dir) / "checkpoints"
            for name in ("final.pt", "best.pt", "last.pt"):
                if (folder / name).is_file():
                    self._set_current_checkpoint(str(folder / name), announce=False)
                    self.checkpoints.select_checkpoint(folder / name)
                    break
        self._update_actions()

    @Slot(str)
    def use_checkpoint(self, path: str) -> None:
        """Make a checkpoint the current model: evaluation, Try it, export and "train from weights" use it."""
        self._set_current_checkpoint(path, announce=True)

    def _set_current_checkpoint(self, path: str | None, *, announce: bool) -> None:
        self.current_checkpoint = path
        self.evaluation.set_checkpoint(path)
        self.try_it.set_checkpoint(path)
        if announce and path:
            self.log(f"Current model: {path}")
        self._update_actions()

    @Slot(str, list)
    def _on_run_opened(self, run_dir: str, rows: list) -> None:
        self._set_current_run(run_dir, pick_checkpoint=True)
        self.run_view.show_history(run_dir, rows)
        self.tabs.setCurrentWidget(self.run_view)
        self.log(f"Opened run {run_dir} ({len(rows)} epoch(s))")

    @Slot()
    def _on_open_run_triggered(self) -> None:
        self.checkpoints.choose_run_dir()

    # -- evaluation, export, checks ------------------------------------------------------------
    @Slot()
    def evaluate_current(self) -> None:
        if not self.current_checkpoint:
            self.show_error("No model to evaluate", "Train a model or choose a checkpoint first.")
            return
        self.evaluation.set_checkpoint(self.current_checkpoint)
        self.tabs.setCurrentIndex(1)
        self.evaluation.evaluate()

    @Slot()
    def open_export_dialog(self):
        from widgets.export_dialog import ExportDialog

        if not self.current_checkpoint:
            self.show_error("No model to export", "Train a model or choose a checkpoint first.")
            return None
        run_dir = Path(self.current_run_dir) if self.current_run_dir else Path(self.current_checkpoint).parent
        dialog = ExportDialog(self.current_checkpoint, self, default_dir=str(run_dir / "exports"))
        dialog.setObjectName("export.dialog")
        delete_on_close(dialog)  # a new one for each export: deleted on the GUI thread when closed
        forget_when_destroyed(self, "export_dialog", dialog)
        dialog.open()
        return dialog

    @Slot()
    def open_codegen_dialog(self):
        """The project as a plain PyTorch training script: a preview to copy, and files to save."""
        from widgets.codegen_dialog import CodegenDialog

        problems = self.state.problems(check_paths=True)
        if problems:
            self.show_error("Project problems", "\n".join(f"• {p}" for p in problems))
            return None
        dialog = CodegenDialog(self.state.config, self, project_file=self.state.file or None)
        delete_on_close(dialog)
        forget_when_destroyed(self, "codegen_dialog", dialog)
        dialog.open()
        return dialog

    @Slot()
    def open_sweep_dialog(self) -> SweepDialog:
        """The Sweep dialog for this project (one at a time, kept while its sweep runs), shown beside the window."""
        from widgets.sweep_dialog import SweepDialog

        if self.sweep_dialog is None:
            self.sweep_dialog = SweepDialog(
                self.state, self, blocks=self.layers.up_to_modules(), busy=self._sweep_refusal
            )
            self.sweep_dialog.logged.connect(self.log)
            self.sweep_dialog.running_changed.connect(self._on_sweep_running)
        self.sweep_dialog.show()
        self.sweep_dialog.raise_()
        return self.sweep_dialog

    def _sweep_refusal(self) -> str | None:
        if self.controller.is_running():
            return "A training run is active in the window: stop it or let it finish before starting a sweep."
        others = sorted(self._busy - {"the sweep"})
        if others:
            return f"{' and '.join(others)} is running: stop it or let it finish before starting a sweep."
        return None

    @Slot(bool)
    def _on_sweep_running(self, running: bool) -> None:
        """A sweep trains: Train, Resume, New and Open wait until it ends (one run at a time on this machine)."""
        self.set_busy("the sweep", running)

    @Slot()
    def check_project(self) -> list[Problem]:
        problems = self.state.problems(check_paths=True)
        if problems:
            self.show_error("Project problems", "\n".join(f"• {p}" for p in problems))
        else:
            self.log("The project's settings are valid. (The data and the model are checked when training starts.)")
            self.statusBar().showMessage("Project settings are valid", 4000)
        return problems

    # -- state and display ---------------------------------------------------------------------
    @Slot(str)
    def _on_state_changed(self, path: str) -> None:
        if path in ("", "name"):
            self._update_title()
        if path in ("", "data.path", "output.dir"):
            self._update_dialog_folders()

    def _update_dialog_folders(self, *_args: object) -> None:
        """Dialogs start where this project's files are: its runs, and its dataset for Try it's images."""
        cfg = self.state.config
        output = cfg.resolve(cfg.output.dir) if self.state.file or Path(cfg.output.dir).is_absolute() else None
        self.checkpoints.set_runs_dir(output)
        self.runs_view.set_project(self.state.file, output)
        data = cfg.resolve(cfg.data.path)
        self.try_it.set_dataset_dir(data if data is None or data.is_dir() else data.parent)

    @Slot(str, str)
    def _on_field_refused(self, path: str, reason: str) -> None:
        self.statusBar().showMessage(reason, 10000)

    @Slot(dict)
    def _on_dataset_scanned(self, info: dict) -> None:
        self._num_outputs = int(info.get("num_classes") or 0) or None
        if self._num_outputs:
            self.layers.set_num_outputs(self._num_outputs)

    @Slot()
    def _update_title(self, *_args) -> None:
        name = self.state.config.name or "untitled"
        where = f" — {self.state.file}" if self.state.file else " — not saved"
        self.setWindowTitle(f"{name}[*]{where} — Model Workbench")
        self.setWindowModified(self.state.dirty)

    @Slot()
    def _update_actions(self, *_args) -> None:
        training = self.controller.is_running()
        busy = training or bool(self._busy)  # a sweep trains too, and the finder: one job at a time on this machine
        sweeping = "the sweep" in self._busy
        has_model = bool(self.current_checkpoint)
        for action in (self.act_new, self.act_open):
            action.setEnabled(not training and not sweeping)
        self.act_train.setEnabled(not busy)
        self.act_train_from.setEnabled(not busy and has_model)
        self.act_stop.setEnabled(training)
        can_resume = bool(self.current_run_dir and (Path(self.current_run_dir) / "checkpoints" / "last.pt").is_file())
        self.act_resume.setEnabled(not busy and can_resume)
        self.run_view.set_can_resume(not busy and can_resume)
        self.act_evaluate.setEnabled(has_model)
        self.act_export.setEnabled(has_model)

    def log(self, message: str) -> None:
        """Lines into the Log tab. A progress line (the data's scan, the feature pass: about one a second) takes
        the place of the one before it of the same work, so a long pass leaves its last line, not a screenful."""
        for line in readable(str(message)).splitlines() or [""]:
            kind = progress_kind(line)
            if kind is not None and kind == self._open_progress:
                cursor = QTextCursor(self.log_view.document().lastBlock())
                cursor.select(QTextCursor.SelectionType.BlockUnderCursor)
                cursor.removeSelectedText()  # the line and the line break before it
            self.log_view.appendPlainText(line)
            # A finished stage ('..., done in 12 s') stays: the next stage (validation after training) starts below.
            self._open_progress = kind if kind is not None and ", done in " not in line else None

    def show_error(self, title: str, message: str) -> QMessageBox:
        """A window-modal message that does not block the event loop (a running trainer keeps reporting)."""
        message = readable(message)  # Qt would drop the undecodable bytes of a file name without a word
        self.log(f"{title}: {message}")
        box = QMessageBox(QMessageBox.Icon.Warning, title, message, QMessageBox.StandardButton.Ok, self)
        box.setObjectName("main.error_box")
        box.setTextFormat(Qt.TextFormat.PlainText)
        box.setWindowModality(Qt.WindowModality.WindowModal)
        delete_on_close(box)  # OK closes it: deleted then, on the GUI thread, not kept until the window goes
        forget_when_destroyed(self, "last_error_box", box)
        box.open()
        return box

    @Slot()
    def _on_about_triggered(self) -> None:
        import torch

        QMessageBox.about(
            self,
            "About Model Workbench",
            (
                "<b>Model Workbench</b><br>Fine-tune a pretrained PyTorch model without writing a training script."
                f"<br><br>PyTorch {html.escape(torch.__version__)}; "
                f"CUDA {'available' if torch.cuda.is_available() else 'not available'}."
            ),
        )

    # -- layout --------------------------------------------------------------------------------
    def _restore_layout(self) -> None:
        settings = QSettings()
        geometry = settings.value("window/geometry")
        layout = settings.value("window/state")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        if isinstance(layout, QByteArray):
            self.restoreState(layout)
        else:
            self._default_sizes()

    def _save_layout(self) -> None:
        settings = QSettings()
        settings.setValue("window/geometry", self.saveGeometry())
        settings.setValue("window/state", self.saveState())

    @Slot()
    def reset_layout(self) -> None:
        self.restoreState(self._default_layout)
        for dock in (self.setup_dock, self.checkpoints_dock, self.log_dock):
            dock.setFloating(False)
            dock.show()
        self._default_sizes()

    def _default_sizes(self) -> None:
        self.resizeDocks([self.setup_dock], [600], Qt.Orientation.Horizontal)
        self.resizeDocks([self.checkpoints_dock], [220], Qt.Orientation.Vertical)

    # -- drag and drop -------------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.open_dropped(paths[0])
            event.acceptProposedAction()

    def open_dropped(self, path: str) -> None:
        """A dropped folder, .csv or .npz is a dataset, a .json a project, an image goes to Try it, a .pt is a model."""
        p = Path(path)
        suffix = p.suffix.lower()
        if p.is_dir() or suffix in (".csv", ".npz"):
            self.setup_tabs.setCurrentIndex(0)
            self.dataset.open_path(str(p))
        elif suffix == ".json":
            self.open_project(str(p))
        elif suffix in IMAGE_SUFFIXES:
            self.tabs.setCurrentIndex(2)
            self.try_it.open_image(str(p))
        elif suffix == ".pt":
            self.use_checkpoint(str(p))
        else:
            self.show_error(
                "Cannot open this",
                f"{path}: expected a dataset folder, .csv, .npz, a project .json, an image or a .pt checkpoint",
            )

    # -- closing -------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        if self.controller.is_running():
            if not self._ask_stop_training():
                event.ignore()
                return
            self._closing = True
            self.log("Stopping the run before closing...")
            self.controller.stop()
            self.controller.wait(10 * 60 * 1000)  # the trainer ends within a batch; a checkpoint write completes
        sweep = self.sweep_dialog
        if sweep is not None and sweep.is_running():
            if not self._ask_stop_sweep():
                event.ignore()
                return
            self._closing = True
            self.log("Stopping the sweep before closing...")
            sweep.stop_and_wait()  # the sweep's own Stop: the running trial ends within a batch, marked stopped
        if not self._may_discard_changes():
            self._closing = False
            event.ignore()
            return
        self._closing = True
        from widgets.tasks import cancel_all

        self.runs_view.shutdown()
        cancel_all(60000)
        self._save_layout()
        self._remember_shown_run()
        event.accept()

    def _ask_stop_training(self) -> bool:
        return self._ask_stop(
            "Training is running",
            "A run is in progress. Stop it and close? The checkpoints written so far are kept, and the run can be "
            "resumed later.",
        )

    def _ask_stop_sweep(self) -> bool:
        assert self.sweep_dialog is not None  # asked only while its sweep runs
        return self._ask_stop(
            "A sweep is running",
            f"The sweep is in progress: {self.sweep_dialog.progress_text()}.\n\nStop it and close? The finished "
            "trials stay in the study with their run folders; running the sweep again continues the study.",
        )

    def _ask_stop(self, title: str, text: str) -> bool:
        """Stop what is training and close? No (the default) keeps the window and the work going."""
        box = QMessageBox(
            QMessageBox.Icon.Question,
            title,
            text,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            self,
        )
        box.setObjectName("main.stop_confirm")
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.setTextFormat(Qt.TextFormat.PlainText)
        try:
            return box.exec() == QMessageBox.StandardButton.Yes
        finally:
            box.deleteLater()
