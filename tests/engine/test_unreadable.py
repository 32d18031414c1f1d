"""Image files that stop decoding after the scan: skipped and reported while training and evaluating, never a crash.

The files are corrupted the way a disk or an interrupted copy does it: cut short after their header, so a reader
of headers alone still takes them for images. Real DataLoaders with worker processes carry the reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder, write_project
from torch.utils.data import DataLoader, default_collate

from engine.backbones import preprocess_for
from engine.config import load_project
from engine.data import DataError, ImageFileDataset, load_image, prepare_data, scan_source
from engine.evaluate import evaluate_model
from engine.events import RunFinished
from engine.run_files import read_run_info
from engine.sample_failures import ReportingCollate, TooManyFailures, batch_failures
from engine.session import RunSession
from engine.trainer import Callback, Trainer

TRUNCATED = "unreadable when training read it"


def truncate(path: Path) -> None:
    """Keep the first half: the PNG header opens, the pixels are cut short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def plain(path: Path) -> torch.Tensor:
    """Ground truth: the file decoded on its own, as a float CHW tensor (the dataset without a transform)."""
    import numpy as np

    return torch.from_numpy(np.array(load_image(path), dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture()
def scanned(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=4, size=8)
    return root, scan_source(root)


def test_a_worker_process_reports_the_file_and_serves_the_next_of_its_class(scanned):
    root, src = scanned
    ds = ImageFileDataset(src.files, src.targets, None, src.task, origin=root)
    bad = 5  # the second image of the second class
    truncate(src.files[bad])
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ReportingCollate(default_collate))

    batches = list(loader)

    failures = [f for b in batches for f in batch_failures(b)]
    assert len(failures) == 1
    f = failures[0]
    assert (f.path, f.index, f.dataset) == (str(src.files[bad]), bad, str(root))
    assert "truncated" in f.reason
    stand_in = bad + 1  # the next file of the same class
    assert src.targets[stand_in] == src.targets[bad] and f.replaced_by == str(src.files[stand_in])
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert len(images) == len(src.files)  # every position served: the batches keep their size
    for i, path in enumerate(src.files):
        expected = plain(src.files[stand_in] if i == bad else path)
        assert torch.equal(images[i], expected), i
    assert targets.tolist() == src.targets


def test_evaluation_leaves_the_file_out_and_the_other_samples_score_as_before(scanned):
    root, src = scanned
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    names = [str(f) for f in src.files]

    def evaluate() -> object:
        ds = ImageFileDataset(src.files, src.targets, None, src.task, origin=root, on_error="drop")
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ReportingCollate(default_collate))
        return evaluate_model(model, loader, task="classification", class_names=src.class_names, sample_names=names)

    before = evaluate()
    bad = [0, 1, 2, 3]  # a whole batch of the loader, and one more
    for i in [*bad, 9]:
        truncate(src.files[i])
    after = evaluate()

    gone = {str(src.files[i]) for i in [*bad, 9]}
    assert {u["path"] for u in after.unreadable} == gone
    assert after.samples == before.samples - 5
    kept = [p for p in before.predictions if p["path"] not in gone]
    assert [(p["path"], p["predicted"], p["loss"]) for p in after.predictions] == [
        (p["path"], p["predicted"], p["loss"]) for p in kept
    ]
    assert all(str(src.files[p["index"]]) == p["path"] for p in after.predictions)  # dataset positions still
    assert all(str(src.files[h["index"]]) == h["path"] for h in after.hardest)


def test_a_row_of_unreadable_files_is_a_clear_error_not_a_hang(scanned):
    root, src = scanned
    for f in src.files:
        truncate(f)
    ds = ImageFileDataset(src.files, src.targets, None, src.task, origin=root)
    with pytest.raises(DataError, match=r"image files in a row could not be read .*scan the dataset again"):
        ds[0]


class CorruptAtStart(Callback):
    """Corrupts files once the run is built (scan, split and loaders made), before the first batch is read."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.logs: list[str] = []

    def on_run_started(self, trainer, state):
        for f in self.files:
            truncate(f)

    def on_log(self, trainer, message):
        self.logs.append(message)


def _project(tmp_path: Path, **loader) -> Path:
    write_image_folder(tmp_path / "images", per_class=8)
    return write_project(
        tmp_path / "p.json",
        "images",
        loader={"batch_size": 6, "decoded_cache": "off", **loader},
        train={"epochs": 1, "device": "cpu", "seed": 0},
    )


def test_a_file_corrupted_after_the_scan_is_skipped_reported_and_the_next_scan_lists_it(tmp_path):
    cfg = load_project(_project(tmp_path, num_workers=2))
    root = tmp_path / "images"
    victim = root / "green" / "003.png"
    hook = CorruptAtStart([victim])
    events: list = []
    session = RunSession(cfg, out=tmp_path / "run", outputs=[events.append], callbacks=[hook])

    result = session.run()

    assert result.status == "completed", result.error
    # The run's log, its last event and run.json name the file and why.
    line = [m for m in hook.logs if "Unreadable image skipped" in m]
    assert len(line) == 1 and str(victim) in line[0] and "truncated" in line[0]
    assert "1 unreadable image(s) skipped: 003.png" in hook.logs[-1]  # the run's last line sums them up
    finished = [e for e in events if isinstance(e, RunFinished)]
    assert [u["path"] for u in finished[0].unreadable] == [str(victim)]
    assert "truncated" in finished[0].unreadable[0]["reason"]
    info = read_run_info(tmp_path / "run")
    assert [(u["path"], u["split"]) for u in info["unreadable"]] == [(str(victim), finished[0].unreadable[0]["split"])]
    # The scan cache marks it: the next scan skips it with the reason training found.
    again = scan_source(root)
    assert victim not in again.files
    reasons = {s.path: s.reason for s in again.skipped}
    assert reasons[str(victim)].startswith(TRUNCATED)
    json.dumps(info)  # plain JSON all the way


def test_too_many_unreadable_files_stop_the_run_with_a_clear_message(tmp_path):
    cfg = load_project(_project(tmp_path, num_workers=0))
    data = prepare_data(cfg, preprocess_for(cfg.model, cfg.data))
    victims = list(data.train.files[:5])  # 5 of 18 training images: far more than a tenth
    hook = CorruptAtStart(victims)
    trainer = Trainer(cfg, [hook])

    with pytest.raises(TooManyFailures, match=r"of the 18 train images could not be read .*scan the dataset again"):
        trainer.run()

    assert trainer.state.status == "failed"
    assert {u["path"] for u in trainer.state.unreadable} <= {str(v) for v in victims}
    assert len(trainer.state.unreadable) >= 2
    skipped = {s.path for s in scan_source(tmp_path / "images").skipped if s.reason.startswith(TRUNCATED)}
    assert skipped == {u["path"] for u in trainer.state.unreadable}


def test_a_resumed_runs_record_keeps_the_files_found_before_the_resume(tmp_path):
    from engine.run_files import update_run_info
    from engine.runs import RunRecorder
    from engine.trainer import TrainState

    (tmp_path / "project.json").write_text("{}")
    before = {"path": "/data/red/1.png", "reason": "image file is truncated", "split": "train"}
    update_run_info(tmp_path, unreadable=[before])
    now = {"path": "/data/blue/7.png", "reason": "cannot identify image file", "split": "val"}
    state = TrainState(epochs=2, epoch=1, status="stopped", unreadable=[now])

    RunRecorder(tmp_path).on_run_finished(None, state)

    assert read_run_info(tmp_path)["unreadable"] == [before, now]
