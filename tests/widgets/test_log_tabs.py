"""The log's tabs: the app's log alone (no tab bar) until a multi-process run adds one tab per rank."""

from PySide6.QtWidgets import QPlainTextEdit

from widgets.log_tabs import OBJECT_NAMES, LogTabs


def test_rank_tabs_appear_for_a_multi_process_run_and_lines_go_to_their_rank(qtbot):
    app_log = QPlainTextEdit()
    tabs = LogTabs(app_log)
    qtbot.addWidget(tabs)
    tabs.show()
    assert tabs.count() == 1 and not tabs.tabBar().isVisible()  # a single-process app: the log as before
    tabs.on_launched(2)
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Log", "Rank 0", "Rank 1"]
    assert tabs.tabBar().isVisible()
    tabs.on_rank_logged(1, "rank one says")
    tabs.on_rank_logged(0, "rank zero says")
    tabs.on_rank_logged(5, "no such rank")  # ignored, not an error
    assert tabs.rank_text(0) == "rank zero says" and tabs.rank_text(1) == "rank one says"
    assert tabs.findChild(QPlainTextEdit, "log.rank.1").toPlainText() == "rank one says"
    tabs.on_launched(3)  # the next run starts with empty logs
    assert tabs.rank_count() == 3 and tabs.rank_text(1) == ""
    tabs.on_launched(1)
    assert tabs.count() == 1 and tabs.widget(0) is app_log


def test_names_are_documented(qtbot):
    tabs = LogTabs(QPlainTextEdit())
    qtbot.addWidget(tabs)
    tabs.on_launched(2)
    names = {w.objectName() for w in tabs.findChildren(QPlainTextEdit) if w.objectName().startswith("log.rank.")}
    assert names == {"log.rank.0", "log.rank.1"} and "log.rank.N" in OBJECT_NAMES
    assert tabs.objectName() in OBJECT_NAMES
