"""Data-parallel FoRDE over torch.distributed (NCCL on GPUs, Gloo on CPUs), launched by torchrun.

Every rank holds all M members and takes its contiguous shard of each global batch. The
repulsion needs the members' input gradients of the WHOLE global batch (its logsumexp runs over
all inputs), so the shards' gradient features are all-gathered: each rank's own rows stay in its
autograd graph, the other ranks' rows enter as constants. Each rank's loss is its share of the
global objective, batch norm normalizes with global-batch statistics (`synced_batch_norm`), and
the parameter gradients are averaged, so a step equals a one-process step over the global batch.

DistributedDataParallel is not used: its reducer does not support the double backward that
the FoRDE step needs (pytorch/pytorch#47562), so gradients are averaged here in one flat
all-reduce after `backward()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "SINGLE",
    "World",
    "all_sum",
    "average_gradients",
    "broadcast_state",
    "gather_rows",
    "init_world",
    "is_distributed",
    "shard",
    "synced_batch_norm",
]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder, the log and the progress bars."""
        return self.rank == 0


SINGLE = World(0, 1, 0)


def init_world(device: str) -> tuple[World, str]:
    """Join the process group torchrun set up (WORLD_SIZE, RANK, ...), or stay single.

    Returns the world and the device this rank trains on (`cuda:LOCAL_RANK` on GPUs).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank} has LOCAL_RANK {local_rank} but this machine has "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local_rank), f"cuda:{local_rank}" if cuda else "cpu"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(rows: int, world: World) -> slice:
    """This rank's contiguous share of a global batch of `rows` (sizes differ by at most one)."""
    base, extra = divmod(rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def gather_rows(local: torch.Tensor, rows: int, world: World, dim: int = 0) -> torch.Tensor:
    """All ranks' shards of a global batch of `rows`, concatenated along `dim` in rank order.

    Only this rank's shard keeps its autograd history; the others are constants here (their own
    ranks differentiate through them).
    """
    if world.size == 1:
        return local
    shards = [shard(rows, World(r, world.size, 0)) for r in range(world.size)]
    sizes = [s.stop - s.start for s in shards]
    longest = max(sizes)
    padding = [0, 0] * (local.dim() - dim - 1) + [0, longest - local.shape[dim]]
    padded = torch.nn.functional.pad(local.detach(), padding).contiguous()
    buffers = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(buffers, padded)
    parts = [local if r == world.rank else buffers[r].narrow(dim, 0, sizes[r]) for r in range(world.size)]
    return torch.cat(parts, dim)


def average_gradients(module: torch.nn.Module, world: World) -> None:
    """Average every parameter's `.grad` over the ranks, in one flat all-reduce."""
    if world.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's parameters and buffers (same seed makes them equal already; this
    makes it a fact rather than a hope)."""
    if world.size == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def all_sum(values: list[float], world: World) -> list[float]:
    """Sum a few numbers over the ranks (epoch totals for the log)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def synced_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode batch norm of `[batch, C, H, W]` with mean and variance over the global batch.

    Two differentiable all-reduces (sum, then centred sum of squares): their backward sums the
    statistics' gradients over ranks, and they can be differentiated again (the FoRDE step).
    Running statistics are updated as F.batch_norm does (unbiased variance).
    """
    from torch.distributed.nn.functional import all_reduce

    dims = (0, 2, 3)
    count = all_reduce(torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], device=x.device))
    mean = all_reduce(x.sum(dims)) / count
    centred = x - mean[None, :, None, None]
    var = all_reduce(centred.pow(2).sum(dims)) / count
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mean)
        running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
    scale = weight * torch.rsqrt(var + eps)
    return centred * scale[None, :, None, None] + bias[None, :, None, None]
