"""Checkpoints that survive crashes, exact resume, early stopping, the NaN guard and TensorBoard files."""

import json
import math
import shutil

import pytest
import torch
from conftest import cli, copy_run, write_project

from engine.checkpoints import FORMAT_VERSION, CheckpointError, atomic_torch_save, load_checkpoint
from engine.config import from_dict, load_project
from engine.failures import NonFiniteLossError
from engine.runs import create_run_dir, read_metrics, run_callbacks
from engine.trainer import Callback, Trainer


def train(cfg, run_dir, resume=None):
    trainer = Trainer(cfg, run_callbacks(cfg, run_dir), resume=resume)
    trainer.run()
    return trainer


@pytest.fixture()
def project(tmp_path, image_folder):
    return write_project(
        tmp_path / "p.json",
        "images",
        data={"augment": {"horizontal_flip": True, "rotation": 5.0}},
        model={"backbone": "timm/test_resnet"},  # a whole ResNet (BatchNorm too) in a fraction of resnet18's time
        train={"epochs": 4, "device": "cpu", "seed": 3, "deterministic": True},
        schedule={"name": "cosine"},
        optimizer={"name": "sgd", "lr": 0.02},
        output={"dir": "runs", "tensorboard": False},
    )


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def dies_halfway(obj, fh, *a, **k):
        real_save(obj, fh, *a, **k)
        fh.truncate(10)  # half a file on disk, then the process "dies"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left either


# Two phases: the head alone on cached features without augmentation, then layer4 too on augmented images with a
# cosine of its own; resumed after epoch 3, inside phase 2.
TWO_PHASES = [
    {"epochs": 2, "freeze": "head_only", "augment": False, "lr": 0.05},
    {"epochs": 2, "freeze": "up_to", "freeze_up_to": "layer3", "lr_factor": 0.4, "schedule": "cosine"},
]


@pytest.mark.parametrize(
    ("optimizer", "phases", "stop_after"),
    [({}, [], 2), ({"layer_lr_decay": 0.5, "lr_mult": {"layer4.0.conv1": 2.0}}, [], 2), ({}, TWO_PHASES, 3)],
    ids=["plain", "layer-wise", "two-phases"],
)
def test_resume_continues_exactly_like_a_straight_run(project, tmp_path, optimizer, phases, stop_after):
    data = json.loads(project.read_text())
    data["train"]["phases"] = phases
    project.write_text(json.dumps(data))
    cfg = load_project(project)
    cfg.checkpoint.keep_last = 0
    for key, value in optimizer.items():
        setattr(cfg.optimizer, key, value)
    straight = train(cfg, create_run_dir(cfg, tmp_path / "straight"))

    # As if the run had been killed after epoch stop_after: continue from that checkpoint in another folder.
    ckpt = load_checkpoint(tmp_path / "straight" / "checkpoints" / f"epoch-{stop_after:03d}.pt")
    assert ckpt["phase"]["index"] == (1 if phases else 0)  # the checkpoint records the phase it was in
    (tmp_path / "split").mkdir()
    resumed = train(from_dict(ckpt["config"]), tmp_path / "split", resume=ckpt)

    a, b = straight.state.history, resumed.state.history
    assert [m["epoch"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b, strict=True):
        assert abs(ma["train_loss"] - mb["train_loss"]) <= 1e-6
        assert abs(ma["val_loss"] - mb["val_loss"]) <= 1e-6
        assert ma["lr"] == pytest.approx(mb["lr"], abs=1e-12)
    wa, wb = straight.parts.model.state_dict(), resumed.parts.model.state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-6, rtol=0), key
    assert [m["epoch"] for m in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]
    # The checkpoint kept the groups, and the cosine schedule scaled every group alike.
    saved = [(g["name"], g["initial_lr"]) for g in ckpt["optimizer_state_dict"]["param_groups"]]
    built = straight.parts.optimizer.param_groups
    assert saved == [(g["name"], g["initial_lr"]) for g in built]
    if optimizer:
        assert len(built) == 7  # head, stem, layer1..layer4 and layer4.0.conv1 at twice its stage's rate
        middle = ckpt["optimizer_state_dict"]["param_groups"]  # half-way down the cosine
        assert 0 < middle[0]["lr"] < middle[0]["initial_lr"]
        for group in middle:
            assert group["lr"] / middle[0]["lr"] == pytest.approx(group["initial_lr"] / middle[0]["initial_lr"])


def test_checkpoint_policy_keeps_the_newest_epochs_and_the_best(project, tmp_path):
    cfg = load_project(project)
    cfg.checkpoint.keep_last = 2
    trainer = train(cfg, create_run_dir(cfg, tmp_path / "run"))
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["best.pt", "epoch-003.pt", "epoch-004.pt", "final.pt", "last.pt"]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    losses = [m["val_loss"] for m in trainer.state.history]
    assert best["epoch"] == 1 + losses.index(min(losses))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 4
    for key in (
        "epoch",
        "model_state_dict",
        "optimizer_state_dict",
        "loss",
        "scheduler_state_dict",
        "rng_state",
        "global_step",
        "config",
        "class_names",
        "freeze",
        "history",
        "format_version",
    ):
        assert key in last, key


def test_resume_refuses_when_the_classes_changed(project, tmp_path):
    cfg = load_project(project)
    cfg.train.epochs = 1
    train(cfg, create_run_dir(cfg, tmp_path / "run"))
    shutil.copytree(tmp_path / "images" / "red", tmp_path / "images" / "yellow")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    data = ckpt["config"]
    data["train"]["epochs"] = 2
    with pytest.raises(CheckpointError, match="new: yellow"):
        train(from_dict(data), tmp_path / "run", resume=ckpt)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file: proof that code ran
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"epoch": 1, "model_state_dict": {}, "extra": Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(bad)
    assert not marker.exists()
    result = cli(capsys, "resume", str(bad))
    assert result.returncode == 2 and "refusing to load" in result.stderr and not marker.exists()


def test_truncated_and_newer_checkpoints_are_refused(tmp_path):
    good = tmp_path / "c.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(cut)
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")  # torch's legacy reader fails on this with a bare KeyError
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(text)
    newer = tmp_path / "new.pt"
    atomic_torch_save({"epoch": 1, "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)


def test_early_stopping_stops_at_the_expected_epoch_and_restores_the_best(project, tmp_path, monkeypatch):
    curve = iter([1.0, 0.7, 0.75, 0.72, 0.9, 0.5, 0.4, 0.3])  # best at epoch 2, then 2 epochs without gain
    monkeypatch.setattr(Trainer, "evaluate_loss", lambda self: (next(curve), 0.5))
    cfg = load_project(project)
    cfg.train.epochs = 8
    cfg.early_stopping.enabled = True
    cfg.early_stopping.patience = 2
    cfg.early_stopping.min_delta = 0.01
    cfg.early_stopping.restore_best = True
    trainer = train(cfg, create_run_dir(cfg, tmp_path / "run"))
    state = trainer.state
    assert state.status == "completed" and state.stopped_early and state.epoch == 4
    assert state.restored_best_epoch == 2
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert final["epoch"] == best["epoch"] == 2
    for key, value in trainer.parts.model.state_dict().items():
        assert torch.equal(value, best["model_state_dict"][key]), key


def expected_stop(history, monitor, mode, patience, min_delta):
    """(the epoch early stopping ends at, the best epoch) from a run's recorded metrics, by the rule's definition:
    stop once `patience` epochs in a row did not beat the best so far by more than min_delta."""
    best, best_epoch, bad = None, None, 0
    for m in history:
        value = m[monitor]
        better = best is None or (value < best - min_delta if mode == "min" else value > best + min_delta)
        best, best_epoch, bad = (value, m["epoch"], 0) if better else (best, best_epoch, bad + 1)
        if bad >= patience:
            return m["epoch"], best_epoch
    return None, best_epoch


class EpochWeights(Callback):
    """A copy of the model's weights at the end of every epoch, as that epoch's checkpoint saves them."""

    def __init__(self):
        self.epochs = {}

    def on_epoch_finished(self, trainer, state, metrics):
        self.epochs[state.epoch] = {k: v.clone() for k, v in trainer.built.model.state_dict().items()}


@pytest.mark.parametrize(
    "monitor, mode, min_delta, epochs, checkpoint",
    [
        # A loss >= 0 can beat the best by more than 0.1 at most L1 / 0.1 times after epoch 1 (L1 < ln 3, asserted
        # below); with patience 2 each such gain takes at most 2 epochs, so the run must stop by epoch 24.
        ("val_loss", "min", 0.1, 24, {"keep_last": 0}),
        # 6 validation images: 7 possible accuracies, so at most 6 gains after epoch 1: stopped by epoch 15.
        ("val_accuracy", "max", 0.0, 16, {"keep_last": 0}),
        # No per-epoch files: final.pt is written from the restored weights.
        ("val_loss", "min", 0.1, 24, {"every_epoch": False}),
    ],
)
def test_early_stopping_on_real_validation_restores_the_best_epochs_weights(
    tmp_path, monitor, mode, min_delta, epochs, checkpoint
):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "images", per_class=8)
    cfg = load_project(
        write_project(
            tmp_path / "p.json",
            "images",
            model={"backbone": "timm/test_resnet", "freeze": "head_only"},  # trains in a blink on cached features
            loader={"batch_size": 4},
            optimizer={"name": "adam", "lr": 0.03},
            train={"epochs": epochs, "device": "cpu", "seed": 0},
            checkpoint=checkpoint,
            early_stopping={
                "enabled": True,
                "monitor": monitor,
                "mode": mode,
                "patience": 2,
                "min_delta": min_delta,
                "restore_best": True,
            },
            output={"dir": "runs", "tensorboard": False},
        )
    )
    run_dir = create_run_dir(cfg, tmp_path / "run")
    seen = EpochWeights()
    trainer = Trainer(cfg, [*run_callbacks(cfg, run_dir), seen])
    state = trainer.run()
    history = state.history
    assert history[0]["val_loss"] < math.log(3)  # epoch 1 learned something (a guess among 3 classes scores ln 3)
    stop, best = expected_stop(history, monitor, mode, 2, min_delta)
    assert stop is not None and stop < epochs
    assert state.status == "completed" and state.stopped_early and state.epoch == stop == len(history)
    assert state.restored_best_epoch == best < stop
    best_weights = seen.epochs[best]
    assert any(not torch.equal(best_weights[k], seen.epochs[stop][k]) for k in best_weights)  # a real restore
    final = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    assert final["epoch"] == best and final["metrics"]["val_loss"] == history[best - 1]["val_loss"]
    files = [final["model_state_dict"]]
    if checkpoint.get("every_epoch", True):
        files.append(load_checkpoint(run_dir / "checkpoints" / f"epoch-{best:03d}.pt")["model_state_dict"])
    weights = trainer.parts.model.state_dict()
    for saved in files:
        assert saved.keys() == weights.keys() == best_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, best_weights[key]), key
        assert all(torch.equal(saved[key], value) for saved in files), key


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(project, tmp_path, monkeypatch):
    cfg = load_project(project)
    run_dir = create_run_dir(cfg, tmp_path / "run")
    trainer = Trainer(cfg, run_callbacks(cfg, run_dir))
    real = None

    def poisoned(outputs, targets):
        loss = real(outputs, targets)
        if trainer.state.epoch == 2 and trainer.state.batch == 2:
            return loss * float("nan")
        return loss

    from engine import trainer as trainer_module

    build = trainer_module.build_run

    def build_and_poison(*a, **k):
        nonlocal real
        parts = build(*a, **k)
        real = parts.loss_fn
        poisoned.threshold = real.threshold
        parts.loss_fn = poisoned
        return parts

    monkeypatch.setattr(trainer_module, "build_run", build_and_poison)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 2"):
        trainer.run()
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and not (run_dir / "checkpoints" / "final.pt").exists()
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]


def test_tensorboard_files_hold_the_logged_scalars(project, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_project(project)
    cfg.train.epochs = 2
    cfg.output.tensorboard = True
    trainer = train(cfg, create_run_dir(cfg, tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("loss/train", "loss/val", "accuracy/val", "lr", "batch/loss"):
        assert tag in tags, tag
    logged = [e.value for e in events.Scalars("loss/train")]
    assert logged == pytest.approx([m["train_loss"] for m in trainer.state.history], rel=1e-6)
    assert [e.step for e in events.Scalars("loss/val")] == [1, 2]


def test_cli_resume_evaluate_and_export(cli_trained_run, tmp_path, capsys):
    # The commands in this process (their exit codes and console output); the shared run came from a real
    # main.py process, and tests/engine/test_cli.py runs main.py end to end.
    assert cli_trained_run.result.returncode == 0, cli_trained_run.result.stderr
    run = copy_run(cli_trained_run.run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    result = cli(capsys, "resume", str(last), "--epochs", "1")
    assert result.returncode == 2 and "already trained 1" in result.stderr
    result = cli(capsys, "resume", str(last), "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert load_checkpoint(run / "checkpoints" / "final.pt")["epoch"] == 2

    result = cli(capsys, "evaluate", str(run / "checkpoints" / "final.pt"), "--json", str(tmp_path / "ev.json"))
    assert result.returncode == 0, result.stderr
    assert "precision" in result.stdout and "confusion" in result.stdout
    report = json.loads((tmp_path / "ev.json").read_text())
    assert report["accuracy"] == pytest.approx(
        load_checkpoint(run / "checkpoints" / "final.pt")["metrics"]["val_accuracy"]
    )

    # Every format's own round trip (ONNX through onnxruntime included) is tests/engine/test_export.py's; here the
    # command's exit codes and output, with the quickest format to write and check.
    out = tmp_path / "model.safetensors"
    result = cli(capsys, "export", str(run / "checkpoints" / "final.pt"), "--format", "safetensors", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "max |difference|" in result.stdout
    before = out.read_bytes()
    result = cli(capsys, "export", str(run / "checkpoints" / "final.pt"), "--format", "safetensors", "--out", str(out))
    assert result.returncode == 2 and "--force" in result.stderr and out.read_bytes() == before

    result = cli(
        capsys,
        "train",
        str(cli_trained_run.project),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "ft"),
        "--init-from",
        str(run / "checkpoints" / "final.pt"),
    )
    assert result.returncode == 0, result.stderr
    assert "file final.pt" in result.stderr  # every tensor fits: no "loaded N of M" report of misfits
    assert "loaded" not in result.stderr and "kept as built" not in result.stderr


def test_resuming_a_finished_cosine_run_follows_the_cosine_over_the_new_total(project, tmp_path):
    import math

    cfg = load_project(project)
    cfg.train.epochs = 2
    train(cfg, create_run_dir(cfg, tmp_path / "run"))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    data = ckpt["config"]
    data["train"]["epochs"] = 4
    resumed = train(from_dict(data), tmp_path / "run", resume=ckpt)
    lrs = [m["lr"] for m in resumed.state.history]
    base = cfg.optimizer.lr
    assert lrs[2] == pytest.approx(base * (1 + math.cos(math.pi * 2 / 4)) / 2)  # epoch 3 of a 4-epoch cosine
    assert lrs[3] == pytest.approx(base * (1 + math.cos(math.pi * 3 / 4)) / 2)
