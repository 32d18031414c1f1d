"""The input-pipeline benchmark runs in its quick form and returns a well-formed section (speed is not checked)."""

import json
import math

from bench import input_pipeline


def test_quick_run_gives_a_well_formed_section():
    section = input_pipeline.run(quick=True)
    assert section.name == "input_pipeline" and section.skipped is None
    keys = {f.key for f in section.figures}
    assert {"epoch_speedup_cached_noaug", "cache_build_vs_epoch", "training_speedup_cached_aug"} <= keys
    for figure in section.figures:
        assert figure.unit == "x" and figure.value is not None and math.isfinite(figure.value) and figure.value > 0
        assert figure.target is None and figure.ok is None and figure.detail
    assert "digits" in section.setup and section.notes
    json.dumps(section.to_dict())  # the report writer takes it as JSON
