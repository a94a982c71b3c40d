"""Data-parallel training with torch.distributed, in processes that torchrun started.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `init` joins the process group
(NCCL on CUDA, gloo on CPU) and returns a `Context` the trainer asks for its shard, its device and
the few collectives it needs. Without torchrun the Context is a single process and every
collective is a no-op, so the trainer has one code path. Imported by train; runs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import VisiontuneError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and decides early stopping."""
        return self.rank == 0

    def shard(self, items: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch: every world-th item from its rank."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float] | np.ndarray, device: torch.device) -> np.ndarray:
        """Element-wise sum over all ranks (float64)."""
        if self.world == 1:  # no collective; also spares devices without float64 (MPS)
            return np.asarray(values, dtype=np.float64)
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def decide(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's flag on every rank (e.g. early stopping), so that no rank waits for the others."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())


def launched() -> bool:
    """Whether this process is one rank of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_request: str, timeout_s: float) -> tuple[Context, torch.device | None]:
    """Join the process group when torchrun started this process: (context, this rank's device).

    The device is None for a single process (the trainer picks it as usual).
    """
    if not launched():
        return Context(), None
    env = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    cuda = torch.cuda.is_available() and device_request in ("auto", "cuda")
    if device_request == "mps":
        raise VisiontuneError("train.device: mps cannot run several processes; set train.nproc: 1")
    if cuda:
        device = torch.device("cuda", env["LOCAL_RANK"])
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Context(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], local_world), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
