"""Evaluation: exact metrics on models with known outputs, and a trained checkpoint on its own and on new data."""

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, train_head_only_run, write_image_folder
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from engine.checkpoints import load_checkpoint
from engine.collate import pad_collate
from engine.evaluate import evaluate_checkpoint, evaluate_model


class PresetOutputs(nn.Module):
    """Returns preset outputs for the sample whose index is written in the input's first value."""

    def __init__(self, outputs):
        super().__init__()
        self.register_buffer("outputs", torch.tensor(outputs, dtype=torch.float32))

    def forward(self, x):
        return self.outputs[x.reshape(x.shape[0], -1)[:, 0].long()]


def index_loader(targets, batch_size=3, dtype=torch.long):
    n = len(targets)
    dataset = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.tensor(targets, dtype=dtype))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def cross_entropy(logits, target):
    return math.log(sum(math.exp(z) for z in logits)) - logits[target]


# Four classes, one of which ("none") is never true and never predicted.
NAMES = ["a", "b", "c", "none"]
TARGETS = [0, 0, 1, 1, 2, 2]
LOGITS = [
    [3.0, 1.0, 0.0, -5.0],  # a -> a
    [0.5, 2.0, 0.0, -5.0],  # a -> b
    [0.0, 1.0, 0.0, -5.0],  # b -> b
    [0.0, 4.0, 1.0, -5.0],  # b -> b
    [2.0, 0.0, 1.5, -5.0],  # c -> a
    [0.0, 0.0, 2.5, -5.0],  # c -> c
]
PATHS = [f"/data/{i}.png" for i in range(6)]


def test_classification_metrics_equal_hand_computed_values():
    progress = []
    ev = evaluate_model(
        PresetOutputs(LOGITS),
        index_loader(TARGETS),
        task="classification",
        class_names=NAMES,
        sample_names=PATHS,
        top_n=4,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert progress == [(1, 2), (2, 2)]
    assert ev.samples == 6
    assert ev.accuracy == pytest.approx(4 / 6)
    assert ev.confusion == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # precision = tp / predicted, recall = tp / true, by hand from the table above
    expected = {"a": (1 / 2, 1 / 2, 2), "b": (2 / 3, 2 / 2, 2), "c": (1 / 1, 1 / 2, 2), "none": (0.0, 0.0, 0)}
    for row in ev.per_class:
        precision, recall, support = expected[row["class"]]
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
    assert [r["class"] for r in ev.per_class] == NAMES
    # the empty class counts as 0.0, not NaN, and does not drag the macro average down
    assert ev.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert ev.top5_accuracy is None  # fewer than 5 classes

    losses = [cross_entropy(z, t) for z, t in zip(LOGITS, TARGETS, strict=True)]
    assert ev.loss == pytest.approx(sum(losses) / 6)
    worst = sorted(range(6), key=lambda i: -losses[i])[:4]
    assert [h["index"] for h in ev.hardest] == worst
    assert [h["path"] for h in ev.hardest] == [PATHS[i] for i in worst]
    assert [h["loss"] for h in ev.hardest] == pytest.approx([losses[i] for i in worst])
    assert all(a["loss"] >= b["loss"] for a, b in zip(ev.hardest, ev.hardest[1:], strict=False))
    first = ev.hardest[0]  # sample 1: an 'a' taken for a 'b'
    assert (first["index"], first["true"], first["predicted"]) == (1, "a", "b")
    z = LOGITS[1]
    assert first["confidence"] == pytest.approx(math.exp(z[1]) / sum(math.exp(v) for v in z))
    json.dumps(ev.to_dict(), allow_nan=False)


def test_top5_accuracy_with_six_classes():
    # The true class is ranked 1st, 5th, and 6th (last) for the three samples.
    logits = [[5.0, 4, 3, 2, 1, 0], [1.0, 5, 4, 3, 2, 0], [5.0, 4, 3, 2, 1, 0]]
    targets = [0, 0, 5]
    ev = evaluate_model(
        PresetOutputs(logits),
        index_loader(targets),
        task="classification",
        class_names=list("uvwxyz"),
        sample_names=["s0", "s1", "s2"],
    )
    assert ev.top5_accuracy == pytest.approx(2 / 3)
    assert ev.accuracy == pytest.approx(1 / 3)


class SizedImages(Dataset):
    """Images of different sizes whose pixels all hold the sample's index, for the pad collate."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, 4 + i, 6 - i % 3), float(i)), torch.tensor(self.targets[i])


def test_pad_collate_batches_give_the_same_result():
    plain = evaluate_model(
        PresetOutputs(LOGITS), index_loader(TARGETS), task="classification", class_names=NAMES, sample_names=PATHS
    )
    padded = evaluate_model(
        PresetOutputs(LOGITS),
        DataLoader(SizedImages(TARGETS), batch_size=4, collate_fn=pad_collate),
        task="classification",
        class_names=NAMES,
        sample_names=PATHS,
    )
    assert padded.to_dict() == plain.to_dict()


def test_multilabel_per_label_metrics_and_accuracy():
    names = ["cat", "dog", "sky"]
    targets = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    logits = [[2.0, -1.0, -3.0], [1.0, 3.0, -2.0], [4.0, -2.0, -1.0], [-1.0, -1.0, -1.0]]
    ev = evaluate_model(
        PresetOutputs(logits),
        index_loader(targets, dtype=torch.float32),
        task="multilabel",
        class_names=names,
        sample_names=["p0", "p1", "p2", "p3"],
    )
    # predicted (logit > 0): {cat}, {cat, dog}, {cat}, {}
    # cat: tp 2, fp 1, fn 0; dog: tp 1, fp 0, fn 1; sky: tp 0, fp 0, fn 1
    rows = {r["class"]: r for r in ev.per_class}
    assert (rows["cat"]["precision"], rows["cat"]["recall"], rows["cat"]["support"]) == pytest.approx((2 / 3, 1.0, 2))
    assert (rows["dog"]["precision"], rows["dog"]["recall"], rows["dog"]["support"]) == pytest.approx((1.0, 0.5, 2))
    assert (rows["sky"]["precision"], rows["sky"]["recall"], rows["sky"]["f1"]) == (0.0, 0.0, 0.0)
    assert rows["cat"]["f1"] == pytest.approx(0.8)
    assert rows["dog"]["f1"] == pytest.approx(2 / 3)
    assert ev.accuracy == pytest.approx(9 / 12)  # wrong: s0 sky, s1 cat, s2 dog
    assert ev.confusion == [] and ev.top5_accuracy is None
    bce = [
        np.mean([math.log1p(math.exp(-z)) if t else math.log1p(math.exp(z)) for z, t in zip(zs, ts, strict=True)])
        for zs, ts in zip(logits, targets, strict=True)
    ]
    assert ev.loss == pytest.approx(np.mean(bce))
    assert ev.hardest[0]["path"] == f"p{int(np.argmax(bce))}"
    assert ev.hardest[0]["true"] == ["cat", "sky"] and ev.hardest[0]["predicted"] == ["cat"]
    json.dumps(ev.to_dict(), allow_nan=False)


def test_regression_reports_mse_mae_rmse():
    targets = [[1.0], [2.0], [4.0]]
    outputs = [[1.5], [2.0], [1.0]]
    ev = evaluate_model(
        PresetOutputs(outputs),
        index_loader(targets, dtype=torch.float32),
        task="regression",
        class_names=["value"],
        sample_names=["r0", "r1", "r2"],
    )
    assert ev.accuracy is None and ev.per_class == [] and ev.confusion == []
    assert ev.loss == pytest.approx((0.25 + 0 + 9) / 3)
    assert ev.mae == pytest.approx((0.5 + 0 + 3) / 3)
    assert ev.rmse == pytest.approx(math.sqrt((0.25 + 0 + 9) / 3))
    assert [h["path"] for h in ev.hardest] == ["r2", "r0", "r1"]
    assert json.loads(json.dumps(ev.to_dict(), allow_nan=False))["mae"] == pytest.approx(ev.mae)


def test_stop_event_ends_evaluation_without_a_result():
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        stop.set()

    ev = evaluate_model(
        PresetOutputs(LOGITS),
        index_loader(TARGETS, batch_size=2),
        task="classification",
        class_names=NAMES,
        sample_names=PATHS,
        stop_event=stop,
        progress=progress,
    )
    assert ev is None and seen == [1]


# ---------------------------------------------------------------------------------------------
# A trained checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return root, train_head_only_run(root)


def test_own_validation_split_reproduces_recorded_accuracy(trained):
    root, final = trained
    ckpt = load_checkpoint(final)
    ev = evaluate_checkpoint(final, device="cpu", top_n=5)
    assert ev.samples == 6  # 8 images per class, val_fraction 0.25
    assert ev.accuracy == pytest.approx(ckpt["metrics"]["val_accuracy"], abs=1e-6)
    assert ev.loss == pytest.approx(ckpt["metrics"]["val_loss"], abs=1e-5)  # the project trains with cross-entropy
    assert ev.class_names == ckpt["class_names"] == ["blue", "green", "red"]
    assert ev.data == f"validation split of {(root / 'images').resolve()} (6 samples)"
    assert sum(map(sum, ev.confusion)) == 6 and [r["support"] for r in ev.per_class] == [2, 2, 2]
    assert ev.top5_accuracy is None
    assert len(ev.hardest) == 5
    assert all(a["loss"] >= b["loss"] for a, b in zip(ev.hardest, ev.hardest[1:], strict=False))
    for h in ev.hardest:  # each path is a real image of the class it is said to be
        assert Path(h["path"]).resolve().parent == (root / "images" / h["true"]).resolve()
        assert h["predicted"] in ev.class_names and 0.0 < h["confidence"] <= 1.0
    json.dumps(ev.to_dict(), allow_nan=False)


def test_separate_folder_skips_an_unknown_class(trained, tmp_path):
    _, final = trained
    other = write_image_folder(tmp_path / "other", per_class=2, seed=7)
    (other / "purple").mkdir()
    for i in range(2):
        Image.new("RGB", (12, 12), (150, 40, 200)).save(other / "purple" / f"{i}.png")
    ev = evaluate_checkpoint(final, data=other, device="cpu", batch_size=4)
    assert ev.samples == 6
    assert sorted(s["path"] for s in ev.skipped) == [str(other / "purple" / f"{i}.png") for i in range(2)]
    assert all("purple" not in h["path"] for h in ev.hardest) and len(ev.hardest) == 6
    assert [r["support"] for r in ev.per_class] == [2, 2, 2]
    assert ev.data == f"{other.resolve()} (6 samples, 2 skipped)"
    json.dumps(ev.to_dict(), allow_nan=False)


def test_npz_samples_are_named_by_row(trained, tmp_path):
    _, final = trained
    labels = ["red", "blue", "purple", "green"]
    colours = {**COLOURS, "purple": (150, 40, 200)}
    x = np.stack([np.full((12, 12, 3), colours[name], dtype=np.uint8) for name in labels])
    np.savez(tmp_path / "test.npz", X=x, y=np.array(labels))
    ev = evaluate_checkpoint(final, data=tmp_path / "test.npz", device="cpu")
    assert ev.samples == 3 and len(ev.skipped) == 1
    assert sorted(h["path"] for h in ev.hardest) == ["row 0", "row 1", "row 2"]
    by_row = {h["path"]: h["true"] for h in ev.hardest}
    assert by_row == {"row 0": "red", "row 1": "blue", "row 2": "green"}  # rows of the kept images
