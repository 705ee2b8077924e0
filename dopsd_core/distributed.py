"""Data parallelism over torch.distributed, as `torchrun` (or `accelerate launch`) starts it.

Each process (rank) holds the whole model and the same LoRA, optimizer and EMA teacher. A step's global
batch is split into equal contiguous shares: rank r trains rows [r*b, (r+1)*b) of it. Every rank draws
the whole step's randomness from the same training stream (indices, captions, noise for all rows) and
keeps its share, so what sample i sees depends on the seed, the step and i only: N processes x batch
b equal one process x batch N*b, up to the order of the gradient sum. Gradients and the reported loss are
averaged over ranks after the backward passes (what DistributedDataParallel does for the LoRA's
parameters; the frozen base needs no reduction), so every rank takes the same optimizer step and the
EMA teacher stays identical everywhere. Only rank 0 writes files.

A collective that waits longer than DOPSD_DIST_TIMEOUT seconds (default 60) fails: a rank that dies
makes the others stop with an error instead of hanging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import DopsdError

DEFAULT_TIMEOUT_S = 60


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str = "batch") -> slice:
        """The rows of a global batch of n that this rank trains."""
        if n % self.world:
            raise DopsdError(f"the {what} ({n}) must split evenly over {self.world} processes; pass a multiple of "
                             f"{self.world}")
        b = n // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor becomes its mean over ranks (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: all ranks stop at the same step."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


SINGLE = Dist()


def from_env() -> Dist:
    """The process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT), started here; a plain
    process is rank 0 of 1. gloo on the CPU (the toy, the CI), nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    import torch.distributed as dist
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("DOPSD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size())


def shutdown(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
