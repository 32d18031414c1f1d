"""Cyclic garbage made on a worker thread is collected on the GUI thread (widgets/gc_thread.py)."""

from __future__ import annotations

import gc
import threading

from widgets.gc_thread import GuiThreadCollector


def test_cycles_made_on_a_worker_thread_are_freed_on_the_gui_thread(qtbot):
    collector = GuiThreadCollector(interval_ms=10)
    freed_on: list[int] = []

    class Node:
        def __del__(self) -> None:
            freed_on.append(threading.get_ident())

    def make_cycles() -> None:
        for _ in range(5000):  # several times the young generation's threshold
            node = Node()
            node.me = node

    try:
        assert not gc.isenabled()
        worker = threading.Thread(target=make_cycles)
        worker.start()
        worker.join()
        assert freed_on == []  # nothing was collected where the garbage was made
        qtbot.waitUntil(lambda: len(freed_on) >= 4000, timeout=20000)
        assert set(freed_on) == {threading.get_ident()}
    finally:
        collector.stop()
    gc.collect()
