"""Saliency metrics: score(W, statistics) -> tensor shaped like W. Pure functions.

Notation: W is (out, in); ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j
over N calibration tokens; ``gram`` is H = X X^T / N. Higher score = more worth keeping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .refine import row_output_error

__all__ = ["magnitude", "wanda", "ria", "energy_balanced", "balanced_mask", "sample_rows"]

_TINY = torch.finfo(torch.float32).tiny


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|."""
    return weight.float().abs()


def wanda(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, here with the per-token mean sqrt(a_j)
    (a constant factor away from the reference's norm, so the same ranking)."""
    return weight.float().abs() * energy.float().sqrt()


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


def balanced_mask(
    weight: torch.Tensor,
    energy: torch.Tensor,
    gram: torch.Tensor,
    labels: torch.Tensor,
    alphas: Sequence[float],
    groupings: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Error-guided balance. Each candidate (alpha, grouping) is masked, refined (``refine``) and
    judged by the output energy it removes on ``gram``'s tokens, tr(dW H dW^T), on the ``sample``
    rows (None: all); each cluster of rows (``labels``) takes the candidate with the least error
    on its rows. A grouping is ``fn(scores, labels) -> keep`` over the rows it is given, so on a
    sample each cluster's sampled rows form its pool and every candidate prunes the same count.

    Returns (the chosen candidates' masks on all rows, *before* refinement; per cluster
    ``{"cluster", "rows", "alpha", "grouping", "error"}``, error being the judged one).
    """
    rows = torch.arange(weight.shape[0]) if sample is None else sample
    w_s, lab_s = weight[rows.to(weight.device)], labels[rows]
    clusters = labels.unique().tolist()
    best: dict[int, tuple[float, tuple[float, str]]] = {c: (float("inf"), (0.5, next(iter(groupings)))) for c in clusters}
    for alpha in alphas:
        scores = energy_balanced(w_s, energy, alpha)
        for name, fn in groupings.items():
            err = row_output_error(w_s, refine(w_s, fn(scores, lab_s.to(scores.device))), gram).cpu()
            for c in clusters:
                e = float(err[lab_s == c].sum())
                if e < best[c][0]:
                    best[c] = (e, (alpha, name))
    keep = torch.ones_like(weight, dtype=torch.bool)
    choices = []
    for c in clusters:
        error, (alpha, name) = best[c]
        rc = labels == c
        rd = rc.to(weight.device)
        keep[rd] = groupings[name](energy_balanced(weight[rd], energy, alpha), labels[rc].to(weight.device))
        choices.append({"cluster": c, "rows": int(rc.sum()), "alpha": alpha, "grouping": name, "error": error})
    return keep, choices
