"""Saliency metrics: score(W, statistics) -> tensor shaped like W. Pure functions.

Notation: W is (out, in); ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j
over N calibration tokens; ``gram`` is H = X X^T / N. Higher score = more worth keeping.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude", "wanda", "ria", "energy_balanced", "sample_rows", "removed_energy"]

_TINY = torch.finfo(torch.float32).tiny


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|."""
    return weight.float().abs_() if weight.dtype != torch.float32 else weight.abs()


def wanda(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, here with the per-token mean sqrt(a_j)
    (a constant factor away from the reference's norm, so the same ranking)."""
    return magnitude(weight).mul_(energy.float().sqrt())  # one weight-sized float32 tensor


def ria(weight: torch.Tensor, energy: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA (Zhang et al., 2024): relative importance times activation,
    (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^power."""
    a = weight.float().abs()
    rel = a / a.sum(0, keepdim=True).clamp_min(_TINY) + a / a.sum(1, keepdim=True).clamp_min(_TINY)
    return rel * energy.float().sqrt().pow(power)


def energy_balanced(weight: torch.Tensor, energy: torch.Tensor, alpha: float) -> torch.Tensor:
    """DiT-Pruning's energy-balanced saliency, S_ij = (W_ij^2 / E_W)^(1 - alpha) * (a_j / E_A)^alpha,
    each energy normalized by its layer mean. alpha = 0.5 ranks exactly as Wanda."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w = weight.float().pow(2)
    a = energy.float()
    w = w / w.mean().clamp_min(_TINY)
    a = a / a.mean().clamp_min(_TINY)
    return w.pow(1.0 - alpha) * a.pow(alpha)


def sample_rows(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor | None:
    """A seeded sample of about ``n`` row indices, stratified by cluster (every cluster gets its
    share and at least min(its size, 8) rows); None when that would be every row."""
    out = len(labels)
    if n >= out:
        return None
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        take = min(len(rows), max(8, round(n * len(rows) / out)))
        picked.append(rows[torch.randperm(len(rows), generator=g)[:take]])
    return torch.cat(picked).sort().values


def removed_energy(weight: torch.Tensor, keep: torch.Tensor, new_weight: torch.Tensor | None,
                   energy: torch.Tensor, gram: torch.Tensor | None = None, rows: int = 256,
                   chunk: int = 1 << 20) -> float:
    """The fraction of a layer's output energy on the calibration inputs that pruning removes,
    ``tr(D G D^T) / tr(W G W^T)`` with ``D = W - W'`` (``W'``: the pruned, and where a method
    updated it reconstructed, weight) and ``G`` the inputs' Gram matrix. Without ``gram`` its
    diagonal ``energy`` stands in (exact for uncorrelated inputs; for a mask without update, the
    sum of Wanda's scores removed), over every row. A reconstruction compensates through the
    correlations, so it is given ``gram``, and then ``rows`` evenly spaced rows estimate the
    ratio (a full pass would cost a layer's worth of matrix products)."""
    if gram is not None:
        pick = torch.linspace(0, weight.shape[0] - 1, min(rows, weight.shape[0]), device=weight.device).long()
        w, g = weight[pick].float(), gram.float().to(weight.device)
        after = new_weight[pick].float() if new_weight is not None else w
        d = torch.where(keep[pick], w - after, w)
        total = float(((w @ g) * w).sum())
        return float(((d @ g) * d).sum()) / total if total > 0 else 0.0
    e = energy.float().to(weight.device)
    step = max(1, chunk // max(weight.shape[1], 1))
    removed = total = 0.0
    for r in range(0, weight.shape[0], step):
        w = weight[r:r + step].float()
        after = new_weight[r:r + step].float() if new_weight is not None else w
        removed += float((torch.where(keep[r:r + step], w - after, w).pow(2) @ e).sum())
        total += float((w.pow(2) @ e).sum())
    return removed / total if total > 0 else 0.0
