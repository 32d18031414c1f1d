"""The big-folder benchmark runs in its quick form (300 images, scans in this process, no trainings) and reports
well-formed figures; speed is not checked."""

import json
import math

from bench.large_dataset import run


def test_quick_run_reports_its_figures():
    section = run(quick=True)
    assert section.name == "large_dataset" and section.skipped is None
    keys = [f.key for f in section.figures]
    assert keys == [
        "first_scan_s",
        "first_scan_peak_rss",
        "second_start_s",
        "second_start_vs_walk_stat",
        "first_batch_vs_script",
    ]
    for figure in section.figures[:4]:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value >= 0, figure.key
    assert section.figures[4].value is None and "quick" in section.figures[4].detail
    assert "300 distinct 8x8 PNGs" in section.setup and "0 skipped" in section.figures[0].detail
    json.dumps(section.to_dict())
