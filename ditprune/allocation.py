"""Sparsity per layer under one budget (pure functions): ``uniform``, ``owl`` and ``auto``.

Every allocation gives each targeted layer l of n_l weights a sparsity s_l in
``[s - r, s + r]`` (clipped to [0, 0.99]) with ``sum_l n_l s_l = s sum_l n_l``: the requested
fraction of zeros over all targeted weights (:func:`fit_budget` makes it exact).

- ``owl`` is OWL (Yin et al., ICML 2024, ``luuyin/OWL``): a layer's outlier ratio D_l is the
  fraction of its Wanda scores |W_ij| sqrt(a_j) above ``m`` times their mean; layers with more
  outliers keep more weights, ``s_l = s - (2 lam (D_l - min D) / (max D - min D) - mean)``. OWL
  allocates per LLM block and averages with equal weights; here it is per layer (the layers of
  a DiT block differ more than its blocks do), and the mean is weighed by layer size so that the
  budget holds.
- ``auto`` minimises the predicted relative error of the model's output, ``sum_l g_l e_l(s_l)``,
  under the budget. Measured on the calibration inputs: e_l(s), the fraction of layer l's output
  energy that per-row pruning removes at sparsity s, by the diagonal of its input statistics
  (:func:`removal_curve`: Wanda's scores, sorted, squared, summed), and g_l, how much of that
  relative error reaches the model's output (:mod:`ditprune.gains` prunes each layer alone with
  Wanda's mask at s on a few calibration batches spread over the timesteps and divides the
  relative change of the model's output by the fraction of the layer's output energy that mask
  removes, measured as the curve is: by the diagonal for Wanda's curve, on the Gram matrix
  (:func:`gram_removed`) for the curves below; ``gains="probes"``: the same ratio to first
  order, every layer at once from random probes of the output's gradient, :mod:`ditprune.probes`;
  ``gains="none"``: every g_l = 1). For a method that reconstructs (SparseGPT,
  ``dit`` with ``reconstruct=True``), which loses less than Wanda's curve and unequally across
  layers, e_l is what SparseGPT itself loses on sampled rows at a few sparsities in the range
  (:func:`sparsegpt_curve`, ``curve="sparsegpt"``, the default for those methods; ``"obs"``:
  each entry's Optimal Brain Surgeon cost alone, :func:`obs_curve`, measured worse at 80%).
  With gains measured at both ends of the range (``gain_sparsities=2``), a layer's cost is
  g_l(s) e_l(s), g log-linear between them (:func:`gained_curve`): a layer's error reaches the
  output more than in proportion as it grows, and unequally across layers.
  Assumed: the layers' errors add up at the output (no interaction), the curve's method stands
  for the one used (SparseGPT for ``dit`` with ``reconstruct=True``), and g_l measured with
  Wanda's mask at s holds over the range and for the method. The curves are convex in s, so
  the optimum equalises the marginal costs g_l e_l'(s_l) / n_l across layers (a Lagrange
  multiplier found by bisection).

With an N:M pattern every pruned layer keeps the pattern (what the kernels need); ``auto`` then
chooses which layers stay dense, within ``max_dense`` (a fraction of the allocated layers'
weights): :func:`nm_removed` measures e_l at the pattern (Wanda's N:M mask, by the diagonal),
the measured gains weigh it as above, and :func:`keep_dense` keeps the layers whose predicted
g_l e_l is largest per weight (greedy knapsack: the exact optimum when the budget is filled, as
it is for the many small layers of a DiT).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ALLOCATIONS", "bounds", "fit_budget", "whole_rows", "removal_curve", "obs_curve", "outlier_ratio", "owl",
           "auto", "value_at", "nm_removed", "keep_dense", "sampled_rows", "sparsegpt_curve", "gram_removed", "hull_curve", "gained_curve"]

ALLOCATIONS = ("uniform", "owl", "auto")
GRID = 100  # the removal curve's resolution: sparsity in steps of 0.01


def bounds(sparsity: float, spread: float) -> tuple[float, float]:
    """``[s - r, s + r]`` clipped to [0, 0.99]."""
    return max(0.0, sparsity - spread), min(0.99, sparsity + spread)


def fit_budget(wanted: Sequence[float], sizes: Sequence[int], sparsity: float, lo: float, hi: float) -> list[float]:
    """``wanted`` shifted by one constant and clipped to [lo, hi] so that the size-weighted mean
    is ``sparsity`` (bisection on the shift; exact to 1e-12 of the budget)."""
    total = float(sum(sizes))
    budget = sparsity * total

    def zeros(c: float) -> float:
        return sum(n * min(hi, max(lo, w + c)) for w, n in zip(wanted, sizes))

    a, b = -1.0 - max(wanted), 1.0 - min(wanted)
    for _ in range(200):
        c = (a + b) / 2
        if zeros(c) < budget:
            a = c
        else:
            b = c
    return [min(hi, max(lo, w + b)) for w in wanted]


def whole_rows(alloc: Sequence[float], shapes: Sequence[tuple[int, int]], sparsity: float, lo: float = 0.0,
               hi: float = 0.99) -> list[float]:
    """``alloc`` moved to sparsities k_l / in_l, which per-row pruning (``int(in * s)`` zeros in
    every row) realises exactly, inside [lo, hi] and as close to the budget as whole rows allow:
    each layer rounded down (not below ``lo``), then one more zero per row in the layers rounded
    down most while that brings the total nearer the budget and stays within ``hi``."""
    def clamp(k: int, n_in: int) -> int:
        return min(max(k, math.ceil(lo * n_in - 1e-9)), math.floor(hi * n_in + 1e-9))

    ks = [clamp(math.floor(a * n_in + 1e-9), n_in) for a, (_, n_in) in zip(alloc, shapes)]
    missing = sparsity * sum(o * i for o, i in shapes) - sum(o * k for k, (o, _) in zip(ks, shapes))
    order = sorted(range(len(ks)), key=lambda l: ks[l] - alloc[l] * shapes[l][1])  # most cut first
    for l in order:
        rows, n_in = shapes[l]
        if missing >= rows / 2 and clamp(ks[l] + 1, n_in) == ks[l] + 1:
            ks[l] += 1
            missing -= rows
    return [k / n_in for k, (_, n_in) in zip(ks, shapes)]


def removal_curve(weight: torch.Tensor, energy: torch.Tensor, grid: int = GRID, chunk: int = 1 << 20) -> torch.Tensor:
    """(grid + 1,) float64: e(k / grid), the fraction of the layer's output energy that removing
    the in * k / grid smallest Wanda scores of every row takes away (linear between whole counts),
    by the diagonal of the input statistics (``sum_ij a_j W_ij^2`` over the removed entries, over
    the same sum for all)."""
    out_f, in_f = weight.shape
    e = energy.float().to(weight.device)
    x = torch.tensor([in_f * k / grid for k in range(grid + 1)], dtype=torch.float64, device=weight.device)
    k0 = x.floor().long().clamp(max=in_f - 1)
    frac = x - k0
    removed = torch.zeros(grid + 1, dtype=torch.float64, device=weight.device)
    step = max(1, chunk // max(in_f, 1))
    for r in range(0, out_f, step):
        scores = (weight[r:r + step].float().pow(2) * e).sort(dim=1).values
        cum = torch.nn.functional.pad(scores.cumsum(1, dtype=torch.float64), (1, 0)).sum(0)
        removed += cum[k0] + frac * (cum[k0 + 1] - cum[k0])  # linear between whole counts: convex
    if removed[-1] <= 0:  # a zero layer or dead inputs: nothing to lose
        return torch.zeros(grid + 1, dtype=torch.float64)
    return (removed / removed[-1]).cpu()


def obs_curve(weight: torch.Tensor, gram: torch.Tensor, grid: int = GRID, percdamp: float = 0.01,
              chunk: int = 1 << 20) -> torch.Tensor:
    """(grid + 1,) float64: like :func:`removal_curve`, for a method that updates the kept weights
    (SparseGPT, ``dit`` with ``reconstruct=True``): each entry's Optimal Brain Surgeon cost
    ``W_ij^2 / [H^-1]_jj`` (the output energy lost when it is pruned and the rest of its row is
    updated optimally, one entry at a time) replaces Wanda's ``a_j W_ij^2``; the smallest are
    removed first in every row, over ``tr(W H W^T)``, capped at 1."""
    h = gram.double().to(weight.device)
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inv_diag = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
    out_f, in_f = weight.shape
    x = torch.tensor([in_f * k / grid for k in range(grid + 1)], dtype=torch.float64, device=weight.device)
    k0 = x.floor().long().clamp(max=in_f - 1)
    frac = x - k0
    removed = torch.zeros(grid + 1, dtype=torch.float64, device=weight.device)
    total = 0.0
    step = max(1, chunk // max(in_f, 1))
    for r in range(0, out_f, step):
        w = weight[r:r + step].double()
        total += float(((w @ h) * w).sum())
        cum = torch.nn.functional.pad((w.pow(2) / inv_diag).sort(dim=1).values.cumsum(1), (1, 0)).sum(0)
        removed += cum[k0] + frac * (cum[k0 + 1] - cum[k0])
    if total <= 0:
        return torch.zeros(grid + 1, dtype=torch.float64)
    return (removed / total).clamp(max=1.0).cpu()


def sampled_rows(weight: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """The indices of ``rows`` evenly spaced rows of ``weight`` (all of them if it has fewer): the
    rows :func:`sparsegpt_curve` and :func:`gram_removed` measure on."""
    out_f = weight.shape[0]
    return torch.linspace(0, out_f - 1, min(rows, out_f)).round().long().unique().to(weight.device)


def sparsegpt_curve(weight: torch.Tensor, gram: torch.Tensor, lo: float, hi: float, points: int = 8,
                    rows: int = 128, grid: int = GRID, percdamp: float = 0.01,
                    dtype: torch.dtype = torch.float32, judge: torch.Tensor | None = None) -> torch.Tensor:
    """(grid + 1,) float64: like :func:`removal_curve`, for a method that updates the kept weights,
    measured rather than modelled: SparseGPT (:func:`ditprune.sparsegpt.obs_prune`, its own
    mask and sequential update) prunes ``rows`` evenly spaced rows at ``points + 1`` sparsities
    spread over [lo, hi] (and 0), and the fraction of those rows' output energy it loses,
    ``tr(D H D^T) / tr(W H W^T)``, is taken at each; the curve is the lower convex hull of
    those points, linear between them (convex, as :func:`auto` assumes) and extended linearly
    beyond them. The sparsities run as row groups of one ``obs_prune`` call (one Cholesky
    factorisation of H and one column pass for all), in ``dtype`` as SparseGPT itself
    (float32: at 12288 inputs float64 doubled the factorisation's time). ``judge``: the Gram
    matrix of held-out tokens on which the loss is measured (SparseGPT fitted on ``gram``, the
    other tokens): with fewer tokens than inputs, as FLUX.1-dev's adaLN layers see, a fit
    judged on its own tokens loses nearly nothing and the curve would call the layer free."""
    from .sparsegpt import obs_prune

    idx = sampled_rows(weight, rows)
    w = weight[idx].to(dtype)
    h = gram.to(dtype=dtype, device=weight.device)
    j = h if judge is None else judge.to(dtype=dtype, device=weight.device)
    energy = lambda m: ((m @ j) * m).sum(1, dtype=torch.float64)  # noqa: E731 (per row, on the judging tokens)
    total = float(energy(w).sum())
    if total <= 0:
        return torch.zeros(grid + 1, dtype=torch.float64)
    xs = sorted({0.0, *(lo + (hi - lo) * k / points for k in range(points + 1))})
    new, keep, _ = obs_prune(w.repeat(len(xs) - 1, 1), h, xs[1:], percdamp=percdamp, dtype=dtype)
    lost = energy(w.repeat(len(xs) - 1, 1) - new * keep).view(len(xs) - 1, -1).sum(1)
    ys = [0.0] + [min(1.0, float(v) / total) for v in lost]
    return hull_curve(xs, ys, grid)


def gram_removed(weight: torch.Tensor, gram: torch.Tensor, energy: torch.Tensor, sparsity: float,
                 rows: int = 128) -> float:
    """The fraction of the layer's output energy that Wanda's per-row mask at ``sparsity`` removes,
    on the Gram matrix (``tr(D H D^T) / tr(W H W^T)``, D the pruned entries) rather than its
    diagonal, on the ``rows`` evenly spaced rows :func:`sparsegpt_curve` samples: the denominator
    of a measured gain that multiplies a curve measured on the Gram matrix. The diagonal leaves
    out the inputs' correlations and misjudges layers unequally (0.2-1.0 of it on the reference
    models' layers at 70%)."""
    from .granularity import row_mask
    from .saliency import wanda

    idx = sampled_rows(weight, rows)
    w = weight[idx].float()
    h = gram.to(dtype=torch.float32, device=weight.device)  # no copy of a float32 Gram matrix (1 GB at 15360 inputs)
    d = w * ~row_mask(wanda(weight[idx], energy.to(weight.device)), sparsity)
    total = float(((w @ h) * w).sum(dtype=torch.float64))
    return float(((d @ h) * d).sum(dtype=torch.float64)) / total if total > 0 else 0.0


def hull_curve(xs: Sequence[float], ys: Sequence[float], grid: int = GRID, top: float | None = 1.0) -> torch.Tensor:
    """(grid + 1,) float64 on sparsities k / grid: the lower convex hull of the points (xs
    ascending from 0), linear between its vertices and extended linearly beyond them, clipped
    to [0, ``top``] (convex, as :func:`auto` assumes)."""
    hull = [0]  # Andrew's monotone chain, lower part
    for j in range(1, len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[j] - xs[a]) >= (ys[j] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()  # b lies on or above the segment a-j
            else:
                break
        hull.append(j)
    if len(hull) < 2:
        return torch.zeros(grid + 1, dtype=torch.float64)
    hx = torch.tensor([xs[j] for j in hull], dtype=torch.float64)
    hy = torch.tensor([ys[j] for j in hull], dtype=torch.float64)
    g = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    seg = (torch.searchsorted(hx, g, right=True) - 1).clamp(0, len(hx) - 2)
    slope = (hy[seg + 1] - hy[seg]) / (hx[seg + 1] - hx[seg])
    return (hy[seg] + slope * (g - hx[seg])).clamp(0.0, top)


def gained_curve(curve: torch.Tensor, lo: float, g_lo: float, hi: float, g_hi: float) -> torch.Tensor:
    """(grid + 1,) float64: g(s) e(s), the layer's predicted error at the model's output, for
    gains measured at two sparsities (``g_lo`` at ``lo``, ``g_hi`` at ``hi``): g log-linear in
    s through them (linear where one is 0), extended beyond them, times the removal curve
    ``curve``; its lower convex hull, as :func:`auto` needs (no longer a fraction: not clipped
    at 1). A layer's error reaches the output more than in proportion as it grows, and unequally
    across layers, so one gain measured at the target sparsity misprices the range's ends."""
    grid = len(curve) - 1
    x = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    t = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if g_lo > 0 and g_hi > 0:
        g = g_lo * torch.exp(t * (math.log(g_hi) - math.log(g_lo)))
    else:
        g = (g_lo + t * (g_hi - g_lo)).clamp(min=0.0)
    return hull_curve(x.tolist(), (g * curve.double()).tolist(), grid, top=None)


def outlier_ratio(weight: torch.Tensor, energy: torch.Tensor, m: float = 5.0) -> float:
    """OWL's D: the fraction of Wanda scores |W_ij| sqrt(a_j) above ``m`` times their mean."""
    scores = weight.float().abs() * energy.float().to(weight.device).sqrt()
    return float((scores > m * scores.mean()).float().mean())


def owl(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, spread: float, lam: float = 0.08) -> list[float]:
    """OWL's sparsities from the outlier ratios (see the module docstring), within
    :func:`bounds` and on budget."""
    lo, hi = bounds(sparsity, spread)
    d_min, d_max = min(ratios), max(ratios)
    if d_max - d_min <= 0:
        return fit_budget([sparsity] * len(ratios), sizes, sparsity, lo, hi)
    boost = [2 * lam * (d - d_min) / (d_max - d_min) for d in ratios]
    mean = sum(b * n for b, n in zip(boost, sizes)) / sum(sizes)
    return fit_budget([sparsity - (b - mean) for b in boost], sizes, sparsity, lo, hi)


def value_at(curve: torch.Tensor, s: float) -> float:
    """The curve at sparsity ``s``, linear between its grid points."""
    x = s * (len(curve) - 1)
    i = min(int(math.floor(x)), len(curve) - 2)
    return float(curve[i] + (x - i) * (curve[i + 1] - curve[i]))


def auto(curves: Sequence[torch.Tensor], sizes: Sequence[int], sparsity: float, spread: float,
         gains: Sequence[float] | None = None) -> tuple[list[float], list[float]]:
    """(sparsities, predicted e_l(s_l)) minimising ``sum_l g_l e_l(s_l)`` on budget within
    :func:`bounds`. Each layer takes the sparsity where its marginal cost per weight,
    g_l e_l'(s) / n_l, reaches a common multiplier lambda; lambda is bisected until the budget
    is met, and the last layers at the margin share the remainder (linear between the two
    allocations that bracket the budget)."""
    lo, hi = bounds(sparsity, spread)
    gains = list(gains) if gains is not None else [1.0] * len(curves)
    grid = len(curves[0]) - 1
    levels = [k / grid for k in range(grid + 1) if lo - 1e-12 <= k / grid <= hi + 1e-12] or [lo]
    # marginal cost of moving from one level to the next, per weight; convex curves: non-decreasing
    slopes = []
    for c, n, g in zip(curves, sizes, gains):
        vals = [g * value_at(c, s) for s in levels]
        slopes.append([(vals[i + 1] - vals[i]) / ((levels[i + 1] - levels[i]) * n) for i in range(len(levels) - 1)])

    def pick(lam: float) -> list[float]:
        out = []
        for sl in slopes:
            j = 0
            while j < len(sl) and sl[j] <= lam:  # take every step that costs at most lambda
                j += 1
            out.append(levels[j])
        return out

    def zeros(alloc):
        return sum(a * n for a, n in zip(alloc, sizes))

    budget = sparsity * sum(sizes)
    low, high = 0.0, max((max(sl) for sl in slopes if sl), default=0.0) + 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if zeros(pick(mid)) < budget:
            low = mid
        else:
            high = mid
    under, over = pick(low), pick(high)
    z_under, z_over = zeros(under), zeros(over)
    t = 0.0 if z_over == z_under else (budget - z_under) / (z_over - z_under)
    alloc = [u + t * (o - u) for u, o in zip(under, over)]
    alloc = fit_budget(alloc, sizes, sparsity, lo, hi)  # rounding of the blend: exact budget
    return alloc, [value_at(c, s) for c, s in zip(curves, alloc)]


def nm_removed(weight: torch.Tensor, energy: torch.Tensor, n: int, m: int, chunk: int = 1 << 20) -> float:
    """The fraction of the layer's output energy that Wanda's N:M mask removes, by the diagonal
    of the input statistics (``sum_ij a_j W_ij^2`` over the pruned entries, over the same sum for
    all; 0 for a zero layer)."""
    out_f, in_f = weight.shape
    e = energy.float().to(weight.device)
    removed = total = 0.0
    step = max(1, chunk // max(in_f, 1))
    for r in range(0, out_f, step):
        scores = weight[r:r + step].float().pow(2) * e  # Wanda's score squared: the same order
        pruned = scores.reshape(-1, in_f // m, m).sort(dim=2).values[..., : m - n]
        removed += float(pruned.sum(dtype=torch.float64))
        total += float(scores.sum(dtype=torch.float64))
    return removed / total if total > 0 else 0.0


def keep_dense(costs: Sequence[float], sizes: Sequence[int], max_dense: float) -> list[bool]:
    """Which layers stay dense: the largest ``costs`` (predicted output error the layer would
    add if pruned) per weight first, each taken while the dense weights stay within
    ``max_dense`` of ``sum(sizes)`` (a layer too large for what is left is skipped, smaller ones
    after it may still fit). Layers that cost nothing stay pruned."""
    budget = max_dense * sum(sizes)
    dense = [False] * len(costs)
    used = 0
    for l in sorted(range(len(costs)), key=lambda l: (-costs[l] / max(sizes[l], 1), l)):
        if costs[l] > 0 and used + sizes[l] <= budget + 1e-9:
            dense[l] = True
            used += sizes[l]
    return dense
