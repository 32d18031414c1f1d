"""Run view: progress and time left follow the controller's payloads, buttons follow the run, a real run fills it."""

import pytest
from conftest import write_project
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication, QLabel, QProgressBar, QPushButton

from app.training import TrainingController
from engine.config import load_project
from engine.runs import read_metrics
from widgets.checkpoints_panel import CheckpointsPanel
from widgets.run_view import GUI_SHARE, OBJECT_NAMES, RunView, format_duration


@pytest.fixture()
def view(qtbot):
    widget = RunView()
    qtbot.addWidget(widget)
    widget.resize(1280, 800)
    return widget


def started(epochs=10, batches=4, start_epoch=0, history=()):
    return {
        "run_dir": "/tmp/run",
        "epochs": epochs,
        "start_epoch": start_epoch,
        "batches_per_epoch": batches,
        "device": "cpu",
        "global_step": start_epoch * batches,
        "history": list(history),
    }


def batch(epoch, n, elapsed, epochs=10, batches=4, loss=0.5):
    step = (epoch - 1) * batches + n
    return {
        "epoch": epoch,
        "epochs": epochs,
        "batch": n,
        "batches_per_epoch": batches,
        "global_step": step,
        "steps": [step],
        "losses": [loss],
        "loss": loss,
        "lr": 0.01,
        "elapsed": elapsed,
    }


def epoch_done(epoch, elapsed, epochs=10, **metrics):
    return {
        "epoch": epoch,
        "train_loss": 0.5,
        "train_accuracy": 0.6,
        "val_loss": 0.55,
        "val_accuracy": 0.7,
        "lr": 0.01,
        "epoch_seconds": 5.0,
        "samples_per_second": 120.0,
        "best": True,
        "epochs": epochs,
        "global_step": epoch * 4,
        "best_epoch": epoch,
        "checkpoint": "",
        "last_checkpoint": "",
        "elapsed": elapsed,
        **metrics,
    }


def test_every_object_name_is_documented(view):
    named = {w.objectName() for w in view.findChildren(object) if w.objectName().startswith("run.")}
    assert named == set(OBJECT_NAMES)


def test_progress_bars_and_time_left_follow_the_payloads(qtbot, view):
    epoch_bar = view.findChild(QProgressBar, "run.epoch_progress")
    batch_bar = view.findChild(QProgressBar, "run.batch_progress")
    view.on_run_started(started())
    assert epoch_bar.text() == "epoch 1 / 10" and epoch_bar.value() == 0
    view.on_batch_finished(batch(1, 2, elapsed=2.0))
    assert (batch_bar.value(), batch_bar.maximum()) == (2, 4) and batch_bar.text() == "batch 2 / 4"
    # Half the epoch took 2 s: 2 s to go in it; 1/20 of the run took 2 s: 38 s to go.
    assert view.findChild(QLabel, "run.epoch_eta").text() == "about 2 s left in this epoch"
    assert view.findChild(QLabel, "run.run_eta").text() == "about 38 s left in the run"
    view.on_epoch_finished(epoch_done(1, elapsed=5.0))
    assert (epoch_bar.value(), epoch_bar.maximum()) == (1, 10) and epoch_bar.text() == "epoch 2 / 10"
    assert batch_bar.value() == 4
    status = view.findChild(QLabel, "run.status").text()
    assert "cpu" in status and "120 samples/s" in status and "val accuracy 70.0%" in status
    view.on_batch_finished(batch(2, 1, elapsed=6.0))
    qtbot.waitUntil(lambda: batch_bar.value() == 1, timeout=60000)  # paced: shown now or at the next update
    assert view.findChild(QLabel, "run.epoch_eta").text() == "about 3 s left in this epoch"  # from the epoch start
    assert view.plots.point_count("batch_loss") == 2 and view.plots.point_count("train_loss") == 1


def test_a_burst_of_batches_is_shown_in_few_paced_updates_with_every_point(qtbot, view):
    view.show()
    view.on_run_started(started(epochs=1, batches=500))
    applied = []
    original = view._show_batch
    view._show_batch = lambda info: (applied.append(info["batch"]), original(info))
    for n in range(1, 501):
        view.on_batch_finished(batch(1, n, elapsed=n / 100, epochs=1, batches=500, loss=1.0 / n))
    assert applied == [1]  # the first at once, the rest wait for the next update
    batch_bar = view.findChild(QProgressBar, "run.batch_progress")
    qtbot.waitUntil(lambda: batch_bar.value() == 500, timeout=60000)
    assert applied[-1] == 500 and len(applied) <= 3
    assert view.plots.point_count("batch_loss") == 500  # nothing is dropped, only drawn later
    x, y = view.plots.curve_data("batch_loss")
    assert list(x) == list(range(1, 501)) and y[-1] == pytest.approx(1 / 500)
    assert view.plots.point_count("lr") == 500  # each payload's learning rate, at its step
    assert view.plots.paint_seconds > 0  # the plots were painted and timed
    # The interval follows the measured cost: a costly update is spaced out, within the bounds.
    view._update_cost = 0.005
    assert view.update_interval() == pytest.approx(0.005 / GUI_SHARE)
    view._update_cost = 1.0
    assert view.update_interval() == 1.0
    view._update_cost = 0.0
    assert view.update_interval() == 0.1


def test_an_epoch_end_shows_the_batches_still_waiting(view):
    view.on_run_started(started(epochs=2, batches=3))
    for n in (1, 2, 3):
        view.on_batch_finished(batch(1, n, elapsed=n, epochs=2, batches=3))
    view.on_epoch_finished(epoch_done(1, elapsed=3.5, epochs=2))
    assert view.plots.point_count("batch_loss") == 3
    view.on_batch_finished(batch(2, 1, elapsed=4.0, epochs=2, batches=3))
    view.on_run_finished(
        {
            "status": "stopped",
            "run_dir": "/tmp/run",
            "epoch": 1,
            "epochs": 2,
            "best_epoch": 1,
            "stopped_early": False,
            "error": None,
            "traceback": None,
        }
    )
    assert view.plots.point_count("batch_loss") == 4
    view.on_batch_finished(batch(2, 2, elapsed=5.0, epochs=2, batches=3))  # a stale payload: pending ...
    view.on_run_started(started(epochs=1, batches=3))  # ... is dropped when a new run starts
    view.flush_batches()
    assert view.plots.point_count("batch_loss") == 0


def _lines(label: QLabel) -> int:
    """How many lines the label's text takes, wrapped at its width."""
    box = QRect(0, 0, label.contentsRect().width(), 10_000)
    wrapped = label.fontMetrics().boundingRect(box, Qt.TextFlag.TextWordWrap, label.text())
    return round(wrapped.height() / label.fontMetrics().lineSpacing())


def test_the_plots_keep_their_size_when_the_status_line_wraps(qtbot, view):
    """A run's status goes from one line (starting) to two (an epoch's metrics) and back at the next run; the
    plots under it must not be resized (laid out and repainted whole) each time."""
    view.resize(560, 700)
    view.show()
    qtbot.waitExposed(view)
    view.on_run_started(started(epochs=2))
    QApplication.processEvents()
    before = _lines(view.status_label)
    height = view.plots.height()
    view.on_epoch_finished(epoch_done(1, elapsed=3.5, epochs=2))
    QApplication.processEvents()
    assert _lines(view.status_label) > before  # the text wraps onto more lines (how many depends on the font)
    assert view.plots.height() == height
    view.on_run_started(started(epochs=2))
    QApplication.processEvents()
    assert view.plots.height() == height


def test_a_finished_run_fills_the_bars_and_says_how_it_went(view):
    view.on_run_started(started(epochs=2, batches=3))
    view.on_batch_finished(batch(2, 3, elapsed=6.0, epochs=2, batches=3))
    view.on_epoch_finished(epoch_done(2, elapsed=7.0, epochs=2))
    view.on_run_finished(
        {
            "status": "completed",
            "run_dir": "/tmp/run",
            "epoch": 2,
            "epochs": 2,
            "best_epoch": 2,
            "stopped_early": False,
            "error": None,
            "traceback": None,
        }
    )
    epoch_bar = view.findChild(QProgressBar, "run.epoch_progress")
    assert epoch_bar.value() == epoch_bar.maximum() == 2 and epoch_bar.text() == "epoch 2 / 2"
    assert "Finished 2 of 2 epoch(s), best epoch 2" in view.findChild(QLabel, "run.status").text()
    assert view.findChild(QLabel, "run.run_eta").text() == ""
    view.on_run_finished(
        {
            "status": "failed",
            "run_dir": None,
            "epoch": 0,
            "epochs": 2,
            "best_epoch": None,
            "stopped_early": False,
            "error": "ConfigError: no images",
            "traceback": "...",
        }
    )
    assert "The run failed: ConfigError: no images" in view.findChild(QLabel, "run.status").text()


def test_buttons_follow_running_and_stop_twice_is_harmless(qtbot, view):
    train = view.findChild(QPushButton, "run.train")
    stop = view.findChild(QPushButton, "run.stop")
    resume = view.findChild(QPushButton, "run.resume")
    assert train.isEnabled() and not stop.isEnabled() and not resume.isEnabled()
    view.set_can_resume(True)
    assert resume.isEnabled()
    with qtbot.waitSignal(view.train_requested):
        train.click()
    view.on_running_changed(True)
    assert not train.isEnabled() and not resume.isEnabled() and stop.isEnabled()
    stops = []
    view.stop_requested.connect(lambda: stops.append(1))
    stop.click()
    stop.click()
    view._on_stop_clicked()  # even a second press that reaches the handler asks only once
    assert stops == [1] and not stop.isEnabled() and stop.text() == "Stopping..."
    view.on_running_changed(False)
    assert train.isEnabled() and resume.isEnabled() and not stop.isEnabled() and stop.text() == "Stop"
    with qtbot.waitSignal(view.resume_requested):
        resume.click()
    view.set_can_resume(False)
    assert not resume.isEnabled()


def test_a_resumed_run_shows_its_earlier_epochs(view):
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5, "val_accuracy": 0.5, "lr": 0.01}
        for e in (1, 2, 3)
    ]
    view.plots.add_batches([1, 2, 3], [1.0, 1.0, 1.0])  # a previous run on screen
    view.on_run_started(started(epochs=5, batches=4, start_epoch=3, history=history))
    assert view.plots.point_count("train_loss") == 3 and view.plots.point_count("batch_loss") == 0
    epoch_bar = view.findChild(QProgressBar, "run.epoch_progress")
    assert epoch_bar.value() == 3 and epoch_bar.text() == "epoch 4 / 5"
    view.on_batch_finished(batch(4, 2, elapsed=2.0, epochs=5))
    # Half of epoch 4, a quarter of the two epochs this session trains, took 2 s.
    assert view.findChild(QLabel, "run.run_eta").text() == "about 6 s left in the run"
    assert "Resumed after epoch 3 of 5 on cpu" in view.findChild(QLabel, "run.status").text()


def test_saving_plots_writes_a_png_or_says_why_not(view, tmp_path):
    view.plots.add_batches([1, 2, 3], [1.0, 0.8, 0.7])
    assert view.save_plots(str(tmp_path / "curves"))  # ".png" added
    assert not QImage(str(tmp_path / "curves.png")).isNull()
    message = view.findChild(QLabel, "run.message")
    assert "Saved the plots to" in message.text()
    assert not view.save_plots(str(tmp_path / "missing" / "x.png"))
    assert "Could not save the plots" in message.text() and "does not exist" in message.text()


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 60 * 5)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "2 h 05 min",
    ]


def test_a_real_one_epoch_run_fills_the_view_and_its_checkpoints_are_listed(qtbot, view, tmp_path, image_folder):
    cfg = load_project(
        write_project(
            tmp_path / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": 1, "device": "cpu", "seed": 0},
            output={"dir": "runs", "tensorboard": False},
        )
    )
    controller = TrainingController()
    controller.logged.connect(view.on_logged)
    status = view.findChild(QLabel, "run.status")
    shown: list[tuple[str, str]] = []  # (log line, the status line after it)
    controller.logged.connect(lambda line: shown.append((line, status.text())))
    controller.run_started.connect(view.on_run_started)
    controller.batch_finished.connect(view.on_batch_finished)
    controller.epoch_finished.connect(view.on_epoch_finished)
    controller.run_finished.connect(view.on_run_finished)
    controller.running_changed.connect(view.on_running_changed)
    panel = CheckpointsPanel()
    qtbot.addWidget(panel)
    controller.epoch_finished.connect(lambda _m: panel.refresh())
    controller.run_finished.connect(lambda _r: panel.refresh())  # as the main window does: final.pt comes last
    controller.run_started.connect(lambda info: panel.set_run_dir(info["run_dir"]))

    with qtbot.waitSignal(controller.run_finished, timeout=120000) as finished:
        assert controller.start(cfg)
        assert not view.findChild(QPushButton, "run.train").isEnabled()
    assert controller.wait(30000)
    result = finished.args[0]
    assert result["status"] == "completed", result

    rows = read_metrics(result["run_dir"])
    assert len(rows) == 1
    steps = view.plots.point_count("batch_loss")
    assert steps > 0 and view.plots.point_count("train_loss") == 1 and view.plots.point_count("lr") > 0
    epoch_bar = view.findChild(QProgressBar, "run.epoch_progress")
    batch_bar = view.findChild(QProgressBar, "run.batch_progress")
    assert epoch_bar.value() == epoch_bar.maximum() == 1
    assert batch_bar.value() == batch_bar.maximum() == steps
    assert view.findChild(QPushButton, "run.train").isEnabled()
    assert "Finished 1 of 1" in view.findChild(QLabel, "run.status").text()
    # Before its first batch the run prepared (the feature pass here), and the status line said what it was doing.
    cache = next(i for i, (line, _) in enumerate(shown) if line.startswith("Feature cache: computing"))
    assert shown[cache][1] == "Preparing the run: " + shown[cache][0]
    # Once it trains, its other log lines stay in the log.
    assert shown[-1][0].startswith("Run completed after epoch 1") and "epoch 1: train loss" in shown[-1][1]

    table = panel.table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    listed = [{h: table.item(r, c).text() for c, h in enumerate(headers)} for r in range(table.rowCount())]
    assert [r["File"] for r in listed] == ["epoch-001.pt"]  # last/best/final.pt are links to it, not extra rows
    assert listed[0]["Epoch"] == "1"
    assert listed[0]["Train loss"] == f"{rows[0]['train_loss']:.4g}"
    assert listed[0]["Val accuracy"] == f"{100 * rows[0]['val_accuracy']:.1f}%"
    assert listed[0]["Role"] == "★ best, last, final"

    assert view.save_plots(str(tmp_path / "run.png"))
    assert not QImage(str(tmp_path / "run.png")).isNull()


def test_a_multi_process_run_says_how_many_processes_train(view):
    view.on_run_started({**started(), "world_size": 2})
    assert (
        "Training 10 epoch(s) on cpu in 2 processes, 4 batches per epoch."
        == view.findChild(QLabel, "run.status").text()
    )


def test_while_a_run_prepares_the_status_line_says_what_it_is_doing(view):
    status = view.findChild(QLabel, "run.status")
    epoch_bar = view.findChild(QProgressBar, "run.epoch_progress")
    view.on_running_changed(True)
    assert status.text() == "Preparing the run: reading the data and building the model..."
    assert epoch_bar.text() == "preparing"
    view.on_logged("Feature cache: computing the features after blocks.4 for 1438 train samples")
    assert (
        status.text()
        == "Preparing the run: Feature cache: computing the features after blocks.4 for 1438 train samples"
    )
    view.on_logged("Computing cached features: 640 of 1,797 (35%), 30/s, about 45 s left")
    assert status.text() == "Preparing the run: Computing cached features: 640 of 1,797 (35%), 30/s, about 45 s left"

    view.on_run_started(started(epochs=11, batches=4))
    assert status.text().startswith("Training 11 epoch(s)")
    view.on_logged("Precision fp32, channels_last on, torch.compile off")  # the run's other lines stay in the log
    assert status.text().startswith("Training 11 epoch(s)")
    view.on_epoch_finished(epoch_done(8, elapsed=16.0, epochs=11))
    after_epoch = status.text()
    # Between two phases a feature pass runs with the bars standing still: its progress shows, then the run's state.
    view.on_logged("Computing cached features: 100 of 1,797 (5%), 20/s, about 85 s left")
    assert status.text() == "Computing cached features: 100 of 1,797 (5%), 20/s, about 85 s left"
    view.on_batch_finished(batch(9, 1, elapsed=110.0, epochs=11))
    view.flush_batches()
    assert status.text() == after_epoch

    view.on_running_changed(False)
    view.on_logged("Computing cached features: 5 of 10 (50%)")  # the finder's, say, after the run: not the run's
    assert status.text() == after_epoch


def test_the_time_left_in_a_run_in_phases_counts_the_epochs_to_come_at_this_epochs_pace(view):
    """Eight cached head epochs of 2 s, a 30 s feature pass for phase 2, then epochs of 45 batches at 0.675 s.
    The run's average pace would say 17 s are left at batch 5 of epoch 10 of 11; this epoch's 40 batches and one
    more epoch say 57 s. The pass before the epoch's first batch is not counted as batches."""
    view.on_run_started(started(epochs=11, batches=45))
    for epoch in range(1, 9):
        view.on_epoch_finished(epoch_done(epoch, elapsed=2.0 * epoch, epochs=11))
    view.on_epoch_finished(epoch_done(9, elapsed=46.0, epochs=11))
    view.on_batch_finished(batch(10, 1, elapsed=76.675, epochs=11, batches=45))  # after the 30 s pass
    view.flush_batches()
    run_eta = view.findChild(QLabel, "run.run_eta")
    first = run_eta.text()  # one batch shown: the pace is not known yet, the averages say what they can
    view.on_batch_finished(batch(10, 5, elapsed=79.375, epochs=11, batches=45))
    view.flush_batches()
    pace = 0.675
    assert view.findChild(QLabel, "run.epoch_eta").text() == f"about {format_duration(pace * 40)} left in this epoch"
    assert run_eta.text() == f"about {format_duration(pace * 40 + pace * 45)} left in the run" != first


def test_a_run_that_ends_before_it_started_leaves_no_preparing_behind(view):
    view.on_running_changed(True)
    assert view.findChild(QProgressBar, "run.epoch_progress").text() == "preparing"
    view.on_run_finished({"status": "failed", "epoch": 0, "epochs": 11, "error": "no such folder: /data"})
    view.on_running_changed(False)
    assert view.findChild(QProgressBar, "run.epoch_progress").text() == "no run"
    assert view.findChild(QLabel, "run.status").text() == "The run failed: no such folder: /data"


def test_a_new_run_measures_its_pace_from_its_own_batches(view):
    """A run stopped in its first epoch, then a new one: the old run's first batch (at 10 s) is no reference for
    the new run's batch 2 at 2 s (a negative pace showed 'about 0 s left')."""
    view.on_run_started(started())
    view.on_batch_finished(batch(1, 1, elapsed=10.0))
    view.flush_batches()
    view.on_run_started(started())
    view.on_batch_finished(batch(1, 2, elapsed=2.0))
    view.flush_batches()
    assert view.findChild(QLabel, "run.epoch_eta").text() == "about 2 s left in this epoch"
