"""Measures what pretrained weights and freezing buy on examples/single_phase.json: accuracy and time.

Usage: python examples/compare_transfer.py [--epochs N]   (about ten minutes on two CPU cores)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import load_project  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.trainer import Trainer  # noqa: E402 - after the sys.path line that makes the repository importable

VARIANTS = [  # (label, weights, freeze preset)
    ("pretrained (BUNDLED), blocks 0-2 frozen", "BUNDLED", "up_to"),
    ("pretrained (BUNDLED), nothing frozen", "BUNDLED", "none"),
    ("random init, blocks 0-2 frozen", None, "up_to"),
    ("random init, nothing frozen", None, "none"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="epochs per variant (default: the project's)")
    parser.add_argument("--project", default=str(ROOT / "examples" / "single_phase.json"))
    args = parser.parse_args()
    rows = []
    for label, weights, freeze in VARIANTS:
        cfg = load_project(args.project)
        cfg.model.weights = weights
        cfg.model.freeze = freeze
        if freeze != "up_to":
            cfg.model.freeze_up_to = None
        if weights is None:  # the weights' preprocessing, kept so that only the weights differ
            cfg.data.image_size, cfg.data.mean, cfg.data.std = 224, [0.5], [0.5]
        if args.epochs:
            cfg.train.epochs = args.epochs
        started = time.perf_counter()
        trainer = Trainer(cfg)
        state = trainer.run()
        seconds = time.perf_counter() - started
        best = max(m["val_accuracy"] for m in state.history)
        rows.append((label, state.history[-1]["val_accuracy"], best, seconds))
        print(f"{label}: final val accuracy {rows[-1][1]:.3f}, {seconds:.0f} s", file=sys.stderr, flush=True)
    fastest = min(r[3] for r in rows)
    data = trainer.parts.data
    print(
        f"{cfg.name}: {len(data.train)} train / {len(data.val) if data.val else 0} validation images, "
        f"{cfg.model.backbone}, {cfg.train.epochs} epochs, "
        f"{platform.machine()} CPU, torch threads {__import__('torch').get_num_threads()}:\n"
    )
    print("| variant | final val accuracy | best val accuracy | time (x fastest) |")
    print("|---|---|---|---|")
    for label, final, best, seconds in rows:
        print(f"| {label} | {final:.3f} | {best:.3f} | {seconds / fastest:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
