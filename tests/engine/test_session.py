"""One run session for every front end: typed events in order, a typed outcome, failures classified in one
place, and the run folder claimed, cleaned and released the same way whoever runs it."""

from __future__ import annotations

import io
import os

import pytest
from conftest import write_image_folder, write_project

from engine.config import load_project
from engine.events import (
    BatchProgress,
    EpochFinished,
    JsonLines,
    LogMessage,
    RunFinished,
    RunStarted,
    decode,
    encode,
    to_dict,
)
from engine.run_lock import LOCK_FILE, read_owner
from engine.session import RunSession, error_kind, error_text


@pytest.fixture()
def project(tmp_path):
    write_image_folder(tmp_path / "images", per_class=6)
    return write_project(
        tmp_path / "project.json",
        "images",
        model={"freeze": "head_only"},
        train={"epochs": 2, "device": "cpu", "seed": 0},
    )


def test_a_session_reports_typed_events_in_order_and_a_typed_result(project, tmp_path):
    seen: list = []
    out = tmp_path / "run"
    owner_during_run: list = []
    session = RunSession(
        load_project(project),
        out=out,
        outputs=[
            seen.append,
            lambda e: owner_during_run.append(read_owner(out / LOCK_FILE)) if isinstance(e, EpochFinished) else None,
        ],
    )

    result = session.run()

    assert isinstance(result, RunFinished) and result.status == "completed" and result.epoch == 2
    assert result.run_dir == str(out) and result.error is None and result.kind is None
    kinds = [type(e) for e in seen]
    assert kinds[-1] is RunFinished and seen[-1] == result
    assert kinds.count(RunStarted) == 1 and kinds.count(EpochFinished) == 2
    assert kinds.index(RunStarted) < kinds.index(BatchProgress) < kinds.index(EpochFinished)
    assert any(isinstance(e, LogMessage) and e.message == f"Run folder: {out}" for e in seen)
    epochs = [e for e in seen if isinstance(e, EpochFinished)]
    assert [e.metrics["epoch"] for e in epochs] == [1, 2]
    assert to_dict(epochs[0])["epoch"] == 1 and to_dict(epochs[0])["checkpoint"].endswith("epoch-001.pt")
    # every batch's loss arrives, grouped: the steps run 1..N without a gap
    steps = [s for e in seen if isinstance(e, BatchProgress) for s in e.steps]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * seen[kinds.index(RunStarted)].batches_per_epoch
    # the folder was this process's while it trained, and is free afterwards
    assert all(o["pid"] == os.getpid() for o in owner_during_run) and owner_during_run
    assert not (out / LOCK_FILE).exists()


def test_a_project_that_fails_before_training_is_an_input_failure_leaving_no_folder(tmp_path):
    (tmp_path / "images" / "only").mkdir(parents=True)  # one empty class: nothing to train on
    cfg = load_project(write_project(tmp_path / "p.json", "images", train={"epochs": 1, "device": "cpu"}))
    seen: list = []

    result = RunSession(cfg, outputs=[seen.append]).run()

    assert result.status == "failed" and result.kind == "input" and result.error_type == "DataError"
    assert "no images found" in result.error and result.traceback is None
    assert result.run_dir is None and not any((tmp_path / "runs").iterdir())  # the empty folder was removed
    assert seen[-1] == result


def test_failures_are_classified_once_for_every_front_end():
    from engine.checkpoints import CheckpointWriteError
    from engine.config import ConfigError
    from engine.failures import NonFiniteLossError
    from engine.run_lock import FolderBusyError

    assert error_kind(ConfigError(["x: bad"])) == "input"
    assert error_kind(FolderBusyError("run folder 'r' is in use by process 7")) == "input"
    assert error_kind(CheckpointWriteError(__import__("pathlib").Path("c.pt"), OSError(28, "No space"))) == "fault"
    assert error_kind(NonFiniteLossError("loss is nan")) == "fault"
    assert error_kind(RuntimeError("CUDA out of memory. Tried to allocate")) == "fault"
    assert "lower loader.batch_size" in error_text(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert error_kind(ZeroDivisionError("division by zero")) == "bug"
    assert error_text(ZeroDivisionError("division by zero\nmore")) == "ZeroDivisionError: division by zero"
    assert error_kind(KeyboardInterrupt()) == "interrupted"


def test_every_event_type_survives_a_json_line():
    events = [
        LogMessage("hello"),
        RunStarted(
            run_dir="/r",
            epochs=3,
            start_epoch=1,
            batches_per_epoch=4,
            device="cpu",
            global_step=4,
            history=[{"epoch": 1, "val_loss": None}],
            world_size=2,
        ),
        BatchProgress(
            epoch=2,
            epochs=3,
            batch=2,
            batches_per_epoch=4,
            global_step=6,
            steps=[5, 6],
            losses=[0.5, 0.25],
            loss=0.25,
            lr=0.01,
            elapsed=1.5,
        ),
        EpochFinished(
            metrics={"epoch": 2, "train_loss": 0.3},
            epochs=3,
            global_step=8,
            best_epoch=2,
            checkpoint="/r/checkpoints/epoch-002.pt",
            last_checkpoint="/r/checkpoints/last.pt",
            elapsed=2.0,
        ),
        RunFinished(status="failed", run_dir=None, epoch=2, epochs=3, error="boom", error_type="X", kind="bug"),
    ]
    stream = io.StringIO()
    for event in events:
        JsonLines(stream)(event)
    lines = stream.getvalue().splitlines()
    assert [decode("[default0]:" + line) for line in lines] == events  # torchrun's prefix is skipped
    assert decode("plain output") is None and decode(encode(events[0])[:-3]) is None  # cut short: not an event
