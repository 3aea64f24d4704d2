"""torch.distributed for calibration: statistics are sums, so each rank calibrates on its shard
and the sums (and token counts) are all-reduced before any mask is made; the masks (and any
updated weights) are then broadcast from rank 0, so every rank holds the same model whatever
its hardware's arithmetic. No launcher of ours: Lightning DDP or ``torchrun`` starts the ranks.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .stats import HOLDOUT_BELOW, InputStats

__all__ = ["active", "rank", "world_size", "all_reduce_stats", "broadcast_", "min_over_ranks", "max_over_ranks", "sum_over_ranks",
           "gather_rows"]


def active() -> bool:
    """A process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


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
    """Sum every statistic (and token count) over the ranks, in the same order on every rank;
    statistics shared by several layers are reduced once. Held-out statistics survive only if
    every rank still has them."""
    seen: set[int] = set()
    for s in stats:
        if id(s) in seen:
            continue
        seen.add(id(s))
        _reduce(s.sq_sum)
        if s.gram_sum is not None:
            _reduce(s.gram_sum)
            if min_over_ranks(int(s.held_sum is not None)) == 0:
                s.held_sum = None
            else:
                _reduce(s.held_sum)
                held = _reduce(torch.tensor([s.held_count, s.held_weight], dtype=torch.float64))
                s.held_count, s.held_weight = int(held[0].item()), float(held[1].item())
        counts = _reduce(torch.tensor([s.count, s.weight_sum], dtype=torch.float64))
        s.count, s.weight_sum = int(counts[0].item()), float(counts[1].item())
        if s.held_sum is not None and s.count >= HOLDOUT_BELOW * s.sq_sum.numel():
            s.held_sum = None


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


def max_over_ranks(value: int) -> int:
    return int(_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX).item())


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64), the same list on every rank."""
    return _reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def gather_rows(rows: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """Every rank's ``rows`` (tuples of one length, as float64), rank 0's first, the same list on
    every rank."""
    width = len(rows[0]) if rows else 0
    width = max_over_ranks(width)
    most = max_over_ranks(len(rows))
    buf = torch.zeros(world_size(), most, width + 1, dtype=torch.float64)  # last column: the row is there
    if rows:
        buf[rank(), : len(rows), :width] = torch.tensor(rows, dtype=torch.float64)
        buf[rank(), : len(rows), width] = 1.0
    _reduce(buf)
    return [tuple(r[:width].tolist()) for r in buf.view(-1, width + 1) if r[width] == 1.0]
