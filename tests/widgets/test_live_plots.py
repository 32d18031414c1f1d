"""Live plots: long runs keep one curve item each and every point, epoch curves follow the metrics, PNG export works."""

import math

import numpy as np
import pytest
from PySide6.QtGui import QColor, QImage, QPalette
from PySide6.QtWidgets import QApplication

from widgets.live_plots import DISPLAY_POINTS, EXPORT_SIZE, LivePlots, Series


@pytest.fixture()
def plots(qtbot):
    widget = LivePlots()
    qtbot.addWidget(widget)
    return widget


def items_per_plot(plots):
    return {name: list(plot.listDataItems()) for name, plot in plots.plots.items()}


def test_ten_thousand_batch_points_in_chunks_are_all_kept_on_one_item_per_curve(plots):
    before = items_per_plot(plots)
    step = 0
    while step < 10_000:
        chunk = list(range(step + 1, min(step + 37, 10_000) + 1))  # the controller sends uneven chunks
        plots.add_batches(chunk, [2.0 * math.exp(-s / 2000) for s in chunk], [0.01] * len(chunk))
        step = chunk[-1]
    assert plots.point_count("batch_loss") == 10_000
    assert plots.point_count("batch_loss_smoothed") == 10_000
    assert plots.point_count("lr") == 10_000
    x, y = plots.curve_data("batch_loss")
    assert len(x) == len(y) == 10_000 and x[0] == 1 and x[-1] == 10_000
    assert len(plots.curve_data("batch_loss_smoothed")[1]) == 10_000
    # While the plot follows the run it is handed a bounded envelope that still spans the whole run.
    drawn_x = plots.curves["batch_loss"].xData
    assert len(drawn_x) <= DISPLAY_POINTS + 64 and drawn_x[0] == 1 and drawn_x[-1] == 10_000
    after = items_per_plot(plots)
    assert {k: len(v) for k, v in after.items()} == {"batch": 2, "loss": 2, "accuracy": 2, "lr": 1}
    assert all(a is b for name in before for a, b in zip(before[name], after[name], strict=True))  # never rebuilt
    # Long series are drawn downsampled and clipped to the view, so an update costs the same late in a run.
    curve = plots.curves["batch_loss"]
    assert curve.opts["autoDownsample"] and curve.opts["downsampleMethod"] == "peak" and curve.opts["clipToView"]


def test_the_smoothed_loss_follows_the_trend_and_survives_a_nan(plots):
    plots.add_batches([1, 2, 3, 4], [1.0, 3.0, 1.0, 3.0])
    plots.add_batches([5], [float("nan")])
    plots.add_batches([6], [1.0])
    _, smoothed = plots.curve_data("batch_loss_smoothed")
    assert smoothed[0] == 1.0
    assert np.all(np.isfinite(smoothed))
    assert np.all((smoothed >= 1.0) & (smoothed <= 3.0))
    assert plots.point_count("lr") == 0  # no learning rate given


def test_a_single_learning_rate_is_placed_at_the_last_step_of_the_chunk(plots):
    plots.add_batches([7, 8, 9], [0.5, 0.4, 0.3], 0.02)
    x, y = plots.curve_data("lr")
    assert list(x) == [9] and list(y) == [0.02]


def test_epoch_curves_show_accuracy_in_percent_and_skip_missing_values(plots):
    plots.add_epoch({"epoch": 1, "train_loss": 0.9, "val_loss": None, "train_accuracy": 0.5, "val_accuracy": None})
    plots.add_epoch({"epoch": 2, "train_loss": 0.6, "val_loss": 0.7, "train_accuracy": 0.75, "val_accuracy": 0.8})
    assert plots.point_count("train_loss") == 2 and plots.point_count("val_loss") == 1
    x, y = plots.curve_data("val_accuracy")
    assert list(x) == [2] and y[0] == pytest.approx(80.0)
    assert list(plots.curve_data("train_accuracy")[1]) == pytest.approx([50.0, 75.0])


def test_load_history_replaces_what_was_shown(plots):
    plots.add_batches([1, 2], [1.0, 0.9])
    rows = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "train_accuracy": 0.5,
            "val_accuracy": 0.4,
            "lr": 0.001 * e,
        }
        for e in (1, 2, 3)
    ]
    plots.load_history(rows, batches_per_epoch=10)
    assert plots.point_count("batch_loss") == 0
    assert plots.point_count("train_loss") == 3 and plots.point_count("val_accuracy") == 3
    assert list(plots.curve_data("lr")[0]) == [10, 20, 30]
    plots.load_history(rows[:1])
    assert plots.point_count("train_loss") == 1 and plots.point_count("lr") == 0
    plots.clear()
    assert all(plots.point_count(name) == 0 for name in plots.CURVES)


def _fill(plots):
    steps = list(range(1, 301))
    plots.add_batches(steps, [1 / math.sqrt(s) for s in steps], [0.001] * 300)
    for e in (1, 2, 3):
        plots.add_epoch(
            {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.3 * e, "val_accuracy": 0.25 * e}
        )


def test_export_png_of_hidden_plots_writes_the_whole_layout_at_the_export_size(plots, tmp_path):
    _fill(plots)
    path = tmp_path / "plots.png"
    size = plots.export_png(path)
    image = QImage(str(path))
    assert path.stat().st_size > 0 and not image.isNull()
    assert (
        (image.width(), image.height()) == (size.width(), size.height()) == (EXPORT_SIZE.width(), EXPORT_SIZE.height())
    )
    # The curves are in the picture: the train colour appears, not just background and axes.
    pixels = {image.pixelColor(x, y).name() for x in range(0, image.width(), 3) for y in range(0, image.height(), 3)}
    assert len(pixels) > 10


def test_export_png_of_shown_plots_has_their_on_screen_size(qtbot, plots, tmp_path):
    _fill(plots)
    plots.resize(900, 640)
    plots.show()
    qtbot.waitExposed(plots)
    path = tmp_path / "shown.png"
    plots.export_png(path)
    image = QImage(str(path))
    view = plots.layout_widget.size()
    assert (image.width(), image.height()) == (view.width(), view.height())


def test_export_to_a_missing_folder_raises_oserror(plots, tmp_path):
    with pytest.raises(OSError):
        plots.export_png(tmp_path / "no" / "such" / "folder.png")


def test_plots_take_their_background_and_text_from_the_palette(plots):
    dark = QPalette(plots.palette())
    dark.setColor(QPalette.ColorRole.Base, QColor("#1e1e1e"))
    dark.setColor(QPalette.ColorRole.Text, QColor("#e6e6e6"))
    plots.setPalette(dark)
    assert plots.layout_widget.backgroundBrush().color().name() == "#1e1e1e"
    axis = plots.plots["batch"].getAxis("left")
    assert axis.textPen().color().name() == "#e6e6e6"


def test_a_constant_learning_rate_is_drawn_on_a_readable_scale(plots):
    plots.add_batches([1, 2, 3], [1.0, 1.0, 1.0], [0.001, 0.001, 0.001])
    low, high = plots.plots["lr"].viewRange()[1]
    assert (low, high) == pytest.approx((0.0, 0.002))  # not -0.5..0.5, where 0.001 reads as 0
    plots.add_batches([4, 5], [1.0, 1.0], [0.0005, 0.0001])  # a schedule starts to decay
    assert plots.plots["lr"].getViewBox().autoRangeEnabled()[1]


def test_the_envelope_keeps_each_buckets_extremes_in_order_and_stays_bounded():
    rng = np.random.default_rng(0)
    series = Series()
    x_all, y_all = np.arange(1, 50_001, dtype=np.float64), rng.normal(size=50_000)
    y_all[1234] = 40.0  # a spike and a dip must survive downsampling
    y_all[33_333] = -40.0
    y_all[777] = np.nan
    for start in range(0, 50_000, 997):  # uneven chunks, drawn after each as the live plot does
        series.extend(x_all[start : start + 997], y_all[start : start + 997])
        x, y = series.display(limit=1000)
        assert len(x) <= 1000 + 2 * 997
    x, y = series.display(limit=1000)
    assert len(x) < 1100
    assert np.all(np.diff(x) > 0)
    assert x[0] == 1 and x[-1] == 50_000
    assert np.nanmax(y) == 40.0 and np.nanmin(y) == -40.0
    # Every drawn point is a real point of the curve.
    assert np.array_equal(y, y_all[x.astype(int) - 1], equal_nan=True)
    # A short curve is drawn as it is.
    short = Series()
    short.extend(x_all[:500], y_all[:500])
    assert np.array_equal(short.display(limit=1000)[1], y_all[:500], equal_nan=True)


def test_the_envelope_work_per_update_does_not_grow_with_the_run():
    """Each point is summarised a bounded number of times (once, plus once per doubling of the bucket): the
    work per update stays flat as the run grows, where rebuilding the envelope each time would be O(n)."""
    series = Series()
    rng = np.random.default_rng(1)
    chunk, limit = 50, 1000
    work = []
    for start in range(0, 200_000, chunk):
        xs = np.arange(start, start + chunk, dtype=np.float64)
        series.extend(xs, rng.normal(size=chunk))
        before = series.summarised
        series.display(limit=limit)
        work.append(series.summarised - before)
    assert series.summarised <= 3 * series.n  # a rebuild per doubling adds at most n in all
    # amortised over the last quarter of the run, an update costs about the points it added, not the run's length
    late = work[3 * len(work) // 4 :]
    assert sum(late) / len(late) <= 2 * chunk


def test_zooming_in_draws_every_point_and_following_again_draws_the_envelope(plots):
    steps = np.arange(1, 3 * DISPLAY_POINTS + 1)
    plots.add_batches(steps, np.cos(steps / 50.0))
    curve, box = plots.curves["batch_loss"], plots.plots["batch"].getViewBox()
    assert len(curve.xData) <= DISPLAY_POINTS + 64
    box.setXRange(100, 200)  # what a mouse zoom does: auto-range off
    assert len(curve.xData) == len(steps)
    assert len(curve.getData()[0]) < 500  # and pyqtgraph clips them to the view when it draws
    box.enableAutoRange()
    assert len(curve.xData) <= DISPLAY_POINTS + 64


def test_phase_boundaries_are_drawn_where_each_later_phase_begins(plots):
    step = 0
    for epoch, phase in enumerate([1, 1, 1, 2, 2, 3], start=1):
        steps = list(range(step + 1, step + 11))  # ten batches an epoch
        plots.add_batches(steps, [1.0] * 10, 0.01)
        step = steps[-1]
        plots.add_epoch({"epoch": epoch, "phase": phase, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch})
    # Between the last epoch of a phase and the first of the next; on the step axes after that epoch's last batch.
    assert [(x, s, p) for x, s, p in plots.phase_boundaries()] == [(3.5, 30.0, 2), (5.5, 50.0, 3)]
    for name, plot in plots.plots.items():
        lines = [item for item in plot.items if type(item).__name__ == "InfiniteLine"]
        expected = [3.5, 5.5] if name in ("loss", "accuracy") else [30.0, 50.0]
        assert sorted(line.value() for line in lines) == expected, name
        # Named over the plot, clear of the legend and the curves inside it.
        top = plot.getAxis("top")
        assert top.isVisible() and top._tickLevels[0] == [(expected[0], "phase 2"), (expected[1], "phase 3")], name

    # A finished run's history (a run folder opened later) shows the same boundaries; a run without phases none.
    rows = [{"epoch": e, "phase": p, "train_loss": 1.0} for e, p in enumerate([1, 1, 1, 2, 2, 3], start=1)]
    plots.load_history(rows, batches_per_epoch=10)
    assert plots.phase_boundaries() == [(3.5, 30.0, 2), (5.5, 50.0, 3)]
    plots.load_history([{"epoch": e, "train_loss": 1.0} for e in (1, 2, 3)])
    assert plots.phase_boundaries() == []
    assert not any(type(i).__name__ == "InfiniteLine" for plot in plots.plots.values() for i in plot.items)
    assert not any(plot.getAxis("top").isVisible() for plot in plots.plots.values())


def _overlay_runs(count: int, epochs: int):
    """count runs' epoch_curves of `epochs` epochs each, with different spans and scales."""
    from widgets.live_plots import epoch_curves

    runs = []
    for i in range(count):
        e = np.arange(1, epochs + 1 + 100 * i, dtype=np.float64)
        loss = (1.0 + i) * np.exp(-e / epochs) + 0.1 * np.sin(e)
        rows = [
            {
                "epoch": int(x),
                "val_loss": v,
                "train_loss": v + 0.2 * i,
                "val_accuracy": 0.1 + 0.05 * i,
                "lr": 1e-3 * (i + 1),
            }
            for x, v in zip(e.tolist(), loss.tolist(), strict=True)
        ]
        runs.append((f"run-{i}", f"run {i}", epoch_curves([rows])))
    return runs


def test_the_overlay_is_ranged_to_every_curve_before_it_is_painted(qtbot):
    from widgets.live_plots import OVERLAY_POINTS, RunsPlots

    plots = RunsPlots()
    qtbot.addWidget(plots)
    plots.resize(900, 600)
    plots.show()
    qtbot.waitExposed(plots)
    runs = _overlay_runs(3, 3 * OVERLAY_POINTS)
    for end in (1, 3):  # one run, then two more: the range grows to the new curves
        plots.set_runs(runs[:end])
        # No event processed since: the range is already the one that fits every curve, not left to the paint.
        for plot_name, plot in plots.plots.items():
            names = [name for name, (p, _scale) in RunsPlots.CURVES.items() if p == plot_name]
            series = [curves[name] for _key, _label, curves in runs[:end] for name in names]
            xs = np.concatenate([c.used()[0] for c in series])
            ys = np.concatenate([c.used()[1] for c in series])
            (x0, x1), (y0, y1) = plot.getViewBox().viewRange()
            assert x0 <= xs.min() and xs.max() <= x1, plot_name
            assert y0 <= ys.min() and ys.max() <= y1, plot_name
            # pyqtgraph pads the data's span by at most 10 % on each side (a flat curve gets its own span)
            assert x1 - x0 <= 1.2 * (xs.max() - xs.min()) + 1e-9, plot_name
            if ys.max() > ys.min():
                assert y1 - y0 <= 1.2 * (ys.max() - ys.min()) + 1e-9, plot_name


def view_processing(item):
    """What pyqtgraph redoes for an item at each change of the view's range: clip, downsample, limit the range."""
    return item.opts["clipToView"], item.opts["autoDownsample"], item.opts["dynamicRangeLimit"]


def test_an_overlay_curve_is_clipped_and_downsampled_by_the_view_only_when_zoomed_in(qtbot):
    from widgets.live_plots import OVERLAY_POINTS, RunsPlots

    plots = RunsPlots()
    qtbot.addWidget(plots)
    runs = _overlay_runs(2, 3 * OVERLAY_POINTS)
    plots.set_runs(runs)
    item = plots.drawn("run-1", "val_loss")
    held = plots.curve_data("run-1", "val_loss")[0]
    # Following the data: the bounded envelope, shown whole, so a change of range reprocesses nothing.
    assert len(item.xData) <= OVERLAY_POINTS + 2 < len(held)
    assert view_processing(item) == (False, False, None)
    box = plots.plots["val_loss"].getViewBox()
    box.setXRange(100, 200)  # a mouse zoom: auto-range off
    assert len(item.xData) == len(held)  # every point, clipped and downsampled to the view when drawn
    assert view_processing(item) == (True, True, 1e6)
    assert 0 < len(item.getData()[0]) < len(held) / 10
    other = plots.drawn("run-1", "val_accuracy")  # another plot, still following
    assert other.opts["clipToView"] is False and len(other.xData) <= OVERLAY_POINTS + 2
    box.enableAutoRange()
    assert len(item.xData) <= OVERLAY_POINTS + 2
    assert view_processing(item) == (False, False, None)


def value_axis_ticks(plot) -> tuple[list[float], float]:
    """The y positions in pixels of every tick the plot's value axis draws now, and one text line's height."""
    from PySide6.QtGui import QFont, QFontMetrics

    axis = plot.getAxis("left")
    low, high = plot.viewRange()[1]
    size = axis.height()
    values = sorted({v for _spacing, level in axis.tickValues(low, high, size) for v in level if low <= v <= high})
    line = QFontMetrics(axis.style.get("tickFont") or QFont()).height()
    return [(v - low) / (high - low) * size for v in values], line


@pytest.mark.parametrize("height", [200, 600])
def test_value_axes_never_crowd_their_numbers_and_name_at_least_one(qtbot, height):
    from widgets.live_plots import RunsPlots

    for widget in (LivePlots(), RunsPlots()):
        qtbot.addWidget(widget)
        widget.resize(440, height)
        widget.show()
        qtbot.waitExposed(widget)
        if isinstance(widget, LivePlots):
            widget.add_batches([1, 2, 3], [1.9, 0.4, 0.3], [0.0004, 0.0008, 0.0011])
        # RunsPlots is left empty: no run selected, the axes run 0 to 1 (where 0.2 ... 0.8 used to overlap).
        QApplication.processEvents()
        for name, plot in widget.plots.items():
            ticks, line = value_axis_ticks(plot)
            gaps = np.diff(ticks)
            assert (gaps >= line).all(), (type(widget).__name__, name, height, ticks, line)
            # At least one number, half a line or more inside the axis (pyqtgraph hides a label that sticks out).
            inside = [t for t in ticks if line / 2 <= t <= plot.getAxis("left").height() - line / 2]
            assert inside, (type(widget).__name__, name, height, ticks)


def test_an_update_of_the_live_plots_is_painted_once(qtbot):
    plots = LivePlots()
    qtbot.addWidget(plots)
    plots.resize(900, 600)
    plots.show()
    qtbot.waitExposed(plots)
    view = plots.layout_widget

    def deliver_posted_events():
        # Every posted update of the view delivered: a paint whose new range asked for another shows up here.
        for _ in range(5):
            QApplication.sendPostedEvents()
            QApplication.processEvents()

    qtbot.waitUntil(lambda: view.paint_count > 0)  # the first paint, on showing
    deliver_posted_events()
    steps = np.arange(1, 33)
    for chunk in range(4):  # each chunk widens the step axis and moves the loss range
        before = view.paint_count
        plots.add_batches(steps + 32 * chunk, 3.0 / (steps + 32 * chunk), lrs=1e-3 * (chunk + 1))
        plots.add_epoch({"epoch": chunk + 1, "train_loss": 1.0 / (chunk + 1), "val_accuracy": 0.5 + 0.1 * chunk})
        qtbot.waitUntil(lambda before=before: view.paint_count > before)
        deliver_posted_events()
        if chunk:  # the first data also sizes the axes' labels, which repaints the layout on its own
            assert view.paint_count == before + 1, chunk  # two paints each without settle_ranges()
