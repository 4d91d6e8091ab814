"""Process-group setup under torchrun and the few collectives the trainer needs.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) everything runs as a single
process of rank 0, and every collective here is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from isaret.errors import ConfigError, IsaretError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc_per_node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(device_setting: str, backend_setting: str) -> DistContext:
    """Join torchrun's process group when launched by torchrun, else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = choose_device(device_setting, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = choose_backend(backend_setting, device, local_world_size)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        # Logging is not set up for the rank yet, so only rank 0 reports (the others log warnings only).
        if rank == 0:
            log.info("Joined process group: %d processes on %d machine(s), backend %s, rank 0 on %s",
                     world_size, world_size // max(local_world_size, 1), backend, device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       local_world_size=local_world_size)


def choose_backend(setting: str, device: torch.device, local_world_size: int) -> str:
    """Return the torch.distributed backend: `setting`, or for auto nccl on CUDA and gloo on CPU."""
    backend = setting
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist_backend=nccl needs CUDA devices; use dist_backend=gloo or auto on CPU")
    if backend == "nccl" and local_world_size > torch.cuda.device_count():
        raise ConfigError(
            f"torchrun started {local_world_size} processes on this machine but it has "
            f"{torch.cuda.device_count()} CUDA device(s), and NCCL needs one device per process; "
            "set --nproc_per_node to at most the number of GPUs"
        )
    return backend


def launch_command(ctx: DistContext) -> str:
    """Return the torchrun command prefix that starts `isaret train` with this run's processes."""
    if ctx.world_size == ctx.local_world_size:
        return f"torchrun --nproc_per_node={ctx.local_world_size} -m isaret train"
    nodes = ctx.world_size // max(ctx.local_world_size, 1)
    return (f"torchrun --nnodes={nodes} --nproc_per_node={ctx.local_world_size} --node_rank=N "
            "--rdzv_endpoint=HOST:PORT -m isaret train")


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks in place (on the collective's device) and return it on its own device."""
    if not ctx.enabled:
        return tensor
    work = tensor.to(ctx.device) if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on at least one rank."""
    if not ctx.enabled:
        return flag
    value = all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), ctx)
    return bool(value.item() > 0)


def gather_objects(value: Any, ctx: DistContext) -> list[Any]:
    """Return every rank's `value`, in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run_on_main(fn: Callable[[], Any], ctx: DistContext) -> Any:
    """Run `fn` on rank 0; every rank waits, and an error on rank 0 is raised on every rank.

    So a failed checkpoint save stops all ranks with rank 0's message instead of leaving the
    others waiting in the next collective.
    """
    result, error, original = None, None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:
            if not ctx.enabled:
                raise
            original, error = exc, str(exc) or type(exc).__name__
    error = broadcast_object(error, ctx)
    if original is not None:
        raise original
    if error is not None:
        raise IsaretError(f"rank 0 failed: {error}")
    return result
