"""Measures the Fine-tune recipe (examples/default.json) against single-phase training and wrong learning rates.

Every row trains in this process, one after the other, on the same data, split and seed. Times are ratios to the
first row, the single-phase project the recipe replaced as the default (examples/single_phase.json), measured in the
same process so that a shared machine's load cancels out as far as it can; each row's own seconds are given too.
Rows:
  1. examples/single_phase.json as it is (2 epochs, blocks 0-2 frozen, augmented, lr 0.002): the time baseline
  2. examples/default.json as it is (the recipe: 8 head epochs on cached features, 3 epochs of the top two blocks)
  3. the recipe at the learning-rate finder's suggestion for its first phase
  4. the single-phase project at the finder's suggestion for that project
  5. and 6. the recipe at 10x and at a tenth of row 3's learning rate
The finders' own time is printed, not counted in the rows. Every row computes its own cached features.

Usage: python examples/compare_recipe.py [--seed N] [--only ROW ...]   (about 25 minutes on two CPU cores)
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


def with_lr(cfg: ProjectConfig, lr: float) -> ProjectConfig:
    out = cfg.copy()
    out.optimizer.lr = lr
    return out


def finder_lr(cfg: ProjectConfig, what: str) -> float:
    """The finder's suggestion for `cfg` (its first phase when it has phases), or its own rate when there is none."""
    feature_cache.clear()
    started = time.perf_counter()
    found = find_lr(plan_phases(cfg)[0].cfg)
    lr = found.suggestion or cfg.optimizer.lr
    print(
        f"learning-rate finder on {what}: {found.suggestion} ({found.reason}) in {time.perf_counter() - started:.0f} s;"
        f" using {lr:.3g}",
        file=sys.stderr,
        flush=True,
    )
    return lr


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "examples" / "default.json"))
    parser.add_argument("--single", default=str(ROOT / "examples" / "single_phase.json"))
    parser.add_argument("--seed", type=int, help="train.seed and data.split_seed of both (default: the projects')")
    parser.add_argument(
        "--only",
        nargs="+",
        type=int,
        choices=range(1, 7),
        metavar="ROW",
        help="rows to train, 1 to 6 (the first of them is the time baseline)",
    )
    args = parser.parse_args()
    recipe, single = load_project(args.recipe), load_project(args.single)
    if args.seed is not None:
        for cfg in (recipe, single):
            cfg.train.seed = cfg.data.split_seed = args.seed
    wanted = set(args.only) if args.only else set(range(1, 7))
    recipe_lr = finder_lr(recipe, "the recipe's head phase") if wanted & {3, 5, 6} else recipe.optimizer.lr
    single_lr = finder_lr(single, "the single-phase project") if 4 in wanted else single.optimizer.lr
    variants = [
        (f"one phase: examples/single_phase.json, lr {single.optimizer.lr:.3g}", single),
        (f"Fine-tune recipe: examples/default.json, lr {recipe.optimizer.lr:.3g}", recipe),
        (f"Fine-tune recipe, its finder's lr {recipe_lr:.3g}", with_lr(recipe, recipe_lr)),
        (f"one phase, its finder's lr {single_lr:.3g}", with_lr(single, single_lr)),
        (f"Fine-tune recipe, lr 10x too high ({10 * recipe_lr:.3g})", with_lr(recipe, 10 * recipe_lr)),
        (f"Fine-tune recipe, lr 10x too low ({recipe_lr / 10:.3g})", with_lr(recipe, recipe_lr / 10)),
    ]
    rows = []
    for number, (label, variant) in enumerate(variants, start=1):
        if number not in wanted:
            continue
        feature_cache.clear()  # every run computes its own features: their cost is part of its time
        started, cpu = time.perf_counter(), cpu_seconds()
        state = Trainer(variant).run()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        final = state.history[-1]["val_accuracy"] if state.history else float("nan")
        best = max((m["val_accuracy"] for m in state.history), default=float("nan"))
        rows.append((number, label, final, best, seconds, cpu, state.epoch))
        print(f"{label}: final val accuracy {final:.3f}, {seconds:.0f} s, {cpu:.0f} CPU s", file=sys.stderr, flush=True)
    base = rows[0]
    print(
        f"{recipe.model.backbone} on {recipe.data.path}, seed {recipe.train.seed}, split seed "
        f"{recipe.data.split_seed}, {platform.machine()} CPU, torch threads {__import__('torch').get_num_threads()}:\n"
    )
    print(f"| # | variant | epochs | final val accuracy | best val accuracy | seconds | time (x row {base[0]}) |")
    print("|---|---|---|---|---|---|---|")
    for number, label, final, best, seconds, cpu, epochs in rows:
        print(
            f"| {number} | {label} | {epochs} | {final:.3f} | {best:.3f} | {seconds:.0f} | "
            f"{seconds / base[4]:.2f} (CPU {cpu / base[5]:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
