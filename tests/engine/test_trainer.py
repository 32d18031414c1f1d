"""The trainer end to end on small real data: events, stopping, reproducibility, frozen layers, every loss."""

import math
import threading
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import COLOURS, write_image_folder, write_project

from engine.config import ConfigError, load_project
from engine.failures import NonFiniteLossError
from engine.trainer import Callback, Trainer, build_run


class Recorder(Callback):
    def __init__(self, stop_at_batch=None):
        self.events = []
        self.losses = []
        self.stop_at_batch = stop_at_batch

    def on_log(self, trainer, message):
        self.events.append(("log", message))

    def on_run_started(self, trainer, state):
        self.events.append(("started", state.batches_per_epoch))

    def on_batch_finished(self, trainer, state, loss):
        self.events.append(("batch", state.epoch, state.batch))
        self.losses.append(loss)
        if self.stop_at_batch is not None and state.global_step == self.stop_at_batch:
            trainer.stop()

    def on_epoch_finished(self, trainer, state, metrics):
        self.events.append(("epoch", metrics))

    def on_run_finished(self, trainer, state):
        self.events.append(("finished", state.status))


def kinds(events):
    return [e[0] for e in events if e[0] != "log"]


@pytest.fixture()
def small_project_file(tmp_path, image_folder):
    """The tiny project with timm's test_resnet: a whole ResNet, BatchNorm included, at a fraction of resnet18's cost,
    for the behaviours that do not depend on the architecture."""
    return write_project(tmp_path / "project.json", "images", model={"backbone": "timm/test_resnet"})


def test_run_fires_events_in_order_and_learns(tiny_project):
    cfg = load_project(tiny_project)
    cfg.train.epochs = 4
    rec = Recorder()
    state = Trainer(cfg, [rec]).run()
    assert state.status == "completed" and state.epoch == 4
    k = kinds(rec.events)
    assert k[0] == "started" and k[-1] == "finished"
    per_epoch = rec.events[[e[0] for e in rec.events].index("started")][1]
    assert k.count("batch") == 4 * per_epoch and k.count("epoch") == 4
    epochs = [e[1] for e in rec.events if e[0] == "epoch"]
    for m in epochs:
        for key in ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second"):
            assert m[key] is not None, key
    # A resnet18 from scratch on 27 tiny images swings from epoch to epoch (BatchNorm's running statistics
    # lag its batch statistics, and the float kernels differ between CPUs), so "learns" is judged on the run,
    # not on its last epoch: the loss falls below where it began and validation beats chance (three colours:
    # 0.33) at some epoch.
    assert min(m["train_loss"] for m in epochs[1:]) < epochs[0]["train_loss"]
    assert max(m["val_accuracy"] for m in epochs) > 0.5
    assert any("train" in e[1] and "red" in e[1] for e in rec.events if e[0] == "log")


def test_stop_ends_the_run_within_one_batch(small_project_file):
    cfg = load_project(small_project_file)
    cfg.train.epochs = 5
    rec = Recorder(stop_at_batch=3)
    state = Trainer(cfg, [rec]).run()
    assert state.status == "stopped"
    assert kinds(rec.events).count("batch") == 3
    assert state.history == [] and kinds(rec.events)[-1] == "finished"


def test_stop_from_another_thread(small_project_file):
    cfg = load_project(small_project_file)
    cfg.train.epochs = 50
    stop = threading.Event()

    class StopSoon(Callback):
        def on_batch_finished(self, trainer, state, loss):
            if state.global_step == 2:
                threading.Thread(target=stop.set).start()

    state = Trainer(cfg, [StopSoon()], stop_event=stop).run()
    assert state.status == "stopped" and state.epoch < 50


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}


def test_a_seeded_cpu_run_is_reproducible(small_project_file):
    cfg = load_project(small_project_file)
    cfg.data.augment.horizontal_flip = True
    runs = []
    for _ in range(2):
        rec = Recorder()
        t = Trainer(cfg.copy(), [rec])
        t.run()
        runs.append((rec.losses, _weights(t)))
    assert runs[0][0] == runs[1][0]
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key


def test_head_only_training_leaves_the_backbone_bitwise_unchanged(small_project_file):
    cfg = load_project(small_project_file)
    cfg.model.freeze = "head_only"
    t = Trainer(cfg)
    t.parts = build_run(cfg)
    before = _weights(t)
    t.run()
    after = _weights(t)
    head = t.parts.head_name
    for key in before:
        if key.startswith(head + "."):
            assert not torch.equal(before[key], after[key]), key
        else:  # includes BatchNorm running statistics: frozen BN stays in eval mode
            assert torch.equal(before[key], after[key]), key


def test_backbone_lr_multiplier_reaches_the_optimizer(tiny_project):
    cfg = load_project(tiny_project)
    cfg.optimizer.backbone_lr_mult = 0.1
    parts = build_run(cfg)
    lrs = {g["name"]: g["lr"] for g in parts.optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.003) and lrs["backbone"] == pytest.approx(0.0003)


def test_divergence_stops_at_the_first_non_finite_loss(small_project_file):
    cfg = load_project(small_project_file)
    cfg.optimizer.name = "sgd"
    cfg.optimizer.lr = 1e30
    cfg.train.epochs = 3
    rec = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, batch \d+") as info:
        Trainer(cfg, [rec]).run()
    assert "optimizer.lr" in str(info.value)
    assert kinds(rec.events)[-1] == "finished" and rec.events[-1][1] == "failed"


def test_a_bad_module_name_in_the_freeze_spec_is_a_config_error(tiny_project):
    cfg = load_project(tiny_project)
    cfg.model.freeze = "up_to"
    cfg.model.freeze_up_to = "layer9"
    with pytest.raises(ConfigError, match="layer9"):
        Trainer(cfg).run()


def test_everything_frozen_is_refused(tiny_project):
    cfg = load_project(tiny_project)
    cfg.model.freeze_prefixes = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    with pytest.raises(ConfigError, match="nothing to train"):
        build_run(cfg)


def head_only_project(tmp_path, **sections):
    """A project that trains only the head of timm's tiny test_resnet on frozen features of the colour images:
    a convex problem on cached features, so its loss falls on any CPU and a run takes well under a second."""
    if not (tmp_path / "images").exists():
        write_image_folder(tmp_path / "images", per_class=8)
    parts = {
        "model": {"backbone": "timm/test_resnet", "freeze": "head_only"},
        "loader": {"batch_size": 4},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 4, "device": "cpu", "seed": 0},
    }
    for key, value in sections.items():
        parts[key] = {**parts.get(key, {}), **value}
    return load_project(write_project(tmp_path / "p.json", "images", **parts))


def assert_learned(history):
    """Training and validation loss lower after the run than after its first epoch, and validation above chance."""
    first, last = history[0], history[-1]
    assert last["train_loss"] < first["train_loss"], [m["train_loss"] for m in history]
    assert last["val_loss"] < first["val_loss"], [m["val_loss"] for m in history]
    assert last["val_accuracy"] > 1 / 3 + 0.2, [m["val_accuracy"] for m in history]  # three classes: chance is 1/3


@pytest.mark.parametrize("loss", ["cross_entropy", "nll", "mse", "l1", "smooth_l1", "bce_with_logits"])
def test_every_classification_loss_learns(tmp_path, loss):
    cfg = head_only_project(tmp_path, loss={"name": loss})
    state = Trainer(cfg).run()
    assert state.status == "completed" and len(state.history) == 4
    assert_learned(state.history)


def record_step_lrs(trainer):
    """Build the run and note the head's learning rate whenever its optimizer steps: the rate every step used."""
    trainer.parts = build_run(trainer.cfg)
    rates = []
    trainer.parts.optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    return rates


def onecycle_lr(step, total, max_lr, pct_start, div_factor=25.0, final_div_factor=1e4):
    """One-cycle's rate at a step (Smith's schedule, cosine annealing, PyTorch's defaults): from max_lr / 25 up to
    max_lr over the first pct_start of the steps, then down to max_lr / 25 / 1e4 at the last step."""
    low = max_lr / div_factor
    peak_step = pct_start * total - 1
    if step <= peak_step:
        start, end, pct = low, max_lr, step / peak_step
    else:
        start, end, pct = max_lr, low / final_div_factor, (step - peak_step) / (total - 1 - peak_step)
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def plateau_lrs(monitored, lr, factor, patience, threshold=1e-4):
    """Each epoch's rate under reduce-on-plateau ('min' mode, relative threshold) from the losses it watched."""
    best, bad, rates = math.inf, 0, []
    for value in monitored:
        rates.append(lr)
        if value < best * (1 - threshold):
            best, bad = value, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = lr * factor, 0
    return rates


def write_mislabelled_copy(root):
    """Validation images whose labels cannot be learned from the training set: each class's folder holds the
    colour of another class, so the better the model fits the training colours, the higher this loss."""
    write_image_folder(root, per_class=4, seed=5)
    names = list(COLOURS)
    for name in names:
        (root / name).rename(root / f"_{name}")
    for i, name in enumerate(names):
        (root / f"_{name}").rename(root / names[(i + 1) % len(names)])


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle", "plateau"])
@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_optimizers_learn_and_schedules_set_the_rate_of_every_step(tmp_path, optimizer, schedule):
    lr = {"sgd": 0.1, "rmsprop": 0.01, "adamw": 0.03}[optimizer]  # each learns the toy problem in 5 epochs
    epochs = 5
    change = {
        "step": {"step_size": 2, "gamma": 0.5},
        "cosine": {"eta_min": lr / 10},
        "onecycle": {"max_lr": 2 * lr, "pct_start": 0.4},
        "plateau": {"patience": 1, "factor": 0.5},
    }[schedule]
    data = {}
    if schedule == "plateau":
        # Validation the training cannot improve: its loss rises while the training loss falls, so the rate
        # drops only if the schedule watches the validation loss, as it should.
        write_mislabelled_copy(tmp_path / "val")
        data = {"val_path": "val"}
    cfg = head_only_project(
        tmp_path,
        data=data,
        optimizer={"name": optimizer, "lr": lr},
        schedule={"name": schedule, **change},
        train={"epochs": epochs},
    )
    trainer = Trainer(cfg)
    used = record_step_lrs(trainer)
    history = trainer.run().history
    per_epoch = trainer.state.batches_per_epoch
    assert per_epoch == -(-len(trainer.built.data.train) // 4) and len(used) == epochs * per_epoch
    if schedule == "onecycle":
        total = epochs * per_epoch
        assert used == pytest.approx([onecycle_lr(k, total, 2 * lr, 0.4) for k in range(total)], rel=1e-9)
        # Warm-up from max_lr / 25 to max_lr at step 0.4 * 25 - 1 = 9, then the anneal to max_lr / 25 / 1e4.
        assert all(a < b for a, b in pairwise(used[:10])) and all(a > b for a, b in pairwise(used[9:]))
        assert used[0] == pytest.approx(2 * lr / 25) and used[9] == pytest.approx(2 * lr)
        assert used[-1] == pytest.approx(2 * lr / 25 / 1e4)
    else:
        if schedule == "step":  # halved after every second epoch
            rates = [lr * 0.5 ** ((e - 1) // 2) for e in range(1, epochs + 1)]
        elif schedule == "cosine":  # half a cosine from lr down to eta_min over the run
            rates = [lr / 10 + (lr - lr / 10) * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, 6)]
        else:
            rates = plateau_lrs([m["val_loss"] for m in history], lr, factor=0.5, patience=1)
            assert rates[-1] < lr  # the rate did drop (the validation loss rose after its first epoch)
        assert used == pytest.approx([r for r in rates for _ in range(per_epoch)], rel=1e-9)
        assert [m["lr"] for m in history] == pytest.approx(rates, rel=1e-9)  # what metrics.jsonl and the app show
    if schedule == "plateau":
        assert history[-1]["train_loss"] < history[0]["train_loss"], [m["train_loss"] for m in history]
    else:
        assert_learned(history)


def test_balanced_class_weights_and_sampler_train_on_imbalanced_data(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "imgs", per_class=4)
    write_image_folder(tmp_path / "more", per_class=16, seed=1)
    import shutil

    for f in (tmp_path / "more" / "red").iterdir():
        shutil.copy(f, tmp_path / "imgs" / "red" / f"extra-{f.name}")
    project = write_project(
        tmp_path / "p.json",
        "imgs",
        loss={"class_weights": "balanced"},
        loader={"batch_size": 8, "sampler": {"name": "weighted_random", "weights": "balanced", "replacement": True}},
    )
    cfg = load_project(project)
    parts = build_run(cfg)
    counts = parts.data.train_counts
    assert counts[parts.data.class_names.index("red")] > 3 * min(counts)
    w = parts.loss_fn.weight.tolist()
    assert w[parts.data.class_names.index("red")] < min(w[i] for i in range(3) if parts.data.class_names[i] != "red")
    assert Trainer(cfg).run().status == "completed"


def test_regression_and_multilabel_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, size=(40, 12, 12, 3), dtype=np.uint8)
    brightness = X.mean(axis=(1, 2, 3)) / 255.0
    np.savez(tmp_path / "reg.npz", X=X, y=brightness.astype(np.float32))
    multi = np.stack([X[..., c].mean(axis=(1, 2)) > 127 for c in range(3)], axis=1).astype(np.float32)
    np.savez(tmp_path / "multi.npz", X=X, y=multi)
    reg = load_project(write_project(tmp_path / "r.json", "reg.npz", data={"task": "regression"}, loss={"name": "mse"}))
    state = Trainer(reg).run()
    assert state.history[-1]["val_accuracy"] is None and np.isfinite(state.history[-1]["val_loss"])
    ml = load_project(
        write_project(tmp_path / "m.json", "multi.npz", data={"task": "multilabel"}, loss={"name": "bce_with_logits"})
    )
    state = Trainer(ml).run()
    assert 0.0 <= state.history[-1]["val_accuracy"] <= 1.0


def test_padding_collate_with_keep_aspect_learns(tmp_path):
    from PIL import Image

    from engine.collate import pad_collate

    for cls, colour in (("wide", (200, 0, 0)), ("tall", (0, 0, 200))):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(8):
            size = (24, 12 + i) if cls == "wide" else (12 + i, 24)
            Image.new("RGB", size, colour).save(tmp_path / "d" / cls / f"{i}.png")
    cfg = load_project(
        write_project(
            tmp_path / "p.json",
            "d",
            data={"keep_aspect": True},
            model={"backbone": "timm/test_resnet"},
            loader={"collate": "pad", "batch_size": 4},
            optimizer={"name": "adam", "lr": 0.01},
            train={"epochs": 4, "device": "cpu", "seed": 0},
        )
    )
    trainer = Trainer(cfg)
    trainer.parts = build_run(cfg)
    train = trainer.parts.data.train
    items = [train[i] for i in range(len(train))]
    assert len({tuple(x.shape[1:]) for x, _ in items}) > 1  # the images keep their shapes: no stacking them as they are
    assert trainer.parts.train_loader.collate_fn.inner is pad_collate  # inside the one that carries failures
    history = trainer.run().history
    assert history[-1]["train_loss"] < history[0]["train_loss"], [m["train_loss"] for m in history]
    assert history[-1]["val_loss"] < history[0]["val_loss"], [m["val_loss"] for m in history]
    assert history[-1]["val_accuracy"] == 1.0  # red against blue: two of each held out


def test_backbone_lr_multiplier_zero_freezes_the_backbone_and_its_batchnorm(small_project_file):
    cfg = load_project(small_project_file)
    cfg.optimizer.backbone_lr_mult = 0.0
    t = Trainer(cfg)
    t.parts = build_run(cfg)
    before = _weights(t)
    t.run()
    head = t.parts.head_name
    for key, value in _weights(t).items():
        assert torch.equal(before[key], value) != key.startswith(head + "."), key


def test_a_model_that_cannot_take_the_input_is_a_config_error(tiny_project):
    cfg = load_project(tiny_project)
    cfg.loader.batch_size = 1  # BatchNorm cannot normalise a single 1x1 feature map
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        Trainer(cfg).run()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"distributed": {"backend": "nccl"}}, "distributed.backend = 'nccl' needs a CUDA GPU per process"),
        ({"distributed": {"sync_batchnorm": True}}, "distributed.sync_batchnorm = true needs GPUs"),
        ({"train": {"device": "mps"}}, "train.device = 'mps' cannot train in several processes"),
    ],
)
def test_settings_that_cannot_run_under_torchrun_on_this_machine_are_refused_before_joining(
    tmp_path, image_folder, monkeypatch, change, message
):
    from conftest import write_project

    cfg = load_project(write_project(tmp_path / "p.json", "images", **change))
    if torch.cuda.is_available() and "mps" not in message:
        cfg.train.device = "cpu"
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        build_run(cfg)


def test_multilabel_accuracy_with_regression_losses_thresholds_at_half(tmp_path):
    from engine.config import LossConfig
    from engine.losses import TaskLoss
    from engine.trainer import correct_predictions

    out = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    tgt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for name in ("mse", "l1", "smooth_l1"):
        threshold = TaskLoss(LossConfig(name=name), "multilabel", 2).threshold
        assert correct_predictions(out, tgt, "multilabel", threshold).item() == 2.0
    assert TaskLoss(LossConfig(name="bce_with_logits"), "multilabel", 2).threshold == 0.0


# ---------------------------------------------------------------------------------------------
# Samplers and dataset kinds, trained end to end through the Trainer and its real DataLoader


def record_draws(monkeypatch):
    """Note the positions every epoch's batches drew, per batch sampler (the real sampler still draws them)."""
    from engine.samplers import _EpochBatchSampler

    draws = {}
    real = _EpochBatchSampler.__iter__

    def noting(self):
        epoch = []
        draws.setdefault(id(self), []).append(epoch)
        for batch in real(self):
            epoch.extend(batch)
            yield batch

    monkeypatch.setattr(_EpochBatchSampler, "__iter__", noting)
    return draws


def small_project(tmp_path, data_path="images", **sections):
    """The head of timm's tiny test_resnet trains on the frozen backbone's output (a problem that learns on any CPU),
    with the feature cache off: every epoch's batches come through the sampler and the image DataLoader."""
    parts = {
        "model": {"backbone": "timm/test_resnet", "freeze": "head_only"},
        "loader": {"batch_size": 4},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 4, "device": "cpu", "seed": 0, "feature_cache": "off"},
    }
    for key, value in sections.items():
        parts[key] = {**parts.get(key, {}), **value}
    return load_project(write_project(tmp_path / "p.json", data_path, **parts))


def test_subset_random_sampler_trains_on_the_listed_positions_only(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=8)
    subset = [0, 2, 3, 5, 8, 9, 11, 13, 14, 17]  # of 18 training images
    cfg = small_project(tmp_path, loader={"sampler": {"name": "subset_random", "indices": subset}})
    draws = record_draws(monkeypatch)
    trainer = Trainer(cfg)
    history = trainer.run().history
    assert len(trainer.built.data.train) == 18
    epochs = draws[id(trainer.built.train_loader.batch_sampler)]
    assert len(epochs) == 4 and all(sorted(drawn) == subset for drawn in epochs)  # each listed position, once
    assert len({tuple(drawn) for drawn in epochs}) > 1  # in a new random order each epoch
    assert trainer.state.batches_per_epoch == 3  # 10 samples in batches of 4
    assert_learned(history)


def test_distributed_sampler_with_explicit_replicas_trains_on_its_rank_s_shard(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", per_class=8)
    spec = {"name": "distributed", "num_replicas": 2, "rank": 1, "shuffle": True, "seed": 7}
    cfg = small_project(tmp_path, loader={"sampler": spec, "batch_size": 3}, train={"epochs": 5})
    draws = record_draws(monkeypatch)
    trainer = Trainer(cfg)
    history = trainer.run().history
    n = len(trainer.built.data.train)
    assert n == 18
    epochs = draws[id(trainer.built.train_loader.batch_sampler)]

    def shard(epoch, rank):  # DistributedSampler: a permutation seeded by seed + epoch, every 2nd position from rank
        order = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        return order[rank::2]

    assert epochs == [shard(e, 1) for e in range(1, 6)]  # the trainer sets each epoch (1, 2, ...) on the sampler
    for e in range(1, 6):
        assert sorted(shard(e, 0) + epochs[e - 1]) == list(range(n))  # the two ranks share the data, no overlap
    assert len({tuple(drawn) for drawn in epochs}) == 5 and trainer.state.batches_per_epoch == 3
    assert_learned(history)


def colour_arrays(per_class, size=12, seed=0):
    """The colour classes as a uint8 array (N, size, size, 3) and their labels 0, 1, 2."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS.values()):
        for _ in range(per_class):
            noise = rng.integers(-30, 30, size=(size, size, 3))
            images.append(np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_npz_classification_learns(tmp_path):
    X, y = colour_arrays(per_class=8)
    np.savez(tmp_path / "colours.npz", X=X, y=y, class_names=np.array(list(COLOURS)))
    trainer = Trainer(small_project(tmp_path, "colours.npz"))
    history = trainer.run().history
    data = trainer.built.data
    assert data.source.kind == "npz" and data.class_names == list(COLOURS)
    assert len(data.train) == 18 and len(data.val) == 6 and data.val_counts == [2, 2, 2]
    assert_learned(history)


def test_csv_dataset_learns(tmp_path):
    write_image_folder(tmp_path / "pictures", per_class=8)
    rows = ["path,label"] + [f"pictures/{name}/{i:03d}.png,{name}" for name in COLOURS for i in range(8)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    trainer = Trainer(small_project(tmp_path, "labels.csv"))
    history = trainer.run().history
    data = trainer.built.data
    assert data.source.kind == "csv" and data.class_names == sorted(COLOURS)
    assert len(data.train) == 18 and data.val_counts == [2, 2, 2]
    assert_learned(history)
