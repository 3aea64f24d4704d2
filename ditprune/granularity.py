"""Comparison groups: which weights compete for survival. Pure functions on score tensors.

Every function takes scores ``S`` shaped like a weight (out, in) and returns a boolean *keep*
mask of the same shape (True = kept). Low scores are pruned; ties break by position (stable
sort), as in the Wanda reference.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from .errors import InputError

__all__ = [
    "parse_pattern",
    "check_sparsity",
    "prune_count",
    "layer_mask",
    "row_mask",
    "nm_mask",
    "pooled_mask",
    "row_features",
    "cluster_rows",
]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise InputError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise InputError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")
    return float(sparsity)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M): keep at most N non-zeros in every M consecutive input weights (2:4 = 50%)."""
    match = _PATTERN.match(str(pattern))
    if not match:
        raise InputError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise InputError(f"pattern {pattern!r}: need 0 < N < M (N weights kept out of every M)")
    return n, m


def prune_count(size: int, sparsity: float) -> int:
    """Weights pruned from a group of ``size``: ``int(size * sparsity)``, as the Wanda reference."""
    return int(size * sparsity)


CHUNK = 1 << 20  # entries whose temporaries exist at once when rows are masked independently


def _prune_lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep mask over the last dim of ``scores``: the ``n_prune`` lowest of each row are pruned,
    ties broken by position (what a stable sort gives), in linear time: the n-th lowest value is
    found by ``kthvalue``, then the first tied entries fill the count. Rows (the first dim) are
    independent and go by chunks of about :data:`CHUNK` entries, so the temporaries stay small
    beside a FLUX-sized layer."""
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= scores.shape[-1]:
        return torch.zeros_like(scores, dtype=torch.bool)
    step = max(1, CHUNK // max(1, scores[0].numel()))
    if scores.shape[0] > step:
        keep = torch.empty_like(scores, dtype=torch.bool)
        for i in range(0, scores.shape[0], step):
            keep[i : i + step] = _lowest(scores[i : i + step], n_prune)
        return keep
    return _lowest(scores, n_prune)


_LONG = 1 << 18  # a row this long (a pooled or layer-wide group) has its threshold bracketed first
_SAMPLE = 1 << 14


def _kth_lowest(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th lowest value (1-based) of the 1-D ``s``, exactly ``s.kthvalue(k)``'s value. A long
    ``s`` is bracketed first by a seeded sample of its entries (six standard deviations of the
    sample's rank either side), so the exact selection runs on the few entries inside the
    bracket; where the bracket misses (the counts say so), a full ``kthvalue``."""
    n = s.numel()
    if n < _LONG:
        return s.kthvalue(k).values
    idx = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(s.device)
    sample = s[idx].sort().values
    at, margin = (k - 1) * _SAMPLE // n, 3 * math.isqrt(_SAMPLE)  # rank sd <= sqrt(sample) / 2
    lo, hi = sample[max(0, at - margin)], sample[min(_SAMPLE - 1, at + margin)]
    below = int(torch.count_nonzero(s < lo))
    band = s[(s >= lo) & (s <= hi)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return s.kthvalue(k).values


def _lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    s = scores.float()
    if s.dim() == 2 and s.shape[0] == 1:  # one pool (a cluster's rows or the whole layer)
        thr = _kth_lowest(s[0], n_prune).view(1, 1)
    else:
        thr = s.kthvalue(n_prune, dim=-1, keepdim=True).values
    keep = s > thr
    if bool((torch.count_nonzero(keep, dim=-1) == s.shape[-1] - n_prune).all()):  # no surplus tie: the usual case
        return keep
    tie = s == thr  # keep the ties after the first ``need`` of each row
    need = n_prune - torch.count_nonzero(s < thr, dim=-1).unsqueeze(-1)
    return keep | (tie & (tie.cumsum(-1) > need))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """All weights of the layer compete in one pool."""
    return _prune_lowest(scores.reshape(1, -1), prune_count(scores.numel(), sparsity)).reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row keeps the same count (the Wanda comparison group)."""
    return _prune_lowest(scores, prune_count(scores.shape[1], sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in each row, every M consecutive inputs keep their N best (M - N pruned)."""
    out, cols = scores.shape
    if cols % m:
        raise InputError(f"pattern {n}:{m} does not divide a layer with {cols} input features")
    return _prune_lowest(scores.reshape(out, cols // m, m), m - n).reshape(out, cols)


def pooled_mask(scores: torch.Tensor, labels: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Rows sharing a label compete in one pool; each cluster prunes exactly what its rows would
    prune row by row (``rows_in_cluster * int(in * sparsity)``), so the layer total equals the
    per-row total while sparsity may differ row to row inside a cluster."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    per_row = prune_count(scores.shape[1], sparsity)
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        keep[rows] = _prune_lowest(scores[rows].reshape(1, -1), per_row * rows.numel()).reshape(len(rows), -1)
    return keep


def row_features(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """2-D features of each output row: log row energy ||W_i||^2 and log of the energy the row
    draws from its inputs per unit weight energy, sum_j W_ij^2 a_j / ||W_i||^2. Both are log
    energies (the same unit), so they are centred and scaled by one common factor: a feature that
    barely varies is not blown up to the weight of one that separates the rows."""
    w2 = weight.float().pow(2)
    row_w = w2.sum(1)
    row_out = w2 @ energy.float()
    eps = torch.finfo(torch.float32).tiny
    f = torch.stack([torch.log(row_w + eps), torch.log(row_out + eps) - torch.log(row_w + eps)], 1)
    f = f - f.mean(0)
    scale = f.pow(2).mean().sqrt()
    return f / scale if scale > 1e-6 else f


def cluster_rows(
    features: torch.Tensor, max_clusters: int = 6, seed: int = 0, min_silhouette: float = 0.6
) -> torch.Tensor:
    """Seeded k-means on row features, k in 2..max_clusters chosen by the silhouette score; k = 1
    (no split) unless the best silhouette reaches ``min_silhouette`` (0.5-0.7 reads as "reasonable"
    structure, above 0.7 "strong", in Kaufman & Rousseeuw's scale). Returns labels (long, (out,))."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = features.detach().cpu().double().numpy()
    n = x.shape[0]
    best_score, best = min_silhouette, np.zeros(n, dtype=np.int64)
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=2, random_state=seed).fit(x).labels_
        if len(np.unique(labels)) < 2:
            continue
        score = silhouette_score(x, labels, sample_size=min(n, 1000), random_state=seed)
        if score > best_score:
            best_score, best = score, labels.astype(np.int64)
    return torch.from_numpy(best)
