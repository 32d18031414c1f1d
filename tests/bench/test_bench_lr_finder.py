"""The learning-rate finder benchmark runs and reports well-formed figures (its speed is the benchmark's business)."""

import math

from bench.common import Section
from bench.lr_finder import run


def test_quick_run_reports_every_figure():
    section = run(quick=True)
    assert isinstance(section, Section) and section.name == "lr_finder" and section.skipped is None
    assert [f.key for f in section.figures] == [
        "lr_finder_cached_seconds",
        "lr_finder_recomputed_seconds",
        "lr_finder_cache_speedup",
    ]
    for figure in section.figures:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value > 0, figure.key
    assert section.figures[2].value == section.figures[1].value / section.figures[0].value
    assert "efficientnet_lite0" in section.setup
