"""Predicting single images: the same answers as evaluation, and clear errors for bad checkpoints and images."""

import numpy as np
import pytest
import torch
from conftest import COLOURS, write_image_folder, write_project
from PIL import Image
from torch import nn

from engine.checkpoints import CheckpointError
from engine.config import load_project
from engine.data import DataError
from engine.evaluate import evaluate_checkpoint
from engine.predict import Predictor
from engine.runs import RunRecorder
from engine.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_image_folder(root / "images", per_class=8)
    # Only the head trains, for one epoch: a real checkpoint in a few seconds on a shared CPU.
    cfg = load_project(
        write_project(
            root / "project.json",
            "images",
            model={"freeze": "head_only"},
            train={"epochs": 1, "device": "cpu", "seed": 0},
            output={"dir": "runs", "tensorboard": False},
        )
    )
    run_dir = root / "run"
    run_dir.mkdir()
    Trainer(cfg, [RunRecorder(run_dir)]).run()
    return root, run_dir / "checkpoints" / "final.pt"


def test_predictions_agree_with_evaluation_on_the_validation_images(trained):
    _, final = trained
    predictor = Predictor.from_checkpoint(final)
    ev = evaluate_checkpoint(final, device="cpu", top_n=100)
    assert len(ev.hardest) == ev.samples == 6
    for sample in ev.hardest:
        ranked = predictor.predict(sample["path"])
        assert sorted(name for name, _ in ranked) == ["blue", "green", "red"]
        assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
        assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-6)
        assert ranked[0][0] == sample["predicted"]
        assert ranked[0][1] == pytest.approx(sample["confidence"], abs=1e-6)
    assert predictor.info["backbone"] == "resnet18" and predictor.info["epoch"] == 1
    assert predictor.info["num_classes"] == 3 and predictor.task == "classification"


def test_a_pil_image_and_a_npz_row_are_read_as_evaluation_reads_them(trained, tmp_path):
    root, final = trained
    predictor = Predictor.from_checkpoint(final)
    path = root / "images" / "red" / "003.png"
    with Image.open(path) as img:
        in_memory = img.copy()
    assert predictor.predict(in_memory) == predictor.predict(path)

    labels = ["red", "blue", "green"]
    x = np.stack([np.full((12, 12, 3), COLOURS[name], dtype=np.uint8) for name in labels])
    np.savez(tmp_path / "rows.npz", X=x, y=np.array(labels))
    ev = evaluate_checkpoint(final, data=tmp_path / "rows.npz", device="cpu")
    for sample in ev.hardest:
        row = x[int(sample["path"].split()[1])]
        top_name, top_p = predictor.predict(row)[0]
        assert top_name == sample["predicted"] and top_p == pytest.approx(sample["confidence"], abs=1e-6)


def test_unreadable_images_raise_a_data_error_naming_the_file(trained, tmp_path):
    _, final = trained
    predictor = Predictor.from_checkpoint(final)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, reason in (
        (fake, "not an image"),
        (empty, "empty file"),
        (tmp_path / "gone.png", "no such file"),
        (tmp_path, "folder"),
    ):
        with pytest.raises(DataError) as info:
            predictor.predict(path)
        assert str(path) in str(info.value) and reason in str(info.value)


def test_bad_checkpoints_raise_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.from_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch file"):
        Predictor.from_checkpoint(text)
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="not a Model Workbench checkpoint"):
        Predictor.from_checkpoint(bare)


class Fixed(nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.register_buffer("outputs", torch.tensor([outputs], dtype=torch.float32))

    def forward(self, x):
        return self.outputs.expand(x.shape[0], -1)


def _predictor(outputs, names, task):
    return Predictor(Fixed(outputs), names, task, transform=lambda image: torch.zeros(3, 4, 4))


def test_multilabel_gives_independent_sigmoids_and_regression_raw_values():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    multilabel = _predictor([2.0, -1.0, 0.0], ["cat", "dog", "sky"], "multilabel").predict(image)
    assert [name for name, _ in multilabel] == ["cat", "sky", "dog"]
    assert [p for _, p in multilabel] == pytest.approx([1 / (1 + np.exp(-2.0)), 0.5, 1 / (1 + np.exp(1.0))])
    regression = _predictor([3.5, -2.0], ["width", "height"], "regression").predict(image)
    assert regression == [("width", 3.5), ("height", -2.0)]  # output order, values as the model gives them
    classification = _predictor([0.0, 1.0], ["a", "b"], "classification").predict(image)
    assert [name for name, _ in classification] == ["b", "a"]
    assert sum(p for _, p in classification) == pytest.approx(1.0)


def test_bad_image_arrays_are_refused():
    with pytest.raises(DataError, match="shape"):
        _predictor([0.0, 1.0], ["a", "b"], "classification").predict(np.zeros((2, 4, 4, 3)))
