"""Streaming shards (data.kind = "webdataset"): written by `main.py shard` from generated images, read back byte for
byte, trained on as the folder trains, split between loader workers and between two torchrun processes (gloo).
Nothing is downloaded."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli, write_image_folder, write_project

from engine.backbones import preprocess_for
from engine.config import ConfigError, load_project
from engine.data import DataError, load_image, prepare_data, scan_source
from engine.distributed import torchrun_command
from engine.trainer import Trainer
from engine.webdataset_data import META_NAME, prepare_webdataset, read_back, stream_loader, write_shards

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "wds_hook"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """37 images of 3 classes (12, 12, 13) written as shards of 5 with a quarter held out: 28 training images in
    6 uneven shards (5 x 5 + 3), 9 validation images in 2 (5 + 4)."""
    root = tmp_path_factory.mktemp("wds")
    images = write_image_folder(root / "images", per_class=12)
    # one JPEG under a nested folder: its bytes must come back as they were, not re-encoded
    (images / "red" / "deep").mkdir()
    load_image(images / "red" / "000.png").save(images / "red" / "deep" / "photo.JPG", quality=90)
    before = _snapshot(images)
    result = write_shards(images, root / "shards", shard_size=5, val_fraction=0.25, split_seed=3)
    assert _snapshot(images) == before  # the source is only read
    return root, images, result


def _shard_samples(out: Path, split: str) -> list[dict]:
    return [s for shard in sorted(out.glob(f"{split}-*.tar")) for s in read_back(shard)]


def test_shards_round_trip_every_image_and_label_byte_identical(shard_set):
    root, images, result = shard_set
    source = scan_source(images)
    truth = {
        str(f.relative_to(images)): (f.read_bytes(), source.class_names[t])
        for f, t in zip(source.files, source.targets, strict=True)
    }
    meta = json.loads((root / "shards" / META_NAME).read_text())
    assert meta["classes"] == source.class_names == ["blue", "green", "red"]
    seen = {}
    for split in ("train", "val"):
        samples = _shard_samples(root / "shards", split)
        listed = [e for e in meta["shards"] if e["split"] == split]
        assert [e["samples"] for e in listed] == [len(read_back(root / "shards" / e["name"])) for e in listed]
        for s in samples:
            key = s["path.txt"].decode()
            (ext,) = [k for k in s if k not in ("__key__", "__url__", "cls", "path.txt")]
            assert key.lower().endswith("." + ext)  # the member is named by the file's own type
            assert key not in seen
            seen[key] = (bytes(s[ext]), meta["classes"][int(s["cls"])])
        counts = [0, 0, 0]
        for s in samples:
            counts[int(s["cls"])] += 1
        assert [sum(e["class_counts"][c] for e in listed) for c in range(3)] == counts
    assert seen == truth  # every image once, same bytes, same label
    assert result.samples == {"train": 28, "val": 9}
    assert len(result.shards["train"]) == -(-result.samples["train"] // 5)


def test_the_shard_command_replaces_its_own_set_and_refuses_other_folders(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "shards"
    res = cli(capsys, "shard", str(images), "--out", str(out), "--shard-size", "2")
    assert res.returncode == 0, res.stderr
    assert "train-{000000..000005}.tar" in res.stdout and "12 samples in 6 shard(s)" in res.stdout
    # a second run over the set it wrote replaces it: no stale shard of the first is left
    res = cli(capsys, "shard", str(images), "--out", str(out), "--shard-size", "5")
    assert res.returncode == 0, res.stderr
    assert "Replaced the previous shard set" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        META_NAME,
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    # a folder holding anything else is refused, and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = cli(capsys, "shard", str(images), "--out", str(other), "--shard-size", "5")
    assert res.returncode == 2 and f"--out {other} is not empty" in res.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    res = cli(capsys, "shard", str(images), "--out", str(images / "shards"), "--shard-size", "5")
    assert res.returncode == 2 and "is inside the dataset" in res.stderr
    assert not (images / "shards").exists()


def _train(project: Path) -> list[dict]:
    history: list[dict] = []

    class Keep:
        def on_log(self, trainer, message): ...
        def on_run_started(self, trainer, state): ...
        def on_batch_finished(self, trainer, state, loss): ...
        def on_epoch_finished(self, trainer, state, metrics):
            history.append(metrics)

        def on_run_finished(self, trainer, state): ...

    state = Trainer(load_project(project), [Keep()]).run()
    assert state.status == "completed"
    return history


def test_training_on_shards_gives_the_folders_losses(tmp_path):
    """Same images in the same order (sequential, one process): the same batches, so the same losses."""
    images = write_image_folder(tmp_path / "images", per_class=6, size=16)
    result = write_shards(images, tmp_path / "shards", shard_size=4)
    common = dict(
        loader={"batch_size": 6, "num_workers": 0, "decoded_cache": "off", "sampler": {"name": "sequential"}},
        train={"epochs": 2, "device": "cpu", "seed": 0, "feature_cache": "off"},
        model={"backbone": "timm/test_resnet"},
    )
    folder = write_project(tmp_path / "folder.json", "images", data={"val_fraction": 0.0}, **common)
    shards = write_project(
        tmp_path / "shards.json",
        result.patterns()["train"],
        data={"kind": "webdataset", "val_fraction": 0.0},
        **common,
    )
    a, b = _train(folder), _train(shards)
    assert [m["train_loss"] for m in b] == pytest.approx([m["train_loss"] for m in a], rel=1e-6)
    assert [m["train_accuracy"] for m in b] == [m["train_accuracy"] for m in a]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def test_two_workers_read_every_sample_once_per_epoch_in_a_seeded_shuffle(shard_set, tmp_path):
    root, images, result = shard_set
    project = write_project(
        tmp_path / "p.json",
        result.patterns()["train"],
        data={"kind": "webdataset", "val_path": result.patterns()["val"], "val_fraction": 0.0, "shuffle_buffer": 4},
        loader={"batch_size": 5, "num_workers": 2},  # worker shards of 15 and 13 samples: no batch of one to drop
    )
    cfg = load_project(project)
    pre = preprocess_for(cfg.model, cfg.data)
    data = prepare_webdataset(cfg, pre)
    # ground truth: each training image decoded from its file through the same transform
    truth = {}
    for s in _shard_samples(root / "shards", "train"):
        path = images / s["path.txt"].decode()
        truth[_digest(data.train.transform(load_image(path)))] = (s["path.txt"].decode(), int(s["cls"]))
    assert len(truth) == 28

    def epoch(n: int) -> list[tuple[str, int]]:
        loader = stream_loader(data.train, cfg.loader, collate_fn=None, seed=0, pin_memory=False, workers=2)
        data.train.set_epoch(n)
        seen, batches = [], 0
        for x, y in loader:
            batches += 1
            for xi, yi in zip(x, y, strict=True):
                name, label = truth[_digest(xi)]
                assert label == int(yi)
                seen.append((name, label))
        assert batches == len(loader)
        return seen

    first, second, again = epoch(1), epoch(2), epoch(1)
    assert sorted(first) == sorted(second) == sorted(truth.values())  # every sample once per epoch
    assert first != second  # the shuffle follows the epoch
    assert first == again  # and is seeded: the same epoch draws the same order


def test_two_torchrun_processes_read_disjoint_shards_and_finish(shard_set, tmp_path):
    """Uneven shards (5, 5, 5, 5, 5, 3) between two processes: each reads its own shards, both run the same number
    of batches (or DDP would hang), and the run completes."""
    root, images, result = shard_set
    project = write_project(
        tmp_path / "p.json",
        result.patterns()["train"],
        data={"kind": "webdataset", "val_path": result.patterns()["val"], "val_fraction": 0.0},
        loader={"batch_size": 4, "num_workers": 1},
        model={"backbone": "timm/test_resnet"},
        train={"epochs": 2, "device": "cpu", "seed": 0},
    )
    log = tmp_path / "log"
    log.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(HOOK), MWB_TEST_WDS_LOG=str(log), MWB_TEST_REPO=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        torchrun_command(2, ["train", str(project), "--out", str(tmp_path / "run")]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "All 2 processes end with the same weights and buffers" in res.stderr
    per = collections.defaultdict(list)  # (epoch, rank, split) -> [(url, key)]
    for f in log.iterdir():
        rank = int(f.name.split("-")[1])
        for line in f.read_text().splitlines():
            ep, url, key = line.split()
            per[(int(ep), rank, "val" if "/val-" in url else "train")].append((url, key))
    for ep in (1, 2):
        train = [per[(ep, r, "train")] for r in (0, 1)]
        shards = [{u for u, _ in t} for t in train]
        assert shards[0] and shards[1] and not shards[0] & shards[1]  # disjoint shards
        assert len(train[0]) == len(train[1]) == 14  # 28 samples: each process its 14, whatever its shards hold
    val = [per[(0, r, "val")] for r in (0, 1)]  # the validation stream has no epoch: both epochs' passes
    assert not {u for u, _ in val[0]} & {u for u, _ in val[1]}
    both = collections.Counter(val[0] + val[1])
    assert len(both) == result.samples["val"] and set(both.values()) == {2}  # each sample once per epoch
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_bad_patterns_and_settings_are_refused_by_name(shard_set, tmp_path, capsys):
    root, images, result = shard_set
    out = root / "shards"
    missing = out / "train-000006.tar"  # the first of the pattern past the six written
    project = write_project(
        tmp_path / "p.json",
        str(out / "train-{000004..000009}.tar"),
        data={"kind": "webdataset", "val_fraction": 0.0},
    )
    with pytest.raises(ConfigError, match=f"shard {missing} does not exist"):
        load_project(project)
    project = write_project(
        tmp_path / "p.json", result.patterns()["train"], data={"kind": "webdataset", "val_fraction": 0.2}
    )
    with pytest.raises(ConfigError, match=r"data.val_fraction = 0.2 cannot split a stream of shards"):
        load_project(project)
    project = write_project(
        tmp_path / "p.json",
        result.patterns()["train"],
        data={"kind": "webdataset", "val_fraction": 0.0},
        loader={"sampler": {"name": "weighted_random", "weights": "balanced"}},
    )
    with pytest.raises(ConfigError, match=r"loader.sampler.name = 'weighted_random' draws samples by position"):
        load_project(project)
    # shards from elsewhere (no shards.json): counted by reading them, classes from data.classes
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (foreign / name).write_bytes((out / name).read_bytes())
    pattern = str(foreign / "train-{000000..000001}.tar")
    project = write_project(tmp_path / "p.json", pattern, data={"kind": "webdataset", "val_fraction": 0.0})
    res = cli(capsys, "check", str(project))
    assert res.returncode == 2 and "data.classes" in res.stderr and str(foreign / META_NAME) in res.stderr
    project = write_project(
        tmp_path / "p.json",
        pattern,
        data={"kind": "webdataset", "val_fraction": 0.0, "classes": ["blue", "green", "red"]},
        loader={"batch_size": 4},
    )
    res = cli(capsys, "check", str(project))
    assert res.returncode == 0, res.stderr
    assert "2 shard(s), 10 samples (2 of them counted by reading" in res.stdout
    # what needs every image at once says so by name, here the audit
    res = cli(capsys, "audit", str(project))
    assert res.returncode == 2 and "data.kind = 'webdataset' streams tar shards in order" in res.stderr
    # a shard that is not a tar file names itself
    (foreign / "train-000001.tar").write_bytes(b"not a tar file")
    with pytest.raises(DataError, match="train-000001.tar"):
        cfg = load_project(project)
        prepare_webdataset(cfg, preprocess_for(cfg.model, cfg.data))


def test_what_reads_by_position_refuses_streamed_shards_by_name(shard_set, tmp_path):
    from engine.augment_preview import AugmentPreview
    from engine.lr_finder import find_lr

    root, images, result = shard_set
    project = write_project(
        tmp_path / "p.json",
        result.patterns()["train"],
        data={"kind": "webdataset", "val_path": result.patterns()["val"], "val_fraction": 0.0},
    )
    cfg = load_project(project)
    with pytest.raises(DataError, match=r"The augmentation preview reads samples by position.*read in order"):
        AugmentPreview(cfg)
    with pytest.raises(DataError, match=r"The learning-rate finder reads samples by position"):
        find_lr(cfg)
    pre = preprocess_for(cfg.model, cfg.data)
    with pytest.raises(DataError, match=r"streams tar shards in order; this needs every image"):
        prepare_data(cfg, pre)  # what reads the dataset as files (quantization calibration, the audit's scan)
    data = prepare_webdataset(cfg, pre)
    with pytest.raises(DataError, match=r"sample 3 by position needs random access"):
        data.train[3]
    from engine.codegen import CodegenError, write_export

    with pytest.raises(CodegenError, match=r"data.kind = .webdataset.*the exported script reads image folders"):
        write_export(cfg, tmp_path / "export")


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_the_lean_tar_reader_gives_what_webdatasets_tarfile_reader_gives(tmp_path, fmt):
    """Long names (GNU long-name members, pax path records, ustar prefixes), a folder entry and metadata members."""
    import tarfile

    from webdataset.tariterators import tarfile_samples

    shard = tmp_path / "s.tar"
    deep = "d" * 60 + "/" + "e" * 60  # a path over 100 characters: ustar splits it, GNU and pax carry it whole
    members = [
        (f"{deep}/k{i}.{ext}", bytes([i]) * (700 * i + ext_n))
        for i in range(3)
        for ext_n, ext in enumerate(("png", "cls"))
    ]
    with tarfile.open(shard, "w", format=getattr(tarfile, fmt)) as tar:
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        meta = tarfile.TarInfo("__meta__")
        meta.size = 1
        tar.addfile(meta, io.BytesIO(b"x"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    theirs = list(tarfile_samples([{"url": str(shard)}]))
    ours = read_back(shard)
    assert len(ours) == 3 and ours == theirs
    assert ours[2]["png"] == bytes([2]) * 1400 and ours[2]["__key__"] == f"{deep}/k2"
