"""Measures the Fine-tune recipe (examples/fine_tune.json) against single-phase training and wrong learning rates.

Each variant is trained in this process, one after the other, from the same project; times are given as ratios to
the first row (examples/default.json's training: two epochs with blocks 0-2 frozen), measured in the same process, so a shared
machine's load cancels out as far as it can. The learning rate of the recipe's first phase comes from the
learning-rate finder run here on that phase's project.

Usage: python examples/compare_recipe.py [--seed N] [--only ROW ...]   (tens of minutes on two CPU cores)
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import feature_cache  # noqa: E402 - after the sys.path line that makes the repository importable
from engine.config import ProjectConfig, load_project  # noqa: E402
from engine.lr_finder import find_lr  # noqa: E402
from engine.phases import plan_phases  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def earlier_default(cfg: ProjectConfig, lr: float) -> ProjectConfig:
    """examples/default.json's training: 2 epochs, blocks 0-2 frozen, augmented, cosine, backbone at half the rate."""
    one = cfg.copy()
    one.train.phases = []
    one.train.epochs = 2
    one.model.freeze, one.model.freeze_up_to = "up_to", "blocks.2"
    one.optimizer.lr, one.optimizer.backbone_lr_mult = lr, 0.5
    one.schedule.name = "cosine"
    return one


def recipe(cfg: ProjectConfig, lr: float) -> ProjectConfig:
    out = cfg.copy()
    out.optimizer.lr = lr
    return out


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(ROOT / "examples" / "fine_tune.json"))
    parser.add_argument("--seed", type=int, help="train.seed and data.split_seed (default: the project's)")
    parser.add_argument("--only", nargs="+", help="rows to train, by number from 1 (the first is the time baseline)")
    args = parser.parse_args()
    cfg = load_project(args.project)
    if args.seed is not None:
        cfg.train.seed = cfg.data.split_seed = args.seed
    found = find_lr(plan_phases(cfg)[0].cfg)
    lr = found.suggestion or cfg.optimizer.lr
    print(f"learning-rate finder on phase 1: {found.suggestion} ({found.reason}); using {lr:.3g}", file=sys.stderr)
    variants = [
        ("one phase, examples/default.json (2 epochs, blocks 0-2 frozen), lr 0.002", earlier_default(cfg, 0.002)),
        (f"Fine-tune recipe, finder's lr {lr:.3g}", recipe(cfg, lr)),
        (f"one phase as examples/default.json, finder's lr {lr:.3g}", earlier_default(cfg, lr)),
        (f"Fine-tune recipe, lr 10x too high ({10 * lr:.3g})", recipe(cfg, 10 * lr)),
        (f"Fine-tune recipe, lr 10x too low ({lr / 10:.3g})", recipe(cfg, lr / 10)),
    ]
    rows = []
    for number, (label, variant) in enumerate(variants, start=1):
        if args.only and str(number) not in args.only:
            continue
        feature_cache.clear()  # every run computes its own features: their cost is part of its time
        started, cpu = time.perf_counter(), cpu_seconds()
        state = Trainer(variant).run()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        final = state.history[-1]["val_accuracy"] if state.history else float("nan")
        best = max((m["val_accuracy"] for m in state.history), default=float("nan"))
        rows.append((label, final, best, seconds, cpu, state.epoch))
        print(f"{label}: final val accuracy {final:.3f}, {seconds:.0f} s, {cpu:.0f} CPU s", file=sys.stderr, flush=True)
    base = rows[0]
    print(
        f"{cfg.name}: {cfg.model.backbone}, seed {cfg.train.seed}, split seed {cfg.data.split_seed}, "
        f"{platform.machine()} CPU, torch threads {__import__('torch').get_num_threads()}:\n"
    )
    print(
        f"| variant | epochs | final val accuracy | best val accuracy | time (x row {1 if args.only is None else 'first'}) |"
    )
    print("|---|---|---|---|---|")
    for label, final, best, seconds, cpu, epochs in rows:
        print(f"| {label} | {epochs} | {final:.3f} | {best:.3f} | {seconds / base[3]:.2f} (CPU {cpu / base[4]:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
