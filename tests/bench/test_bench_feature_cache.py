"""The feature-cache benchmark runs and reports well-formed figures (its speed is the benchmark's business)."""

import math

from bench.common import Section
from bench.feature_cache import run


def test_quick_run_reports_every_figure():
    section = run(quick=True)
    assert isinstance(section, Section) and section.name == "feature_cache" and section.skipped is None
    keys = [f.key for f in section.figures]
    assert keys == [
        "feature_cache_speedup",
        "feature_cache_accuracy_diff",
        "feature_cache_first_epoch",
        "feature_cache_prefix_speedup",
    ]
    for figure in section.figures:
        assert figure.value is not None and math.isfinite(figure.value), figure.key
        assert (figure.ok is None) == (figure.target is None), figure.key
    assert section.figures[0].target == ">= 10" and section.figures[1].target == "<= 1"
    assert section.setup and "resnet18" in section.setup
    assert section.to_dict()["figures"][0]["key"] == "feature_cache_speedup"
