"""The decoded-image cache serves the same tensors as decoding every epoch; loader workers are chosen by rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder, write_project
from PIL import Image

from engine.config import load_project
from engine.data import ArrayDataset, ImageFileDataset, prepare_data
from engine.decoded_cache import CacheTooLarge, DecodedImageDataset, apply_decoded_cache, decode_dataset
from engine.samplers import auto_workers, build_loader, describe_plans, plan_loader
from engine.trainer import Callback, Trainer
from engine.transforms import Preprocess, split_transforms

# Resize 20 then centre-crop 16: both steps of the cached part do something to every image.
PRE = Preprocess(resize_size=20, crop_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def odd_sizes_folder(root, per_class=5):
    """Images of different, non-square sizes, so resizing and cropping really change them."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 10 + 3 * i, 14 + 5 * c + i
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def write_npz(path, dtype=np.uint8):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (18, 11, 13, 3)).astype(dtype)
    if dtype == np.float32:
        x /= 255.0
    np.savez(path, X=x, y=np.arange(18) % 3)
    return path


def project(tmp_path, data_path, **data):
    loader = {"collate": "pad"} if data.get("keep_aspect") else {}
    return load_project(
        write_project(tmp_path / "p.json", str(data_path), data={"val_fraction": 0.3, **data}, loader=loader)
    )


def both(cfg, pre=PRE):
    """(uncached, cached) PreparedData of the same project."""
    plain = prepare_data(cfg, pre)
    cached = prepare_data(cfg, pre)
    outcome = apply_decoded_cache(cached, cfg, pre)
    assert outcome.used and outcome.images == len(plain.train) + len(plain.val)
    assert isinstance(cached.train, DecodedImageDataset) and isinstance(cached.val, DecodedImageDataset)
    return plain, cached


def assert_same_items(a, b, *, seed=None):
    assert len(a) == len(b)
    for i in range(len(a)):
        if seed is not None:
            torch.manual_seed(seed + i)
        xa, ya = a[i]
        if seed is not None:
            torch.manual_seed(seed + i)
        xb, yb = b[i]
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb), i
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("source", ["folder", "npz_uint8", "npz_float"])
def test_cached_items_equal_decoding_every_time(tmp_path, source):
    if source == "folder":
        path = odd_sizes_folder(tmp_path / "images")
    else:
        path = write_npz(tmp_path / "d.npz", np.uint8 if source == "npz_uint8" else np.float32)
    plain, cached = both(project(tmp_path, path.name))
    assert isinstance(plain.train, ImageFileDataset if source == "folder" else ArrayDataset)
    assert cached.train.images.shape == (len(plain.train), 3, 16, 16)
    # Files and uint8 arrays are kept as uint8; float arrays as float32 so nothing is rounded.
    assert cached.train.images.dtype == (torch.float32 if source == "npz_float" else torch.uint8)
    assert_same_items(plain.train, cached.train)
    assert_same_items(plain.val, cached.val)


def test_keep_aspect_images_keep_their_own_sizes(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images", keep_aspect=True)
    pre = Preprocess(resize_size=24, crop_size=24, mean=PRE.mean, std=PRE.std)
    plain, cached = both(cfg, pre)
    assert cached.train.images is None  # variable sizes: one flat buffer with offsets
    shapes = {tuple(cached.train.image(i).shape) for i in range(len(cached.train))}
    assert len(shapes) > 1 and all(max(s[1:]) == 24 for s in shapes)
    assert_same_items(plain.train, cached.train)
    assert_same_items(plain.val, cached.val)


def test_random_augmentation_draws_the_same_from_cached_images(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images", augment={"horizontal_flip": True, "rotation": 20.0, "color_jitter": 0.3})
    plain, cached = both(cfg)
    # The random steps draw the same numbers in both paths, so with the same seed the items are identical.
    assert_same_items(plain.train, cached.train, seed=7)
    assert_same_items(plain.val, cached.val)


def test_random_resized_crops_come_from_presized_images(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images", augment={"random_resized_crop": True, "horizontal_flip": True})
    plain, cached = both(cfg)
    train = cached.train
    assert train.images is None  # presized images keep their aspect ratio, so their sizes differ
    for i in range(len(train)):
        image = train.image(i)
        assert image.dtype == torch.uint8 and min(image.shape[1:]) == PRE.resize_size  # shorter side presized
        torch.manual_seed(i)
        x, _ = train[i]
        torch.manual_seed(i)
        ref, _ = plain.train[i]
        assert x.shape == ref.shape == (3, PRE.crop_size, PRE.crop_size) and x.dtype == ref.dtype
    assert cached.val.images.shape[1:] == (3, 16, 16)  # validation: resize and centre crop as ever
    assert_same_items(plain.val, cached.val)


def test_the_memory_bound_falls_back_with_a_note(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images")
    cfg.loader.decoded_cache_max_mb = 1
    cfg.loader.decoded_cache_disk = "off"  # memory only (the file on disk: test_decoded_cache_disk.py)
    big = Preprocess(resize_size=256, crop_size=224, mean=PRE.mean, std=PRE.std)  # 147 KiB an image, 15 images
    for setting in ("auto", "on"):
        cfg.loader.decoded_cache = setting
        data = prepare_data(cfg, big)
        logged = []
        outcome = apply_decoded_cache(data, cfg, big, log=logged.append)
        assert not outcome.used and isinstance(data.train, ImageFileDataset)
        assert outcome.estimate == 15 * 3 * 224 * 224 and outcome.bound == 2**20
        assert len(logged) == 1 and "2 MiB" in logged[0] and "bound of 1 MiB" in logged[0]
        assert "loader.decoded_cache_max_mb = 1" in logged[0] and "decoded_cache_disk = 'off'" in logged[0]
        assert ("although loader.decoded_cache = 'on'" in logged[0]) == (setting == "on")
    cfg.loader.decoded_cache = "off"
    data = prepare_data(cfg, PRE)
    assert not apply_decoded_cache(data, cfg, PRE).used and isinstance(data.train, ImageFileDataset)


def test_wide_presized_images_that_overrun_the_bound_fall_back(tmp_path):
    # Presizing is estimated as square; 4:1 images are four times that, and filling stops at the bound.
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        folder = tmp_path / "wide" / name
        folder.mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (40, 160, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = project(tmp_path, "wide", augment={"random_resized_crop": True})
    cfg.loader.decoded_cache_max_mb = 1
    cfg.loader.decoded_cache_disk = "off"
    pre = Preprocess(resize_size=64, crop_size=56, mean=PRE.mean, std=PRE.std)
    data = prepare_data(cfg, pre)
    logged = []
    outcome = apply_decoded_cache(data, cfg, pre, log=logged.append)
    assert outcome.estimate < 2**20 and not outcome.used
    assert isinstance(data.train, ImageFileDataset) and "presized images pass" in logged[0]
    fixed, per_item = split_transforms(pre, cfg.data.augment, train=True, keep_aspect=False)
    with pytest.raises(CacheTooLarge):
        decode_dataset(data.train, fixed, per_item, fixed_size=False, bound=100_000)


def test_a_file_that_no_longer_decodes_is_named_and_stood_in_for_when_the_cache_fills(tmp_path):
    odd_sizes_folder(tmp_path / "images")
    cfg = project(tmp_path, "images")
    data = prepare_data(cfg, PRE)
    broken = data.train.files[3]
    broken.write_bytes(b"not a png any more")
    assert apply_decoded_cache(data, cfg, PRE).used
    failures = data.train.failures  # engine/sample_failures.py: the trainer logs and records them
    assert [(f.path, f.index) for f in failures] == [(str(broken), 3)] and "cannot identify" in failures[0].reason
    stand_in = data.train.source.files.index(Path(failures[0].replaced_by))
    assert data.train.targets[stand_in] == data.train.targets[3]
    assert torch.equal(data.train.image(3), data.train.image(stand_in))


def test_auto_worker_rules():
    gpu = dict(accelerator=True)
    assert auto_workers(8, cached=True, augmented=False, **gpu)[0] == 0  # indexing beats worker IPC
    assert auto_workers(8, cached=True, augmented=True, **gpu)[0] == 7  # one CPU stays with training
    assert auto_workers(8, cached=False, augmented=False, **gpu)[0] == 7
    assert auto_workers(64, cached=False, augmented=True, **gpu)[0] == 8  # capped
    assert auto_workers(2, cached=False, augmented=True, **gpu)[0] == 1
    assert auto_workers(1, cached=False, augmented=True, **gpu)[0] == 0
    assert auto_workers(16, cached=True, augmented=True, deterministic=True, **gpu)[0] == 0  # exact resume
    assert auto_workers(16, cached=False, augmented=False, deterministic=True, **gpu)[0] == 8  # nothing to replay
    # Training on the CPU: a quarter of the CPUs load, the rest stay with the model's threads.
    assert [auto_workers(n, cached=False, augmented=True)[0] for n in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 2, 4, 8]
    assert auto_workers(16, cached=True, augmented=False)[0] == 0


def test_loader_plans_fill_in_only_what_is_auto(tmp_path):
    cfg = load_project(write_project(tmp_path / "p.json", "images"), check_paths=False)
    lo = cfg.loader
    assert lo.num_workers is None and lo.persistent_workers is None and lo.pin_memory is None
    plan = plan_loader(lo, cached=False, augmented=True, device_type="cuda", cpus=4)
    assert (plan.workers, plan.persistent, plan.pin_memory, plan.auto_workers) == (3, True, True, True)
    plan = plan_loader(lo, cached=True, augmented=False, device_type="cuda", cpus=4)
    assert (plan.workers, plan.persistent, plan.pin_memory) == (0, False, True)
    assert describe_plans(plan, plan) == "Loader: main process (auto: cached, no augmentation), pinned memory on"
    lo.num_workers, lo.persistent_workers, lo.pin_memory = 2, False, False
    plan = plan_loader(lo, cached=True, augmented=False, device_type="cuda", cpus=4)
    assert (plan.workers, plan.persistent, plan.pin_memory, plan.auto_workers) == (2, False, False, False)
    assert describe_plans(plan, None) == "Loader: 2 workers, pinned memory off"
    lo.num_workers, lo.persistent_workers = None, None
    train = plan_loader(lo, cached=True, augmented=True, cpus=8)
    val = plan_loader(lo, cached=True, augmented=False, cpus=8)
    assert (train.workers, train.pin_memory, val.workers) == (2, False, 0)
    assert describe_plans(train, val) == (
        "Loader: training 2 workers (auto: 8 CPUs shared with training on the "
        "CPU), validation main process (auto: cached, no augmentation), "
        "persistent, pinned memory off"
    )


def test_worker_processes_give_the_same_batches_from_the_cache(tmp_path):
    odd_sizes_folder(tmp_path / "images", per_class=9)
    cfg = project(tmp_path, "images")
    data = prepare_data(cfg, PRE)
    assert apply_decoded_cache(data, cfg, PRE).used

    def batches(workers, train):
        plan = plan_loader(cfg.loader, cached=True, augmented=False)
        plan.workers, plan.persistent = workers, False
        loader = build_loader(
            data.train if train else data.val,
            cfg.loader,
            train=train,
            targets=None,
            collate_fn=None,
            seed=5,
            pin_memory=False,
            plan=plan,
        )
        assert loader.num_workers == workers
        return list(loader)

    for train in (True, False):
        zero, two = batches(0, train), batches(2, train)
        assert len(zero) == len(two) > 1
        for (xa, ya), (xb, yb) in zip(zero, two, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_persistent_workers_draw_the_same_order_as_none_also_after_a_resume(tmp_path):
    odd_sizes_folder(tmp_path / "images", per_class=6)
    cfg = project(tmp_path, "images")
    data = prepare_data(cfg, PRE)
    assert apply_decoded_cache(data, cfg, PRE).used

    def loader(workers, state=None):
        plan = plan_loader(cfg.loader, cached=True, augmented=False)
        plan.workers, plan.persistent = workers, workers > 0
        built = build_loader(
            data.train, cfg.loader, train=True, targets=None, collate_fn=None, seed=1, pin_memory=False, plan=plan
        )
        if state is not None:
            built.generator.set_state(state)
        return built

    def order(built):  # the batches of one epoch, each sample by its first pixel values
        return [x.flatten(1)[:, :8].tolist() for x, _ in built]

    runs = {}
    for workers in (0, 1):
        built = loader(workers)
        epochs = [order(built) for _ in range(2)]
        saved = built.generator.get_state()  # what a checkpoint after epoch 2 keeps
        epochs.append(order(built))
        resumed = order(loader(workers, saved))
        assert resumed == epochs[2], workers
        runs[workers] = epochs
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # shuffled anew each epoch


class Losses(Callback):
    def __init__(self):
        self.losses, self.lines = [], []

    def on_batch_finished(self, trainer, state, loss):
        self.losses.append(loss)

    def on_log(self, trainer, message):
        self.lines.append(message)


def test_training_with_and_without_the_cache_gives_the_same_losses(tmp_path):
    write_image_folder(tmp_path / "images")
    cfg = load_project(write_project(tmp_path / "p.json", "images", loader={"batch_size": 8, "num_workers": 0}))
    runs = {}
    for setting in ("on", "off"):
        c = cfg.copy()
        c.loader.decoded_cache = setting
        rec = Losses()
        trainer = Trainer(c, [rec])
        trainer.run()
        runs[setting] = (rec, trainer.state.history)
        assert isinstance(trainer.parts.data.train, DecodedImageDataset) == (setting == "on")
    on, off = runs["on"], runs["off"]
    assert len(on[0].losses) == len(off[0].losses) > 4
    assert on[0].losses == off[0].losses
    assert [m["val_loss"] for m in on[1]] == [m["val_loss"] for m in off[1]]
    assert any(line.startswith("Decoded-image cache: 36 images") for line in on[0].lines)
    assert not any(line.startswith("Decoded-image cache") for line in off[0].lines)
    assert "Loader: main process, pinned memory off" in on[0].lines
