"""The disk-backed decoded-cache benchmark runs in its quick form: two real torchrun processes share one cache file
(each file written by one and mapped by the other, the same pixels as the one-process cache in memory; run() raises otherwise), and
the section is well formed (the memory ratio itself is not checked: at the quick size PyTorch dominates it)."""

import json
import math

from bench import decoded_cache
from bench.run import RUNNERS


def test_quick_run_gives_a_well_formed_section():
    assert "decoded_cache" in RUNNERS
    section = decoded_cache.run(quick=True)
    assert section.name == "decoded_cache" and section.skipped is None
    figures = {f.key: f for f in section.figures}
    assert set(figures) == {"two_processes_disk_vs_one", "cache_mib"}
    ratio = figures["two_processes_disk_vs_one"]
    assert ratio.unit == "x" and ratio.target == "<= 1.5" and ratio.ok is not None
    assert math.isfinite(ratio.value) and 1.0 < ratio.value < 3.0  # two processes hold more than one, not 3 copies
    assert "MiB together" in ratio.detail and "USS" in ratio.detail
    size = figures["cache_mib"]
    assert size.unit == "MiB" and size.value > 0 and "written by one process and mapped by the other" in size.detail
    assert "smaps_rollup" in section.setup and section.notes
    json.dumps(section.to_dict())  # the report writer takes it as JSON
