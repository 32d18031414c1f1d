"""Try it: a trained checkpoint's predictions for an opened or dropped image, and the messages when it cannot."""

import pytest
from conftest import write_image_folder, write_project
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QWidget

from engine.config import load_project
from engine.predict import Predictor
from engine.runs import RunRecorder
from engine.trainer import Trainer
from widgets.try_it import OBJECT_NAMES, TryItPanel


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet18's head trained on 16 px colour squares until it tells red from green and blue on every image.

    Head only: the frozen backbone's features barely depend on the thread count (last bits). The whole network trained two
    epochs did (BatchNorm's running statistics after six steps): validation accuracy 1.0 on one thread and 0.67
    on two, so the test's red image came out green in one full run."""
    root = tmp_path_factory.mktemp("try_it")
    write_image_folder(root / "images", per_class=8)
    cfg = load_project(
        write_project(
            root / "project.json",
            "images",
            model={"freeze": "head_only"},
            optimizer={"name": "adam", "lr": 0.05},
            train={"epochs": 5, "device": "cpu", "seed": 0},
            output={"dir": "runs", "tensorboard": False},
        )
    )
    run_dir = root / "run"
    run_dir.mkdir()
    state = Trainer(cfg, [RunRecorder(run_dir)]).run()
    assert state.history[-1]["val_accuracy"] == 1.0, state.history  # what the tests below take as given
    return root, run_dir / "checkpoints" / "final.pt"


@pytest.fixture()
def panel(qtbot):
    widget = TryItPanel()
    qtbot.addWidget(widget)
    widget.resize(1000, 600)
    widget.show()
    yield widget
    widget.wait()


def predict_and_wait(qtbot, panel, path):
    with qtbot.waitSignal(panel.predicted, timeout=60000) as blocker:
        panel.open_image(str(path))
    panel.wait()
    return blocker.args[0]


def shown_bars(panel):
    """(name, bar value 0..1000, value text) of each visible bar row."""
    return [(name.text(), bar.value(), value.text()) for name, bar, value in panel.bars.rows if name.isVisible()]


def test_without_a_model_the_button_is_disabled_and_says_why(panel, tmp_path):
    button = panel.findChild(QPushButton, "tryit.open_image")
    message = panel.findChild(QLabel, "tryit.message")
    assert not button.isEnabled()
    assert message.isVisible() and "train or restore a checkpoint first" in message.text()
    panel.open_image(str(tmp_path / "any.png"))  # a dropped image without a model
    assert "train or restore a checkpoint first" in message.text() and not panel.is_busy()


def test_a_red_image_is_predicted_red_with_bars_that_sum_to_one(qtbot, panel, trained):
    root, final = trained
    panel.set_checkpoint(str(final))
    assert panel.findChild(QPushButton, "tryit.open_image").isEnabled()
    assert "final.pt" in panel.findChild(QLabel, "tryit.checkpoint").text()

    image = root / "images" / "red" / "005.png"
    shown = predict_and_wait(qtbot, panel, image)
    assert shown[0][0] == "red"
    expected = Predictor.from_checkpoint(final).predict(image)
    assert [name for name, _ in shown] == [name for name, _ in expected]
    assert [p for _, p in shown] == pytest.approx([p for _, p in expected], abs=1e-6)

    bars = shown_bars(panel)
    assert [name for name, _, _ in bars] == [name for name, _ in expected]
    assert sum(value for _, value, _ in bars) == pytest.approx(1000, abs=3)
    assert bars[0][2] == f"{expected[0][1] * 100:.1f}%"
    assert not panel.findChild(QLabel, "tryit.image").pixmap().isNull()
    assert "resnet18" in panel.findChild(QLabel, "tryit.checkpoint").text()
    assert not panel.findChild(QLabel, "tryit.message").isVisible()
    assert not panel.findChild(QProgressBar, "tryit.progress").isVisible()


def test_a_dropped_image_is_predicted(qtbot, panel, trained):
    root, final = trained
    panel.set_checkpoint(str(final))
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(root / "images" / "blue" / "002.png"))])
    enter = QDragEnterEvent(
        QPoint(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    enter.ignore()
    panel.dragEnterEvent(enter)  # offscreen Qt runs no drag loop, so the handlers are called as it would
    assert enter.isAccepted()
    drop = QDropEvent(
        QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    with qtbot.waitSignal(panel.predicted, timeout=60000) as blocker:
        panel.dropEvent(drop)
    panel.wait()
    expected = Predictor.from_checkpoint(final).predict(root / "images" / "blue" / "002.png")
    assert blocker.args[0][0][0] == expected[0][0]


def test_an_unreadable_image_gives_an_inline_message(qtbot, panel, trained, tmp_path):
    root, final = trained
    panel.set_checkpoint(str(final))
    predict_and_wait(qtbot, panel, root / "images" / "green" / "000.png")
    fake = tmp_path / "photo.png"
    fake.write_text("not an image")
    panel.open_image(str(fake))
    panel.wait()
    message = panel.findChild(QLabel, "tryit.message")
    assert message.isVisible() and str(fake) in message.text() and "not an image" in message.text()
    assert shown_bars(panel) == []
    assert panel.findChild(QLabel, "tryit.image").pixmap().isNull()  # the previous image is not left showing

    # Still usable: a good image works again.
    assert predict_and_wait(qtbot, panel, root / "images" / "green" / "001.png")
    assert not message.isVisible()


def test_a_bad_checkpoint_is_reported_and_a_good_one_then_works(qtbot, panel, trained, tmp_path):
    root, final = trained
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    panel.set_checkpoint(str(broken))
    panel.open_image(str(root / "images" / "red" / "000.png"))
    panel.wait()
    message = panel.findChild(QLabel, "tryit.message")
    assert message.isVisible() and "Cannot load the model" in message.text() and str(broken) in message.text()

    # A good checkpoint then works.
    panel.set_checkpoint(str(final))
    assert predict_and_wait(qtbot, panel, root / "images" / "red" / "000.png")[0][0] == "red"

    # Clearing the model disables the button and says why.
    panel.set_checkpoint(None)
    assert not panel.findChild(QPushButton, "tryit.open_image").isEnabled()
    assert "train or restore a checkpoint first" in message.text()


def test_a_new_checkpoint_predicts_the_shown_image_again(qtbot, panel, trained):
    root, final = trained
    panel.set_checkpoint(str(final))
    first = predict_and_wait(qtbot, panel, root / "images" / "red" / "001.png")
    with qtbot.waitSignal(panel.predicted, timeout=60000) as blocker:
        panel.set_checkpoint(str(final.parent / "last.pt"))
    panel.wait()
    assert blocker.args[0] == first  # last.pt is the final epoch's checkpoint too


def test_every_control_has_a_documented_object_name(panel):
    names = {w.objectName() for w in panel.findChildren(QWidget) if w.objectName().startswith("tryit.")}
    assert names == set(OBJECT_NAMES)


def test_the_activation_map_is_laid_over_the_image_for_the_chosen_class(qtbot, panel, trained):
    root, final = trained
    panel.set_checkpoint(str(final))
    image = root / "images" / "green" / "003.png"
    predict_and_wait(qtbot, panel, image)
    plain = panel.findChild(QLabel, "tryit.image").pixmap().toImage()
    assert not panel.map_shown()
    # Every class of the model can be explained, not only the predicted one.
    assert [panel.cam_class.itemData(i) for i in range(panel.cam_class.count())] == [None, "blue", "green", "red"]

    panel.show_cam.setChecked(True)
    qtbot.waitUntil(panel.map_shown, timeout=60000)
    assert panel.wait()
    overlaid = panel.findChild(QLabel, "tryit.image").pixmap().toImage()
    assert overlaid.size() == plain.size() and overlaid != plain
    assert "layer" in panel.show_cam.toolTip() and "green" in panel.show_cam.toolTip()

    panel.cam_class.setCurrentIndex(panel.cam_class.findData("red"))
    qtbot.waitUntil(lambda: "red" in panel.show_cam.toolTip(), timeout=60000)
    panel.show_cam.setChecked(False)
    assert not panel.map_shown() and panel.findChild(QLabel, "tryit.image").pixmap().toImage() == plain
    assert panel.wait()
