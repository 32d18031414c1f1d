"""The random number generators' states as plain values and tensors (torch.load(weights_only=True) reads them),
so a resumed run draws exactly what the uninterrupted run would have drawn."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture(loader_generator: torch.Generator) -> dict[str, Any]:
    """torch's, CUDA's, numpy's, Python's and the training loader's generator states."""
    np_state = cast(tuple[Any, ...], np.random.get_state())  # the legacy tuple, get_state's default
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "loader": loader_generator.get_state(),
    }


def restore(rng: dict[str, Any], loader_generator: torch.Generator) -> None:
    """Put back what capture() saved (each part only when present: older checkpoints have fewer)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    if "python" in rng:
        py = rng["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "loader" in rng:
        loader_generator.set_state(rng["loader"])
