"""The training controller: a real Trainer on a worker QThread, its signals on the GUI thread, Stop within a batch."""

from __future__ import annotations

import json
import threading

from conftest import write_project
from PySide6.QtCore import QThread

from app.training import TrainingController
from engine.runs import read_metrics


def _record(controller: TrainingController) -> dict:
    seen = {"threads": set(), "batches": [], "epochs": [], "started": [], "finished": []}
    main = threading.current_thread()

    def on(name):
        def slot(payload):
            seen["threads"].add(threading.current_thread() is main)
            seen[name].append(payload)

        return slot

    controller.batch_finished.connect(on("batches"))
    controller.epoch_finished.connect(on("epochs"))
    controller.run_started.connect(on("started"))
    controller.run_finished.connect(on("finished"))
    return seen


def test_a_run_reports_every_batch_on_the_gui_thread_with_plain_values(qtbot, project_state):
    controller = TrainingController()
    seen = _record(controller)
    with qtbot.waitSignal(controller.run_finished, timeout=120000):
        assert controller.start(project_state.snapshot())
    assert seen["threads"] == {True}  # every slot ran on the GUI thread
    info = seen["started"][0]
    steps = [s for b in seen["batches"] for s in b["steps"]]
    assert steps == list(range(1, 2 * info["batches_per_epoch"] + 1))  # throttled, but no point lost
    for payload in seen["batches"] + seen["epochs"]:
        json.dumps(payload)  # plain Python values only: nothing device-bound crosses threads
    assert [m["epoch"] for m in seen["epochs"]] == [1, 2]
    assert seen["finished"][0]["status"] == "completed"
    assert controller.run_dir and read_metrics(controller.run_dir)[-1]["epoch"] == 2
    assert not controller.is_running()


def test_stop_ends_the_run_within_one_batch(qtbot, tmp_path, image_folder):
    # Many small batches, so the run is far from its end when Stop is pressed.
    path = write_project(
        tmp_path / "long.json", "images", loader={"batch_size": 2}, train={"epochs": 50, "device": "cpu"}
    )
    from widgets.state import ProjectState

    state = ProjectState()
    state.open(path)
    controller = TrainingController()
    seen = _record(controller)
    logs = []
    controller.logged.connect(logs.append)
    controller.start(state.snapshot())
    qtbot.waitUntil(lambda: len(seen["batches"]) >= 2, timeout=60000)
    before = controller.current_step()
    with qtbot.waitSignal(controller.run_finished, timeout=60000):
        controller.stop()
        controller.stop()  # twice is harmless
    assert seen["finished"][0]["status"] == "stopped"
    assert logs.count("Stopping after this batch...") == 1
    # Counted on the worker's side, however late the GUI thread got to press Stop: the first batch that ended
    # after the request is the last one trained. (None: the request came between batches, and none followed.)
    last = max(s for b in seen["batches"] for s in b["steps"])
    during = controller.stop_seen_step
    assert during is None or before < during == last, (before, during, last)
    if during is not None:
        assert f"(Stop was pressed during step {during}; the last step trained: {last})" in logs[-1]
    assert not controller.is_running()


def test_an_error_in_the_worker_arrives_as_a_message_and_the_next_run_works(qtbot, project_state):
    controller = TrainingController()
    messages = []
    controller.errored.connect(messages.append)
    bad = project_state.snapshot()
    bad.model.freeze_prefixes = ["no_such_layer"]  # only the built model can tell this name is wrong
    with qtbot.waitSignal(controller.run_finished, timeout=60000) as blocker:
        controller.start(bad)
    assert blocker.args[0]["status"] == "failed"
    assert "no_such_layer" in messages[0] and "Traceback" not in messages[0]
    assert blocker.args[0]["run_dir"] is None  # a run that never started leaves no empty folder
    project_state.set("train.epochs", 1)
    with qtbot.waitSignal(controller.run_finished, timeout=120000) as blocker:
        controller.start(project_state.snapshot())
    assert blocker.args[0]["status"] == "completed"


def test_resume_continues_the_run_in_its_folder(qtbot, project_state):
    project_state.set("train.epochs", 1)
    controller = TrainingController()
    with qtbot.waitSignal(controller.run_finished, timeout=120000) as first:
        controller.start(project_state.snapshot())
    run_dir = first.args[0]["run_dir"]
    seen = _record(controller)
    with qtbot.waitSignal(controller.run_finished, timeout=120000) as second:
        controller.resume(f"{run_dir}/checkpoints/last.pt", epochs=2)
    assert second.args[0]["status"] == "completed" and second.args[0]["run_dir"] == run_dir
    assert seen["started"][0]["start_epoch"] == 1 and len(seen["started"][0]["history"]) == 1
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]


def test_starting_while_running_is_refused(qtbot, project_state):
    controller = TrainingController()
    assert controller.start(project_state.snapshot())
    assert not controller.start(project_state.snapshot())
    controller.stop()
    assert controller.wait(60000)
    assert not any(isinstance(t, QThread) and t.isRunning() for t in controller.findChildren(QThread))
