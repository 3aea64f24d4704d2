"""Saliency metrics: score(W, statistics) -> tensor shaped like W. Pure functions.

Notation: W is (out, in); ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j
over N calibration tokens; ``gram`` is H = X X^T / N. Higher score = more worth keeping.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["magnitude", "wanda", "ria", "energy_balanced", "row_output_error", "balanced_mask", "refine_mask"]

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


@torch.no_grad()
def refine_mask(
    weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, max_swaps: int = 64, group: int | None = None,
    damp: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Energy-guided swaps: in every row, revive the pruned weight and prune the kept weight whose
    exchange lowers the row's removed output energy dW_i H dW_i^T the most, while any exchange
    lowers it (at most ``max_swaps`` per row). Counts per row (and per ``group`` of consecutive
    inputs, for N:M) never change, and the layer error only decreases. A training-free mask
    update in the spirit of DSnoT (Zhang et al., ICLR 2024), with the exact quadratic change:

        e' - e = 2 w_p g_p + w_p^2 H_pp - 2 w_q g_q + w_q^2 H_qq - 2 w_p w_q H_pq,  g = H dW_i^T

    for pruning kept weight p and reviving pruned weight q. ``damp`` adds damp * mean(diag H) to
    the diagonal of H (as SparseGPT dampens), so that swaps cannot exploit directions the
    calibration data never visited. Returns (keep mask, swaps made)."""
    w, h = weight.float(), gram.float().to(weight.device)
    if damp:
        h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], device=h.device)
    keep = keep.clone()
    g = (w * ~keep) @ h
    dh = torch.diagonal(h)
    rows = torch.arange(w.shape[0], device=w.device)
    cols = torch.arange(w.shape[1], device=w.device)
    swaps = 0
    inf = float("inf")
    for _ in range(max_swaps):
        revive = (w * w * dh - 2 * w * g).masked_fill(keep, inf)  # change in e from reviving q alone
        prune = (w * w * dh + 2 * w * g).masked_fill(~keep, inf)  # change in e from pruning p alone
        if group is not None:
            same = lambda j: cols.unsqueeze(0) // group == (j // group).unsqueeze(1)  # noqa: E731
        # two candidate exchanges per row, each exact with the cross term: the best revival with
        # its best partner, and the best pruning with its best partner
        q1 = revive.argmin(1)
        cross = 2 * w * w[rows, q1].unsqueeze(1) * h[q1]
        partner = prune - cross if group is None else (prune - cross).masked_fill(~same(q1), inf)
        p1 = partner.argmin(1)
        d1 = revive[rows, q1] + partner[rows, p1]
        p2 = prune.argmin(1)
        cross = 2 * w * w[rows, p2].unsqueeze(1) * h[p2]
        partner = revive - cross if group is None else (revive - cross).masked_fill(~same(p2), inf)
        q2 = partner.argmin(1)
        d2 = prune[rows, p2] + partner[rows, q2]
        second = d2 < d1
        p, q, delta = torch.where(second, p2, p1), torch.where(second, q2, q1), torch.minimum(d1, d2)
        scale = (w * g).abs().sum(1).clamp_min(1e-30)
        act = torch.isfinite(delta) & (delta < -1e-9 * scale)
        if not act.any():
            break
        r, pa, qa = rows[act], p[act], q[act]
        keep[r, pa] = False
        keep[r, qa] = True
        g[r] += w[r, pa].unsqueeze(1) * h[pa] - w[r, qa].unsqueeze(1) * h[qa]
        swaps += int(act.sum())
    return keep, swaps
