"""Multi-process training with PyTorch's own distributed engine: torchrun starts the processes, this module
joins them into a process group and gives the trainer what it needs (device, rank, reductions).

One process per GPU (nccl), or several CPU processes (gloo). loader.batch_size is per process, so the global
batch is processes x batch_size, as in DistributedDataParallel everywhere. Only rank 0 writes the run folder.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError, ProjectConfig

MAIN = Path(__file__).resolve().parent.parent / "main.py"


def local_processes() -> int:
    """How many processes of this run share this machine (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    if world_from_env() is None:
        return 1
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def world_from_env() -> tuple[int, int, int] | None:
    """(world_size, rank, local_rank) when torchrun started this process among others, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    return (world, rank, local) if world > 1 else None


def torchrun_command(
    processes: int,
    args: Sequence[str],
    *,
    python: str | None = None,
    tee: bool = False,
    log_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The command that runs `main.py ARGS` in `processes` processes on this machine through torchrun.

    --standalone picks a free rendezvous port on localhost; tee prefixes each line with its local rank
    ("[default0]:...") so a parent can tell the ranks' output apart.
    """
    cmd = [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "--max_restarts=0",
    ]
    if log_dir is not None:
        cmd.append(f"--log-dir={log_dir}")
    if tee:
        cmd.append("--tee=3")
    return [*cmd, str(MAIN), *args]


@dataclass
class DistContext:
    """This process's place in the process group."""

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"Distributed: {self.world_size} processes ({self.backend}), this is rank {self.rank} "
            f"on {self.device}; loader.batch_size is per process"
        )


_context: DistContext | None = None


def context() -> DistContext | None:
    """The process group this process joined (init_from_env), or None in a single-process run."""
    return _context


def init_from_env(cfg: ProjectConfig) -> DistContext | None:
    """Join the process group torchrun set up (once per process); None when not started among others."""
    global _context
    world = world_from_env()
    if world is None:
        return None
    if _context is not None:
        return _context
    import torch.distributed as dist

    world_size, rank, local_rank = world
    if not dist.is_available():
        raise ConfigError(["this PyTorch build has no torch.distributed, so it cannot train in several processes"])
    wanted = cfg.train.device
    cuda = torch.cuda.is_available() and wanted in ("auto", "cuda")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device = 'cuda': no CUDA GPU is available here; use 'auto' or 'cpu'"])
    if wanted == "mps":
        raise ConfigError(
            [
                "train.device = 'mps' cannot train in several processes (no distributed backend for "
                "Apple's Metal); use 'cpu' or run one process"
            ]
        )
    if cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                [
                    f"torchrun started {local_rank + 1}+ processes on this machine but it has {count} "
                    f"GPU(s): use --nproc_per_node={count} or fewer (one process per GPU)"
                ]
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # torchrun sets OMP_NUM_THREADS=1 for several processes: give each its share of the cores instead
        from engine.samplers import usable_cpus

        torch.set_num_threads(usable_cpus())
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError(
            ["distributed.backend = 'nccl' needs a CUDA GPU per process; use 'gloo' (or 'auto') on the CPU"]
        )
    if cfg.distributed.sync_batchnorm and not cuda:
        raise ConfigError(
            [
                "distributed.sync_batchnorm = true needs GPUs: PyTorch synchronises BatchNorm only on "
                "CUDA. On the CPU turn it off (each process keeps its own statistics)"
            ]
        )
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo on first use, and that import keeps references to every
        # process group that exists then, for good: destroy_process_group at the end of the run could not free
        # the group, whose Gloo threads would live on into interpreter shutdown, where one still dropping the
        # last collective's tensors takes the GIL and aborts the process ("terminate called without an active
        # exception", a rank lost after its run had finished). Imported before the group exists, it holds none.
        importlib.import_module("torch._dynamo")

        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=cfg.distributed.timeout_s)}
        if cuda and backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    _context = DistContext(world_size, rank, local_rank, backend, device)
    return _context


def shutdown() -> None:
    """Leave the process group (at the end of a run), so the process exits without a hang or a warning."""
    global _context
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # The group's threads end only when nothing holds the group: an earlier phase's DDP wrapper may still be
        # waiting in a reference cycle (Trainer.release dropped the last one).
        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a failed peer may have left the group unusable; exiting is enough
            pass
    _context = None


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over every process (in place, on the process group's device)."""
    import torch.distributed as dist

    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's value, on every rank."""
    import torch.distributed as dist

    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def weights_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of the weights and buffers (sum and sum of squares), to compare ranks at the end."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v = v.detach().to(torch.float64).cpu()
                total[0] += v.sum()
                total[1] += (v * v).sum()
    return total


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them before each forward, so after an epoch's last batch each process holds statistics
    updated by its own batch: this evens them out before evaluation and at the end, as rank 0's are saved.
    """
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
