"""Exports of a trained checkpoint: every format loads back in its own runtime and matches PyTorch; bad targets are refused."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_image_folder, write_project

from engine.checkpoints import CheckpointError, load_checkpoint
from engine.config import load_project
from engine.export import FORMATS, ExportError, default_suffix, export_checkpoint
from engine.restore import restore_model
from engine.runs import RunRecorder
from engine.trainer import Trainer

CLASSES = ["blue", "green", "red"]
SIZE = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A resnet18 trained one epoch on 16 px images of three colours; 9 validation images."""
    root = tmp_path_factory.mktemp("trained")
    write_image_folder(root / "images")
    cfg = load_project(write_project(root / "project.json", "images", train={"epochs": 1}))
    run_dir = root / "run"
    run_dir.mkdir()
    Trainer(cfg, [RunRecorder(run_dir)]).run()
    return run_dir / "checkpoints" / "final.pt"


@pytest.fixture(scope="module")
def pytorch_model(checkpoint):
    return restore_model(load_checkpoint(checkpoint))[0]


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g) for n in (1, 3)]


def _run_without_the_project(fmt, path):
    """Load the file as the README shows, with nothing from this project, and run it on batches of 1 and 3."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].name == "input" and session.get_outputs()[0].name == "logits"
        return [torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]) for x in _batches()]
    if fmt == "torchscript":
        model = torch.jit.load(str(path))
    elif fmt == "pt2":
        model = torch.export.load(str(path)).module()
    else:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, weights_only=True)
        model = torchvision.models.resnet18(num_classes=len(CLASSES))
        model.load_state_dict(state)
        model.eval()
    with torch.no_grad():
        return [model(x) for x in _batches()]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated upstream, still the format asked for
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_within_tolerance(checkpoint, pytorch_model, tmp_path, fmt):
    out = tmp_path / f"model{default_suffix(fmt)}"
    messages = []
    result = export_checkpoint(checkpoint, fmt, out, log=messages.append)

    assert result.path == out and out.is_file()
    assert result.sidecar == tmp_path / f"{out.name}.json" and result.sidecar.is_file()
    assert 0.0 <= result.max_abs_diff <= 1e-3 and result.tolerance == 1e-3
    assert result.inputs == "validation batch of 8 images"
    assert any("Verified" in m for m in messages)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind

    info = json.loads(result.sidecar.read_text())
    assert info["format"] == fmt and info["file"] == out.name
    assert info["class_names"] == CLASSES and info["task"] == "classification"
    assert info["input_size"] == [3, SIZE, SIZE] and info["resize_size"] == SIZE
    assert info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3 and info["interpolation"] == "bilinear"
    assert info["backbone"] == "resnet18"
    assert info["source_checkpoint"] == str(checkpoint.resolve()) and info["epoch"] == 1
    assert info["max_abs_diff"] == result.max_abs_diff
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["python"]
    if fmt == "onnx":
        assert info["versions"]["onnxruntime"] and info["onnx_opset"] >= 17
    assert info["created"]

    # The file works on its own, in the runtime a user would pick, at more than one batch size.
    with torch.no_grad():
        expected = [pytorch_model(x) for x in _batches()]
    for got, want in zip(_run_without_the_project(fmt, out), expected, strict=True):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-3


def test_existing_files_are_kept_unless_forced(checkpoint, tmp_path):
    out = tmp_path / "model.pth"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="model.pth exists; use --force to replace it"):
        export_checkpoint(checkpoint, "state_dict", out)
    assert out.read_bytes() == b"previous export"
    assert not (tmp_path / "model.pth.json").exists()

    # A failed check does not replace the previous file, even with force.
    with pytest.raises(ExportError, match=r"max abs logit difference .* > tolerance -"):
        export_checkpoint(checkpoint, "state_dict", out, force=True, tolerance=-1.0)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]

    result = export_checkpoint(checkpoint, "state_dict", out, force=True)
    assert set(torch.load(out, weights_only=True)) == set(load_checkpoint(checkpoint)["model_state_dict"])
    assert result.sidecar.is_file()

    out.unlink()  # the sidecar alone is enough to refuse: it would describe the wrong file
    with pytest.raises(ExportError, match="model.pth.json exists; use --force"):
        export_checkpoint(checkpoint, "state_dict", out)


def test_an_export_in_progress_to_the_same_file_is_refused_by_name(checkpoint, tmp_path):
    """Two exports to one file would each rename their model and sidecar into place: a mismatched pair."""
    import subprocess
    import sys

    out = tmp_path / "model.pth"
    script = (
        "import sys; from engine.run_lock import claim; c = claim(sys.argv[1], 'export'); "
        "print('held', flush=True); sys.stdin.read(); c.release()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / ".model.pth.lock")],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExportError, match=rf"export '{out}' is in use by process {holder.pid}"):
            export_checkpoint(checkpoint, "state_dict", out, force=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pth.lock"]  # nothing written, no staging
    finally:
        holder.stdin.close()
        holder.wait(30)
    export_checkpoint(checkpoint, "state_dict", out)  # free again once the other export ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model.pth.json"]


def test_missing_folder_is_refused(checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"folder .*nowhere does not exist"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "nowhere" / "model.onnx")
    assert not (tmp_path / "nowhere").exists()


def test_read_only_folder_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root?) can write into a read-only folder")
        with pytest.raises(ExportError, match=r"locked is not writable"):
            export_checkpoint(checkpoint, "state_dict", folder / "model.pth")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_unknown_format_lists_the_allowed_ones(checkpoint, tmp_path):
    with pytest.raises(
        ExportError, match="unknown export format 'tflite'; allowed: torchscript, onnx, state_dict, safetensors, pt2"
    ):
        export_checkpoint(checkpoint, "tflite", tmp_path / "model.tflite")


def test_a_file_that_is_not_our_checkpoint_is_refused(tmp_path):
    bare = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a Model Workbench checkpoint"):
        export_checkpoint(bare, "state_dict", tmp_path / "model.pth")
    assert not (tmp_path / "model.pth").exists()


def test_random_batch_when_the_training_data_is_gone(checkpoint, tmp_path):
    # The same checkpoint, as it would be after its data folder was deleted.
    ckpt = load_checkpoint(checkpoint)
    gone = tmp_path / "deleted-images"
    ckpt["config"]["data"]["path"] = str(gone)
    moved = tmp_path / "moved.pt"
    torch.save(ckpt, moved)

    result = export_checkpoint(moved, "state_dict", tmp_path / "model.pth", batch_size=4)
    assert result.inputs == f"random batch of 4 (dataset not found at {gone})"
    assert result.max_abs_diff <= 1e-3
    assert json.loads(result.sidecar.read_text())["verified_on"] == result.inputs
    assert np.isfinite(result.max_abs_diff)
