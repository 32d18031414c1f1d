"""How the processes of a run act together: alone (OneProcess), or as one run under torchrun (Processes: DDP,
one small all-reduce per batch, stops agreed in the same batch, the epoch's sums over every process).

The trainer's loop asks its strategy at the few points where several processes must agree, so the loop itself
has no multi-process branches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from engine.distributed import DistContext, all_reduce_sum, broadcast_buffers, weights_checksum
from engine.failures import is_peer_failure, peer_failure

if TYPE_CHECKING:
    from engine.trainer import TrainState


class OneProcess:
    """A run in this process alone: nothing to share; a stop request ends the run before the next batch."""

    dist: DistContext | None = None
    ddp: torch.nn.Module | None = None

    def __init__(self, stop_event: threading.Event):
        self.stop_event = stop_event

    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def trains(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls forward on (DDP's wrapper under torchrun)."""
        return module

    def batch_loss(self, loss: torch.Tensor, model: torch.nn.Module) -> float | None:
        """The batch's loss as reported and checked; None when the processes agreed to stop here."""
        return loss.item()

    def epoch_sums(
        self, loss_sum: torch.Tensor, seen: int, correct: torch.Tensor, model: torch.nn.Module
    ) -> tuple[float, int, float]:
        """(summed loss, samples, correct) of the epoch's training batches."""
        return loss_sum.item(), seen, correct.item()

    def eval_interrupted(self) -> bool:
        """Whether a stop request ends validation midway (several processes finish it together)."""
        return self.stop_event.is_set()

    def eval_sums(self, total: float, seen: int, correct: float, device: torch.device) -> tuple[float, int, float]:
        return total, seen, correct

    def gather(self, value: Any) -> list[Any]:
        """Every process's value (picklable), in rank order."""
        return [value]

    def passes_through(self, exc: BaseException) -> bool:
        """An error that is not this process's to explain (another process failed under it)."""
        return False

    def failure(self, exc: BaseException, state: TrainState) -> BaseException:
        """The error to report for exc (under torchrun, a peer's failure is named as such)."""
        return exc

    def finish(self, model: torch.nn.Module, log: Callable[[str], None]) -> None:
        """At the end of a run."""

    def release(self) -> None:
        """After the run, before the process group ends: drop what holds on to it (DDP's wrapper)."""
        self.ddp = None


class Processes(OneProcess):
    """The processes of a torchrun run training as one: every decision is taken together."""

    def __init__(self, stop_event: threading.Event, dist: DistContext):
        super().__init__(stop_event)
        self.dist: DistContext = dist
        self.agreed_stop = False  # a stop request counts once every process has seen it in the same batch

    def stop_requested(self) -> bool:
        return self.agreed_stop

    def agree_on(self, mine: bool) -> bool:
        """Whether every process says yes (one process that cannot, say the feature cache, means none do)."""
        votes = all_reduce_sum(torch.tensor([1.0 if mine else 0.0], device=self.dist.device)).item()
        return votes == float(self.dist.world_size)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> None:
        """DistributedDataParallel around the module that trains: it broadcasts rank 0's weights and buffers
        and averages the gradients in backward."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)

    def trains(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else module

    def batch_loss(self, loss: torch.Tensor, model: torch.nn.Module) -> float | None:
        # One small all-reduce per batch: the loss averaged over the processes (what is reported and checked
        # for NaN, so every process stops at the same batch) and whether any was asked to stop.
        shared = torch.stack(
            [
                loss.detach().to(torch.float64),
                torch.tensor(float(self.stop_event.is_set()), dtype=torch.float64, device=loss.device),
            ]
        )
        total, stops = all_reduce_sum(shared).tolist()
        if stops > 0:  # every process leaves here, in the same batch: keep their buffers equal too
            self.agreed_stop = True
            broadcast_buffers(model)
            return None
        return total / self.dist.world_size

    def epoch_sums(
        self, loss_sum: torch.Tensor, seen: int, correct: torch.Tensor, model: torch.nn.Module
    ) -> tuple[float, int, float]:
        broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere
        sums = all_reduce_sum(
            torch.stack(
                [
                    loss_sum,
                    torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
                    correct.to(torch.float64),
                ]
            )
        )
        total, seen_all, correct_all = sums.tolist()
        return total, int(round(seen_all)), correct_all

    def eval_interrupted(self) -> bool:
        return False

    def eval_sums(self, total: float, seen: int, correct: float, device: torch.device) -> tuple[float, int, float]:
        # each process evaluated its own share: sum the shares
        sums = all_reduce_sum(torch.tensor([total, float(seen), correct], dtype=torch.float64, device=device))
        total, seen_all, correct_all = sums.tolist()
        return total, int(round(seen_all)), correct_all

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as tdist

        out: list[Any] = [None] * self.dist.world_size
        tdist.all_gather_object(out, value)
        return out

    def passes_through(self, exc: BaseException) -> bool:
        return is_peer_failure(exc)

    def failure(self, exc: BaseException, state: TrainState) -> BaseException:
        if not is_peer_failure(exc):
            return exc
        return peer_failure(exc, rank=self.dist.rank, world_size=self.dist.world_size, state=state)

    def finish(self, model: torch.nn.Module, log: Callable[[str], None]) -> None:
        """Every process must hold the same weights at the end; say so either way."""
        import torch.distributed as tdist

        mine = weights_checksum(model).to(self.dist.device)
        high, low = mine.clone(), mine.clone()
        tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
        tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
        n = self.dist.world_size
        if torch.allclose(high, low, rtol=1e-9, atol=0.0):
            log(f"All {n} processes end with the same weights and buffers (checksum {mine[0].item():.10g})")
        else:
            log(
                f"Warning: the {n} processes end with different weights or buffers (checksums "
                f"{low[0].item():.10g} to {high[0].item():.10g}); rank 0's are saved"
            )
