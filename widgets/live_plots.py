"""Live training curves: batch loss, epoch losses, accuracies and learning rate, in one exportable pyqtgraph layout."""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.exporters import ImageExporter
from PySide6.QtCore import QEvent, QSize, Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics, QImage, QPalette
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

OBJECT_NAMES: dict[str, str] = {
    "plots.layout": "the four training plots (batch loss, epoch loss, accuracy, learning rate); drag to pan, "
    "wheel to zoom, right-click for View All",
}


SMOOTHING = 0.9  # weight of the past in the smoothed batch loss (TensorBoard's default look)
EXPORT_SIZE = QSize(1200, 900)  # used when the plots were never laid out on screen
# A curve longer than this is drawn from its min/max envelope of at most this many points while the plot follows
# the run, so an update costs the same at step 1,000 and at step 1,000,000. Zoomed in, the plot gets every point
# (clipped to the view).
DISPLAY_POINTS = 4096

# Mid-lightness colours that keep their contrast on both a white and a near-black background.
COLOURS = {
    "train": "#3b82d6",
    "val": "#e8710a",
    "train_acc": "#2ca25f",
    "val_acc": "#d6336c",
    "lr": "#8e5ad6",
}


class Series:
    """x/y values in numpy arrays that grow by doubling, so appending is amortised O(1) per point."""

    def __init__(self, capacity: int = 256):
        self.x = np.empty(capacity, dtype=np.float64)
        self.y = np.empty(capacity, dtype=np.float64)
        self.n = 0
        self.lo = math.inf  # running min and max of y, for the flat-curve check without a pass over the data
        self.hi = -math.inf
        self._bucket = 1  # raw points per envelope bucket (a power of two)
        self._done = 0  # raw points already summarised in the envelope
        self._ex = np.empty(0)
        self._ey = np.empty(0)
        self._en = 0
        self.summarised = 0  # raw points passed through _envelope since the start (the work display() did)

    def extend(self, xs: np.ndarray, ys: np.ndarray) -> None:
        need = self.n + len(xs)
        if need > len(self.x):
            capacity = max(need, 2 * len(self.x))
            # Fresh arrays: the plot may still hold a view of the old ones until its next setData.
            self.x = np.concatenate([self.x[: self.n], np.empty(capacity - self.n)])
            self.y = np.concatenate([self.y[: self.n], np.empty(capacity - self.n)])
        self.x[self.n : need] = xs
        self.y[self.n : need] = ys
        self.n = need
        finite = ys[np.isfinite(ys)]
        if len(finite):
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[: self.n], self.y[: self.n]

    def display(self, limit: int = DISPLAY_POINTS) -> tuple[np.ndarray, np.ndarray]:
        """At most about `limit` points to draw: every point, or each bucket's minimum and maximum in x order.

        Kept up to date incrementally: a new bucket is summarised once; when the envelope outgrows the limit
        the bucket size doubles and the envelope is rebuilt (amortised O(1) per point, as the arrays' growth).
        """
        if self.n <= limit:
            return self.used()
        bucket = self._bucket
        while 2 * (self.n // bucket) > limit:
            bucket *= 2
        if bucket != self._bucket:
            self._bucket, self._done, self._en = bucket, 0, 0
        full = self.n // bucket * bucket
        if full > self._done:
            ex, ey = _envelope(self.x[self._done : full], self.y[self._done : full], bucket)
            self.summarised += full - self._done
            need = self._en + len(ex)
            if need > len(self._ex):
                self._ex = np.concatenate([self._ex[: self._en], np.empty(max(need, 2 * len(self._ex)) - self._en)])
                self._ey = np.concatenate([self._ey[: self._en], np.empty(len(self._ex) - self._en)])
            self._ex[self._en : need], self._ey[self._en : need] = ex, ey
            self._en, self._done = need, full
        # The first and last points are always drawn, so the x range is the run's whole span.
        head = slice(0, 0) if self._ex[0] == self.x[0] else slice(0, 1)
        tail = self._done if self._done < self.n else self.n - (self._ex[self._en - 1] != self.x[self.n - 1])
        return (
            np.concatenate([self.x[head], self._ex[: self._en], self.x[tail : self.n]]),
            np.concatenate([self.y[head], self._ey[: self._en], self.y[tail : self.n]]),
        )


def _envelope(x: np.ndarray, y: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bucket of `bucket` consecutive points as two: its minimum and its maximum, in x order (NaN ignored)."""
    xs, ys = x.reshape(-1, bucket), y.reshape(-1, bucket)
    finite = np.isfinite(ys)
    lo = np.argmin(np.where(finite, ys, np.inf), axis=1)
    hi = np.argmax(np.where(finite, ys, -np.inf), axis=1)
    first, second = np.minimum(lo, hi), np.maximum(lo, hi)
    rows = np.arange(len(ys))
    ex, ey = np.empty(2 * len(ys)), np.empty(2 * len(ys))
    ex[0::2], ex[1::2] = xs[rows, first], xs[rows, second]
    ey[0::2], ey[1::2] = ys[rows, first], ys[rows, second]
    return ex, ey


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _IntegerAxis(pg.AxisItem):
    """An epoch axis: ticks only at whole numbers (there is no epoch 1.5)."""

    def tickValues(self, minVal, maxVal, size):  # noqa: N802, N803 - pyqtgraph override
        levels = [
            (spacing, [v for v in values if float(v).is_integer()])
            for spacing, values in super().tickValues(minVal, maxVal, size)
            if spacing >= 1
        ]
        if not any(values for _, values in levels):
            levels = [(1.0, [float(v) for v in range(math.ceil(minVal), math.floor(maxVal) + 1)])]
        return levels


class _SpacedAxis(pg.AxisItem):
    """A value axis whose labelled ticks never crowd: at least GAP_LINES text lines apart however short the plot
    (pyqtgraph keeps two intervals at any length, so a 40-pixel axis wrote 0.2, 0.4, 0.6 and 0.8 over each other)."""

    GAP_LINES = 1.6

    def min_gap(self) -> float:
        """The fewest pixels between two labelled ticks."""
        return self.GAP_LINES * QFontMetrics(self.style.get("tickFont") or QFont()).height()

    def tickSpacing(self, minVal, maxVal, size):  # noqa: N802, N803 - pyqtgraph override
        levels = super().tickSpacing(minVal, maxVal, size)
        dif = abs(maxVal - minVal)
        if not levels or dif == 0 or size <= 0 or self.orientation not in ("left", "right"):
            return levels
        gap = self.min_gap()
        roomy = [(spacing, offset) for spacing, offset in levels if spacing * size / dif >= gap]
        if roomy:
            return roomy
        # Half a line in from either end: pyqtgraph hides a label that would stick out of the axis.
        inset = dif * gap / self.GAP_LINES / 2 / size
        return [(_roomy_step(min(minVal, maxVal) + inset, max(minVal, maxVal) - inset, dif * gap / size), 0.0)]


def _roomy_step(low: float, high: float, wanted: float) -> float:
    """A tick step (1, 2 or 5 times a power of ten) for an axis from low to high: the smallest of at least
    `wanted` that puts a tick in the range; else a smaller one that puts exactly one there (one label cannot
    crowd), so a short axis still has a number on it."""
    power = 10.0 ** math.floor(math.log10(wanted))
    steps = sorted((m * power * f for m in (1, 2, 5) for f in (0.1, 1.0, 10.0)), reverse=True)
    roomy = [step for step in steps if step >= wanted]
    for step in reversed(roomy):
        if math.floor(high / step) >= math.ceil(low / step):
            return step
    for step in steps[len(roomy) :]:
        ticks = math.floor(high / step) - math.ceil(low / step) + 1
        if ticks == 1:
            return step
        if ticks > 1:
            break
    return roomy[-1]


class _TimedLayout(pg.GraphicsLayoutWidget):
    """The plots' view, which remembers how long painting it takes (the run view paces its updates by it)."""

    def __init__(self) -> None:
        super().__init__()
        self.paint_seconds = 0.0  # moving average of one paint of the whole view
        self.paint_total = 0.0  # seconds spent painting it since it was made
        self.paint_count = 0  # paints since it was made

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        started = time.perf_counter()
        super().paintEvent(event)
        took = time.perf_counter() - started
        self.paint_total += took
        self.paint_count += 1
        self.paint_seconds = took if self.paint_seconds == 0.0 else 0.7 * self.paint_seconds + 0.3 * took


class PlotGrid(QWidget):
    """Plots in one GraphicsLayoutWidget (PLOTS: name -> title, x label, y label, row, column), downsampled, clipped
    to the view and coloured from the palette. LivePlots shows one run as it trains; RunsPlots overlays runs."""

    PLOTS: dict[str, tuple[str, str, str, int, int]] = {}
    # The axes' names under and beside each plot; without them (a grid that must fit a short pane) the titles
    # name what is plotted, in TITLE_SIZE.
    AXIS_LABELS = True
    TITLE_SIZE: str | None = None

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.layout_widget = _TimedLayout()
        self.layout_widget.setObjectName("plots.layout")
        self.layout_widget.setMinimumSize(440, 300)  # four plots stay legible; fits 1280x800 with the docks
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.layout_widget)

        self.plots: dict[str, pg.PlotItem] = {}
        for name, (_title, xlabel, _ylabel, row, col) in self.PLOTS.items():
            axes: dict[str, pg.AxisItem] = {"left": _SpacedAxis("left")}
            if xlabel == "epoch":
                axes["bottom"] = _IntegerAxis("bottom")
            plot = self.layout_widget.addPlot(row=row, col=col, axisItems=axes)
            plot.showGrid(x=True, y=True, alpha=0.2)
            # Drawn points stay near the plot's pixel width however long the run: an update costs the same.
            plot.setDownsampling(auto=True, mode="peak")
            plot.setClipToView(True)
            plot.addLegend(offset=(-10, 10))  # top right, where falling curves leave room
            self.plots[name] = plot

    def settle_ranges(self) -> None:
        """Each plot's range that fits its new data, and the view's transform for it, set now. Left to the paint
        (pyqtgraph re-ranges as it prepares one), the new transform asks for a second paint of every plot as soon
        as the first ends: two full paints for each update (measured: 25 paints of a 10 s run, 17 with this)."""
        for plot in self.plots.values():
            plot.getViewBox().prepareForPaint()

    @property
    def paint_seconds(self) -> float:
        """How long one paint of the plots takes lately (0 before the first)."""
        return self.layout_widget.paint_seconds

    @property
    def paint_total(self) -> float:
        """Seconds spent painting the plots so far."""
        return self.layout_widget.paint_total

    @staticmethod
    def _follows(plot: pg.PlotItem) -> bool:
        """The plot follows its data (auto-range on x): draw the bounded envelope; zoomed in, every point."""
        return bool(plot.getViewBox().autoRangeEnabled()[0])

    # -- look ------------------------------------------------------------------------------------
    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt override
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.StyleChange):
            self._apply_palette()
        super().changeEvent(event)

    def _apply_palette(self) -> None:
        """Background and text from the palette, so the plots sit in light and dark themes alike."""
        pal = self.palette()
        background = pal.color(QPalette.ColorRole.Base)
        text = pal.color(QPalette.ColorRole.Text)
        grid = QColor(text)
        self.layout_widget.setBackground(background)
        for name, plot in self.plots.items():
            title, xlabel, ylabel, _, _ = self.PLOTS[name]
            if self.TITLE_SIZE:
                plot.setTitle(title, color=text.name(), size=self.TITLE_SIZE)
                # pyqtgraph keeps 30 pixels for any title: a small one needs its line only
                height = QFontMetrics(self.font()).height() + 4
                plot.titleLabel.setMaximumHeight(height)
                plot.layout.setRowFixedHeight(0, height)
            else:
                plot.setTitle(title, color=text.name())
            for axis_name, label in (("bottom", xlabel), ("left", ylabel)):
                axis = plot.getAxis(axis_name)
                axis.setPen(pg.mkPen(grid))
                axis.setTextPen(pg.mkPen(text))
                if self.AXIS_LABELS:
                    axis.setLabel(label, color=text.name())
                axis.enableAutoSIPrefix(False)  # "loss (x0.001)" misleads; plain numbers read directly
            legend = plot.legend
            if legend is not None:
                legend.setLabelTextColor(text)
                for _, label in legend.items:
                    label.setText(label.text)  # the new colour shows only when the label is drawn again
                fill = QColor(background)
                fill.setAlpha(200)
                legend.setBrush(pg.mkBrush(fill))
                legend.setPen(pg.mkPen(QColor(text.red(), text.green(), text.blue(), 60)))


class LivePlots(PlotGrid):
    """Four plots in one GraphicsLayoutWidget; one PlotDataItem per curve, updated with setData on used slices."""

    # curve name -> (plot name, legend label, colour key, pen width, alpha)
    CURVES = {
        "batch_loss": ("batch", "batch loss", "train", 1, 90),
        "batch_loss_smoothed": ("batch", "smoothed", "train", 2, 255),
        "train_loss": ("loss", "train", "train", 2, 255),
        "val_loss": ("loss", "validation", "val", 2, 255),
        "train_accuracy": ("accuracy", "train", "train_acc", 2, 255),
        "val_accuracy": ("accuracy", "validation", "val_acc", 2, 255),
        "lr": ("lr", "learning rate", "lr", 2, 255),
    }
    PLOTS = {
        # plot name -> (title, x label, y label, row, column)
        "batch": ("Batch loss", "step", "loss", 0, 0),
        "loss": ("Epoch loss", "epoch", "loss", 0, 1),
        "accuracy": ("Accuracy", "epoch", "accuracy (%)", 1, 0),
        "lr": ("Learning rate", "step", "learning rate", 1, 1),
    }

    def __init__(self, parent: QWidget | None = None, smoothing: float = SMOOTHING):
        super().__init__(parent)
        self.smoothing = smoothing
        self.plots["accuracy"].setYRange(0, 100)
        self.plots["accuracy"].enableAutoRange(y=False)  # a fixed 0-100 % scale reads at a glance

        self.curves: dict[str, pg.PlotDataItem] = {}
        self._series: dict[str, Series] = {}
        for name, (plot_name, label, colour, width, alpha) in self.CURVES.items():
            color = QColor(COLOURS[colour])
            color.setAlpha(alpha)  # the raw batch loss is faint so the smoothed line reads on top of it
            pen = pg.mkPen(color, width=width)
            epoch_curve = self.PLOTS[plot_name][1] == "epoch"
            item = pg.PlotDataItem(
                name=label,
                pen=pen,
                # Few epoch points: markers show each one; step curves can hold many thousands of points.
                symbol="o" if epoch_curve else None,
                symbolSize=6,
                symbolPen=pen,
                symbolBrush=color,
            )
            self.plots[plot_name].addItem(item)
            # After addItem: the plot hands its own (menu) settings to each item it adds.
            item.setDownsampling(auto=True, method="peak")
            item.setClipToView(True)
            self.curves[name] = item
            self._series[name] = Series()
        self._ema: float | None = None
        self._lr_range_fixed = False
        self._following = {name: True for name in self.plots}
        # Phase boundaries of a run in phases (train.phases): a dashed line where each later phase begins.
        self._phase: Any = None  # the phase of the last epoch shown
        self._epoch_steps: dict[int, float] = {}  # the last step of each epoch shown while it ran
        self._boundaries: list[tuple[float, float | None, Any]] = []  # (epoch x, step x or None, phase)
        self._phase_lines: list[tuple[pg.PlotItem, pg.InfiniteLine]] = []
        for name, plot in self.plots.items():
            # Zooming in (or pressing "A" to follow again) switches between every point and the envelope.
            plot.getViewBox().sigStateChanged.connect(lambda _box, name=name: self._follow_changed(name))
        self._apply_palette()

    # -- data ------------------------------------------------------------------------------------
    def add_batches(
        self,
        steps: Sequence[int] | np.ndarray,
        losses: Sequence[float] | np.ndarray,
        lrs: Sequence[float] | float | None = None,
    ) -> None:
        """Append batch losses at global steps; lrs is one value per step, or one value for the last step."""
        if len(steps) == 0:
            return
        x = np.asarray(steps, dtype=np.float64)
        y = np.asarray(losses, dtype=np.float64)
        self._append("batch_loss", x, y)
        smoothed = np.empty_like(y)
        ema, w = self._ema, self.smoothing
        for i, value in enumerate(y.tolist()):
            if math.isfinite(value):  # a NaN loss must not poison every later smoothed value
                ema = value if ema is None else w * ema + (1.0 - w) * value
            smoothed[i] = ema if ema is not None else np.nan
        self._ema = ema
        self._append("batch_loss_smoothed", x, smoothed)
        if isinstance(lrs, (int, float)):
            if _finite(lrs):
                self._append("lr", x[-1:], np.array([float(lrs)]))
        elif lrs is not None:
            lr = np.asarray([v if _finite(v) else np.nan for v in lrs], dtype=np.float64)
            keep = np.isfinite(lr)
            self._append("lr", x[keep], lr[keep])
        self.settle_ranges()

    def add_epoch(self, metrics: dict[str, Any]) -> None:
        """Append one epoch's train/validation loss and accuracy (missing or non-finite values are skipped)."""
        batches = self._series["batch_loss"]
        if _finite(metrics.get("epoch")) and batches.n:
            self._epoch_steps[int(metrics["epoch"])] = float(batches.x[batches.n - 1])
        self._add_epochs([metrics])
        self.settle_ranges()

    def phase_boundaries(self) -> list[tuple[float, float | None, Any]]:
        """Where later phases begin: (epoch axis x, step axis x or None when unknown, the phase) for each."""
        return list(self._boundaries)

    def load_history(self, rows: Iterable[dict[str, Any]], batches_per_epoch: int | None = None) -> None:
        """Replace what is shown with a run's epoch curves (metrics.jsonl rows); with batches_per_epoch, its lr too.

        A resumed run calls this with its earlier epochs, then keeps adding batches and epochs.
        """
        self.clear()
        rows = [r for r in rows if _finite(r.get("epoch"))]
        if batches_per_epoch:
            self._epoch_steps = {int(r["epoch"]): float(r["epoch"] * batches_per_epoch) for r in rows}
        self._add_epochs(rows)
        if batches_per_epoch:
            lr_rows = [r for r in rows if _finite(r.get("lr"))]
            if lr_rows:
                # The epoch's lr as recorded at its end, placed at the step the epoch ended on.
                x = np.array([r["epoch"] * batches_per_epoch for r in lr_rows], dtype=np.float64)
                self._append("lr", x, np.array([r["lr"] for r in lr_rows], dtype=np.float64))

    def clear(self) -> None:
        """Empty every curve (a new run starts)."""
        for name, item in self.curves.items():
            self._series[name] = Series()
            item.setData([], [])
        self._ema = None
        self._lr_range_fixed = False
        for plot, line in self._phase_lines:
            plot.removeItem(line)
        for plot in self.plots.values():
            if plot.getAxis("top").isVisible():
                plot.getAxis("top").setTicks(None)
                plot.hideAxis("top")
        self._phase_lines, self._boundaries, self._epoch_steps, self._phase = [], [], {}, None
        for plot in self.plots.values():
            plot.enableAutoRange()
        self.plots["accuracy"].setYRange(0, 100)  # fixed again even after the user zoomed

    def point_count(self, curve: str = "batch_loss") -> int:
        """How many points a curve holds (see CURVES for the names)."""
        return self._series[curve].n

    def curve_data(self, curve: str) -> tuple[np.ndarray, np.ndarray]:
        """A copy of a curve's x and y values."""
        x, y = self._series[curve].used()
        return x.copy(), y.copy()

    def _add_epochs(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            phase = r.get("phase")
            if phase is None or not _finite(r.get("epoch")):
                continue
            if self._phase is not None and phase != self._phase:
                self._mark_phase(int(r["epoch"]), phase)
            self._phase = phase
        for name, scale in (("train_loss", 1.0), ("val_loss", 1.0), ("train_accuracy", 100.0), ("val_accuracy", 100.0)):
            pts = [(r["epoch"], r[name] * scale) for r in rows if _finite(r.get(name)) and _finite(r.get("epoch"))]
            if pts:
                arr = np.asarray(pts, dtype=np.float64)
                self._append(name, arr[:, 0], arr[:, 1])

    def _mark_phase(self, epoch: int, phase: Any) -> None:
        """A dashed line where `phase` begins: before `epoch` on the epoch plots, after the previous epoch's last
        step on the step plots (when that step is known). Its name is a tick of an axis over the plot: inside,
        it lay under the legend (top right, where a late boundary is) or on the curves."""
        step = self._epoch_steps.get(epoch - 1)
        self._boundaries.append((epoch - 0.5, step, phase))
        colour = self.palette().color(QPalette.ColorRole.WindowText)
        colour.setAlpha(140)
        pen = pg.mkPen(colour, width=1, style=Qt.PenStyle.DashLine)
        for name, plot in self.plots.items():
            epochs = self.PLOTS[name][1] == "epoch"
            x = epoch - 0.5 if epochs else step
            if x is None:
                continue
            line = pg.InfiniteLine(pos=x, angle=90, pen=pen)
            plot.addItem(line, ignoreBounds=True)
            self._phase_lines.append((plot, line))
            ticks = [(b[0] if epochs else b[1], f"phase {b[2]}") for b in self._boundaries]
            top = plot.getAxis("top")
            top.setTicks([[(float(at), text) for at, text in ticks if at is not None], []])
            top.setPen(pg.mkPen(colour))
            top.setTextPen(pg.mkPen(colour))
            plot.showAxis("top")

    def _append(self, name: str, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) == 0:
            return
        series = self._series[name]
        series.extend(x, y)
        self._draw(name)
        if name == "lr":
            self._fit_flat_lr(series)

    def _draw(self, name: str) -> None:
        """Hand the curve its points: the bounded envelope while its plot follows the run, all when zoomed in."""
        series = self._series[name]
        plot_name = self.CURVES[name][0]
        following = self._follows(self.plots[plot_name])
        self._following[plot_name] = following
        self.curves[name].setData(*(series.display() if following else series.used()))

    def _follow_changed(self, plot_name: str) -> None:
        following = self._follows(self.plots[plot_name])
        if following != self._following.get(plot_name, True):
            self._following[plot_name] = following
            for name, (curve_plot, *_rest) in self.CURVES.items():
                if curve_plot == plot_name and self._series[name].n:
                    self._draw(name)

    def _fit_flat_lr(self, series: Series) -> None:
        """A constant learning rate gets a 0..2x axis: auto-range would centre it in +-0.5 and show it as 0."""
        plot = self.plots["lr"]
        if series.hi > series.lo:
            if self._lr_range_fixed:  # the schedule started moving: let the axis follow again
                self._lr_range_fixed = False
                plot.enableAutoRange(y=True)
        elif series.hi > 0 and (self._lr_range_fixed or plot.getViewBox().autoRangeEnabled()[1]):
            self._lr_range_fixed = True
            plot.setYRange(0, 2 * series.hi, padding=0)

    # -- export ----------------------------------------------------------------------------------
    def export_png(self, path: str | os.PathLike) -> QSize:
        """Write all four plots as one PNG (the on-screen size, or EXPORT_SIZE when hidden); returns its size.

        Raises OSError when the image cannot be written.
        """
        layout = self.layout_widget.ci
        geometry = layout.geometry()
        try:
            if not self.layout_widget.isVisible():
                # Never shown, offscreen or in a hidden tab: lay the plots out at a fixed size for the picture.
                layout.resize(EXPORT_SIZE.width(), EXPORT_SIZE.height())
            rect = layout.boundingRect()
            exporter = ImageExporter(layout)
            exporter.parameters()["width"] = int(round(rect.width()))  # the height follows the aspect ratio
            # Axes widen to fit their tick labels only once they have been drawn: draw, re-lay out, draw again.
            exporter.export(toBytes=True)
            layout.layout.activate()
            image: QImage = exporter.export(toBytes=True)
        finally:
            layout.setGeometry(geometry)  # the view lays it out only on resize, so put it back as it was
        if image is None or image.isNull() or not image.save(str(path), "PNG"):  # type: ignore[call-overload]  # PySide6 wants str here; its stubs say bytes
            raise OSError(f"could not write a PNG image to {path}")
        return image.size()


# One colour per run in an overlay: Tableau's ten, then the same ten darker (twenty runs stay apart).
RUN_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
# Markers show each epoch of a short run; a long curve is a line.
MARKER_POINTS = 100
# An overlay's curves follow their data from an envelope of at most this many points each (about two per pixel
# of a plot's width): twenty runs make eighty curves, and each point is paid for whenever the plots redraw.
OVERLAY_POINTS = 1024


def _values(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    """One field of every row as floats, NaN where it is missing or not a number."""
    return np.fromiter(
        (
            v if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
            for v in (r.get(key) for r in rows)
        ),
        dtype=np.float64,
        count=len(rows),
    )


def epoch_curves(chunks: Iterable[list[dict[str, Any]]]) -> dict[str, Series]:
    """A run's metrics.jsonl rows, given in pieces (engine.run_files.metrics_chunks; [rows] for a list), as
    RunsPlots' curves: curve name -> Series of epochs and values (accuracy in percent), their envelopes already
    summarised. Each piece becomes arrays at once, so its rows can go.

    Plain numpy work (no Qt): the Runs view calls it off the GUI thread, which then only hands points over."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in RunsPlots.CURVES}
    for rows in chunks:
        epochs = _values(rows, "epoch")
        for name, (_plot, scale) in RunsPlots.CURVES.items():
            values = _values(rows, name) * scale
            keep = np.isfinite(epochs) & np.isfinite(values)
            parts[name].append((epochs[keep], values[keep]))
    out = {}
    for name, pieces in parts.items():
        n = sum(len(x) for x, _y in pieces)
        series = Series(max(256, n))
        for x, y in pieces:
            series.extend(x, y)
        series.display(OVERLAY_POINTS)  # the envelope RunsPlots draws, summarised here rather than on the GUI thread
        out[name] = series
    return out


# A run's name in the legend at most (cut in the middle, where dated run names share the least): a few runs fit
# on one line, and the plots keep the height.
LEGEND_LABEL_WIDTH = 180


class RunsPlots(PlotGrid):
    """Several runs' epoch curves overlaid: one colour per run, named in a legend above the plots; long curves
    drawn from the same bounded envelope as LivePlots while a plot follows its data, every point when zoomed in."""

    # curve name -> (plot name, scale)
    CURVES = {
        "val_accuracy": ("accuracy", 100.0),
        "val_loss": ("val_loss", 1.0),
        "train_loss": ("train_loss", 1.0),
        "lr": ("lr", 1.0),
    }
    PLOTS = {
        "accuracy": ("Validation accuracy (%) by epoch", "epoch", "accuracy (%)", 0, 0),
        "val_loss": ("Validation loss by epoch", "epoch", "loss", 0, 1),
        "train_loss": ("Training loss by epoch", "epoch", "loss", 1, 0),
        "lr": ("Learning rate by epoch", "epoch", "learning rate", 1, 1),
    }
    # The Runs tab shares the window's height with the run table and the docks (some 250 pixels for the four
    # plots at 1280 x 800): the titles say what each plot shows, so the plots keep their height for the curves.
    AXIS_LABELS = False
    TITLE_SIZE = "9pt"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.layout_widget.setObjectName("runs.plots")
        self.layout_widget.setMinimumSize(400, 180)
        for plot in self.plots.values():
            if plot.legend is not None:
                plot.legend.hide()  # twenty names inside a plot would cover its curves: the legend is a label
        self.legend = QLabel()
        self.legend.setObjectName("runs.legend")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        box = self.layout()
        assert isinstance(box, QVBoxLayout)  # PlotGrid's
        box.insertWidget(0, self.legend)
        for name, plot in self.plots.items():
            plot.getViewBox().sigStateChanged.connect(lambda _box, name=name: self._follow_changed(name))
        self._runs: dict[str, dict[str, tuple[pg.PlotDataItem, Series]]] = {}  # run key -> curve -> item, data
        self._labels: dict[str, str] = {}
        self._following = {name: True for name in self.plots}
        self._apply_palette()

    def run_keys(self) -> list[str]:
        """The runs shown, in the order they were given."""
        return list(self._runs)

    def label(self, key: str) -> str:
        return self._labels[key]

    def curve_data(self, key: str, curve: str) -> tuple[np.ndarray, np.ndarray]:
        """A copy of one run's curve (x, y) as held (every point)."""
        x, y = self._runs[key][curve][1].used()
        return x.copy(), y.copy()

    def drawn(self, key: str, curve: str) -> pg.PlotDataItem:
        return self._runs[key][curve][0]

    def colour(self, key: str) -> QColor:
        return self._runs[key]["val_accuracy"][0].opts["pen"].color()

    def set_runs(self, runs: Sequence[tuple[str, str, dict[str, Series]]]) -> None:
        """Show these runs, each (key, legend label, epoch_curves()); runs already shown keep their items, and a
        curve given as the same Series as before is not handed over again."""
        wanted = [key for key, _label, _curves in runs]
        for key in [k for k in self._runs if k not in wanted]:
            self._remove(key)
        for index, (key, label, curves) in enumerate(runs):
            if key not in self._runs or self._labels.get(key) != label:
                self._remove(key)
                self._add(key, label, index)
            self._labels[key] = label
            for name, series in curves.items():
                item, shown = self._runs[key][name]
                if series is not shown:
                    self._runs[key][name] = (item, series)
                    self._draw(key, name)
        self._restyle(wanted)
        self.settle_ranges()

    def clear(self) -> None:
        for key in list(self._runs):
            self._remove(key)

    def _pen(self, index: int, points: int = 0) -> Any:
        colour = QColor(RUN_COLOURS[index % len(RUN_COLOURS)])
        if (index // len(RUN_COLOURS)) % 2:
            colour = colour.darker(170)  # the second ten: darker (a dash pattern costs much more to paint)
        # A wide line is several times slower to rasterise than a cosmetic one: long curves are drawn thin.
        return pg.mkPen(colour, width=2 if points <= MARKER_POINTS else 1)

    def _add(self, key: str, label: str, index: int) -> None:
        pen = self._pen(index)
        curves = {}
        for name, (plot_name, _scale) in self.CURVES.items():
            # No name: pyqtgraph would add it to the plot's (hidden) legend, a millisecond or so per curve.
            item = pg.PlotDataItem(pen=pen)
            self.plots[plot_name].addItem(item)
            self._set_view_processing(item, not self._follows(self.plots[plot_name]))  # after addItem (see there)
            item.setSkipFiniteCheck(True)  # epoch_curves keeps only finite points
            curves[name] = (item, Series())
        self._runs[key] = curves

    def _remove(self, key: str) -> None:
        for name, (item, _series) in self._runs.pop(key, {}).items():
            self.plots[self.CURVES[name][0]].removeItem(item)
        self._labels.pop(key, None)

    def legend_entries(self) -> list[tuple[str, str]]:
        """The legend as shown: (run label, its colour as #rrggbb), in the order of the runs."""
        return [(self._labels[key], self.colour(key).name()) for key in self._runs]

    def _restyle(self, order: list[str]) -> None:
        """Colours follow the order of the runs, so a run keeps its colour while the ones before it stay."""
        metrics = QFontMetrics(self.legend.font())
        self.legend.setText(
            "&nbsp;&nbsp; ".join(
                f'<span style="color:{colour}">&#9632;</span>&nbsp;'
                + html.escape(metrics.elidedText(label, Qt.TextElideMode.ElideMiddle, LEGEND_LABEL_WIDTH))
                for label, colour in ((self._labels[k], self._pen(i).color().name()) for i, k in enumerate(order))
            )
        )
        self.legend.setToolTip("\n".join(self._labels[k] for k in order))  # the names in full
        self.legend.setVisible(bool(order))
        for index, key in enumerate(order):
            for item, series in self._runs[key].values():
                # Only what changed: each of these makes pyqtgraph process the curve's points again.
                pen = self._pen(index, series.n)
                if item.opts["pen"] != pen:
                    item.setPen(pen)
                few = 0 < series.n <= MARKER_POINTS
                if few and (item.opts["symbol"] != "o" or item.opts["symbolPen"] != pen):
                    item.setSymbol("o")
                    item.setSymbolSize(5)
                    item.setSymbolPen(pen)
                    item.setSymbolBrush(pen.color())
                elif not few and item.opts["symbol"] is not None:
                    item.setSymbol(None)

    @staticmethod
    def _set_view_processing(item: pg.PlotDataItem, zoomed: bool) -> None:
        """Zoomed in, an item gets every point and pyqtgraph clips and downsamples them to the view (again at each
        change of the view's range). Following its data, it gets the bounded envelope, which the view shows whole:
        then nothing is redone when the range changes. (Otherwise each run added, by re-ranging the plots, made
        pyqtgraph process again and repaint every curve already shown: 50-90 ms a run with twenty.)"""
        item.setDownsampling(auto=zoomed, method="peak")
        item.setClipToView(zoomed)
        item.setDynamicRangeLimit(1e6 if zoomed else None)  # pyqtgraph's default limit, when zoomed

    def _draw(self, key: str, name: str) -> None:
        item, series = self._runs[key][name]
        following = self._follows(self.plots[self.CURVES[name][0]])
        item.setData(*(series.display(OVERLAY_POINTS) if following else series.used()))

    def _follow_changed(self, plot_name: str) -> None:
        following = self._follows(self.plots[plot_name])
        if following == self._following[plot_name]:
            return  # panning or zooming within the same mode: the items already hold what to draw
        self._following[plot_name] = following
        for key, curves in self._runs.items():
            for name in curves:
                if self.CURVES[name][0] == plot_name:
                    self._set_view_processing(curves[name][0], not following)
                    self._draw(key, name)
