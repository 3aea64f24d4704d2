"""torch.distributed for calibration: statistics are sums, so each rank calibrates on its shard
and the sums (and token counts) are all-reduced before any mask is made; the masks (and any
updated weights) are then broadcast from rank 0, so every rank holds the same model whatever
its hardware's arithmetic. No launcher of ours: Lightning DDP or ``torchrun`` starts the ranks.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .stats import InputStats

__all__ = ["active", "rank", "all_reduce_stats", "broadcast_", "min_over_ranks"]


def active() -> bool:
    """A process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def _reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    # gloo reduces CPU tensors, nccl CUDA tensors: move to the backend's device and back
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = t.to(dev)
    dist.all_reduce(buf, op=op)
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_stats(stats: Iterable[InputStats]) -> None:
    """Sum every statistic (and token count) over the ranks, in the same order on every rank."""
    for s in stats:
        _reduce(s.sq_sum)
        if s.gram_sum is not None:
            _reduce(s.gram_sum)
        count = torch.tensor([s.count], dtype=torch.float64)
        s.count = int(_reduce(count).item())


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor on every rank with rank ``src``'s, in place."""
    backend = dist.get_backend()
    for t in tensors:
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = t.detach().to(dev)
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.data.copy_(buf)


def min_over_ranks(value: int) -> int:
    return int(_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MIN).item())
