"""The layers panel: the model's module tree with output shapes and parameter counts, and which modules are frozen.

The tree follows the project: after any change to model.* the panel applies engine.freezing.apply_freeze to
the model it built (requires_grad only) and redraws; a tick in the tree writes the project.

How ticks become configuration (exact round trip): the ticked state is a set F of frozen parameters. Two
candidate configs are computed and the one with fewer prefixes wins (ties keep the preset):

* keep the current preset (head_only / up_to / none) with freeze_prefixes = the top-most modules (or single
  parameters) that are wholly in F and cover the frozen parameters the preset leaves trainable, and
  unfreeze_prefixes = the top-most ones wholly outside F that cover the parameters the preset freezes but F
  does not. apply_freeze applies preset, then freeze_prefixes, then unfreeze_prefixes, which gives exactly F.
* freeze "none" with freeze_prefixes = the top-most modules wholly in F that cover F.

The winner is checked with apply_freeze on the built model before it is written; should it not reproduce F
(it always does), the other candidate is used, and failing that the frozen parameters are listed one by one.
Prefixes match by dotted name, as apply_freeze does, so a parameter shared by two modules belongs to the
first module that registered it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QEvent, QModelIndex, QPersistentModelIndex, QPoint, Qt, QTimer
from PySide6.QtGui import QBrush, QFont, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QPushButton,
    QSpinBox,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.config import ConfigError, DataConfig, ModelConfig
from widgets.fields import bind_check
from widgets.look import ERROR_STYLE
from widgets.state import ProjectState
from widgets.tasks import Task, run_task

if TYPE_CHECKING:
    from torch import nn

# PyTorch and the engine's model code are imported where a model is built (a worker thread) or after one was
# built, never while the window starts.

OBJECT_NAMES = {
    "layers.train_all": "preset: every parameter trains (model.freeze = none, no prefixes)",
    "layers.head_only": "preset: only the new classifier head trains (model.freeze = head_only)",
    "layers.up_to": "the module the 'Freeze up to' preset freezes through (top-level and second-level modules)",
    "layers.freeze_up_to": "preset: freeze every module up to and including the chosen one (model.freeze = up_to)",
    "layers.freeze_up_to_here": "tree context menu: freeze every module up to and including this one",
    "layers.depth": "how many levels of the module tree are shown expanded",
    "layers.train_frozen_batchnorm": "whether frozen BatchNorm layers still update their running statistics "
    "(model.train_frozen_batchnorm)",
    "layers.tree": "the model's modules with type, output shape, parameters and trainable parameters; "
    "a ticked module is frozen",
    "layers.totals": "total, trainable and frozen parameter counts",
    "layers.status": "what was built (backbone, input size, outputs) or what is being built",
    "layers.error": "why the freezing settings or the model cannot be applied",
    "layers.note": "settings elsewhere that change what trains (optimizer.backbone_lr_mult = 0)",
}
# The Learning rate column: each module's effective rate from optimizer.lr, backbone_lr_mult, layer_lr_decay and
# lr_mult; double-click a rate (or press F2) and type the rate that module should train at: its lr_mult is set.

COLUMNS = ("Module", "Type", "Output shape", "Parameters", "Trainable", "Learning rate")
MODULE, TYPE, SHAPE, PARAMS, TRAINABLE, LR = range(len(COLUMNS))
NAME_ROLE = Qt.ItemDataRole.UserRole
# A dry forward that fails on the meta device is retried on the CPU only for models up to this size.
CPU_RETRY_MAX_PARAMS = 150_000_000
DEFAULT_DEPTH = 2


# ---------------------------------------------------------------------------------------------
# Off the GUI thread


def build_layers(backbone: str, image_size: int, num_outputs: int) -> dict[str, Any]:
    """The model (without weights) and its layer tree from one dry forward.

    Built on the meta device: no memory, no random init, yet shapes propagate. A builder that needs real
    values (torchvision's RegNets), or a forward the meta device cannot run, falls back to the CPU.
    """
    import torch

    from engine.backbones import build_model
    from engine.freezing import layer_tree

    cfg = ModelConfig(backbone=backbone)
    size = (3, image_size, image_size)
    built = rows = None
    device = "meta"
    try:
        with torch.device("meta"):
            built = build_model(cfg, num_outputs, image_size=image_size)
        rows = layer_tree(built.model, size)
    except NotImplementedError:
        pass  # "Cannot copy out of meta tensor": this builder needs real tensors
    if rows is None or (rows[0].output_shape is None and rows[0].params <= CPU_RETRY_MAX_PARAMS):
        cpu_built = build_model(cfg, num_outputs, image_size=image_size)
        cpu_rows = layer_tree(cpu_built.model, size)
        if rows is None or cpu_rows[0].output_shape is not None:
            built, rows, device = cpu_built, cpu_rows, "cpu"
    assert built is not None and rows is not None  # the CPU build fills in whatever the meta one left out
    return {
        "model": built.model,
        "head_name": built.head_name,
        "device": device,
        "rows": [dataclasses.asdict(r) for r in rows],
        "backbone": backbone,
        "image_size": image_size,
        "num_outputs": num_outputs,
    }


def build_project_layers(model_cfg: ModelConfig, data_cfg: DataConfig, num_outputs: int) -> dict[str, Any]:
    """build_layers at the input size the project trains at (the weights' own recipe, else data.image_size)."""
    from engine.backbones import preprocess_for

    try:
        size = preprocess_for(model_cfg, data_cfg).crop_size
    except Exception:  # noqa: BLE001 - unknown weights: the shapes do not depend on them anyway
        size = data_cfg.image_size
    return build_layers(model_cfg.backbone, int(size), num_outputs)


# ---------------------------------------------------------------------------------------------
# Ticks <-> configuration


class ParamIndex:
    """Which parameters (by name, as apply_freeze matches them) each module holds."""

    def __init__(self, model: nn.Module):
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.numel = [p.numel() for p in self.params]
        self.modules = [n for n, _ in model.named_modules()]
        known = set(self.modules)
        self.children: dict[str, list[str]] = {m: [] for m in self.modules}
        for m in self.modules[1:]:
            parent = m.rpartition(".")[0]
            self.children[parent if parent in known else ""].append(m)
        self.direct: dict[str, list[int]] = {m: [] for m in self.modules}
        self.of: dict[str, list[int]] = {m: [] for m in self.modules}  # the module's parameters, recursively
        for i, name in enumerate(self.names):
            parts = name.split(".")
            owner = ".".join(parts[:-1])
            self.direct.setdefault(owner, []).append(i)
            for k in range(len(parts)):
                prefix = ".".join(parts[:k])
                if prefix in self.of:
                    self.of[prefix].append(i)

    def frozen(self) -> set[int]:
        return {i for i, p in enumerate(self.params) if not p.requires_grad}

    def cover(self, target: set[int], allowed: set[int]) -> list[str]:
        """Top-most module (or parameter) names whose parameters all lie in `allowed`, covering `target`."""
        out: list[str] = []

        def visit(module: str) -> None:
            held = self.of.get(module, [])
            if not any(i in target for i in held):
                return
            if module and all(i in allowed for i in held):
                out.append(module)
                return
            out.extend(self.names[i] for i in self.direct.get(module, []) if i in target)
            for child in self.children.get(module, []):
                visit(child)

        visit("")
        return out


def _apply(model: nn.Module, model_cfg: ModelConfig, head_name: str, index: ParamIndex) -> set[int] | None:
    from engine.freezing import apply_freeze

    try:
        apply_freeze(model, model_cfg, head_name)
    except ConfigError:
        return None
    return index.frozen()


def freeze_fields(
    model: nn.Module, head_name: str, current: ModelConfig, frozen: set[int], index: ParamIndex
) -> dict[str, Any]:
    """model.* fields that make apply_freeze freeze exactly `frozen` (parameter positions); see the module doc."""
    everything = set(range(len(index.names)))
    trainable = everything - frozen
    plain: dict[str, Any] = {
        "model.freeze": "none",
        "model.freeze_up_to": None,
        "model.freeze_prefixes": index.cover(frozen, frozen),
        "model.unfreeze_prefixes": [],
    }
    candidates = [plain]
    if current.freeze != "none":
        preset_cfg = current.model_copy(update={"freeze_prefixes": [], "unfreeze_prefixes": []})
        preset = _apply(model, preset_cfg, head_name, index)
        if preset is not None:
            kept: dict[str, Any] = {
                "model.freeze": current.freeze,
                "model.freeze_up_to": current.freeze_up_to,
                "model.freeze_prefixes": index.cover(frozen - preset, frozen),
                "model.unfreeze_prefixes": index.cover(preset - frozen, trainable),
            }

            def size(fields: dict) -> int:
                return len(fields["model.freeze_prefixes"]) + len(fields["model.unfreeze_prefixes"])

            candidates = [kept, plain] if size(kept) <= size(plain) else [plain, kept]
    for fields in candidates:
        trial = current.model_copy(
            update={
                "freeze": fields["model.freeze"],
                "freeze_up_to": fields["model.freeze_up_to"],
                "freeze_prefixes": list(fields["model.freeze_prefixes"]),
                "unfreeze_prefixes": list(fields["model.unfreeze_prefixes"]),
            }
        )
        if _apply(model, trial, head_name, index) == frozen:
            return fields
    return {
        "model.freeze": "none",
        "model.freeze_up_to": None,
        "model.freeze_prefixes": [index.names[i] for i in sorted(frozen)],
        "model.unfreeze_prefixes": [],
    }


# ---------------------------------------------------------------------------------------------
# The panel


def _shape_text(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else "—"


_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)


class _RateEditing(QStyledItemDelegate):
    """Only a module's Learning rate cell opens an editor (double-click or F2); the other columns are read-only."""

    # Qt takes a null editor as "not editable"; PySide's stub types the return as QWidget only.
    def createEditor(  # type: ignore[override]  # noqa: N802 - Qt's name
        self, parent: QWidget, option: QStyleOptionViewItem, index: QModelIndex | QPersistentModelIndex
    ) -> QWidget | None:
        if index.column() != LR or not index.data(NAME_ROLE) or not index.data(Qt.ItemDataRole.DisplayRole):
            return None
        return super().createEditor(parent, option, index)


def _rate_text(rates: list[float | None], held: list[int], own: float | None) -> tuple[str, str]:
    """A module's Learning rate cell and its tooltip: one rate, the range of its parts' rates, or frozen."""
    if not held:
        return "", ""
    training = [r for r in rates if r is not None]
    mult = f"; optimizer.lr_mult sets ×{own:g} here" if own is not None else ""
    if not training:
        return "frozen", "Every parameter here is frozen" + mult
    low, high = min(training), max(training)
    part = "" if len(training) == len(rates) else f" ({len(rates) - len(training)} frozen tensors)"
    if high <= low * (1 + 1e-9):
        return f"{high:.3g}", f"Trains at {high:.3g}{part}{mult}"
    return f"{low:.3g}–{high:.3g}", f"Its parts train at rates from {low:.3g} to {high:.3g}{part}{mult}"


class ModuleItem(QTreeWidgetItem):
    """One module's row. It answers data() from Python attributes, so a redraw of thousands of rows is a few
    attribute writes and one repaint rather than a dozen Qt calls per row; a tick arrives in setData()."""

    def __init__(self, parent, panel: LayersPanel, name: str, texts: list[str], checkable: bool):
        super().__init__(parent)
        self.panel, self.name, self.texts, self.checkable = panel, name, texts, checkable
        self.check = Qt.CheckState.Unchecked
        self.looks_frozen = False
        self.rate_tip = ""
        self.setFlags(self.flags() | Qt.ItemFlag.ItemIsEditable)  # only the Learning rate column opens an editor

    def data(self, column: int, role: int):
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return self.texts[column]
        if role == Qt.ItemDataRole.CheckStateRole:
            return self.check if column == MODULE and self.checkable else None
        if self.looks_frozen and role == Qt.ItemDataRole.ForegroundRole:
            return self.panel.frozen_brush
        if self.looks_frozen and role == Qt.ItemDataRole.FontRole:
            return self.panel.frozen_font
        if role == Qt.ItemDataRole.TextAlignmentRole and column >= PARAMS:
            return _RIGHT
        if role == Qt.ItemDataRole.ToolTipRole and column == LR:
            return self.rate_tip
        if role == Qt.ItemDataRole.ToolTipRole and column == MODULE:
            return self.name or "the whole model"
        if role == NAME_ROLE:
            return self.name
        return None

    def setData(self, column: int, role: int, value) -> None:
        if role == Qt.ItemDataRole.EditRole and column == LR:
            if str(value) != self.texts[LR]:
                self.panel.set_rate(self.name, str(value))
            return
        if role == Qt.ItemDataRole.CheckStateRole and column == MODULE:
            if self.checkable:  # a click on the box, or setCheckState(): the user's tick
                self.panel.set_frozen(self.name, Qt.CheckState(value) != Qt.CheckState.Unchecked)
            return
        super().setData(column, role, value)


class LayersPanel(QWidget):
    """The built model's modules; tick a module to freeze it, or choose a preset. Writes model.freeze*."""

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._num_outputs = 2
        self._tasks: list[Task] = []
        self._build_id = 0
        self._built_key: tuple | None = None  # (backbone, image size, outputs) of the model shown
        self._wanted_key: tuple | None = None
        self.model: nn.Module | None = None
        self.head_name = ""
        self.index: ParamIndex | None = None
        self.items: dict[str, ModuleItem] = {}
        self.frozen_brush = QBrush()
        self.frozen_font = QFont()
        self.summary: tuple[int, int, int] | None = None  # total, trainable, frozen
        self._refresh_pending = False

        self.train_all = QPushButton("Train all")
        self.train_all.setObjectName("layers.train_all")
        self.train_all.setToolTip("Every parameter trains (model.freeze = none)")
        self.head_only = QPushButton("Head only")
        self.head_only.setObjectName("layers.head_only")
        self.head_only.setToolTip("Only the new classifier head trains (model.freeze = head_only)")
        self.up_to = QComboBox()
        self.up_to.setObjectName("layers.up_to")
        self.up_to.setToolTip(
            "The module that 'Freeze up to' freezes through; for a deeper one, right-click it in the tree"
        )
        self.up_to.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.freeze_up_to_button = QPushButton("Freeze up to")
        self.freeze_up_to_button.setObjectName("layers.freeze_up_to")
        self.freeze_up_to_button.setToolTip(
            "Freeze every module before the chosen one and the module itself (model.freeze = up_to)"
        )
        self.depth_box = QSpinBox()
        self.depth_box.setObjectName("layers.depth")
        self.depth_box.setRange(1, 32)
        self.depth_box.setValue(DEFAULT_DEPTH)
        self.depth_box.setToolTip("How many levels of the tree are shown expanded")
        self.train_bn = QCheckBox("Update BatchNorm statistics of frozen layers")
        self.train_bn.setObjectName("layers.train_frozen_batchnorm")
        self.train_bn.setToolTip(
            "Off: frozen BatchNorm layers stay in eval mode, so their running statistics "
            "do not move either (model.train_frozen_batchnorm)"
        )
        bind_check(state, "model.train_frozen_batchnorm", self.train_bn)

        self.tree = QTreeWidget()
        self.tree.setObjectName("layers.tree")
        self.tree.setColumnCount(len(COLUMNS))
        self.tree.setHeaderLabels(list(COLUMNS))
        self.tree.headerItem().setToolTip(MODULE, "Ticked: the module's parameters are frozen")
        self.tree.headerItem().setToolTip(SHAPE, "Output of one dry forward pass of a single image")
        self.tree.headerItem().setToolTip(
            LR,
            "The rate each module trains at (optimizer.lr, backbone_lr_mult, layer_lr_decay, lr_mult); "
            "double-click one to type the rate that module should have",
        )
        for col in (PARAMS, TRAINABLE, LR):
            self.tree.headerItem().setTextAlignment(col, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.tree.setItemDelegate(_RateEditing(self.tree))
        self.tree.setEditTriggers(
            QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed
        )
        self._update_frozen_look()
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.tree.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(MODULE, QHeaderView.ResizeMode.Stretch)
        for col in (SHAPE, PARAMS, TRAINABLE, LR):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        # The type's name is elided to a set width (the user can widen it): sized to its contents, with the
        # Learning rate column beside it, it left the module names a few letters at 1280x800.
        header.setSectionResizeMode(TYPE, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(TYPE, self.fontMetrics().horizontalAdvance("BatchNormAct2d") + 12)

        self.totals = QLabel()
        self.totals.setObjectName("layers.totals")
        self.status = QLabel()
        self.status.setObjectName("layers.status")
        self.status.setWordWrap(True)
        self.error = QLabel()
        self.error.setObjectName("layers.error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet(ERROR_STYLE)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.hide()
        self.note = QLabel()
        self.note.setObjectName("layers.note")
        self.note.setWordWrap(True)
        self.note.hide()

        presets = QHBoxLayout()
        presets.addWidget(self.train_all)
        presets.addWidget(self.head_only)
        presets.addSpacing(12)
        presets.addWidget(self.freeze_up_to_button)
        presets.addWidget(self.up_to)
        presets.addStretch(1)
        presets.addWidget(QLabel("Expand to depth:"))
        presets.addWidget(self.depth_box)
        layout = QVBoxLayout(self)
        layout.addLayout(presets)
        layout.addWidget(self.train_bn)
        layout.addWidget(self.status)
        layout.addWidget(self.tree, 1)
        layout.addWidget(self.totals)
        layout.addWidget(self.error)
        layout.addWidget(self.note)

        self.train_all.clicked.connect(self._on_train_all_clicked)
        self.head_only.clicked.connect(self._on_head_only_clicked)
        self.freeze_up_to_button.clicked.connect(self._on_freeze_up_to_clicked)
        self.depth_box.valueChanged.connect(self._on_depth_changed)
        self.tree.customContextMenuRequested.connect(self._on_context_menu_requested)
        state.changed.connect(self._on_state_changed)
        self._set_model_controls(False)
        self._on_state_changed("")

    # -- public API ----------------------------------------------------------------------------
    def up_to_modules(self) -> list[str]:
        """The modules *Freeze up to* offers (top-level and second-level), once the model is built; else []."""
        return [str(self.up_to.itemData(i)) for i in range(self.up_to.count())]

    def set_num_outputs(self, n: int) -> None:
        """The number of model outputs (classes) from the dataset scan; the head, and so the tree, depend on it."""
        n = max(int(n), 1)
        if n != self._num_outputs:
            self._num_outputs = n
            self._rebuild_if_needed()

    def num_outputs(self) -> int:
        return self._num_outputs

    def item_for(self, name: str) -> ModuleItem | None:
        """The tree row of a module by dotted name ("" for the whole model)."""
        return self.items.get(name)

    def frozen_parameters(self) -> set[str]:
        """Names of the parameters the tree shows frozen."""
        if self.index is None:
            return set()
        return {self.index.names[i] for i in self.index.frozen()}

    def freeze_up_to(self, module: str) -> None:
        """The "up_to" preset: freeze every module registered before `module`, and `module` itself."""
        self._preset("up_to", module)

    def set_frozen(self, module: str, frozen: bool) -> None:
        """Freeze or unfreeze a module and everything in it, as ticking its row does."""
        if self.model is None or self.index is None:
            return
        shown = self._apply_config()
        held = set(self.index.of.get(module, []))
        wanted = (shown | held) if frozen else (shown - held)
        fields = freeze_fields(self.model, self.head_name, self.state.config.model, wanted, self.index)
        reason = self.state.try_set("model.freeze", fields.pop("model.freeze"), also=fields)
        self.refresh()  # the box Qt just toggled shows the project's state again, whatever happened
        if reason:
            self._show_error(reason)

    def rates(self) -> list[float | None]:
        """Each parameter's learning rate (None where it is frozen), by position, from the project's settings."""
        from engine.freezing import lr_plan

        assert self.model is not None and self.index is not None  # only with a built model
        o = self.state.config.optimizer
        try:
            plan = lr_plan(self.model, self.head_name, o.backbone_lr_mult, o.layer_lr_decay, o.lr_mult)
        except ConfigError:  # an lr_mult name this model does not have: shown by the run's check, ignored here
            plan = lr_plan(self.model, self.head_name, o.backbone_lr_mult, o.layer_lr_decay)
        factor = {name: g.factor for g in plan for name in g.params}
        return [
            o.lr * factor[name] if p.requires_grad and factor[name] > 0 else None
            for name, p in zip(self.index.names, self.index.params, strict=True)
        ]

    def set_rate(self, module: str, text: str) -> None:
        """Make `module` train at the rate typed (its optimizer.lr_mult entry); empty text removes the entry."""
        from engine.freezing import lr_plan
        from widgets.fields import parse_float

        if self.model is None or self.index is None or not module:
            return
        o = self.state.config.optimizer
        mult = dict(o.lr_mult)
        if not text.strip():
            mult.pop(module, None)
        else:
            try:
                wanted = parse_float(text)
            except ValueError:
                self.refresh()  # the cell shows the project's rate again
                self._show_error(f"{text!r} is not a learning rate; type a number such as 3e-4")
                return
            held = {self.index.names[i] for i in self.index.of.get(module, [])}
            others = {k: v for k, v in mult.items() if k != module}
            plan = lr_plan(self.model, self.head_name, o.backbone_lr_mult, o.layer_lr_decay, others)
            # Relative to the module's highest rate without its own entry: that part gets the rate typed.
            base = max((o.lr * g.factor for g in plan if held & set(g.params)), default=0.0)
            if not (wanted > 0 and base > 0):
                self.refresh()
                self._show_error(
                    f"{module}: a learning rate must be above 0 (to stop a module training, tick it frozen)"
                    if base > 0
                    else f"{module} does not train at any rate (optimizer.backbone_lr_mult is 0)"
                )
                return
            mult[module] = float(f"{wanted / base:.6g}")
        reason = self.state.try_set("optimizer.lr_mult", mult)
        self.refresh()
        if reason:
            self._show_error(reason)

    def wait(self, ms: int = 30000) -> bool:
        """Wait for the background build (tests, closing) and apply its result."""
        while any(t.is_running() for t in self._tasks):
            if not all(t.wait(ms) for t in list(self._tasks)):
                return False
        if self._refresh_pending:
            self.refresh()
        return True

    def refresh(self) -> None:
        """Apply the project's freezing to the built model and redraw ticks, trainable counts and totals."""
        self._refresh_pending = False
        if self.model is None:
            return
        self._apply_config()
        self._redraw()

    # -- building ------------------------------------------------------------------------------
    def _key(self) -> tuple:
        """What the built model depends on: backbone, the settings that decide the input size, output count."""
        cfg = self.state.config
        return (cfg.model.backbone, cfg.model.weights, cfg.data.image_size, cfg.data.keep_aspect, self._num_outputs)

    def _rebuild_if_needed(self) -> None:
        key = self._key()
        if key == self._wanted_key:
            return
        self._wanted_key = key
        self._build_id += 1
        build_id = self._build_id
        cfg = self.state.config
        backbone, outputs = cfg.model.backbone, self._num_outputs
        self.status.setText(f"Building {backbone} with {outputs} outputs…")
        self.tree.setEnabled(False)
        self._set_model_controls(False)
        task = run_task(
            "build layer tree",
            build_project_layers,
            copy.deepcopy(cfg.model),
            copy.deepcopy(cfg.data),
            outputs,
            on_result=lambda result: self._on_built(build_id, result),
            on_error=lambda exc, tb: self._on_build_failed(build_id, exc),
        )
        self._tasks = [t for t in self._tasks if t.is_running()] + [task]

    def _on_build_failed(self, build_id: int, exc: BaseException) -> None:
        if build_id != self._build_id:
            return
        assert self._wanted_key is not None  # set when the build was asked for
        backbone = self._wanted_key[0]
        self.model = self.index = None
        self._built_key = None
        self.items = {}
        self.summary = None
        self.tree.clear()
        self.totals.clear()
        self.up_to.clear()
        self._show_error("")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.status.setText(f"{backbone} cannot be built: {first}")

    def _on_built(self, build_id: int, result: dict) -> None:
        if build_id != self._build_id:
            return  # a newer backbone, size or output count was asked for meanwhile
        self.model = result["model"]
        self.head_name = result["head_name"]
        self.index = ParamIndex(self.model)
        self._built_key = (result["backbone"], result["image_size"], result["num_outputs"])
        rows = result["rows"]
        shapes = rows[0]["output_shape"] is not None
        size = result["image_size"]
        self.status.setText(
            f"{result['backbone']} for {result['num_outputs']} outputs, head {self.head_name}; output shapes of one "
            f"{size}×{size} px image" + ("" if shapes else " are unknown: the model does not run at this size")
        )
        self._fill_tree(rows)
        self._fill_up_to(rows)
        self.tree.setEnabled(True)
        self._set_model_controls(True)
        self.refresh()

    def _fill_tree(self, rows: list[dict]) -> None:
        assert self._built_key is not None and self.index is not None  # a model was just built
        self.tree.clear()
        self.items = {}
        for row in rows:
            name = row["name"]
            texts = [
                name.rpartition(".")[2] if name else self._built_key[0],
                row["type"],
                _shape_text(row["output_shape"]),
                f"{row['params']:,}",
                f"{row['params']:,}",
                "",
            ]
            parent = self.tree if not name else self.items.get(name.rpartition(".")[0], self.items[""])
            self.items[name] = ModuleItem(parent, self, name, texts, bool(self.index.of.get(name)))
        self._on_depth_changed(self.depth_box.value())

    def _fill_up_to(self, rows: list[dict]) -> None:
        self.up_to.blockSignals(True)
        try:
            self.up_to.clear()
            for row in rows:
                if 1 <= row["depth"] <= 2:
                    indent = "    " * (row["depth"] - 1)
                    self.up_to.addItem(f"{indent}{row['name']}  ({row['type']})", row["name"])
        finally:
            self.up_to.blockSignals(False)
        self._sync_up_to()

    def _set_model_controls(self, enabled: bool) -> None:
        for w in (self.up_to, self.freeze_up_to_button):
            w.setEnabled(enabled)

    # -- applying the project ------------------------------------------------------------------
    def _apply_config(self) -> set[int]:
        """apply_freeze with the project's settings; a setting that names no module is shown and left out."""
        from engine.freezing import apply_freeze

        cfg = self.state.config.model
        assert self.model is not None and self.index is not None  # only with a built model
        try:
            apply_freeze(self.model, cfg, self.head_name)
            self._show_error("")
        except ConfigError as exc:
            cleaned = self._without_unknown(cfg)
            apply_freeze(self.model, cleaned, self.head_name)
            problems = "; ".join(map(str, exc.problems))
            self._show_error(
                f"{problems}. The tree shows the freezing without it; tick modules or choose a "
                "preset to rewrite the freezing settings."
            )
        return self.index.frozen()

    def _without_unknown(self, cfg: ModelConfig) -> ModelConfig:
        assert self.index is not None  # only with a built model
        names = set(self.index.modules) | set(self.index.names)

        def known(prefix: str) -> bool:
            return bool(prefix) and any(n == prefix or n.startswith(prefix + ".") for n in names)

        cleaned = copy.deepcopy(cfg)
        if cleaned.freeze == "up_to" and cleaned.freeze_up_to not in self.index.modules:
            cleaned.freeze, cleaned.freeze_up_to = "none", None
        cleaned.freeze_prefixes = [p for p in cleaned.freeze_prefixes if known(p)]
        cleaned.unfreeze_prefixes = [p for p in cleaned.unfreeze_prefixes if known(p)]
        return cleaned

    def _show_error(self, text: str) -> None:
        self.error.setText(text)
        self.error.setVisible(bool(text))

    def _redraw(self) -> None:
        index = self.index
        assert index is not None  # only with a built model
        frozen = index.frozen()
        total = sum(index.numel)
        frozen_count = sum(index.numel[i] for i in frozen)
        rates = self.rates()
        lr_mult = self.state.config.optimizer.lr_mult
        for name, item in self.items.items():  # pre-order: a parent is drawn before its children
            held = index.of.get(name, [])
            item.texts[LR], item.rate_tip = _rate_text([rates[i] for i in held], held, lr_mult.get(name))
            n_frozen = sum(1 for i in held if i in frozen)
            item.texts[TRAINABLE] = f"{sum(index.numel[i] for i in held if i not in frozen):,}"
            if held:
                item.check = (
                    Qt.CheckState.Unchecked
                    if n_frozen == 0
                    else Qt.CheckState.Checked
                    if n_frozen == len(held)
                    else Qt.CheckState.PartiallyChecked
                )
                item.looks_frozen = item.check == Qt.CheckState.Checked
            else:  # no parameters: it looks like the module around it
                parent = self.items.get(name.rpartition(".")[0]) if name else None
                item.looks_frozen = parent is not None and parent.looks_frozen
        self.tree.viewport().update()
        self.summary = (total, total - frozen_count, frozen_count)
        self.totals.setText(f"{total:,} parameters: {total - frozen_count:,} trainable, {frozen_count:,} frozen")
        self._sync_up_to()
        self._update_note()

    def _update_frozen_look(self) -> None:
        # Greyed like disabled text of the current palette, and italic: readable in light and dark themes.
        self.frozen_brush = QBrush(self.palette().color(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text))
        self.frozen_font = QFont(self.tree.font())
        self.frozen_font.setItalic(True)

    def _sync_up_to(self) -> None:
        cfg = self.state.config.model
        if cfg.freeze == "up_to" and cfg.freeze_up_to:
            i = self.up_to.findData(cfg.freeze_up_to)
            if i >= 0:
                self.up_to.blockSignals(True)
                self.up_to.setCurrentIndex(i)
                self.up_to.blockSignals(False)

    def _update_note(self) -> None:
        if self.state.config.optimizer.backbone_lr_mult == 0:
            self.note.setText(
                f"optimizer.backbone_lr_mult is 0: training freezes everything but the head "
                f"({self.head_name or 'the classifier'}), whatever is ticked here."
            )
            self.note.show()
        else:
            self.note.hide()

    # -- project -> widget ---------------------------------------------------------------------
    def _on_state_changed(self, path: str) -> None:
        if path in ("", "model.backbone", "model.weights", "data.image_size", "data.keep_aspect"):
            self._rebuild_if_needed()
        if path == "optimizer.backbone_lr_mult":
            self._update_note()
        if (path == "" or path.startswith(("model.", "optimizer."))) and not self._refresh_pending:
            # update() emits once per field; one redraw after all of them.
            self._refresh_pending = True
            QTimer.singleShot(0, self._on_refresh_due)

    def _on_refresh_due(self) -> None:
        if self._refresh_pending:
            self.refresh()

    # -- widget -> project ---------------------------------------------------------------------
    def _on_train_all_clicked(self) -> None:
        self._preset("none")

    def _on_head_only_clicked(self) -> None:
        self._preset("head_only")

    def _on_freeze_up_to_clicked(self) -> None:
        module = self.up_to.currentData()
        if module:
            self.freeze_up_to(module)

    def _preset(self, freeze: str, up_to: str | None = None) -> None:
        reason = self.state.try_set(
            "model.freeze",
            freeze,
            also={"model.freeze_up_to": up_to, "model.freeze_prefixes": [], "model.unfreeze_prefixes": []},
        )
        if reason:
            self._show_error(reason)

    def _on_depth_changed(self, depth: int) -> None:
        self.tree.collapseAll()
        self.tree.expandToDepth(depth - 1)

    def _on_context_menu_requested(self, pos: QPoint) -> None:
        item = self.tree.itemAt(pos)
        name = item.name if isinstance(item, ModuleItem) else None
        if not name:
            return
        menu = QMenu(self)
        action = menu.addAction(f"Freeze up to {name}")
        action.setObjectName("layers.freeze_up_to_here")
        action.triggered.connect(lambda: self.freeze_up_to(name))
        menu.exec(self.tree.viewport().mapToGlobal(pos))
        menu.deleteLater()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.FontChange):
            self._update_frozen_look()  # the frozen rows' colour comes from the palette
            self.tree.viewport().update()
