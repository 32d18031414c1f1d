"""The learning-rate finder's curve: the ramp of rates, the smoothing, the suggestion, the result and its plot.

No PyTorch here: the command line's parser and the app's window read the defaults at start-up. The range test
itself is engine/lr_finder.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_START_LR, DEFAULT_END_LR, DEFAULT_BATCHES, DEFAULT_DIVERGE = 1e-7, 10.0, 100, 4.0
SMOOTHING = 0.9  # the divergence check's moving average: its weight of the past (about ten batches)
# The plotted curve's: run forwards and backwards, two passes of a shorter average smooth as much as one longer one.
CURVE_SMOOTHING = 0.8
MIN_POINTS = 5  # fewer points than this before the loss diverges say nothing about where it falls
Progress = Callable[[dict[str, Any]], None]


@dataclass
class LrFinderResult:
    """The curve, the suggestion and how the ramp ended; to_dict() is what `lr-find --json` writes."""

    lrs: list[float]
    losses: list[float]  # per batch, as trained
    smoothed: list[float]  # zero-lag smoothed losses, what the suggestion reads
    suggestion: float | None
    suggestion_index: int | None
    reason: str  # how the suggestion was chosen, or why there is none
    status: str  # "completed" (the ramp reached end_lr or the epoch's end), "diverged" or "stopped"
    start_lr: float
    end_lr: float
    feature_cache: bool
    seconds: float
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: a loss that was not a number is null (JSON has no NaN)."""
        out = asdict(self)
        out["losses"] = [x if math.isfinite(x) else None for x in self.losses]
        return out


def lr_ramp(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` learning rates from start_lr to end_lr, evenly spaced on a log scale."""
    if steps == 1:
        return [start_lr]
    ratio = math.log(end_lr / start_lr) / (steps - 1)
    return [start_lr * math.exp(ratio * i) for i in range(steps)]


def causal_smooth(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average (what the divergence check sees as the ramp goes)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def smooth(losses: Sequence[float], beta: float = CURVE_SMOOTHING) -> list[float]:
    """The causal average run forwards and then backwards: the noise goes, the curve is not shifted to the right.

    A one-way average lags by about beta / (1 - beta) points, which on a ramp is a higher learning rate than the
    one that produced the loss: read off it, a suggestion comes out several times too high. Positive losses are
    averaged as logarithms, so the blown-up tail of a diverging ramp does not drown the bottom of the valley.
    """
    positive = all(x > 0 for x in losses)
    values = [math.log(x) for x in losses] if positive else list(losses)
    forward = causal_smooth(values, beta)
    both = causal_smooth(forward[::-1], beta)[::-1]
    return [math.exp(x) for x in both] if positive else both


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> tuple[int | None, str]:
    """The suggested rate's index on the zero-lag smoothed curve, and how it was chosen (or why there is none).

    Three rules, each covering another's failure: fastai's `valley` finds where the loss falls (the longest
    subsequence of falling losses, from its first to its last point, so single spikes neither end it nor start a
    new one); inside it, the steepest fall of the log-loss per decade of rate is where training gains most from
    a higher rate; and the suggestion stays at least ten times below the bottom of the valley (fastai's
    `minimum` / 10), where the loss is about to blow up, as the steepest point of a curve that falls fastest
    right before the cliff would not.
    """
    n = len(smoothed)
    if n < MIN_POINTS:
        return None, f"only {n} point(s): too few to find where the loss falls; use more batches"
    positive = all(x > 0 for x in smoothed)
    ys = [math.log(x) for x in smoothed] if positive else list(smoothed)
    length = [1] * n
    came_from = list(range(n))
    for i in range(1, n):
        for j in range(i):
            if ys[i] < ys[j] and length[j] + 1 > length[i]:
                length[i], came_from[i] = length[j] + 1, j
    end = max(range(n), key=lambda i: (length[i], -i))
    start = end
    while came_from[start] != start:
        start = came_from[start]
    fell = smoothed[end] < smoothed[start] * 0.98 if positive else smoothed[end] < smoothed[start]
    if length[end] < MIN_POINTS or end - start < 2 or not fell:
        return None, (
            "the loss did not fall over the range; start the ramp lower, end it higher, or check the data and the "
            "frozen layers"
        )
    logs = [math.log(x) for x in lrs]
    slopes = {i: (ys[i + 1] - ys[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(start + 1, end)}
    steepest = min(slopes, key=lambda i: slopes[i])
    cap = lrs[end] / 10
    below = [i for i in range(start, end + 1) if lrs[i] <= cap]
    if below and lrs[steepest] > cap:
        return below[-1], (
            f"a tenth of the rate at the bottom of the valley ({lrs[end]:.2g}), below its steepest fall "
            f"({lrs[steepest]:.2g})"
        )
    still = (
        "; the loss was still falling where the ramp ended: end it higher to see where it turns" if end == n - 1 else ""
    )
    return steepest, f"the steepest fall of the loss in its valley ({lrs[start]:.2g} to {lrs[end]:.2g}){still}"


def ramp(
    step: Callable[[float], float],
    lrs: Sequence[float],
    *,
    diverge: float = DEFAULT_DIVERGE,
    stop_event: threading.Event | None = None,
    progress: Progress | None = None,
) -> tuple[list[float], list[float], str]:
    """Call step(lr) for each lr until the end, a divergence or a stop: (lrs trained, their losses, status)."""
    done: list[float] = []
    losses: list[float] = []
    status = "completed"
    best = math.inf
    avg = 0.0
    for i, lr in enumerate(lrs):
        if stop_event is not None and stop_event.is_set():
            status = "stopped"
            break
        loss = step(lr)
        done.append(lr)
        losses.append(loss)
        if progress is not None:
            progress({"batch": i + 1, "batches": len(lrs), "lr": lr, "loss": loss})
        if not math.isfinite(loss):
            losses[-1] = math.nan
            status = "diverged"
            break
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        smoothed = avg / (1 - SMOOTHING ** (i + 1))
        best = min(best, smoothed)
        if i >= MIN_POINTS and smoothed > diverge * best:
            status = "diverged"
            break
    return done, losses, status


def bounds_problems(start_lr: float, end_lr: float, num_batches: int) -> list[str]:
    """What is wrong with the ramp's bounds, each problem naming the bound and its value (empty when none)."""
    problems = []
    if not (math.isfinite(start_lr) and start_lr > 0):
        problems.append(f"start_lr = {start_lr!r}: must be a number above 0, such as 1e-7")
    if not (math.isfinite(end_lr) and end_lr > 0):
        problems.append(f"end_lr = {end_lr!r}: must be a number above 0, such as 10")
    elif not problems and end_lr <= start_lr:
        problems.append(f"end_lr = {end_lr!r}: must be above start_lr ({start_lr!r})")
    if num_batches < MIN_POINTS:
        problems.append(f"batches = {num_batches}: must be at least {MIN_POINTS}")
    return problems


def write_plot(result: LrFinderResult, path: str | Path) -> None:
    """The loss (raw and smoothed) against the learning rate on a log axis, the suggestion marked, as a PNG."""
    import matplotlib  # only `lr-find --plot` draws with it; imported here so the finder itself does not need it

    matplotlib.use("Agg")  # no display: a file
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        ax.plot(result.lrs, result.losses, color="#9ab", linewidth=1, label="loss per batch")
        ax.plot(result.lrs[: len(result.smoothed)], result.smoothed, color="#1f5fa8", linewidth=2, label="smoothed")
        if result.suggestion is not None and result.suggestion_index is not None:
            y = result.smoothed[result.suggestion_index]
            ax.plot(
                [result.suggestion], [y], "o", color="#d62", markersize=9, label=f"suggested {result.suggestion:.3g}"
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        finite = [x for x in result.smoothed if math.isfinite(x)]
        if finite:  # a diverged tail would squash the interesting part
            low, high = min(finite), max(finite[: max(1, len(finite) * 9 // 10)])
            ax.set_ylim(low - 0.1 * (high - low + 1e-12), high + 0.3 * (high - low + 1e-12))
        ax.set_title(f"Learning-rate finder ({result.status})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)
