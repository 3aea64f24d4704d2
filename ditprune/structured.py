"""Structured pruning, the decision (pure functions): which attention heads or MLP hidden channels
to remove, and the least-squares update of the Linear that reads them.

A group is a set of input columns of one or more *consumer* Linears (``to_out`` / ``to_add_out``
read a head's ``head_dim`` attention outputs, ``ff.net.2`` one MLP channel, a FLUX single
block's ``proj_out`` both). Removing a group deletes those columns (and the producer rows that
made them, which nothing else reads), so the only error it causes is at the consumers' outputs,
and it can be measured exactly from their input Gram matrices H = X X^T / N.

``method="obs"`` (OBS-Diff's and ZipLM's criterion): the cost of removing group S from a
consumer W, given that the remaining columns are refitted by least squares, is
``tr(W_S [(H^-1)_SS]^-1 W_S^T)`` (the group Optimal Brain Surgeon error, damped H); groups go
greedily, cheapest first, the inverse updated after each removal (a Schur complement), so the
cost of later groups accounts for what was already removed; the costs of the consumers that
share the groups (a joint attention's image and text outputs) add. :func:`refit` then solves the
kept columns exactly. Baselines: ``"magnitude"`` (the squared weights of the group in its
producers and consumers) and ``"activation"`` (Wanda's score |W_ij| sqrt(a_j) summed over the
group's consumer columns, as FLAP ranks channels), neither followed by a refit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .lsq import damped

__all__ = ["STRUCTURE_METHODS", "damped", "select_obs", "select_by_score", "magnitude_scores", "activation_scores",
           "refit", "removal_count"]

STRUCTURE_METHODS = ("obs", "magnitude", "activation")


def removal_count(groups: int, fraction: float) -> int:
    """How many of ``groups`` a fraction removes (rounded down: the fraction is an upper bound),
    never all of them."""
    return min(int(math.floor(groups * fraction + 1e-9)), groups - 1)


@torch.no_grad()
def select_obs(consumers: Sequence[tuple[torch.Tensor, torch.Tensor]], groups: Sequence[Sequence[int]], remove: int,
               rounds: int = 16, percdamp: float = 0.01, gone: Sequence[Sequence[int]] = ()) -> list[int]:
    """Indices into ``groups`` to remove: greedily the ``remove`` groups whose removal costs the
    consumers' outputs least after the optimal update of their other columns. ``consumers``:
    (weight (out, in), Gram (in, in)) pairs whose column indices ``groups`` refer to. Groups
    go in ``rounds`` rounds (one per round when ``remove <= rounds``), the inverse updated
    after each round. ``gone``: per consumer, columns another unit already removed (a FLUX single
    block's ``proj_out`` reads heads and MLP channels): they are eliminated first."""
    if remove <= 0:
        return []
    Hinvs = [torch.linalg.inv(damped(H, percdamp)) for _, H in consumers]
    Ws = [W.to(torch.float64) for W, _ in consumers]
    for i, cols in enumerate(gone):
        if len(cols):
            Ws[i], Hinvs[i] = _eliminate(Ws[i], Hinvs[i], torch.as_tensor(list(cols), dtype=torch.long))
    idx = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]
    alive, removed = list(range(len(groups))), []
    per_round = max(1, math.ceil(remove / rounds))
    while len(removed) < remove:
        costs = torch.zeros(len(alive), dtype=torch.float64)
        for W, Hinv in zip(Ws, Hinvs):
            costs += _group_costs(W, Hinv, [idx[g] for g in alive])
        take = [alive[i] for i in torch.argsort(costs, stable=True)[: min(per_round, remove - len(removed))].tolist()]
        cols = torch.cat([idx[g] for g in take])
        for i in range(len(Ws)):
            Ws[i], Hinvs[i] = _eliminate(Ws[i], Hinvs[i], cols)
        removed += take
        alive = [g for g in alive if g not in set(take)]
    return sorted(removed)


def _eliminate(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns ``cols`` removed: the OBS update of the other columns of W, and the inverse of H
    without them (a Schur complement; their rows and columns become 0)."""
    step = torch.linalg.solve(Hinv[cols][:, cols], Hinv[cols, :])
    return W - W[:, cols] @ step, Hinv - Hinv[:, cols] @ step


def _group_costs(W: torch.Tensor, Hinv: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """tr(W_S [(H^-1)_SS]^-1 W_S^T) for each group S (groups of one size batched)."""
    out = torch.empty(len(groups), dtype=torch.float64)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(len(g), []).append(i)
    for size, members in by_size.items():
        S = torch.stack([groups[i] for i in members])  # (k, size)
        blocks = Hinv[S.unsqueeze(2), S.unsqueeze(1)]  # (k, size, size)
        Ws = W[:, S].permute(1, 0, 2)  # (k, out, size)
        sol = torch.linalg.solve(blocks, Ws.transpose(1, 2))  # (k, size, out)
        out[members] = (Ws.transpose(1, 2) * sol).sum((1, 2))
    return out


def select_by_score(scores: torch.Tensor, remove: int) -> list[int]:
    """The ``remove`` groups with the lowest score (ties: the first)."""
    return sorted(torch.argsort(scores.to(torch.float64), stable=True)[:remove].tolist())


def magnitude_scores(producers: Sequence[torch.Tensor], consumers: Sequence[torch.Tensor],
                     groups: Sequence[Sequence[int]], rows: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per group: the squared weights it owns, consumer columns ``groups[g]`` and producer rows
    ``rows[g]`` (default: the same indices)."""
    rows = groups if rows is None else rows
    return torch.tensor([sum(float(W[:, list(g)].double().pow(2).sum()) for W in consumers)
                         + sum(float(P[list(r)].double().pow(2).sum()) for P in producers)
                         for g, r in zip(groups, rows)], dtype=torch.float64)


def activation_scores(consumers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per group: Wanda's score |W_ij| sqrt(a_j) summed over its consumer columns (``consumers``:
    (weight, input energy a))."""
    scores = [(W.double().abs() * a.double().to(W.device).sqrt()).sum(0) for W, a in consumers]
    return torch.tensor([sum(float(s[list(g)].sum()) for s in scores) for g in groups], dtype=torch.float64)


@torch.no_grad()
def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The kept columns' least-squares update: V = argmin tr((W - [V 0]) H_d (W - [V 0])^T) over
    the columns ``keep`` (bool, (in,)), H_d the damped H of :func:`damped`; returns V
    (out, keep.sum()) in ``weight``'s dtype: V = W H_d[:, K] (H_d[K, K])^-1."""
    H = damped(gram).to(weight.device)
    K = keep.to(weight.device)
    rhs = weight.to(torch.float64) @ H[:, K]  # (out, k)
    V = torch.linalg.solve(H[K][:, K], rhs.T).T
    return V.to(weight.dtype)
