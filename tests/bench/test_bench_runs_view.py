"""The Runs view benchmark runs on its generated run folders and reports every figure (its speed is the bench's)."""

import math

from bench.common import Section
from bench.run import RUNNERS
from bench.runs_view import run


def test_quick_run_reports_every_figure():
    sections = run(quick=True)
    assert all(isinstance(s, Section) and s.skipped is None for s in sections)
    opening, overlay = sections
    assert [f.key for f in opening.figures] == [
        "runs_view_open_s",
        "runs_view_open_vs_engine_read",
        "runs_view_open_heartbeat_p99_ms",
        "runs_view_open_heartbeat_max_ms",
    ]
    assert [f.key for f in overlay.figures] == [
        "runs_view_overlay_s",
        "runs_view_overlay_paint_vs_empty",
        "runs_view_overlay_drawn_ratio",
        "runs_view_overlay_heartbeat_p99_ms",
        "runs_view_overlay_heartbeat_max_ms",
    ]
    for figure in opening.figures + overlay.figures:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value >= 0, figure.key
    drawn = overlay.figures[2].value
    assert 0 < drawn <= 1  # never more points handed to the plot than the run holds
    assert "20 run folders" in opening.setup
    assert "runs_view" in RUNNERS  # make bench runs it
