"""The OBS solver of SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): prune column by
column and update the not-yet-processed weights to compensate, with H = X X^T / N + lambda I,
lambda = 0.01 * mean(diag H), in blocks of 128 columns. Pure: tensors in, tensors out.

Mask choice follows the reference: within each block, the weights with the lowest
w^2 / [H^-1]_jj^2 are pruned (``pattern`` N:M: M - N per row in each M columns). One deviation:
the reference thresholds with ``<=`` (one extra weight per block, more with ties); here each block
prunes exactly its share, so the layer's sparsity is exact. With ``prune_mask`` given, that mask
is used as is and only the reconstruction runs (the ``dit`` method's OBS option).

As in the reference, input channels that were zero throughout calibration (diag H = 0) have
their weights set to zero: those zeros are part of the returned mask, so reports count them.
With N:M the blocks are a multiple of M wide, so groups always start at a multiple of M of the
layer's columns. If H + lambda I is not positive definite (numerically), lambda is raised
tenfold until it is, and the retry is logged.
"""

from __future__ import annotations

import logging

import torch

from .granularity import prune_count

__all__ = ["obs_prune", "inverse_cholesky"]

log = logging.getLogger(__name__)


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, tries: int = 6) -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + lambda I)^-1, the percdamp used), lambda = percdamp * mean(diag H);
    on failure percdamp is multiplied by 10, up to ``tries`` times."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    for attempt in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if attempt:
                    log.warning("Cholesky of H failed with percdamp=%g; succeeded with percdamp=%g", percdamp, damp)
                return U, damp
        damp *= 10
    raise RuntimeError(f"H + lambda I is not positive definite even with percdamp={damp / 10:g}: the calibration "
                       "statistics are degenerate (check for constant or duplicated inputs)")


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | list[float] = 0.0,
    nm: tuple[int, int] | None = None,
    prune_mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (updated weight in ``weight``'s dtype, keep mask, percdamp used). Math runs in
    ``dtype``: float32 as the reference (``method="sparsegpt"``); the ``dit`` reconstruction asks
    float64, so that summation-order noise in H (several processes) does not move the weights.
    ``sparsity`` a list of G values: the rows form G equal consecutive groups, each pruned at its
    own sparsity as if by its own call (one column pass instead of G)."""
    W = weight.detach().to(dtype).clone()
    H = gram.detach().to(dtype=dtype, device=W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    rows, cols = W.shape
    Hinv, percdamp = inverse_cholesky(H, percdamp)
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])  # N:M groups never straddle two blocks

    pruned = torch.zeros_like(W, dtype=torch.bool)
    groups = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity]
    if rows % len(groups):
        raise ValueError(f"{rows} rows do not split into {len(groups)} equal groups")
    counts = (torch.tensor([_block_counts(rows // len(groups), cols, blocksize, s) for s in groups]).to(W.device)
              if nm is None else None)  # (groups, blocks)
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
            score = (W1.pow(2) / d.pow(2)).view(len(groups), -1)  # each group's lowest scores of the block
            take = torch.arange(score.shape[1], device=W.device) < counts[:, b : b + 1]
            mask1.view(len(groups), -1).scatter_(1, torch.sort(score, dim=1, stable=True).indices, take)
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
    pruned[:, dead] = True
    W[pruned] = 0.0
    return W.to(weight.dtype), ~pruned, percdamp


def _block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Per-block prune counts summing exactly to int(rows * cols * sparsity) (largest remainder)."""
    sizes = [rows * (min(i + blocksize, cols) - i) for i in range(0, cols, blocksize)]
    exact = [s * sparsity for s in sizes]
    counts = [int(e) for e in exact]
    short = prune_count(rows * cols, sparsity) - sum(counts)
    for j in sorted(range(len(sizes)), key=lambda j: counts[j] - exact[j])[:short]:
        counts[j] += 1
    return counts
