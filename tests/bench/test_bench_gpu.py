"""The GPU-paths benchmark: skipped at once without CUDA; with CUDA its quick run gives finite ratios."""

import json
import math
import time

import pytest
import torch

from bench import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_the_section_is_skipped_at_once():
    started = time.perf_counter()
    section = gpu.run(quick=True)
    assert time.perf_counter() - started < 1.0
    assert section.name == "gpu_paths" and section.skipped == "no CUDA GPU on this machine"
    assert section.figures == []
    json.dumps(section.to_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_cuda_gives_finite_ratios():
    section = gpu.run(quick=True)
    assert section.name == "gpu_paths" and section.skipped is None
    assert [f.key for f in section.figures] == [o.key for o in gpu.OPTION_SETS if not o.compile]
    for figure in section.figures:
        assert figure.value is not None and math.isfinite(figure.value) and figure.value > 0, figure.detail
        assert figure.unit == "x" and figure.target == ">= 0.97" and "samples/s" in figure.detail
    json.dumps(section.to_dict())
