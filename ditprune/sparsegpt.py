"""The OBS solver of SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): prune column by
column and update the not-yet-processed weights to compensate, with H = X X^T / N + lambda I,
lambda = 0.01 * mean(diag H), in blocks of 128 columns. Pure: tensors in, tensors out.

Mask choice follows the reference: within each block, the weights with the lowest
w^2 / [H^-1]_jj^2 are pruned (``pattern`` N:M: M - N per row in each M columns). One deviation:
the reference thresholds with ``<=`` (one extra weight per block, more with ties); here each block
prunes exactly its share, so the layer's sparsity is exact. With ``prune_mask`` given, that mask
is used as is and only the reconstruction runs (the ``dit`` method's OBS option).
"""

from __future__ import annotations

import torch

from .granularity import prune_count

__all__ = ["obs_prune"]


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    prune_mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (updated weight in ``weight``'s dtype, keep mask). Math runs in float32."""
    W = weight.detach().float().clone()
    H = gram.detach().float().clone().to(W.device)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    block_counts = _block_counts(rows, cols, blocksize, sparsity) if nm is None else None
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if prune_mask is not None:
            mask1 = prune_mask[:, i1:i2].to(W.device)
        elif nm is None:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            score = (W1.pow(2) / d.pow(2)).flatten()
            mask1.view(-1)[torch.sort(score, stable=True).indices[: block_counts[b]]] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and prune_mask is None and i % nm[1] == 0:
                tmp = W1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
                mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[pruned] = 0.0
    return W.to(weight.dtype), ~pruned


def _block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Per-block prune counts summing exactly to int(rows * cols * sparsity) (largest remainder)."""
    sizes = [rows * (min(i + blocksize, cols) - i) for i in range(0, cols, blocksize)]
    exact = [s * sparsity for s in sizes]
    counts = [int(e) for e in exact]
    short = prune_count(rows * cols, sparsity) - sum(counts)
    for j in sorted(range(len(sizes)), key=lambda j: counts[j] - exact[j])[:short]:
        counts[j] += 1
    return counts
