"""The training settings panel: input, sampler, loss, optimizer, schedule, run, early stopping and checkpoints."""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette, QWheelEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.config import (
    COLLATES,
    DEVICES,
    DIST_BACKENDS,
    FEATURE_CACHE_MODES,
    LOSSES,
    MONITOR_MODES,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
)
from widgets.fields import (
    FieldBinding,
    bind_check,
    bind_combo,
    bind_double,
    bind_float_text,
    bind_spin,
    bind_text,
    format_float,
    parse_optional_int,
)
from widgets.state import ProjectState

OBJECT_NAMES = {
    "training.scroll": "the scroll area holding the training settings",
    "training.group.input": "group: image size, normalisation and augmentation",
    "training.group.sampler": "group: sampler and DataLoader settings",
    "training.group.loss": "group: loss function and its options",
    "training.group.optimizer": "group: optimizer and its options",
    "training.group.schedule": "group: learning-rate schedule and its options",
    "training.group.training": "group: epochs, device, precision, seed",
    "training.group.distributed": "group: training in several processes through torchrun",
    "training.group.early_stopping": "group: early stopping",
    "training.group.checkpoints": "group: checkpoints and TensorBoard logs",
    # Input
    "training.image_size": "image size the data is resized/cropped to (data.image_size)",
    "training.keep_aspect": "keep each image's aspect ratio and pad batches (data.keep_aspect)",
    "training.collate": "how a batch is assembled: stacked or zero-padded (loader.collate)",
    "training.mean": "normalisation mean, 1 or 3 numbers (data.mean)",
    "training.std": "normalisation standard deviation, 1 or 3 numbers (data.std)",
    "training.horizontal_flip": "random horizontal flips (data.augment.horizontal_flip)",
    "training.rotation": "random rotation in degrees (data.augment.rotation)",
    "training.random_resized_crop": "random resized crops (data.augment.random_resized_crop)",
    "training.color_jitter": "colour jitter strength (data.augment.color_jitter)",
    # Sampler and loader
    "training.sampler": "which sampler draws the training samples (loader.sampler.name)",
    "training.sampler_replacement": "draw with or without replacement (loader.sampler.replacement)",
    "training.sampler_num_samples": "samples drawn per epoch (loader.sampler.num_samples)",
    "training.sampler_indices": "training-set positions for the subset sampler (loader.sampler.indices)",
    "training.sampler_weights_mode": "balanced weights or a typed list (loader.sampler.weights)",
    "training.sampler_weights": "one weight per training sample (loader.sampler.weights)",
    "training.sampler_shuffle": "shuffle each replica's share (loader.sampler.shuffle)",
    "training.sampler_seed": "seed of the distributed shuffle (loader.sampler.seed)",
    "training.sampler_num_replicas": "number of processes sharing the data (loader.sampler.num_replicas)",
    "training.sampler_rank": "this process's share (loader.sampler.rank)",
    "training.batch_size": "samples per batch (loader.batch_size)",
    "training.num_workers": "DataLoader worker processes; the lowest setting is auto (loader.num_workers)",
    "training.persistent_workers": "keep worker processes between epochs: auto, on or off (loader.persistent_workers)",
    "training.pin_memory": "pinned host memory: auto, on or off (loader.pin_memory)",
    "training.decoded_cache": "keep decoded, resized images in memory: auto, on or off (loader.decoded_cache)",
    "training.decoded_cache_max_mb": "memory bound of the decoded-image cache in MiB; lowest is auto "
                                     "(loader.decoded_cache_max_mb)",
    "training.drop_last": "drop the last incomplete batch (loader.drop_last)",
    "training.shuffle": "DataLoader's shuffle flag: auto, on or off (loader.shuffle)",
    # Loss
    "training.loss": "loss function (loss.name)",
    "training.label_smoothing": "cross-entropy label smoothing (loss.label_smoothing)",
    "training.class_weights_mode": "no, balanced or typed class weights (loss.class_weights)",
    "training.class_weights": "one weight per class (loss.class_weights)",
    "training.loss_beta": "smooth-L1 beta (loss.beta)",
    # Optimizer
    "training.optimizer": "optimizer (optimizer.name)",
    "training.lr": "learning rate, typed as text such as 1e-4 (optimizer.lr)",
    "training.weight_decay": "weight decay (optimizer.weight_decay)",
    "training.momentum": "momentum for SGD and RMSprop (optimizer.momentum)",
    "training.nesterov": "Nesterov momentum for SGD (optimizer.nesterov)",
    "training.betas": "Adam/AdamW betas, two numbers (optimizer.betas)",
    "training.eps": "Adam/AdamW/RMSprop epsilon (optimizer.eps)",
    "training.alpha": "RMSprop smoothing constant (optimizer.alpha)",
    "training.backbone_lr_mult": "backbone learning-rate multiplier (optimizer.backbone_lr_mult)",
    # Schedule
    "training.schedule": "learning-rate schedule (schedule.name)",
    "training.step_size": "epochs between decays of the step schedule (schedule.step_size)",
    "training.gamma": "decay factor of the step schedule (schedule.gamma)",
    "training.eta_min": "lowest learning rate of the cosine schedule (schedule.eta_min)",
    "training.max_lr": "peak learning rate of the one-cycle schedule (schedule.max_lr)",
    "training.pct_start": "share of the one-cycle spent warming up (schedule.pct_start)",
    "training.plateau_patience": "epochs without improvement before the plateau schedule decays (schedule.patience)",
    "training.plateau_factor": "decay factor of the plateau schedule (schedule.factor)",
    # Training
    "training.epochs": "number of epochs (train.epochs)",
    "training.device": "device to train on, with what is available here (train.device)",
    "training.precision": "fp32, fp16 or bf16 mixed precision (train.precision)",
    "training.seed": "random seed of the run (train.seed)",
    "training.deterministic": "use deterministic algorithms (train.deterministic)",
    "training.grad_clip_norm": "gradient norm clipping, empty for off (train.grad_clip_norm)",
    "training.feature_cache": "compute a frozen backbone's features once: auto or off (train.feature_cache)",
    "training.feature_cache_max_mb": "memory bound of the cached features in MiB, empty for half the free "
                                     "memory (train.feature_cache_max_mb)",
    "training.channels_last": "channels-last memory format: auto, on or off (train.channels_last)",
    "training.compile": "compile the training forward with torch.compile (train.compile)",
    # Several processes
    "training.processes": "processes the run trains in, through torchrun (distributed.processes)",
    "training.dist_backend": "how the processes communicate: auto, nccl or gloo (distributed.backend)",
    "training.sync_batchnorm": "BatchNorm statistics over every process's batch (distributed.sync_batchnorm)",
    "training.dist_timeout": "seconds a process waits for the others before the run fails (distributed.timeout_s)",
    # Early stopping
    "training.early_stopping": "turn early stopping on or off (early_stopping.enabled)",
    "training.es_monitor": "metric early stopping watches (early_stopping.monitor)",
    "training.es_mode": "whether lower or higher is better for early stopping (early_stopping.mode)",
    "training.es_patience": "epochs without improvement before stopping (early_stopping.patience)",
    "training.es_min_delta": "smallest change that counts as an improvement (early_stopping.min_delta)",
    "training.es_restore_best": "end with the best epoch's weights (early_stopping.restore_best)",
    # Checkpoints
    "training.checkpoint_every_epoch": "keep a checkpoint file per epoch (checkpoint.every_epoch)",
    "training.checkpoint_keep_last": "how many epoch checkpoints are kept (checkpoint.keep_last)",
    "training.checkpoint_monitor": "metric that decides best.pt (checkpoint.monitor)",
    "training.checkpoint_mode": "whether lower or higher is better for best.pt (checkpoint.mode)",
    "training.tensorboard": "write TensorBoard event files (output.tensorboard)",
}

ERROR_COLOUR = "#d9534f"  # the same red as the fields' invalid border; readable on light and dark palettes

SAMPLER_LABELS = {
    "sequential": "Sequential (dataset order)",
    "random": "Random (shuffled)",
    "subset_random": "Random subset (chosen positions)",
    "weighted_random": "Weighted random",
    "distributed": "Distributed (one share per process)",
}
SAMPLER_HINTS = {
    "sequential": "Every epoch reads the training set in the same order.",
    "random": "Every epoch draws the training set in a new random order.",
    "subset_random": "Every epoch draws only the listed training-set positions, in random order.",
    "weighted_random": "Samples are drawn in proportion to their weights, so rare classes can be drawn more often.",
    "distributed": "Each process trains on its own share of the data (also chosen automatically under torchrun).",
}
LOSS_LABELS = {
    "cross_entropy": "Cross-entropy",
    "mse": "Mean squared error (MSE)",
    "bce_with_logits": "Binary cross-entropy with logits",
    "nll": "Negative log-likelihood (NLL)",
    "l1": "Mean absolute error (L1)",
    "smooth_l1": "Smooth L1 (Huber)",
}
LOSS_HINTS = {
    "cross_entropy": "The usual loss for single-label classification.",
    "mse": "Squared error; class targets become one-hot vectors.",
    "bce_with_logits": "One yes/no decision per output: the loss for multi-label tasks.",
    "nll": "Negative log-likelihood of the log-softmax of the outputs.",
    "l1": "Absolute error; class targets become one-hot vectors.",
    "smooth_l1": "Squared error near the target and absolute error beyond beta; less sensitive to outliers.",
}
OPTIMIZER_LABELS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
SCHEDULE_LABELS = {
    "none": "Constant",
    "step": "Step decay",
    "cosine": "Cosine annealing",
    "onecycle": "One-cycle",
    "plateau": "Reduce on plateau",
}
SCHEDULE_HINTS = {
    "none": "The learning rate stays the same for the whole run.",
    "step": "The learning rate is multiplied by gamma every step_size epochs.",
    "cosine": "The learning rate follows a half cosine from its start down to eta_min over the run.",
    "onecycle": "The learning rate warms up to max_lr and anneals back down, updated after every batch.",
    "plateau": "The learning rate is multiplied by factor when the validation loss stops improving.",
}
MONITOR_LABELS = {
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
    "train_loss": "training loss",
    "train_accuracy": "training accuracy",
}
MODE_LABELS = {
    "auto": "auto (higher accuracy, lower loss)",
    "min": "lower is better",
    "max": "higher is better",
}
PRECISION_LABELS = {
    "fp32": "fp32 (full precision)",
    "fp16": "fp16 mixed precision",
    "bf16": "bf16 mixed precision",
}
FEATURE_CACHE_LABELS = {
    "auto": "auto (when it applies)",
    "off": "off (recompute)",
}
BACKEND_LABELS = {
    "auto": "auto (nccl on CUDA GPUs, else gloo)",
    "nccl": "nccl (CUDA GPUs)",
    "gloo": "gloo (CPU)",
}
COLLATE_LABELS = {
    "default": "stack (images of one size)",
    "pad": "pad (zero-pad to the batch's largest image)",
}

# Which of a chooser's option rows apply to which choice.
SAMPLER_OPTIONS = {
    "replacement": ("random", "weighted_random"),
    "num_samples": ("random", "weighted_random"),
    "indices": ("subset_random",),
    "weights": ("weighted_random",),
    "distributed": ("distributed",),
}
LOSS_OPTIONS = {
    "label_smoothing": ("cross_entropy",),
    "class_weights": ("cross_entropy", "nll"),
    "beta": ("smooth_l1",),
}
OPTIMIZER_OPTIONS = {
    "momentum": ("sgd", "rmsprop"),
    "nesterov": ("sgd",),
    "betas": ("adam", "adamw"),
    "eps": ("adam", "adamw", "rmsprop"),
    "alpha": ("rmsprop",),
}
SCHEDULE_OPTIONS = {
    "step": ("step",),
    "cosine": ("cosine",),
    "onecycle": ("onecycle",),
    "plateau": ("plateau",),
}
SHUFFLE_SAMPLERS = ("random", "sequential")  # validate(): loader.shuffle only goes with these


# ---------------------------------------------------------------------------------------------
# Text <-> value for the list fields


def parse_numbers(text: str) -> list[float]:
    """Numbers separated by commas, semicolons or spaces: '0.485, 0.456, 0.406'."""
    tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("type at least one number, such as 0.5")
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            raise ValueError(f"{token!r} is not a number") from None
    return values


def format_numbers(values: Iterable[float] | None) -> str:
    return "" if values is None else ", ".join(format_float(float(v)) for v in values)


MAX_POSITIONS = 10_000_000  # a typo such as 0-9999999999 must not build a list that fills the memory


def parse_positions(text: str) -> list[int] | None:
    """Training-set positions and inclusive ranges: '0-99, 200'; empty means all (None)."""
    if not text.strip():
        return None
    # Ranges may be typed with spaces or an en dash ("0 - 99", "0–99", "0..99"); make them one token.
    normal = re.sub(r"\s*(?:-|–|\.\.)\s*(?=\d)", "-", text.strip())
    out: list[int] = []
    for token in (t for t in re.split(r"[,;\s]+", normal) if t):
        single = re.fullmatch(r"\d+", token)
        span = re.fullmatch(r"(\d+)-(\d+)", token)
        if single:
            out.append(int(token))
        elif span:
            first, last = int(span.group(1)), int(span.group(2))
            if last < first:
                raise ValueError(f"the range {token!r} runs backwards; write it as {last}-{first}")
            if len(out) + last - first + 1 > MAX_POSITIONS:
                raise ValueError(f"more than {MAX_POSITIONS:,} positions; give a smaller range")
            out.extend(range(first, last + 1))
        else:
            raise ValueError(f"{token!r} is not a position or a range such as 0-99 (positions start at 0)")
    return out


def format_positions(values: list[int] | None) -> str:
    """The shortest text parse_positions reads back as the same list (runs of 3 or more become ranges)."""
    if not values:
        return ""
    parts: list[str] = []
    start = prev = values[0]
    for v in list(values[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        if prev - start >= 2:
            parts.append(f"{start}-{prev}")
        else:
            parts.extend(str(x) for x in range(start, prev + 1))
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def parse_int(text: str) -> int:
    cleaned = text.strip()
    if not cleaned:
        raise ValueError("a whole number is required")
    try:
        return int(cleaned)
    except ValueError:
        raise ValueError(f"{cleaned!r} is not a whole number") from None


_devices_here: dict[str, bool] | None = None


def devices_available(*, load: bool = True) -> dict[str, bool] | None:
    """Which train.device choices this machine has (asked once: the answer does not change while the app runs).

    load=False: None while PyTorch is not imported yet (the window starts before it; see app.main_window).
    """
    global _devices_here
    if _devices_here is None:
        if not load and "torch" not in sys.modules:
            return None
        import torch

        mps = getattr(torch.backends, "mps", None)
        _devices_here = {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()),
                         "mps": bool(mps is not None and mps.is_available())}
    return _devices_here


def auto_device() -> str:
    """What 'auto' resolves to here (the engine's order: cuda, then mps, then cpu)."""
    here = devices_available()
    assert here is not None  # load=True always answers
    return "cuda" if here["cuda"] else "mps" if here["mps"] else "cpu"


# ---------------------------------------------------------------------------------------------
# Input widgets that leave the wheel to the scroll area unless they have the focus


# The mixin is typed as the QWidget it is mixed into; at run time it is a plain class, so only the input
# widgets below are Qt classes.
if TYPE_CHECKING:
    _GuardBase = QWidget
else:
    _GuardBase = object
_W = TypeVar("_W", bound=QWidget)


class _WheelGuard(_GuardBase):
    """A scrolling form must not change a value the pointer merely passes over while the wheel turns."""

    def _guard_init(self) -> None:
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 - Qt's name
        if self.hasFocus():
            super().wheelEvent(event)
        else:
            event.ignore()  # an ignored wheel event goes on to the parent, so the panel scrolls


class SpinBox(_WheelGuard, QSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setKeyboardTracking(False)  # commit 224, not 2, 22 and 224 on the way
        self.setMaximum(2**31 - 1)


class DoubleSpinBox(_WheelGuard, QDoubleSpinBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setKeyboardTracking(False)


class ComboBox(_WheelGuard, QComboBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._guard_init()
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)  # as wide as the other fields


def _combo(items: Iterable[tuple[str, Any]]) -> ComboBox:
    box = ComboBox()
    for label, value in items:
        box.addItem(label, value)
    return box


def _spin(low: int, high: int, *, step: int = 1, suffix: str = "", special: str = "") -> SpinBox:
    box = SpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setSuffix(suffix)
    box.setSpecialValueText(special)
    return box


def _double(low: float, high: float, *, step: float, decimals: int, suffix: str = "",
            special: str = "") -> DoubleSpinBox:
    box = DoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setSuffix(suffix)
    box.setSpecialValueText(special)
    return box


def _note(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    return label


# ---------------------------------------------------------------------------------------------


class TrainingPanel(QWidget):
    """Every training setting of the project, bound to a ProjectState; refused values are marked at the field.

    The panel keeps no settings of its own: each control writes through ProjectState.try_set and redraws
    from ProjectState.changed. Options that belong to one sampler, loss, optimizer or schedule are shown
    only while that one is chosen.
    """

    TWO_COLUMN_MARGIN = 48  # spacing, margins and a vertical scroll bar between two columns of groups

    def __init__(self, state: ProjectState, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("training")
        self.state = state
        self._bindings: dict[str, list[FieldBinding]] = {}
        self._rows: list[tuple[QFormLayout, QWidget, Callable[[], bool]]] = []  # rows shown only when ...
        self._widgets: dict[str, QWidget] = {}
        self._two_columns: bool | None = None

        self._content = QWidget()
        columns = QHBoxLayout(self._content)
        self._columns_layout = columns
        self._cols = [QVBoxLayout(), QVBoxLayout()]
        for col in self._cols:
            columns.addLayout(col, 1)

        self._left = [self._build_input(), self._build_sampler(), self._build_loss()]
        self._right = [self._build_optimizer(), self._build_schedule(), self._build_training(),
                       self._build_distributed(), self._build_early_stopping(), self._build_checkpoints()]

        self._scroll = QScrollArea()
        self._scroll.setObjectName("training.scroll")
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self._scroll.setWidget(self._content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)
        self._arrange(two=False)

        # Connected after every binding, so the bindings have redrawn their widgets when this runs.
        state.changed.connect(self._on_state_changed)
        self.refresh_devices()
        self._sync()

    # -- public --------------------------------------------------------------------------------
    def field_widget(self, path: str) -> QWidget | None:
        """The control that edits a project field (the first one where a field has two), or None."""
        bindings = self._bindings.get(path)
        return bindings[0].widget if bindings else None

    def focus_field(self, path: str) -> bool:
        """Scroll to the control of a field and give it the focus; False if the panel has none or it is hidden."""
        widget = self.field_widget(path)
        if widget is None or not widget.isVisibleTo(self):
            return False
        self._scroll.ensureWidgetVisible(widget)
        widget.setFocus(Qt.FocusReason.OtherFocusReason)
        return True

    # -- building ------------------------------------------------------------------------------
    def _form(self, title: str, name: str) -> tuple[QGroupBox, QFormLayout]:
        box = QGroupBox(title)
        box.setObjectName(f"training.group.{name}")
        assert box.objectName() in OBJECT_NAMES, name
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return box, form

    def _add(self, form: QFormLayout, label: str, name: str, path: str, widget: _W, tip: str,
             bind: Callable[..., FieldBinding], *,
             when: tuple[QComboBox, tuple[str, ...]] | Callable[[], bool] | None = None,
             note: QLabel | None = None, **bind_kw: Any) -> _W:
        """A form row: the control, its error line under it (shown only while a value is refused), an optional note.

        when: the row shows only while the combo's choice is one of the names, or while the function says so.
        """
        key = f"training.{name}"
        assert key in OBJECT_NAMES, key
        widget.setObjectName(key)
        widget.setToolTip(tip)  # before binding: the binding restores this tooltip once an error is gone
        message = QLabel()
        message.setObjectName(f"{key}.message")
        message.setWordWrap(True)
        message.setStyleSheet(f"color: {ERROR_COLOUR};")
        message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        message.hide()
        cell = QWidget()
        box = QVBoxLayout(cell)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        box.addWidget(widget)
        box.addWidget(message)
        if note is not None:
            box.addWidget(note)
        if label:
            caption = QLabel(label)
            caption.setToolTip(tip)
            caption.setBuddy(widget)
            form.addRow(caption, cell)
        else:
            form.addRow(cell)
        binding = bind(self.state, path, widget, message=message, **bind_kw)
        self._bindings.setdefault(path, []).append(binding)
        self._widgets[key] = widget
        if isinstance(when, tuple):
            combo, names = when
            self._rows.append((form, cell, lambda: combo.currentData() in names))
        elif when is not None:
            self._rows.append((form, cell, when))
        return widget

    def _build_input(self) -> QGroupBox:
        box, form = self._form("Input", "input")
        self._add(form, "Image size:", "image_size", "data.image_size", _spin(8, 4096, step=16, suffix=" px"),
                  "Images are resized and cropped to this many pixels a side when the weights bring no "
                  "preprocessing of their own.", bind_spin)
        self._add(form, "", "keep_aspect", "data.keep_aspect", QCheckBox("Keep the aspect ratio (pad batches)"),
                  "Resize only the longer side so nothing is cropped or stretched; batches are then zero-padded, "
                  "so the collate is switched to 'pad' along with it.", bind_check,
                  also=lambda on: {"loader.collate": "pad"} if on else {},
                  note=_note("Needs the 'pad' collate, which is chosen with it."))
        self._add(form, "Collate:", "collate", "loader.collate",
                  _combo((COLLATE_LABELS.get(c, c), c) for c in COLLATES),
                  "How a batch is assembled: stacked (all images the same size) or zero-padded to the largest "
                  "image of the batch.", bind_combo)
        self._add(form, "Mean:", "mean", "data.mean", QLineEdit(),
                  "Per-channel mean subtracted before the model (one value, or three for R, G, B); used when the "
                  "weights bring no normalisation of their own.", bind_text,
                  parse=parse_numbers, show=format_numbers)
        self._add(form, "Std:", "std", "data.std", QLineEdit(),
                  "Per-channel standard deviation the images are divided by (one value, or three for R, G, B); "
                  "used when the weights bring no normalisation of their own.", bind_text,
                  parse=parse_numbers, show=format_numbers)
        self._add(form, "", "horizontal_flip", "data.augment.horizontal_flip", QCheckBox("Random horizontal flip"),
                  "Mirror half of the training images left to right.", bind_check)
        self._add(form, "Rotation:", "rotation", "data.augment.rotation",
                  _double(0.0, 180.0, step=5.0, decimals=1, suffix="°", special="off"),
                  "Rotate training images by a random angle up to this many degrees either way; 0 turns it off.",
                  bind_double)
        self._add(form, "", "random_resized_crop", "data.augment.random_resized_crop",
                  QCheckBox("Random resized crop"),
                  "Train on random crops of random size and shape, resized to the image size (not together with "
                  "keeping the aspect ratio).", bind_check)
        self._add(form, "Colour jitter:", "color_jitter", "data.augment.color_jitter",
                  _double(0.0, 1.0, step=0.05, decimals=2, special="off"),
                  "Randomly change brightness, contrast and saturation by up to this share; 0 turns it off.",
                  bind_double)
        return box

    def _build_sampler(self) -> QGroupBox:
        box, form = self._form("Sampler and loader", "sampler")
        self._sampler_hint = _note()
        combo = self._add(form, "Sampler:", "sampler", "loader.sampler.name",
                          _combo((SAMPLER_LABELS.get(s, s), s) for s in SAMPLERS),
                          "Which samples each training epoch draws, and in what order.", bind_combo,
                          also=lambda name: self._sampler_values(name, "loader.sampler.name"),
                          note=self._sampler_hint)
        self._sampler_combo = combo
        combo.currentIndexChanged.connect(self._on_choice_changed)

        def options(key):
            return (combo, SAMPLER_OPTIONS[key])

        def along(path):
            return lambda _value: self._sampler_values(combo.currentData(), path)

        self._replacement = self._add(
            form, "Replacement:", "sampler_replacement", "loader.sampler.replacement",
            _combo([("default", None), ("with replacement", True), ("without replacement", False)]),
            "With replacement a sample can be drawn more than once per epoch; the default is without for "
            "the random sampler and with for the weighted one.", bind_combo,
            when=options("replacement"), also=along("loader.sampler.replacement"))
        self._add(form, "Samples per epoch:", "sampler_num_samples", "loader.sampler.num_samples",
                  _spin(0, 2**31 - 1, special="all (the training-set size)"),
                  "How many samples one epoch draws; the lowest setting draws as many as the training set holds.",
                  self._bind_optional_spin, when=options("num_samples"), also=along("loader.sampler.num_samples"))
        indices = QLineEdit()
        indices.setPlaceholderText("all, or positions such as 0-99, 200")
        self._add(form, "Positions:", "sampler_indices", "loader.sampler.indices", indices,
                  "Training-set positions (counted from 0) to draw from, as numbers and ranges such as "
                  "'0-99, 200'; empty draws from all.", bind_text, parse=parse_positions, show=format_positions,
                  when=options("indices"), also=along("loader.sampler.indices"))
        self._weights_mode = self._add(
            form, "Weights:", "sampler_weights_mode", "loader.sampler.weights",
            _combo([("balanced (inverse class frequency)", "balanced"), ("from list", "list")]),
            "Balanced draws every class equally often; a list gives one weight per training sample.",
            self._bind_list_mode, when=options("weights"), also=along("loader.sampler.weights"),
            edit_name="sampler_weights", modes=("balanced", "list"),
            missing="type one weight per training sample in the box below, such as 1, 1, 0.5")
        self._weights_edit = QLineEdit()
        self._weights_edit.setPlaceholderText("one weight per training sample: 1, 1, 0.5, …")
        self._add(form, "", "sampler_weights", "loader.sampler.weights", self._weights_edit,
                  "One non-negative weight per training sample, in training-set order; larger weights are drawn "
                  "more often.", self._bind_list_edit, when=options("weights"), also=along("loader.sampler.weights"))
        self._weights_mode.currentIndexChanged.connect(self._on_choice_changed)
        self._add(form, "", "sampler_shuffle", "loader.sampler.shuffle", QCheckBox("Shuffle each share"),
                  "Shuffle the samples of every process's share each epoch.", bind_check,
                  when=options("distributed"), also=along("loader.sampler.shuffle"))
        self._add(form, "Shuffle seed:", "sampler_seed", "loader.sampler.seed", QLineEdit(),
                  "Seed of the distributed shuffle; every process must use the same one.", bind_text,
                  parse=parse_int, when=options("distributed"), also=along("loader.sampler.seed"))
        self._add(form, "Replicas:", "sampler_num_replicas", "loader.sampler.num_replicas",
                  _spin(0, 65536, special="world size (default)"),
                  "How many processes share the data; the default is the number torchrun started.",
                  self._bind_optional_spin, when=options("distributed"), also=along("loader.sampler.num_replicas"))
        self._add(form, "Rank:", "sampler_rank", "loader.sampler.rank",
                  _spin(-1, 65535, special="this process's (default)"),
                  "Which share this process trains on, from 0; the default is the rank torchrun gave it.",
                  self._bind_optional_spin, when=options("distributed"), also=along("loader.sampler.rank"))

        self._add(form, "Batch size:", "batch_size", "loader.batch_size", _spin(1, 1_000_000),
                  "How many samples go through the model together before each optimizer step.", bind_spin)
        self._add(form, "Workers:", "num_workers", "loader.num_workers", _spin(-1, 256, special="auto"),
                  "Processes that load and augment images in parallel; 0 loads them in the training process. "
                  "Auto uses none when cached images need no augmentation; otherwise one per CPU but one when "
                  "training on a GPU, a quarter of the CPUs when training on the CPU (at most 8).",
                  self._bind_optional_spin)
        self._add(form, "Persistent:", "persistent_workers", "loader.persistent_workers",
                  _combo([("auto (on when there are workers)", None), ("on", True), ("off", False)]),
                  "Keep the worker processes alive from one epoch to the next instead of starting them again.",
                  bind_combo)
        self._add(form, "Pin memory:", "pin_memory", "loader.pin_memory",
                  _combo([("auto (on when training on CUDA)", None), ("on", True), ("off", False)]),
                  "Page-locked host memory makes copies to a CUDA GPU faster; auto turns it on only for CUDA.",
                  bind_combo)
        self._add(form, "Image cache:", "decoded_cache", "loader.decoded_cache",
                  _combo([("auto (when it fits in memory)", "auto"), ("on", "on"), ("off", "off")]),
                  "Decode and resize every image once and keep it in memory, so each epoch runs only the random "
                  "augmentation; with random resized crops, the crops come from the image presized to its "
                  "shorter side.", bind_combo)
        self._add(form, "Cache limit:", "decoded_cache_max_mb", "loader.decoded_cache_max_mb",
                  _spin(0, 16_777_216, step=256, suffix=" MiB", special="auto (a quarter of free memory)"),
                  "The most memory the image cache may take; when the images would need more, they are decoded "
                  "every epoch instead (said in the run's log).", self._bind_optional_spin)
        self._add(form, "", "drop_last", "loader.drop_last", QCheckBox("Drop the last incomplete batch"),
                  "Skip the final batch of an epoch when it is smaller than the batch size.", bind_check)
        self._shuffle_note = _note()
        self._shuffle = self._add(
            form, "Shuffle:", "shuffle", "loader.shuffle",
            _combo([("auto (as the sampler does)", None), ("on", True), ("off (dataset order)", False)]),
            "DataLoader's shuffle flag; only the random and sequential samplers go with it (off turns the "
            "random sampler into a sequential one).", bind_combo, note=self._shuffle_note)
        return box

    def _build_loss(self) -> QGroupBox:
        box, form = self._form("Loss", "loss")
        self._loss_hint = _note()
        combo = self._add(form, "Loss:", "loss", "loss.name", _combo((LOSS_LABELS.get(n, n), n) for n in LOSSES),
                          "The function the training minimises; it has to fit the data's task.", bind_combo,
                          also=lambda name: self._loss_values(name, "loss.name"), note=self._loss_hint)
        self._loss_combo = combo
        combo.currentIndexChanged.connect(self._on_choice_changed)

        def along(path):
            return lambda _value: self._loss_values(combo.currentData(), path)

        self._add(form, "Label smoothing:", "label_smoothing", "loss.label_smoothing",
                  _double(0.0, 0.999, step=0.05, decimals=3, special="off"),
                  "Move this share of each target's probability onto the other classes, which discourages "
                  "over-confident predictions.", bind_double,
                  when=(combo, LOSS_OPTIONS["label_smoothing"]), also=along("loss.label_smoothing"))
        self._class_weights_mode = self._add(
            form, "Class weights:", "class_weights_mode", "loss.class_weights",
            _combo([("none (all equal)", None), ("balanced (inverse class frequency)", "balanced"),
                    ("from list", "list")]),
            "Weigh each class's contribution to the loss: equally, inversely to how often it occurs, or by a "
            "typed list.", self._bind_list_mode, when=(combo, LOSS_OPTIONS["class_weights"]),
            also=along("loss.class_weights"), edit_name="class_weights", modes=(None, "balanced", "list"),
            missing="type one weight per class in the box below, such as 1, 2, 1")
        self._class_weights_edit = QLineEdit()
        self._class_weights_edit.setPlaceholderText("one weight per class, in class order: 1, 2, 1, …")
        self._add(form, "", "class_weights", "loss.class_weights", self._class_weights_edit,
                  "One non-negative weight per class, in the order of the class names.", self._bind_list_edit,
                  when=(combo, LOSS_OPTIONS["class_weights"]), also=along("loss.class_weights"))
        self._class_weights_mode.currentIndexChanged.connect(self._on_choice_changed)
        beta = QLineEdit()
        self._add(form, "Beta:", "loss_beta", "loss.beta", beta,
                  "Where smooth L1 changes from squared to absolute error; must be above 0.", bind_float_text,
                  when=(combo, LOSS_OPTIONS["beta"]), also=along("loss.beta"))
        return box

    def _build_optimizer(self) -> QGroupBox:
        box, form = self._form("Optimizer", "optimizer")
        combo = self._add(form, "Optimizer:", "optimizer", "optimizer.name",
                          _combo((OPTIMIZER_LABELS.get(n, n), n) for n in OPTIMIZERS),
                          "The algorithm that updates the weights from the gradients.", bind_combo)
        self._optimizer_combo = combo
        combo.currentIndexChanged.connect(self._on_choice_changed)

        def along(_value):
            return {"optimizer.name": combo.currentData()}

        def options(key):
            return (combo, OPTIMIZER_OPTIONS[key])

        lr = QLineEdit()
        lr.setPlaceholderText("such as 1e-3")
        self._add(form, "Learning rate:", "lr", "optimizer.lr", lr,
                  "Step size of the optimizer for the new head, typed as a number such as 3e-4; must be above 0.",
                  bind_float_text)
        self._add(form, "Weight decay:", "weight_decay", "optimizer.weight_decay", QLineEdit(),
                  "Pull the weights towards zero by this factor each step (such as 1e-4); 0 turns it off.",
                  bind_float_text)
        self._momentum = self._add(
            form, "Momentum:", "momentum", "optimizer.momentum",
            _double(-0.05, 0.999, step=0.05, decimals=3, special="default"),
            "How much of the previous update each step keeps; the lowest setting uses the default (0.9 for "
            "SGD, 0 for RMSprop).", self._bind_optional_double, when=options("momentum"), also=along)
        self._add(form, "", "nesterov", "optimizer.nesterov", QCheckBox("Nesterov momentum"),
                  "Look ahead along the momentum before taking the gradient; needs a momentum above 0.",
                  bind_check, when=options("nesterov"), also=along)
        self._add(form, "Betas:", "betas", "optimizer.betas", QLineEdit(),
                  "Decay rates of Adam's running averages of the gradient and its square, two numbers such as "
                  "0.9, 0.999.", bind_text, parse=parse_numbers, show=format_numbers,
                  when=options("betas"), also=along)
        self._add(form, "Epsilon:", "eps", "optimizer.eps", QLineEdit(),
                  "A small number added to the denominator for numerical stability, such as 1e-8.",
                  bind_float_text, when=options("eps"), also=along)
        self._add(form, "Alpha:", "alpha", "optimizer.alpha", _double(0.0, 0.9999, step=0.01, decimals=4),
                  "Smoothing constant of RMSprop's running average of squared gradients.", bind_double,
                  when=options("alpha"), also=along)
        self._add(form, "Backbone lr ×:", "backbone_lr_mult", "optimizer.backbone_lr_mult", QLineEdit(),
                  "The pretrained backbone learns at the learning rate times this (such as 0.1); the new head "
                  "uses the learning rate itself.", bind_float_text)
        return box

    def _build_schedule(self) -> QGroupBox:
        box, form = self._form("Learning-rate schedule", "schedule")
        self._schedule_hint = _note()
        combo = self._add(form, "Schedule:", "schedule", "schedule.name",
                          _combo((SCHEDULE_LABELS.get(n, n), n) for n in SCHEDULES),
                          "How the learning rate changes during the run.", bind_combo, note=self._schedule_hint)
        self._schedule_combo = combo
        combo.currentIndexChanged.connect(self._on_choice_changed)

        def along(_value):
            return {"schedule.name": combo.currentData()}

        def options(key):
            return (combo, SCHEDULE_OPTIONS[key])

        self._add(form, "Step size:", "step_size", "schedule.step_size", _spin(1, 100_000, suffix=" epochs"),
                  "Multiply the learning rate by gamma after every this many epochs.", bind_spin,
                  when=options("step"), also=along)
        self._add(form, "Gamma:", "gamma", "schedule.gamma", QLineEdit(),
                  "The factor the learning rate is multiplied by at each step, such as 0.1.", bind_float_text,
                  when=options("step"), also=along)
        self._add(form, "Lowest lr:", "eta_min", "schedule.eta_min", QLineEdit(),
                  "The learning rate the cosine reaches at the end of the run, such as 1e-6.", bind_float_text,
                  when=options("cosine"), also=along)
        max_lr = QLineEdit()
        max_lr.setPlaceholderText("the optimizer's learning rate")
        self._add(form, "Peak lr:", "max_lr", "schedule.max_lr", max_lr,
                  "The highest learning rate of the cycle; empty uses the optimizer's learning rate.",
                  bind_float_text, optional=True, when=options("onecycle"), also=along)
        self._add(form, "Warm-up share:", "pct_start", "schedule.pct_start",
                  _double(0.001, 0.999, step=0.05, decimals=3),
                  "The share of all steps spent rising to the peak learning rate.", bind_double,
                  when=options("onecycle"), also=along)
        self._add(form, "Patience:", "plateau_patience", "schedule.patience", _spin(0, 100_000, suffix=" epochs"),
                  "Epochs without a better validation loss before the learning rate is lowered.", bind_spin,
                  when=options("plateau"), also=along)
        self._add(form, "Factor:", "plateau_factor", "schedule.factor", _double(0.001, 0.999, step=0.05, decimals=3),
                  "The factor the learning rate is multiplied by on a plateau.", bind_double,
                  when=options("plateau"), also=along)
        return box

    def _build_training(self) -> QGroupBox:
        box, form = self._form("Training", "training")
        self._add(form, "Epochs:", "epochs", "train.epochs", _spin(1, 1_000_000),
                  "How many passes over the training set the run makes.", bind_spin)
        items = [(name, name) for name in DEVICES]  # labelled by refresh_devices once PyTorch is loaded
        self._device_note = _note()
        self._device = self._add(form, "Device:", "device", "train.device", _combo(items),
                                 "Where the run computes: auto takes a CUDA GPU, then Apple's MPS, then the CPU.",
                                 bind_combo, note=self._device_note)
        self._device.currentIndexChanged.connect(self._on_choice_changed)
        self._add(form, "Precision:", "precision", "train.precision",
                  _combo((PRECISION_LABELS.get(p, p), p) for p in PRECISIONS),
                  "Number format of the forward pass: fp16/bf16 autocast saves memory and time on a CUDA GPU.",
                  bind_combo,
                  note=_note("Mixed precision pays off on CUDA (fp16 adds a gradient scaler there); on the CPU "
                             "autocast runs too but rarely helps, and on MPS the run stays fp32."))
        seed = QLineEdit()
        self._add(form, "Seed:", "seed", "train.seed", seed,
                  "Seeds every random number generator, so a CPU run with the same seed repeats exactly.",
                  bind_text, parse=parse_int)
        self._add(form, "", "deterministic", "train.deterministic", QCheckBox("Deterministic algorithms"),
                  "Use only deterministic PyTorch algorithms (torch.use_deterministic_algorithms); slower, and an "
                  "operation without one stops the run.", bind_check)
        clip = QLineEdit()
        clip.setPlaceholderText("off")
        self._add(form, "Clip grad norm:", "grad_clip_norm", "train.grad_clip_norm", clip,
                  "Scale the gradients down when their overall norm exceeds this; empty turns clipping off.",
                  bind_float_text, optional=True)
        self._add(form, "Feature cache:", "feature_cache", "train.feature_cache",
                  _combo((FEATURE_CACHE_LABELS.get(m, m), m) for m in FEATURE_CACHE_MODES),
                  "When the frozen layers are the start of the model and no augmentation is on, their output is "
                  "computed once per image and later epochs train only the rest: much faster, same result.",
                  bind_combo,
                  note=_note("The run's log says whether the cache is used, where the model is cut, or why not."))
        cache_mb = QLineEdit()
        cache_mb.setPlaceholderText("half the free memory")
        self._add(form, "Cache limit (MiB):", "feature_cache_max_mb", "train.feature_cache_max_mb", cache_mb,
                  "The most memory the cached features may take; above it the run recomputes them every epoch. "
                  "Empty: half of the memory available when the run starts.",
                  bind_text, parse=parse_optional_int)
        self._add(form, "Channels last:", "channels_last", "train.channels_last",
                  _combo([("auto (on for CUDA with a convolutional model)", None), ("on", True), ("off", False)]),
                  "Store the model's weights and the image batches channels-last (NHWC): faster convolutions on "
                  "a CUDA GPU's tensor cores, usually slower on the CPU.", bind_combo)
        self._add(form, "", "compile", "train.compile", QCheckBox("Compile the model (torch.compile)"),
                  "Compile the training forward pass: the first batch takes longer (seconds on a GPU, minutes on "
                  "the CPU), later ones are faster. If compiling fails, the run says why and trains uncompiled.",
                  bind_check)
        return box

    def _build_distributed(self) -> QGroupBox:
        box, form = self._form("Several processes", "distributed")
        self._processes_note = _note()
        self._processes = self._add(
            form, "Processes:", "processes", "distributed.processes",
            _spin(1, 1024, suffix=" processes", special="1 (in the app)"),
            "Train in this many processes on this machine with DistributedDataParallel, started through "
            "torchrun: one process per GPU, or on the CPU several processes that share its cores (gloo). "
            "The batch size is per process, so every step trains on processes × batch size samples. "
            "1 trains in the app's own process.", bind_spin, note=self._processes_note)
        self._processes.valueChanged.connect(self._on_choice_changed)

        def several() -> bool:
            return self._processes.value() > 1

        self._add(form, "Backend:", "dist_backend", "distributed.backend",
                  _combo((BACKEND_LABELS.get(b, b), b) for b in DIST_BACKENDS),
                  "How the processes exchange gradients: nccl between CUDA GPUs, gloo on the CPU. Auto takes nccl "
                  "when every process has a GPU.", bind_combo, when=several)
        self._add(form, "", "sync_batchnorm", "distributed.sync_batchnorm",
                  QCheckBox("Synchronise BatchNorm across processes"),
                  "Compute BatchNorm statistics over all the processes' batches together (SyncBatchNorm) instead "
                  "of each process's own: steadier with small per-process batches, at some communication cost. "
                  "GPUs only.", bind_check, when=several)
        self._add(form, "Timeout:", "dist_timeout", "distributed.timeout_s", _spin(10, 86_400, step=30, suffix=" s"),
                  "How long a process waits for the others (one that crashed or hangs) before the run ends with "
                  "an error instead of waiting for ever.", bind_spin, when=several)
        return box

    def refresh_devices(self) -> None:
        """Label each device choice with whether this machine has it (once PyTorch is imported; see
        devices_available)."""
        here = devices_available(load=False)
        if here is None:
            return
        for i in range(self._device.count()):
            name = self._device.itemData(i)
            if name == "auto":
                text = f"auto (uses {auto_device()} here)"
            else:
                text = name if here.get(name, False) else f"{name} (not available here)"
            self._device.setItemText(i, text)
        self._on_choice_changed()

    def _build_early_stopping(self) -> QGroupBox:
        box, form = self._form("Early stopping", "early_stopping")
        self._es_enabled = self._add(form, "", "early_stopping", "early_stopping.enabled",
                                     QCheckBox("Stop when the metric stops improving"),
                                     "End the run early once the watched metric has not improved for a while.",
                                     bind_check)
        self._es_enabled.toggled.connect(self._on_choice_changed)
        self._es_widgets = [
            self._add(form, "Watch:", "es_monitor", "early_stopping.monitor",
                      _combo((MONITOR_LABELS.get(m, m), m) for m in MONITORS),
                      "The metric whose improvement keeps the run going.", bind_combo),
            self._add(form, "Better is:", "es_mode", "early_stopping.mode",
                      _combo((MODE_LABELS.get(m, m), m) for m in MONITOR_MODES),
                      "Whether a lower or a higher value of the metric is an improvement.", bind_combo),
            self._add(form, "Patience:", "es_patience", "early_stopping.patience", _spin(1, 100_000, suffix=" epochs"),
                      "Epochs without an improvement before the run stops.", bind_spin),
            self._add(form, "Min. change:", "es_min_delta", "early_stopping.min_delta", QLineEdit(),
                      "The smallest change of the metric that counts as an improvement; 0 counts any.",
                      bind_float_text),
            self._add(form, "", "es_restore_best", "early_stopping.restore_best",
                      QCheckBox("Restore the best epoch's weights"),
                      "End with the weights of the best epoch rather than those of the last one.", bind_check),
        ]
        return box

    def _build_checkpoints(self) -> QGroupBox:
        box, form = self._form("Checkpoints and logs", "checkpoints")
        self._add(form, "", "checkpoint_every_epoch", "checkpoint.every_epoch", QCheckBox("Keep a file per epoch"),
                  "Keep an epoch-NNN.pt checkpoint after every epoch (last.pt and best.pt are always written).",
                  bind_check)
        self._add(form, "Keep last:", "checkpoint_keep_last", "checkpoint.keep_last",
                  _spin(0, 100_000, special="all", suffix=" files"),
                  "How many of the newest epoch files are kept; the lowest setting keeps them all.", bind_spin)
        self._add(form, "Best by:", "checkpoint_monitor", "checkpoint.monitor",
                  _combo((MONITOR_LABELS.get(m, m), m) for m in MONITORS),
                  "The metric that decides which epoch is saved as best.pt.", bind_combo)
        self._add(form, "Better is:", "checkpoint_mode", "checkpoint.mode",
                  _combo((MODE_LABELS.get(m, m), m) for m in MONITOR_MODES),
                  "Whether a lower or a higher value of that metric is better.", bind_combo)
        self._add(form, "", "tensorboard", "output.tensorboard", QCheckBox("Write TensorBoard logs"),
                  "Write TensorBoard event files (losses, accuracy, learning rate) into the run folder.", bind_check)
        return box

    # -- custom bindings -----------------------------------------------------------------------
    @staticmethod
    def _bind_optional_spin(state: ProjectState, path: str, box: QSpinBox, **kw) -> FieldBinding:
        """A spin box whose lowest value (shown as its special text) stands for None: the engine's default."""
        low = box.minimum()
        return FieldBinding(state, path, box, read=lambda: None if box.value() == low else box.value(),
                            write=lambda v: box.setValue(low if v is None else int(v)),
                            signal=box.valueChanged, **kw)

    @staticmethod
    def _bind_optional_double(state: ProjectState, path: str, box: QDoubleSpinBox, **kw) -> FieldBinding:
        low = box.minimum()
        return FieldBinding(state, path, box, read=lambda: None if box.value() <= low else box.value(),
                            write=lambda v: box.setValue(low if v is None else float(v)),
                            signal=box.valueChanged, **kw)

    def _bind_list_mode(self, state: ProjectState, path: str, combo: QComboBox, *, edit_name: str,
                        modes: tuple, missing: str, **kw) -> FieldBinding:
        """The chooser of a field that is None, 'balanced' or a list; 'from list' takes the list from its box."""

        def edit() -> QLineEdit:
            box = self._widgets[f"training.{edit_name}"]
            assert isinstance(box, QLineEdit)  # the list's own text box
            return box

        def read():
            mode = combo.currentData()
            if mode != "list":
                return mode
            text = edit().text()
            if not text.strip():
                raise ValueError(missing)
            return parse_numbers(text)

        def write(value):
            mode = "list" if isinstance(value, list) else value
            if mode not in modes:
                mode = modes[0]
            combo.setCurrentIndex(max(0, combo.findData(mode)))

        return FieldBinding(state, path, combo, read=read, write=write, signal=combo.currentIndexChanged, **kw)

    @staticmethod
    def _bind_list_edit(state: ProjectState, path: str, edit: QLineEdit, **kw) -> FieldBinding:
        def write(value):
            # Keep what was typed while the field holds no list, so switching to "from list" finds it again.
            if isinstance(value, list):
                edit.setText(format_numbers(value))

        return FieldBinding(state, path, edit, read=lambda: parse_numbers(edit.text()), write=write,
                            signal=edit.editingFinished, **kw)

    # -- keeping a chosen sampler or loss consistent ---------------------------------------------
    def _sampler_values(self, name: str | None, own_path: str) -> dict[str, Any]:
        """What has to change along with a sampler choice so the project stays valid (validate()'s rules).

        Options of other samplers that validate() refuses are cleared; weighted_random gets its weights
        from the panel (balanced, or the typed list). The field being set itself is left out.
        """
        loader = self.state.config.loader
        s = loader.sampler
        values: dict[str, Any] = {"loader.sampler.name": name}
        if loader.shuffle is not None and (name not in SHUFFLE_SAMPLERS or
                                           (name == "sequential" and loader.shuffle is True)):
            values["loader.shuffle"] = None
        if s.num_samples is not None and name not in SAMPLER_OPTIONS["num_samples"]:
            values["loader.sampler.num_samples"] = None
        if s.indices is not None and name not in SAMPLER_OPTIONS["indices"]:
            values["loader.sampler.indices"] = None
        if name in SAMPLER_OPTIONS["weights"]:
            if s.weights is None:
                values["loader.sampler.weights"] = self._typed_sampler_weights()
        elif s.weights is not None:
            values["loader.sampler.weights"] = None
        values.pop(own_path, None)
        return values

    def _typed_sampler_weights(self) -> str | list[float]:
        if self._weights_mode.currentData() == "list":
            try:
                return parse_numbers(self._weights_edit.text())
            except ValueError:
                pass
        return "balanced"

    def _loss_values(self, name: str | None, own_path: str) -> dict[str, Any]:
        """Options of the previous loss that validate() refuses with the new one are reset."""
        loss = self.state.config.loss
        values: dict[str, Any] = {"loss.name": name}
        if loss.label_smoothing and name not in LOSS_OPTIONS["label_smoothing"]:
            values["loss.label_smoothing"] = 0.0
        if loss.class_weights is not None and name not in LOSS_OPTIONS["class_weights"]:
            values["loss.class_weights"] = None
        values.pop(own_path, None)
        return values

    # -- layout and visibility -----------------------------------------------------------------
    def _on_state_changed(self, _path: str) -> None:
        self._sync()

    def _on_choice_changed(self, *_args) -> None:
        self._sync()

    def _sync(self) -> None:
        """Show the options of the chosen sampler, loss, optimizer and schedule; enable what applies."""
        for form, cell, shown in self._rows:
            form.setRowVisible(cell, shown())
        sampler = self._sampler_combo.currentData()
        self._sampler_hint.setText(SAMPLER_HINTS.get(sampler, ""))
        default = {"random": "default (without replacement)", "weighted_random": "default (with replacement)"}
        self._replacement.setItemText(0, default.get(sampler, "default"))
        shuffle_applies = sampler in SHUFFLE_SAMPLERS
        self._shuffle.setEnabled(shuffle_applies)
        self._shuffle_note.setText("" if shuffle_applies else
                                   "The chosen sampler decides the order, so the loader's flag stays on auto.")
        self._shuffle_note.setVisible(not shuffle_applies)
        self._weights_edit.setEnabled(self._weights_mode.currentData() == "list")
        self._class_weights_edit.setEnabled(self._class_weights_mode.currentData() == "list")
        self._loss_hint.setText(LOSS_HINTS.get(self._loss_combo.currentData(), ""))
        self._schedule_hint.setText(SCHEDULE_HINTS.get(self._schedule_combo.currentData(), ""))
        optimizer = self._optimizer_combo.currentData()
        self._momentum.setSpecialValueText("default (0.9)" if optimizer == "sgd" else "default (0)")
        device = self._device.currentData()
        here = devices_available(load=False)
        missing = here is not None and device in ("cuda", "mps") and not here.get(device, False)
        self._device_note.setText(f"This machine has no {device.upper() if device == 'cuda' else 'MPS'} device: "
                                  "a run started here stops with an error. Choose auto or cpu to train here."
                                  if missing else "")
        self._device_note.setVisible(missing)
        for widget in self._es_widgets:
            widget.setEnabled(self._es_enabled.isChecked())
        processes = self._processes.value()
        batch = self.state.config.loader.batch_size
        self._processes_note.setText(
            f"Each step trains on {processes} × {batch} = {processes * batch} samples (the batch size is per "
            "process). Each process's output has its own tab in the Log." if processes > 1 else "")
        self._processes_note.setVisible(processes > 1)

    def _arrange(self, *, two: bool) -> None:
        """Two columns of groups when the panel is wide enough, one otherwise (groups keep their objects)."""
        if two == self._two_columns:
            return
        self._two_columns = two
        # The groups' own layout items are moved, not recreated: a widget remembers one item, and a new item
        # would leave the old one's cached height-for-width answers stale (groups drawn squashed after a row
        # appears or a note rewraps).
        items = {}
        for col in self._cols:
            while col.count():
                item = col.takeAt(0)
                assert item is not None  # count() said there is one
                if item.widget() is not None:
                    items[item.widget()] = item
        groups = [self._left, self._right] if two else [self._left + self._right, []]
        for col, boxes in zip(self._cols, groups, strict=True):
            for box in boxes:
                if box in items:
                    col.addItem(items[box])
                else:
                    col.addWidget(box)
            col.addStretch(1)
        self._columns_layout.setStretch(1, 1 if two else 0)
        self._columns_layout.setSpacing(12 if two else 0)

    def _two_column_width(self) -> int:
        def widest(boxes):
            return max(box.minimumSizeHint().width() for box in boxes)

        margins = self._columns_layout.contentsMargins()
        return widest(self._left) + widest(self._right) + margins.left() + margins.right() + self.TWO_COLUMN_MARGIN

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self._arrange(two=event.size().width() >= self._two_column_width())
        super().resizeEvent(event)
