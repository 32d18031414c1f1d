"""The frozen-backbone feature cache: cached training equals recomputed training, and every fallback says why."""

import os

import pytest
import torch
from conftest import write_image_folder, write_project
from torch import nn

from engine import feature_cache
from engine.checkpoints import load_checkpoint
from engine.config import ConfigError, from_dict, load_project
from engine.runs import create_run_dir, run_callbacks
from engine.trainer import Callback, Trainer


class Logs(Callback):
    def __init__(self):
        self.lines = []

    def on_log(self, trainer, message):
        self.lines.append(message)

    def cache_line(self):
        return next(line for line in self.lines if line.startswith("Feature cache o"))


@pytest.fixture(autouse=True)
def _fresh_cache():
    feature_cache.clear()
    feature_cache.stats.reset()
    yield
    feature_cache.clear()


def project(tmp_path, **sections):
    model = sections.pop("model", {"freeze": "head_only"})
    train = {"epochs": 3, "device": "cpu", "seed": 0, **sections.pop("train", {})}
    if not (tmp_path / "images").exists():
        write_image_folder(tmp_path / "images")
    return load_project(write_project(tmp_path / "p.json", "images", model=model, train=train, **sections))


def train(cfg, callbacks=()):
    logs = Logs()
    trainer = Trainer(cfg, [logs, *callbacks])
    trainer.run()
    return trainer, logs


def assert_same_training(a, b, tol=1e-5):
    ha, hb = a.state.history, b.state.history
    assert len(ha) == len(hb) > 0
    for ma, mb in zip(ha, hb, strict=True):
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert ma[key] == pytest.approx(mb[key], abs=tol), key
    wa, wb = a.parts.model.state_dict(), b.parts.model.state_dict()
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=tol, rtol=0), key


def test_cached_head_only_training_equals_recomputed_training(tmp_path):
    cfg = project(tmp_path)
    cached, logs = train(cfg.copy())
    assert cached.feature_cache is not None and cached.feature_cache.boundary.output == "avgpool"
    assert "Feature cache on" in logs.cache_line() and "avgpool" in logs.cache_line()
    assert feature_cache.stats.computed == 2  # train and validation
    off = cfg.copy()
    off.train.feature_cache = "off"
    recomputed, logs_off = train(off)
    assert recomputed.feature_cache is None and "train.feature_cache = 'off'" in logs_off.cache_line()
    assert_same_training(cached, recomputed)
    # The real model is whole: what checkpoints save still has every backbone layer.
    assert (
        isinstance(cached.parts.model.layer4, nn.Sequential)
        and "layer4.0.conv1.weight" in cached.parts.model.state_dict()
    )


def test_a_prefix_boundary_trains_the_rest_of_the_network_equally(tmp_path):
    cfg = project(tmp_path, model={"freeze": "up_to", "freeze_up_to": "layer2"}, train={"epochs": 2})
    cached, _ = train(cfg.copy())
    assert cached.feature_cache.boundary.output == "layer2"
    off = cfg.copy()
    off.train.feature_cache = "off"
    recomputed, _ = train(off)
    assert_same_training(cached, recomputed, tol=1e-4)
    # layer3 trained (its BatchNorm statistics moved) in both runs alike.
    assert not torch.equal(cached.parts.model.layer3[0].bn1.running_mean, torch.zeros(256))


def test_a_weighted_sampler_draws_the_same_batches_from_the_cache(tmp_path):
    cfg = project(
        tmp_path,
        loader={"batch_size": 5, "sampler": {"name": "weighted_random", "weights": "balanced", "num_samples": 20}},
    )
    cached, _ = train(cfg.copy())
    assert cached.feature_cache is not None
    off = cfg.copy()
    off.train.feature_cache = "off"
    assert_same_training(cached, train(off)[0])


def test_with_loader_workers_the_cache_draws_the_batches_persistent_workers_draw(tmp_path):
    # Persistent workers draw their base seed from the loader's generator once, not every epoch: the cached
    # batches must follow, or the later epochs would shuffle differently.
    cfg = project(tmp_path, loader={"batch_size": 8, "num_workers": 1})
    cached, _ = train(cfg.copy())
    assert cached.feature_cache is not None
    off = cfg.copy()
    off.train.feature_cache = "off"
    assert_same_training(cached, train(off)[0])


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"data": {"augment": {"rotation": 10.0}}}, "data.augment.rotation"),
        ({"data": {"augment": {"horizontal_flip": True}}}, "data.augment.horizontal_flip"),
        ({"data": {"keep_aspect": True}, "loader": {"collate": "pad"}}, "data.keep_aspect"),
        ({"model": {"freeze": "head_only", "train_frozen_batchnorm": True}}, "model.train_frozen_batchnorm"),
        ({"model": {"freeze": "none"}}, "nothing is frozen (model.freeze)"),
        ({"model": {"freeze": "none", "freeze_prefixes": ["layer4"]}}, "nothing is frozen at the start"),
    ],
)
def test_ineligible_projects_fall_back_with_the_reason_logged(tmp_path, change, reason):
    cfg = project(tmp_path, **change, train={"epochs": 1})
    trainer, logs = train(cfg)
    assert trainer.feature_cache is None and trainer.state.status == "completed"
    assert logs.cache_line().startswith("Feature cache off") and reason in logs.cache_line()
    assert feature_cache.stats.computed == 0


def test_a_tiny_memory_bound_falls_back_with_a_note(tmp_path):
    cfg = project(tmp_path, train={"epochs": 1, "feature_cache_max_mb": 1})
    # 36 samples x 512 floats is 0.07 MiB: make the features bigger than 1 MiB with a shallow cut.
    cfg.model.freeze = "up_to"
    cfg.model.freeze_up_to = "bn1"
    cfg.data.image_size = 64
    trainer, logs = train(cfg)
    line = logs.cache_line()
    assert trainer.feature_cache is None and trainer.state.status == "completed"
    assert "over the bound of 1.0 MiB" in line and "train.feature_cache_max_mb" in line
    assert feature_cache.stats.computed == 0
    cfg.train.feature_cache_max_mb = 64
    trainer, _ = train(cfg)
    # relu and maxpool have no parameters: the cut goes on to the last frozen call before layer1
    assert trainer.feature_cache is not None and trainer.feature_cache.boundary.output == "maxpool"


@pytest.mark.parametrize("decoded", ["on", "off"])
def test_training_the_same_project_again_reuses_the_features(tmp_path, decoded):
    cfg = project(tmp_path, train={"epochs": 1}, loader={"decoded_cache": decoded})
    first, _ = train(cfg.copy())
    decoded_type = type(first.parts.train_loader.dataset).__name__
    assert (decoded_type == "DecodedImageDataset") == (decoded == "on")
    assert feature_cache.stats.computed == 2 and feature_cache.stats.reused == 0
    second, logs = train(cfg.copy())
    assert feature_cache.stats.computed == 2 and feature_cache.stats.reused == 2
    assert second.feature_cache.reused and "reused" in logs.cache_line()
    assert_same_training(first, second, tol=0)


def test_changed_data_transforms_or_frozen_set_recompute(tmp_path):
    cfg = project(tmp_path, train={"epochs": 1})
    train(cfg.copy())
    assert feature_cache.stats.computed == 2

    # A modified image (same name, new content): the split holding it is computed again.
    victim = sorted((tmp_path / "images" / "red").iterdir())[0]
    write_image_folder(tmp_path / "other", per_class=1, seed=5)
    data = (tmp_path / "other" / "red" / "000.png").read_bytes()
    victim.write_bytes(data)
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    train(cfg.copy())
    assert feature_cache.stats.computed == 3 and feature_cache.stats.reused == 1

    # An added image changes the split (and so both sets).
    (tmp_path / "other" / "red" / "000.png").rename(tmp_path / "images" / "red" / "new.png")
    train(cfg.copy())
    assert feature_cache.stats.computed == 5

    # Another image size: other transforms.
    bigger = cfg.copy()
    bigger.data.image_size = 20
    train(bigger)
    assert feature_cache.stats.computed == 7

    # Another frozen set (and boundary).
    deeper = cfg.copy()
    deeper.model.freeze = "up_to"
    deeper.model.freeze_up_to = "layer3"
    train(deeper)
    assert feature_cache.stats.computed == 9

    # The head-only project once more: nothing new (still in the process cache).
    train(cfg.copy())
    assert feature_cache.stats.computed == 9


def test_other_frozen_weights_recompute(tmp_path):
    cfg = project(tmp_path, train={"epochs": 1})
    train(cfg.copy())
    other = cfg.copy()
    other.train.seed = 1  # another random init of the frozen backbone
    train(other)
    assert feature_cache.stats.computed == 4 and feature_cache.stats.reused == 0


def test_resume_with_the_cache_equals_an_uninterrupted_run(tmp_path):
    cfg = project(
        tmp_path,
        train={"epochs": 4},
        schedule={"name": "cosine"},
        optimizer={"name": "sgd", "lr": 0.05},
        output={"dir": "runs", "tensorboard": False},
    )
    cfg.checkpoint.keep_last = 0
    straight = Trainer(cfg, run_callbacks(cfg, create_run_dir(cfg, tmp_path / "straight")))
    straight.run()
    assert straight.feature_cache is not None
    ckpt = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch-002.pt")
    feature_cache.clear()  # as in a new process: the resumed run computes its features again
    (tmp_path / "split").mkdir()
    resumed_cfg = from_dict(ckpt["config"])
    resumed = Trainer(resumed_cfg, run_callbacks(resumed_cfg, tmp_path / "split"), resume=ckpt)
    resumed.run()
    assert resumed.feature_cache is not None and not resumed.feature_cache.reused
    assert_same_training(straight, resumed, tol=1e-6)


def test_stop_during_cached_training_ends_within_one_batch(tmp_path):
    cfg = project(tmp_path, train={"epochs": 5})

    class StopAt(Callback):
        def on_batch_finished(self, trainer, state, loss):
            if state.global_step == 4:
                trainer.stop()

    trainer, _ = train(cfg, [StopAt()])
    assert trainer.feature_cache is not None
    assert trainer.state.status == "stopped" and trainer.state.global_step == 4


def test_settings_are_validated(tmp_path):
    write_image_folder(tmp_path / "images")
    with pytest.raises(ConfigError, match=r"train.feature_cache = 'always'.*allowed: auto, off"):
        load_project(write_project(tmp_path / "p.json", "images", train={"feature_cache": "always"}))
    with pytest.raises(ConfigError, match=r"train.feature_cache_max_mb = 0: must be >= 1"):
        load_project(write_project(tmp_path / "p.json", "images", train={"feature_cache_max_mb": 0}))


# ---------------------------------------------------------------------------------------------
# The cut, on small models built here


class Skip(nn.Module):
    """A frozen stem, a frozen block whose output is added to the input again after a trainable layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.frozen = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.frozen(x)
        return self.head(y + x)  # x skips across the cut after `frozen`


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(self.drop(self.stem(x))))


class FunctionalBias(nn.Module):
    """A trainable parameter used outside any module before the frozen stem runs."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(6))
        self.stem = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.stem(x + self.shift))


def freeze_all_but(model, *trainable):
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == t or name.startswith(t + ".") for t in trainable))
    return model


def test_a_skip_connection_across_the_cut_picks_a_shorter_verified_boundary():
    torch.manual_seed(0)
    model = freeze_all_but(Skip(), "head")
    x = torch.randn(4, 6)
    candidates = feature_cache.candidate_boundaries(model, feature_cache.record_calls(model, x)[0])
    assert [c.output for c in candidates] == ["frozen", "frozen.0", "stem"]
    assert "does not start from frozen's output alone" in feature_cache.verify(model, [], candidates[0], x)
    boundary, why = feature_cache.find_boundary(model, [], x)
    assert boundary is not None and boundary.output == "stem" and boundary.replaced == ["stem"]
    suffix = feature_cache.build_suffix(model, boundary.replaced)
    assert torch.allclose(suffix(model.stem(x)), model(x))
    assert isinstance(model.stem, nn.Linear)  # the real model is untouched


def test_dropout_in_the_frozen_part_limits_the_cut_to_before_it():
    torch.manual_seed(0)
    model = freeze_all_but(Dropped(), "head")
    model.train()
    x = torch.randn(4, 6)
    boundary, _ = feature_cache.find_boundary(model, [], x)
    assert boundary is not None and boundary.output == "stem"
    model.drop.p = 0.0  # dropout that drops nothing draws nothing: the cut moves past it
    boundary, _ = feature_cache.find_boundary(model, [], x)
    assert boundary.output == "block"


def test_a_trainable_parameter_used_functionally_before_the_cut_is_refused():
    model = freeze_all_but(FunctionalBias(), "head", "shift")
    boundary, why = feature_cache.find_boundary(model, [], torch.randn(4, 6))
    assert boundary is None and "trainable parameter is used before stem" in why


def test_the_suffix_shares_parameters_and_leaves_the_model_whole(tmp_path):
    cfg = project(tmp_path, model={"freeze": "up_to", "freeze_up_to": "layer1"}, train={"epochs": 1})
    trainer, _ = train(cfg)
    suffix, model = trainer.feature_cache.suffix, trainer.parts.model
    assert suffix.layer2 is model.layer2 and suffix.fc is model.fc
    assert isinstance(suffix.layer1, nn.Identity) and isinstance(model.layer1, nn.Sequential)
    assert suffix is not model and set(model.state_dict()) > set(suffix.state_dict())


def test_the_feature_pass_reports_its_progress_in_the_log(tmp_path, monkeypatch):
    """The pass over the frozen part can take a minute on a real dataset: the log says how far it is (at most
    about once a second) and that it ended."""
    from engine.image_scan import ProgressLine
    from engine.trainer import build_run

    cfg = project(tmp_path, train={"epochs": 1})
    parts = build_run(cfg)
    counts = []
    outcome = feature_cache.setup(cfg, parts, progress=lambda done, total: counts.append((done, total)))
    assert outcome.cache is not None
    n_train, n_val = len(parts.data.train), len(parts.data.val)
    # Split by split (the log line before each names it), batch by batch, up to every sample of each.
    for total in (n_train, n_val):
        part = [c for c in counts if c[1] == total]
        done = [d for d, _ in part]
        assert done == sorted(done) and done[-1] == total and len(done) > 1
    assert counts == [c for c in counts if c[1] == n_train] + [c for c in counts if c[1] == n_val]

    # Through a run, with the progress lines' interval at zero (these tiny passes take well under a second).
    feature_cache.clear()
    monkeypatch.setattr("engine.trainer.ProgressLine", lambda write, what: ProgressLine(write, what, every=0.0))
    _, logs = train(cfg)
    lines = [line for line in logs.lines if line.startswith("Computing cached features: ")]
    assert len(lines) == len(counts)
    assert lines[-1].startswith(f"Computing cached features: {n_val:,} of {n_val:,} (100%), done in")
    assert any(
        line.startswith(f"Computing cached features: {n_train:,} of {n_train:,} (100%), done in") for line in lines
    )
