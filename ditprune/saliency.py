"""Saliency metrics: score(W, statistics) -> tensor shaped like W. Pure functions.

Notation: W is (out, in); ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j
over N calibration tokens; ``gram`` is H = X X^T / N. Higher score = more worth keeping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["magnitude", "wanda", "ria", "energy_balanced", "row_output_error", "balanced_mask"]

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


def row_output_error(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per output row, the energy the mask removes from the layer's output on the calibration
    data: ||(W_i - (W*M)_i) X||^2 / N = dW_i H dW_i^T. Summed over rows: tr(dW H dW^T)."""
    dw = weight.float() * (~keep)
    return ((dw @ gram.float()) * dw).sum(1)


def balanced_mask(
    weight: torch.Tensor,
    energy: torch.Tensor,
    gram: torch.Tensor,
    alphas: Sequence[float],
    mask_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    labels: torch.Tensor,
) -> tuple[torch.Tensor, list[dict]]:
    """Error-guided balance: for every candidate (alpha, grouping) build the mask, measure each
    row's output-error energy, and let each cluster of rows (``labels``) take the candidate with
    the least error. Every candidate prunes the same count per cluster, so the layer total is
    unchanged, and the error is additive over rows, so the result is never worse on the layer's
    own objective than any single candidate (Wanda is alpha = 0.5 with row grouping).

    Returns the keep mask and, per cluster, the chosen ``{"cluster", "rows", "alpha", "grouping"}``.
    """
    best_err = torch.full((weight.shape[0],), float("inf"))
    clusters = labels.unique().tolist()
    keep = torch.ones_like(weight, dtype=torch.bool)
    chosen: dict[int, dict] = {}
    for alpha in alphas:
        scores = energy_balanced(weight, energy, alpha)
        for name, fn in mask_fns.items():
            cand = fn(scores)
            err = row_output_error(weight, cand, gram).cpu()
            for c in clusters:
                rows = labels == c
                e = err[rows].sum()
                if e < best_err[rows].sum():
                    best_err[rows] = err[rows]
                    keep[rows.to(keep.device)] = cand[rows.to(cand.device)]
                    chosen[c] = {"cluster": c, "rows": int(rows.sum()), "alpha": alpha, "grouping": name}
    return keep, [chosen[c] for c in clusters]
