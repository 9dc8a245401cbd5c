"""torch.distributed set-up for torchrun: which rank this is, and which rows of a batch it owns.

Run unchanged as one process, or under ``torchrun --nproc_per_node=N`` (NCCL on CUDA,
gloo on CPU). Every rank draws the same seeded global batch and keeps the slice
``rank::world``, as ``DistributedSampler`` does; so, with gradients averaged by
``DistributedDataParallel``, N processes take the same steps as one process with the
same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share ``rows[rank::world]`` of a global batch of row indices."""
        return rows[self.rank :: self.world]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def current_context() -> DistContext:
    """The context of an already initialised process group (one process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()
