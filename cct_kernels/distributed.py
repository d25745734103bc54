"""torch.distributed for training: one process per CPU share or GPU, started by torchrun.

`distributed_context(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
starts the process group (gloo on CPU, nccl on CUDA) unless one is running already, and yields a
DistributedContext: this process's rank and device, DistributedDataParallel wrapping, and the few collectives
training needs. Without torchrun (WORLD_SIZE unset or 1) it is a single-process context whose collectives return
their input, so the training loop has one code path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclasses.dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "gloo" or "nccl"; None in a single process

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel(model) across processes, else the model itself."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sum(self, value: float) -> float:
        """The sum of `value` over the processes."""
        if self.world_size == 1:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar tensor over the processes, as a float."""
        return self.sum(value.item()) / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on one of them."""
        return self.sum(float(flag)) > 0

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


@contextlib.contextmanager
def distributed_context(device: str | None = None):
    """A DistributedContext for this process (see the module docstring).

    device: "cpu", "cuda" or "cuda:N"; default this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else
    the CPU. The process group this function starts is destroyed when the context ends; one started by the caller is
    used and left running.
    """
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
        else _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world_size == 1:
        yield DistributedContext(device=device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), device, dist.get_backend())
    finally:
        if started_here:
            dist.destroy_process_group()
