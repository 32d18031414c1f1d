"""Checkpoints panel: a run's files with their metrics and best/last/final links, its buttons, opening folders."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import answer_file_dialog
from PySide6.QtWidgets import QLabel, QPushButton, QSpinBox

from engine.checkpoints import atomic_torch_save
from engine.runs import link_atomic
from widgets.checkpoints_panel import OBJECT_NAMES, CheckpointsPanel, list_checkpoints


def make_run(root, epochs=(1, 2, 3), best=2, rows=None, total=10, final="best"):
    """A run folder as RunRecorder writes it: epoch files, last/best/final as hard links, metrics.jsonl."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True)
    for e in epochs:
        atomic_torch_save({"epoch": e}, ckpts / f"epoch-{e:03d}.pt")
    if epochs:
        link_atomic(ckpts / f"epoch-{epochs[-1]:03d}.pt", ckpts / "last.pt")
    if best in epochs:
        link_atomic(ckpts / f"epoch-{best:03d}.pt", ckpts / "best.pt")
    if final and (ckpts / f"{final}.pt").exists():
        link_atomic(ckpts / f"{final}.pt", ckpts / "final.pt")
    if rows is None:
        rows = [
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "val_loss": 1.5 / e if e != best else 0.1,
                "train_accuracy": 0.5,
                "val_accuracy": 0.6 + 0.1 * (e == best),
                "best": e <= best,
            }
            for e in epochs
        ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "project.json").write_text(json.dumps({"train": {"epochs": total}}))
    return root


@pytest.fixture()
def panel(qtbot):
    widget = CheckpointsPanel()
    qtbot.addWidget(widget)
    widget.resize(700, 400)
    widget.show()
    return widget


def table_rows(panel):
    """Each row as {column header: cell text}."""
    t = panel.table
    headers = [t.horizontalHeaderItem(c).text() for c in range(t.columnCount())]
    return [{h: t.item(r, c).text() for c, h in enumerate(headers)} for r in range(t.rowCount())]


def cells(row, *names):
    return [row[n] for n in names]


METRICS = ("Epoch", "Train loss", "Val loss", "Val accuracy")


def select(panel, name):
    for r in range(panel.table.rowCount()):
        if panel.table.item(r, 0).text() == name:
            panel.table.selectRow(r)
            return
    raise AssertionError(f"{name} not listed")


def test_every_object_name_is_documented(panel):
    named = {w.objectName() for w in panel.findChildren(object) if w.objectName().startswith("checkpoints.")}
    assert named == set(OBJECT_NAMES)


def test_epoch_files_are_listed_with_their_metrics_and_the_links_as_roles(panel, tmp_path):
    run = make_run(tmp_path / "run")
    panel.set_run_dir(run)
    rows = table_rows(panel)
    assert [r["File"] for r in rows] == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]
    assert cells(rows[0], *METRICS) == ["1", "1", "1.5", "60.0%"]
    assert cells(rows[1], *METRICS) == ["2", "0.5", "0.1", "70.0%"]
    assert cells(rows[1], "Role") == ["★ best, final"] and rows[2]["Role"] == "last" and rows[0]["Role"] == ""
    assert panel.table.item(1, 0).font().bold()


def test_a_file_without_metrics_and_a_best_whose_epoch_file_was_pruned_still_appear(panel, tmp_path):
    run = make_run(tmp_path / "run", epochs=(1, 2, 3), best=2)
    (run / "checkpoints" / "epoch-002.pt").unlink()  # keep_last pruned it; best.pt keeps its own copy
    atomic_torch_save({"epoch": 4}, run / "checkpoints" / "epoch-004.pt")  # written, its metrics line lost
    (run / "checkpoints" / ".epoch-005.pt.123.tmp").write_bytes(b"partial")  # a save in progress
    panel.set_run_dir(run)
    rows = table_rows(panel)
    assert [r["File"] for r in rows] == ["epoch-001.pt", "best.pt", "epoch-003.pt", "epoch-004.pt"]
    assert rows[1]["Epoch"] == "2" and rows[1]["Val loss"] == "0.1" and rows[1]["Role"] == "★ best, final"
    assert cells(rows[3], *METRICS) == ["4", "—", "—", "—"]


_opened: list[str] | None = None  # while a list, every path this process opens is appended to it
_hooked = False


def _note_open(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None:
        _opened.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else repr(args[0]))


def test_checkpoints_are_never_read(tmp_path):
    """Listing looks only at names and inodes: a run's checkpoints can be large, and one may be half-written.
    (Unreadable files would prove nothing here: the tests run as root, who reads them anyway.)"""
    global _opened, _hooked
    if not _hooked:  # Python's "open" audit event: raised by open(), io.open() and os.open(); a hook stays for good
        sys.addaudithook(_note_open)
        _hooked = True
    run = make_run(tmp_path / "run", epochs=(1,), best=1)
    _opened = []
    try:
        entries = list_checkpoints(run)
    finally:
        opened, _opened = _opened, None
    assert [(e.path.name, e.epoch, sorted(e.roles)) for e in entries] == [
        ("epoch-001.pt", 1, ["best", "final", "last"])
    ]
    assert str(run / "metrics.jsonl") in opened  # the hook sees the files the listing does read
    assert not [p for p in opened if Path(p).parent == run / "checkpoints"], opened


def test_selection_drives_the_buttons_and_the_signals_carry_the_path_and_epochs(qtbot, panel, tmp_path):
    run = make_run(tmp_path / "run", total=10)
    panel.set_run_dir(run)
    use = panel.findChild(QPushButton, "checkpoints.use")
    resume = panel.findChild(QPushButton, "checkpoints.resume")
    spin = panel.findChild(QSpinBox, "checkpoints.resume_epochs")
    assert not use.isEnabled() and not resume.isEnabled() and panel.current_checkpoint() is None
    select(panel, "epoch-002.pt")
    path = str(run.resolve() / "checkpoints" / "epoch-002.pt")
    assert use.isEnabled() and resume.isEnabled() and panel.current_checkpoint() == path
    assert spin.value() == 10 and spin.minimum() == 3  # the run's total; at least one more epoch
    with qtbot.waitSignal(panel.restore_requested) as restored:
        use.click()
    assert restored.args == [path]
    spin.setValue(14)
    with qtbot.waitSignal(panel.resume_requested) as resumed:
        resume.click()
    assert resumed.args == [path, 14]
    spin.setValue(1)
    assert spin.value() == 3  # below the checkpoint's epoch + 1 is not possible
    panel.on_running_changed(True)
    assert not resume.isEnabled() and use.isEnabled()
    panel.on_running_changed(False)
    assert resume.isEnabled()


def test_a_late_checkpoint_raises_the_default_total(panel, tmp_path):
    run = make_run(tmp_path / "run", epochs=(1, 2, 3), total=3)
    panel.set_run_dir(run)
    select(panel, "epoch-003.pt")
    assert panel.findChild(QSpinBox, "checkpoints.resume_epochs").value() == 4


def test_refresh_lists_new_epochs_and_keeps_the_selection(panel, tmp_path):
    run = make_run(tmp_path / "run", epochs=(1,), best=1)
    panel.set_run_dir(run)
    select(panel, "epoch-001.pt")
    atomic_torch_save({"epoch": 2}, run / "checkpoints" / "epoch-002.pt")
    link_atomic(run / "checkpoints" / "epoch-002.pt", run / "checkpoints" / "last.pt")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "train_loss": 0.25, "val_loss": 0.3, "val_accuracy": 0.9}) + "\n")
    panel.refresh()
    rows = table_rows(panel)
    assert [r["File"] for r in rows] == ["epoch-001.pt", "epoch-002.pt"]
    assert rows[1]["Train loss"] == "0.25" and rows[1]["Role"] == "last" and "last" not in rows[0]["Role"]
    assert panel.current_checkpoint().endswith("epoch-001.pt")


def test_a_vanished_file_gives_a_message_instead_of_a_signal(qtbot, panel, tmp_path):
    run = make_run(tmp_path / "run")
    panel.set_run_dir(run)
    select(panel, "epoch-001.pt")
    (run / "checkpoints" / "epoch-001.pt").unlink()
    emitted = []
    panel.restore_requested.connect(emitted.append)
    panel.findChild(QPushButton, "checkpoints.use").click()
    message = panel.findChild(QLabel, "checkpoints.message")
    assert emitted == [] and "no longer exists" in message.text()
    assert [r["File"] for r in table_rows(panel)] == ["epoch-002.pt", "epoch-003.pt"]


def test_no_run_and_a_run_without_checkpoints_say_so(panel, tmp_path):
    assert "No run" in panel.findChild(QLabel, "checkpoints.run_label").text()
    run = tmp_path / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    panel.set_run_dir(run)
    assert panel.table.rowCount() == 0
    assert "no checkpoints yet" in panel.findChild(QLabel, "checkpoints.message").text()


def test_opening_a_folder_that_is_not_a_run_explains_and_the_panel_stays_usable(qtbot, panel, tmp_path):
    good = make_run(tmp_path / "good")
    panel.set_run_dir(good)
    plain = tmp_path / "holiday photos"
    plain.mkdir()
    (plain / "beach.jpg").write_bytes(b"x")
    emitted = []
    panel.run_opened.connect(lambda *args: emitted.append(args))
    assert not panel.open_run_dir(plain)
    message = panel.findChild(QLabel, "checkpoints.message")
    assert message.isVisible() and "is not a run folder" in message.text() and "metrics.jsonl" in message.text()
    assert emitted == [] and panel.table.rowCount() == 3  # the listed run is still there
    assert not panel.open_run_dir(tmp_path / "nowhere")
    assert "is not a folder" in message.text()

    other = make_run(tmp_path / "other", epochs=(1, 2), best=1)
    assert panel.open_run_dir(other / "checkpoints")  # picking the checkpoints folder opens its run
    assert not message.isVisible()
    run_dir, rows = emitted[0]
    assert run_dir == str(other.resolve()) and [r["epoch"] for r in rows] == [1, 2]
    assert [r["File"] for r in table_rows(panel)] == ["epoch-001.pt", "epoch-002.pt"]


def test_the_dialog_wrapper_opens_what_was_chosen(qtbot, panel, tmp_path):
    run = make_run(tmp_path / "run")
    answer_file_dialog(run)
    with qtbot.waitSignal(panel.run_opened):
        panel.findChild(QPushButton, "checkpoints.open_run").click()
    answer_file_dialog(None)
    assert not panel.choose_run_dir()  # cancelled: nothing changes
    assert panel.run_dir == str(run.resolve())


def test_the_run_dialog_starts_in_the_projects_runs_then_where_a_run_was_last_opened(panel, tmp_path):
    runs = tmp_path / "project" / "runs"
    runs.mkdir(parents=True)
    elsewhere = make_run(tmp_path / "elsewhere" / "old-run")
    assert panel.run_dir_dialog().directory().absolutePath() == str(Path.home())  # nothing known: home
    panel.set_runs_dir(runs)
    assert panel.run_dir_dialog().directory().absolutePath() == str(runs)
    panel.open_run_dir(elsewhere, remember=True)  # beside the run shown
    assert panel.run_dir_dialog().directory().absolutePath() == str(elsewhere.parent)

    fresh = CheckpointsPanel()  # a later session without a project: the remembered folder
    assert fresh.run_dir_dialog().directory().absolutePath() == str(elsewhere.parent)
    fresh.deleteLater()
