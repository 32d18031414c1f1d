"""How a run fails for reasons outside the code, recognised and told in one line that says what to change."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.config import ProjectConfig
    from engine.trainer import TrainState


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory during a batch; the message names the batch size to lower."""


class PeerProcessError(RuntimeError):
    """Another process of a multi-process run failed or vanished; this one cannot go on without it."""


_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "remote worker",
    "nccl communicator was aborted",
)


def is_peer_failure(exc: BaseException) -> bool:
    """An error of the process group (a peer crashed, was killed, or did not answer within the timeout)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA/MPS/CPU allocation failure, whichever way PyTorch raised it."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _where(state: TrainState) -> str:
    return f"at epoch {state.epoch}, batch {state.batch}" if state.batch else f"in epoch {state.epoch or 1}"


def _last_saved(state: TrainState, resume: bool) -> str:
    if not state.history:
        return "no epoch of this run had finished"
    epoch = state.history[-1]["epoch"]
    return (
        f"epoch {epoch} was the last to finish: resume from its checkpoint (last.pt)"
        if resume
        else f"epoch {epoch} was the last to finish (its checkpoint is last.pt)"
    )


def peer_failure(exc: BaseException, *, rank: int, world_size: int, state: TrainState) -> PeerProcessError:
    """What this process says when another of the run's processes failed under it."""
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", _first_line(exc)).split(". ")[0]  # gloo's location
    return PeerProcessError(
        f"rank {rank}: another of the {world_size} processes failed or stopped answering {_where(state)} "
        f"({first[:200]}); that process's own error says why (torchrun names the first failure); "
        f"{_last_saved(state, resume=False)}"
    )


def out_of_memory(
    exc: BaseException, *, device: str, cfg: ProjectConfig, state: TrainState, built: bool
) -> DeviceOutOfMemoryError:
    """The message for a batch that did not fit on the device: what ran out, where, and what to lower."""
    size = cfg.loader.batch_size
    where = (
        _where(state)
        if state.batch
        else f"while preparing epoch {state.epoch or 1}"
        if built
        else "while building the run"
    )
    if size > 1:
        advice = (
            f"Use a smaller batch: lower loader.batch_size (try {max(size // 2, 1)}) or data.image_size "
            f"(now {cfg.data.image_size})"
        )
    else:
        advice = (
            f"loader.batch_size is 1 already: lower data.image_size (now {cfg.data.image_size}) "
            "or choose a smaller backbone"
        )
    return DeviceOutOfMemoryError(
        f"the {device} device ran out of memory {where} with loader.batch_size = {size} "
        f"({_first_line(exc)[:200]}). {advice}; {_last_saved(state, resume=True)}"
    )


def non_finite_loss(loss_value: float, *, cfg: ProjectConfig, state: TrainState, lr_now: float) -> NonFiniteLossError:
    """The loss became NaN or infinite: where, and the learning rate (a schedule may have moved it far)."""
    scheduled = (
        f"; the {cfg.schedule.name} schedule had it at {lr_now:g} in this batch"
        if cfg.schedule.name != "none" and not math.isclose(lr_now, cfg.optimizer.lr, rel_tol=1e-6)
        else ""
    )
    return NonFiniteLossError(
        f"the loss became {loss_value} at epoch {state.epoch}, batch {state.batch}; training stopped. "
        f"Lower optimizer.lr (now {cfg.optimizer.lr:g}{scheduled}), or set train.grad_clip_norm"
    )
