"""The dataset-scan benchmark runs in its quick form and reports well-formed figures (speed is not checked)."""

import json
import math

from bench.dataset_scan import run


def test_quick_run_reports_its_figures():
    section = run(quick=True)
    assert section.name == "dataset_scan" and section.skipped is None
    assert [f.key for f in section.figures] == [
        "scan_cached_per_10k",
        "scan_cached_vs_imagefolder",
        "scan_first_vs_cached",
    ]
    for figure in section.figures:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value > 0, figure.key
        assert figure.detail
    assert section.figures[0].target == "<= 0.1" and section.figures[0].ok is not None
    assert "600 generated" in section.setup
    json.dumps(section.to_dict())
