"""Exports of a trained checkpoint: every format loads back in its own runtime and matches PyTorch; bad targets are refused."""

import functools
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


@functools.cache
def _pytorch_accuracy(checkpoint):
    """The checkpoint's validation accuracy as `evaluate` measures it (the report's PyTorch figure must be this)."""
    from engine.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, device="cpu").accuracy


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

    # The deployment report: the file's own runtime scored on all 9 validation images, like the PyTorch model.
    assert info["report"] == result.report
    report = result.report
    assert report["evaluated_on"] == "validation set of 9 images" and report["metric"] == "top-1 accuracy"
    assert report["exported"]["metric"] == report["pytorch"]["metric"] == _pytorch_accuracy(checkpoint)
    assert report["difference_points"] == 0.0 and report["top1_agreement"] == 1.0
    assert 0.0 <= report["max_abs_logit_diff"] <= 1e-3
    assert report["exported"]["size_bytes"] == out.stat().st_size
    for figures in (report["exported"], report["pytorch"]):
        assert figures["latency_ms_batch1"] > 0 and figures["throughput_batch32"] > 0
        assert figures["repetitions"]["batch1"] >= 3 and figures["repetitions"]["batch32"] >= 3
    assert report["cpu"]["logical_cpus"] == os.cpu_count() and "baseline" not in report
    assert (tmp_path / "predict.py").is_file() == (fmt == "onnx") and result.quantize is None

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


# ---------------------------------------------------------------------------------------------
# int8 (ONNX Runtime quantization) and predict.py

INT8 = 3  # onnx.TensorProto.INT8


def _validation_files(checkpoint):
    from engine.data import prepare_data
    from engine.evaluate import sample_names

    ckpt = load_checkpoint(checkpoint)
    _, cfg, _, pre = restore_model(ckpt)
    return [Path(p) for p in sample_names(prepare_data(cfg, pre).val)]


def _onnx_accuracy(path, checkpoint):
    """Top-1 accuracy of an ONNX file on the validation images, run here in a plain onnxruntime session."""
    import onnxruntime as ort

    from engine.predict import Predictor, read_image

    predictor = Predictor.from_checkpoint(checkpoint)  # for its evaluation transform only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    files = _validation_files(checkpoint)
    x = torch.stack([predictor.transform(read_image(f)) for f in files]).numpy()
    predicted = session.run(["logits"], {"input": x})[0].argmax(axis=1)
    return float(np.mean([CLASSES[int(p)] == f.parent.name for p, f in zip(predicted, files, strict=True)]))


@pytest.fixture(scope="module")
def int8_export(checkpoint, tmp_path_factory):
    """The checkpoint exported once as float32 ONNX and once as int8 ONNX, into one folder."""
    folder = tmp_path_factory.mktemp("int8")
    fp32 = export_checkpoint(checkpoint, "onnx", folder / "model.onnx")
    messages = []
    int8 = export_checkpoint(checkpoint, "onnx", folder / "model.int8.onnx", quantize="int8", log=messages.append)
    return fp32, int8, messages


def test_int8_onnx_is_quantized_smaller_and_as_accurate(checkpoint, int8_export):
    import onnx

    fp32, int8, messages = int8_export
    assert int8.path.name == "model.int8.onnx" and int8.quantize == "int8"
    info = json.loads(int8.sidecar.read_text())
    assert info["quantization"]["method"] == "static" and "why_not_static" not in info["quantization"]
    assert info["quantization"]["calibration"] == "27 training images with the evaluation preprocessing"
    assert info["quantization"]["float32_max_abs_diff"] <= 1e-3 and info["tolerance"] is None
    assert any(m.startswith("Quantizing to int8 (static, calibrated on 27 training images)") for m in messages)

    # Really quantized: QDQ nodes around the convolutions, and int8 tensors holding nearly all the weight bytes.
    graph = onnx.load(str(int8.path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_bytes = sum(len(t.raw_data) for t in graph.initializer if t.data_type == INT8)
    all_bytes = sum(len(t.raw_data) for t in graph.initializer)
    assert int8_bytes > 0.9 * all_bytes
    assert not any(t.data_type == INT8 for t in onnx.load(str(fp32.path)).graph.initializer)
    size, fp32_size = int8.path.stat().st_size, fp32.path.stat().st_size
    assert size <= 0.3 * fp32_size

    # The report: its figures are the files' own, measured against the ground truth here.
    report = int8.report
    assert report["exported"]["size_bytes"] == size and report["baseline"]["size_bytes"] == fp32_size
    assert report["size_ratio"] == round(size / fp32_size, 4)
    assert report["baseline"]["name"] == "float32 ONNX file" and report["latency_ratio"] > 0
    assert report["exported"]["metric"] == _onnx_accuracy(int8.path, checkpoint)
    assert (
        report["pytorch"]["metric"] == _pytorch_accuracy(checkpoint) >= 0.8
    )  # a learnt model: closeness means something
    assert report["difference_points"] == pytest.approx(
        (report["exported"]["metric"] - report["pytorch"]["metric"]) * 100, abs=1e-9
    )
    assert abs(report["difference_points"]) <= 100 / 9 + 1e-9  # at most one of the 9 validation images changes
    assert report["top1_agreement"] >= 8 / 9
    assert 0 < report["max_abs_logit_diff"] < 1.0  # quantized: different, but not far from PyTorch
    assert fp32.report["exported"]["metric"] == _onnx_accuracy(fp32.path, checkpoint)


def test_int8_without_training_images_falls_back_to_dynamic_and_says_why(checkpoint, tmp_path):
    import onnx

    ckpt = load_checkpoint(checkpoint)
    gone = tmp_path / "deleted-images"
    ckpt["config"]["data"]["path"] = str(gone)
    moved = tmp_path / "moved.pt"
    torch.save(ckpt, moved)

    result = export_checkpoint(moved, "onnx", tmp_path / "model.int8.onnx", quantize="int8")
    quantization = json.loads(result.sidecar.read_text())["quantization"]
    assert quantization["method"] == "dynamic"
    assert quantization["why_not_static"] == f"dataset not found at {gone}"
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops and ops & {"ConvInteger", "MatMulInteger"}
    assert result.report["evaluated_on"] is None
    assert result.report["why_not_evaluated"] == f"dataset not found at {gone}"
    assert result.report["size_ratio"] <= 0.3


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict", "safetensors", "pt2"])
def test_quantize_with_a_format_it_cannot_apply_to_is_refused(checkpoint, tmp_path, fmt):
    with pytest.raises(
        ExportError, match=rf"--quantize int8 needs --format onnx .* a {fmt} export cannot be quantized"
    ):
        export_checkpoint(checkpoint, fmt, tmp_path / f"model{default_suffix(fmt)}", quantize="int8")
    with pytest.raises(ExportError, match="unknown --quantize value 'int4'; allowed: int8"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx", quantize="int4")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_quantize_for_torchscript_naming_the_option(checkpoint, capsys):
    from engine.cli import main

    code = main(["export", str(checkpoint), "--format", "torchscript", "--quantize", "int8"])
    assert code == 2
    assert "--quantize int8 needs --format onnx" in capsys.readouterr().err
    assert not checkpoint.with_name("final.torchscript.pt").exists()


def _run_predict_script(script, *args):
    """predict.py in a fresh isolated interpreter where torch, torchvision and this project cannot be imported."""
    import subprocess
    import sys

    blocker = (
        "import runpy, sys; sys.modules.update(torch=None, torchvision=None, engine=None, widgets=None); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", blocker, str(script), *map(str, args)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_script_agrees_with_the_app_on_the_validation_set(checkpoint, int8_export, tmp_path):
    from engine.predict import Predictor

    fp32, int8, _ = int8_export
    script = fp32.predict_script
    assert script == fp32.path.parent / "predict.py" == int8.predict_script
    files = _validation_files(checkpoint)
    folder = tmp_path / "validation"
    for f in files:  # the validation images, in a folder of their own, under their class folder
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.name / f.name).write_bytes(f.read_bytes())

    done = _run_predict_script(script, folder, "--model", fp32.path)
    assert done.returncode == 0, done.stderr
    got = {}
    for line in done.stdout.splitlines():
        path, label, probability = line.split("\t")
        got[Path(path).relative_to(folder)] = (label, float(probability))
    predictor = Predictor.from_checkpoint(checkpoint)
    want = {f.relative_to(f.parent.parent): predictor.predict(f)[0] for f in files}
    assert len(want) == 9 and set(got) == set(want)
    for key, (label, probability) in want.items():
        assert got[key][0] == label
        assert got[key][1] == pytest.approx(probability, abs=1e-3)

    # Two models in the folder: the script asks which one, naming both.
    done = _run_predict_script(script, folder)
    assert done.returncode == 2
    assert "2 models in" in done.stderr and "model.int8.onnx, model.onnx" in done.stderr
    # JSON output, top 3, the int8 model; one answer per image, probabilities summing to 1.
    done = _run_predict_script(script, folder, "--model", int8.path, "--top", "3", "--json")
    answers = json.loads(done.stdout)
    assert len(answers) == 9 and all(len(a["answer"]) == 3 for a in answers)
    assert all(sum(x["value"] for x in a["answer"]) == pytest.approx(1.0) for a in answers)
    done = _run_predict_script(script, tmp_path / "missing.png", "--model", fp32.path)
    assert done.returncode == 2 and "missing.png: no such file or folder" in done.stderr


def test_a_different_predict_script_is_refused_and_kept(checkpoint, int8_export, tmp_path):
    fp32, _, _ = int8_export
    ours = fp32.predict_script.read_bytes()
    mine = tmp_path / "predict.py"
    mine.write_text("print('my own script')\n")
    with pytest.raises(
        ExportError, match="predict.py exists and is not the predict.py this export writes; use --force"
    ):
        export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx")
    assert mine.read_text() == "print('my own script')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predict.py"]

    from engine.export import replaced_files

    assert replaced_files(tmp_path / "model.onnx", "onnx") == [mine]
    assert replaced_files(tmp_path / "model.pth", "state_dict") == []  # only ONNX exports write predict.py
    mine.write_bytes(ours)  # the script an export writes is not a file it would replace
    assert replaced_files(tmp_path / "model.onnx", "onnx") == []
