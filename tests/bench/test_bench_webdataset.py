"""The shards-vs-folder benchmark runs in its quick form and reports a well-formed figure (speed is not checked)."""

import json
import math

from bench.webdataset import run


def test_quick_run_reports_its_figure():
    section = run(quick=True)
    assert section.name == "webdataset" and section.skipped is None
    (figure,) = section.figures
    assert figure.key == "shards_vs_folder" and figure.target == ">= 0.9" and figure.ok is not None
    assert figure.value is not None and math.isfinite(figure.value) and figure.value > 0
    assert "passes of 200 and 200 samples" in figure.detail  # both loaders read every generated image
    assert "200 generated" in section.setup and "4 shards of 50" in section.setup
    json.dumps(section.to_dict())
