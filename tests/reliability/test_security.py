"""Security: no file the user opens can run code, and the code keeps the guards that make it so.

Two kinds of test. Scans parse the product's source (engine/, app/, widgets/, main.py) with ast and fail
on any torch.load without weights_only=True, np.load without allow_pickle=False, a pickle loader, a
raised decompression-bomb limit, or a shell. Payload tests build checkpoints whose unpickling would
create a marker file, prove the payload is live (an unrestricted load does create it), then open them
through every door the product has: the engine loaders, the CLI, and the desktop app.
"""

from __future__ import annotations

import ast
import hashlib
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder, write_project

REPO = Path(__file__).resolve().parents[2]
PRODUCT = [REPO / "engine", REPO / "app", REPO / "widgets", REPO / "main.py"]


# ---------------------------------------------------------------------------------------------
# The source scan


def product_sources() -> list[Path]:
    files = []
    for root in PRODUCT:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return files


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as: `import numpy as np` gives np -> numpy, `from torch import load` load -> torch.load."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _resolve(name: str | None, aliases: dict[str, str]) -> str | None:
    if name is None:
        return None
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    return f"{full}.{rest}" if rest else full


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
PICKLE_LOADERS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "numpy.lib.format.read_array",
}
SHELLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "pty.spawn",
    "os.execlp",
    "os.execvp",
    "os.spawnlp",
    "os.spawnvp",
}


def scan(source: str, filename: str = "<source>") -> tuple[list[str], dict[str, int]]:
    """(violations, counts of the guarded calls seen) for one module's source."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    problems: list[str] = []
    seen = {"torch.load": 0, "numpy.load": 0, "subprocess": 0}

    def where(node: ast.AST) -> str:
        return f"{filename}:{node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _resolve(_dotted(node.func), aliases)
            hidden = any(k.arg is None for k in node.keywords)  # **kwargs could carry anything
            if name in TORCH_LOADS:
                seen["torch.load"] += 1
                if hidden or not _is_constant(_keyword(node, "weights_only"), True):
                    problems.append(f"{where(node)}: {name} without weights_only=True")
            elif name in NUMPY_LOADS:
                seen["numpy.load"] += 1
                if hidden or not _is_constant(_keyword(node, "allow_pickle"), False):
                    problems.append(f"{where(node)}: {name} without allow_pickle=False")
            elif name in PICKLE_LOADERS:
                problems.append(f"{where(node)}: {name} unpickles arbitrary objects")
            elif name in SHELLS:
                problems.append(f"{where(node)}: {name} runs a shell")
            if name and name.startswith("subprocess."):
                seen["subprocess"] += 1
            shell = _keyword(node, "shell")
            if shell is not None and not _is_constant(shell, False):
                problems.append(f"{where(node)}: {name or 'a call'} with shell={ast.unparse(shell)}")
            if (
                name == "setattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "MAX_IMAGE_PIXELS"
            ):
                problems.append(f"{where(node)}: setattr changes Image.MAX_IMAGE_PIXELS")
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and sub.attr == "MAX_IMAGE_PIXELS":
                    problems.append(f"{where(node)}: assigns {ast.unparse(sub)} (the decompression-bomb limit)")
    problems.sort(key=lambda line: int(line.split(": ", 1)[0].rsplit(":", 1)[1]))  # ast.walk is breadth-first
    return problems, seen


def scan_product() -> tuple[list[str], dict[str, int]]:
    problems, seen = [], {"torch.load": 0, "numpy.load": 0, "subprocess": 0}
    for path in product_sources():
        found, counts = scan(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
        problems += found
        for key, n in counts.items():
            seen[key] += n
    return problems, seen


def test_the_scanner_catches_each_kind_of_violation():
    bad = textwrap.dedent("""
        import torch, pickle, os, subprocess
        import numpy as np
        from torch import load as tload
        from PIL import Image
        import PIL.Image
        opts = {}
        torch.load("a.pt")
        torch.load("a.pt", weights_only=False)
        tload("a.pt", map_location="cpu")
        torch.load("a.pt", **opts)
        np.load("d.npz")
        np.load("d.npz", allow_pickle=True)
        pickle.loads(b"")
        os.system("ls")
        subprocess.run("ls", shell=True)
        subprocess.Popen(["ls"], shell=flag)
        Image.MAX_IMAGE_PIXELS = None
        PIL.Image.MAX_IMAGE_PIXELS *= 10
        setattr(Image, "MAX_IMAGE_PIXELS", None)
    """)
    problems, _ = scan(bad)
    expected = [
        "torch.load without",
        "torch.load without",
        "torch.load without",
        "torch.load without",
        "numpy.load without",
        "numpy.load without",
        "pickle.loads",
        "os.system",
        "shell=True",
        "shell=flag",
        "assigns Image.MAX_IMAGE_PIXELS",
        "assigns PIL.Image.MAX_IMAGE_PIXELS",
        "setattr",
    ]
    assert len(problems) == len(expected), problems
    for line, what in zip(problems, expected, strict=True):
        assert what in line, (line, what)

    good = textwrap.dedent("""
        import torch, subprocess
        import numpy as np
        torch.load("a.pt", map_location="cpu", weights_only=True)
        np.load("d.npz", allow_pickle=False)
        subprocess.run(["ls"], check=True)
        subprocess.run(["ls"], shell=False)
        limit = Image.MAX_IMAGE_PIXELS
    """)
    assert scan(good)[0] == []


def test_the_product_loads_only_tensors_and_arrays_and_runs_no_shell():
    problems, seen = scan_product()
    assert problems == []
    # The scan must have looked at real code: the product's known loaders and its subprocess calls.
    assert seen["torch.load"] >= 2 and seen["numpy.load"] >= 1 and seen["subprocess"] >= 1, seen


def test_importing_the_whole_product_keeps_pillows_decompression_bomb_limit():
    from PIL import Image

    import app.main_window  # noqa: F401 - importing is the test: nothing may raise the limit at import
    import engine.cli  # noqa: F401 - importing is the test
    import engine.data  # noqa: F401 - importing is the test
    import widgets.dataset_panel  # noqa: F401 - importing is the test
    import widgets.try_it  # noqa: F401 - importing is the test

    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default


# ---------------------------------------------------------------------------------------------
# Malicious files


class Payload:
    """Unpickling this calls open(marker, "w"): a file appears if, and only if, the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


FORMATS = ["zip", "legacy", "raw-pickle"]


def write_payload(path: Path, marker: Path, fmt: str, base: dict | None = None) -> Path:
    """A checkpoint-shaped file carrying the payload: torch's zip format, its legacy format, or a bare pickle."""
    obj = {**(base or {"epoch": 1, "model_state_dict": {"w": torch.zeros(2)}}), "extra": Payload(marker)}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def unsafe_load(path: Path, fmt: str) -> None:
    """What a careless loader would do (torch.load(weights_only=False), pickle.load): used only as the control."""
    if fmt == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: 'nothing is lost, nothing is added'."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_payload_is_live_and_both_engine_loaders_refuse_it(tmp_path, fmt):
    from engine.backbones import WeightsError, load_state_dict_file
    from engine.checkpoints import CheckpointError, load_checkpoint

    marker = tmp_path / "code-ran"
    evil = write_payload(tmp_path / f"evil-{fmt}.pt", marker, fmt)
    unsafe_load(evil, fmt)
    assert marker.exists(), "control: an unrestricted load must run the payload, or this test proves nothing"
    marker.unlink()

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(evil)
    text = str(caught.value)
    assert text.startswith(f"refusing to load {evil}") and "could run code" in text and "\n" not in text
    assert "\x1b" not in text and "weights_only" not in text  # no terminal escapes, no advice to load unsafely
    assert not marker.exists()

    with pytest.raises(WeightsError, match=f"refusing to load {evil.name}: .*could run code"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_the_refusal_names_what_the_pickle_would_call(tmp_path):
    from engine.checkpoints import CheckpointError, load_checkpoint

    evil = write_payload(tmp_path / "evil.pt", tmp_path / "code-ran", "zip")
    with pytest.raises(CheckpointError, match=r"it calls (io|builtins)\.open, a pickle that could run code"):
        load_checkpoint(evil)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project, its images and a real trained checkpoint; each payload test copies what it needs."""
    from engine.config import load_project
    from engine.runs import RunRecorder
    from engine.trainer import Trainer

    root = tmp_path_factory.mktemp("security")
    write_image_folder(root / "images", per_class=4)
    project = write_project(
        root / "project.json",
        "images",
        train={"epochs": 1, "device": "cpu", "seed": 0},
        output={"dir": "runs", "tensorboard": False},
    )
    (root / "run").mkdir()
    Trainer(load_project(project), [RunRecorder(root / "run")]).run()
    return root


def _evil_checkpoint(workspace: Path, tmp_path: Path, marker: Path) -> Path:
    """The trained checkpoint with the payload added: everything a real one has, plus a pickle that runs code."""
    good = torch.load(workspace / "run" / "checkpoints" / "final.pt", weights_only=True)
    return write_payload(tmp_path / "shared-model.pt", marker, "zip", base=good)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and a readable error: one 'error:' line, no traceback (progress lines before it are allowed)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


CLI_DOORS = {
    "evaluate": lambda ckpt, ws: ["evaluate", str(ckpt), "--json", str(ws / "eval.json")],
    "export": lambda ckpt, ws: ["export", str(ckpt), "--format", "onnx", "--out", str(ws / "model.onnx"), "--force"],
    "train --init-from": lambda ckpt, ws: [
        "train",
        str(ws / "project.json"),
        "--init-from",
        str(ckpt),
        "--out",
        str(ws / "new-run"),
    ],
    "check (model.weights_file)": lambda ckpt, ws: [
        "check",
        str(
            write_project(ws / "with-weights.json", "images", model={"backbone": "resnet18", "weights_file": str(ckpt)})
        ),
    ],
}


@pytest.mark.parametrize("door", list(CLI_DOORS))
def test_the_cli_refuses_a_payload_checkpoint_through_every_command(workspace, tmp_path, door):
    marker = tmp_path / "code-ran"
    evil = _evil_checkpoint(workspace, tmp_path, marker)
    args = CLI_DOORS[door](evil, workspace)
    before = snapshot(workspace)
    result = _cli(*args, cwd=tmp_path)
    assert_one_line_error(result, "refusing to load", evil.name, "could run code")
    assert not marker.exists()
    assert snapshot(workspace) == before  # no run folder, no partial export, no report: nothing added, nothing changed


def test_an_npz_dataset_with_a_pickle_payload_is_refused_by_the_cli_without_running_it(workspace, tmp_path):
    marker = tmp_path / "code-ran"
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.empty(4, dtype=object)
    y[:] = [Payload(marker), 1, 0, 1]
    data = tmp_path / "shared.npz"
    np.savez(data, X=x, y=y)
    with np.load(data, allow_pickle=True) as archive:  # control: a careless loader runs it
        archive["y"]
    assert marker.exists()
    marker.unlink()

    project = write_project(tmp_path / "npz.json", str(data), train={"epochs": 1, "device": "cpu"})
    for args in (
        ["check", str(project)],
        ["train", str(project), "--out", str(tmp_path / "run")],
        ["evaluate", str(workspace / "run" / "checkpoints" / "final.pt"), "--data", str(data)],
    ):
        line = assert_one_line_error(_cli(*args, cwd=tmp_path), str(data), "array 'y'", "refusing to unpickle")
        assert not marker.exists(), line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The desktop app


@pytest.fixture()
def window(qtbot, workspace, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from app.main_window import MainWindow

    monkeypatch.setattr(MainWindow, "_ask_save_changes", lambda self: QMessageBox.StandardButton.Discard)
    monkeypatch.setattr(MainWindow, "_ask_stop_training", lambda self: True)
    win = MainWindow()
    qtbot.addWidget(win)
    assert win.open_project(str(workspace / "project.json"))
    yield win
    if win.controller.is_running():
        win.controller.stop()
        win.controller.wait(60000)
    win.state._set_dirty(False)
    win.close()


def _wait_tasks(qtbot):
    from widgets.tasks import running_tasks

    qtbot.waitUntil(lambda: not running_tasks(), timeout=120000)


def test_the_app_refuses_a_payload_checkpoint_at_every_door_and_stays_usable(qtbot, window, workspace, tmp_path):
    marker = tmp_path / "code-ran"
    evil = _evil_checkpoint(workspace, tmp_path, marker)
    project_before = window.state.config.to_dict()
    files_before = snapshot(workspace)

    window.open_dropped(str(evil))  # a .pt dropped on the window becomes the current model
    assert window.current_checkpoint == str(evil)

    window.evaluate_current()
    _wait_tasks(qtbot)
    assert not window.evaluation.message.isHidden()
    assert "refusing to load" in window.evaluation.message.text() and evil.name in window.evaluation.message.text()

    window.try_it.open_image(str(workspace / "images" / "red" / "000.png"))
    window.try_it.wait()
    _wait_tasks(qtbot)
    assert "refusing to load" in window.try_it.message_label.text()

    dialog = window.open_export_dialog()
    dialog.set_format("state_dict")
    dialog.path_edit.setText(str(tmp_path / "exports" / "model.pth"))
    dialog.export()
    _wait_tasks(qtbot)
    assert not dialog.message.isHidden() and "refusing to load" in dialog.message.text()
    assert not (tmp_path / "exports").exists()
    dialog.close()

    for start in (lambda: window.resume_from(str(evil)), window.train_from_current_weights):
        window.last_error_box = None
        with qtbot.waitSignal(window.controller.run_finished, timeout=120000) as blocker:
            assert start()
        assert blocker.args[0]["status"] == "failed"
        assert window.last_error_box is not None and "refusing to load" in window.last_error_box.text()
        window.last_error_box.close()
        _wait_tasks(qtbot)
    assert not marker.exists()

    # Nothing lost: the project is as it was, the run folder and images untouched, no new run folder.
    assert window.state.config.to_dict() == project_before
    assert snapshot(workspace) == files_before
    # Still usable: the real checkpoint evaluates.
    window.use_checkpoint(str(workspace / "run" / "checkpoints" / "final.pt"))
    window.evaluate_current()
    _wait_tasks(qtbot)
    assert window.evaluation.result is not None and window.evaluation.message.isHidden()


def test_importing_a_payload_weights_file_in_the_app_is_refused(qtbot, workspace, tmp_path):
    from widgets.backbone_panel import BackbonePanel
    from widgets.state import ProjectState

    marker = tmp_path / "code-ran"
    evil = write_payload(
        tmp_path / "backbone.pth", marker, "zip", base={"fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}
    )
    state = ProjectState()
    state.open(workspace / "project.json")
    before = state.config.to_dict()
    panel = BackbonePanel(state)
    qtbot.addWidget(panel)
    assert panel.wait()
    panel.import_weights_file(str(evil))
    assert panel.wait()
    assert "Not imported" in panel.file_note.text() and "refusing to load backbone.pth" in panel.file_note.text()
    assert state.config.to_dict() == before and not state.dirty
    assert not marker.exists()


def test_a_tampered_pretrained_weights_cache_file_is_refused_before_torchvision_unpickles_it(tmp_path, monkeypatch):
    """torchvision loads its cached .pth without weights_only; the product reads the cache file restricted first."""
    import torchvision

    from engine.backbones import WeightsError, _cache_path, build_model
    from engine.config import ModelConfig

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    weight = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = _cache_path(weight)
    assert cache.parent == tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    write_payload(cache, marker, "zip", base=dict(torchvision.models.resnet18().state_dict()))
    with pytest.raises(WeightsError, match="refusing to load the cached pretrained weights resnet18 IMAGENET1K_V1"):
        build_model(ModelConfig(backbone="resnet18", weights="IMAGENET1K_V1"), 3)
    assert not marker.exists()
