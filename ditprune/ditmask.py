"""The decisions of the ``dit`` method, as pure functions: tensors in, tensors out.

A *choice* is, per cluster of rows, the (alpha, grouping) whose mask is built for that cluster
(``{"cluster", "rows", "alpha", "grouping"}``, plus ``"fallback"`` where the cluster takes the
plain mask). A *grouping* is ``fn(scores, labels) -> keep`` over the rows it is given.

Every decision takes two Gram matrices: ``fit`` (what masks are searched and weights updated
on) and ``judge`` (what they are compared on). With enough tokens both are the layer's H; with
few tokens (see :mod:`ditprune.stats`) ``fit`` leaves out the held-out tokens and ``judge`` is
those tokens alone, so nothing is judged on the tokens it was fitted to.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import granularity as G
from .refine import row_output_error
from .saliency import energy_balanced, wanda
from .lsq import polish
from .sparsegpt import obs_prune

__all__ = ["groupings", "plain_mask", "choose", "build", "fall_back", "removed_rows", "reconstruct"]

Grouping = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Search = Callable[[torch.Tensor, torch.Tensor], object]  # (weight rows, keep) -> better keep, or (keep, its residual)


def groupings(sparsity: float, nm, granularity: str) -> dict[str, Grouping]:
    """The groupings a ``dit`` candidate may use: N:M; per row; or (layer, clusters) one pool per
    cluster, and for clusters also per row."""
    if nm is not None:
        return {"nm": lambda s, lab: G.nm_mask(s, *nm)}
    if granularity == "row":
        return {"row": lambda s, lab: G.row_mask(s, sparsity)}
    out = {"pooled": lambda s, lab: G.pooled_mask(s, lab, sparsity)}
    if granularity == "clusters":
        out["row"] = lambda s, lab: G.row_mask(s, sparsity)
    return out


def plain_mask(weight: torch.Tensor, energy: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """Wanda's mask: per row (N:M: per group), exactly what ``method="wanda"`` gives."""
    scores = wanda(weight, energy)
    return G.nm_mask(scores, *nm) if nm is not None else G.row_mask(scores, sparsity)


def build(weight: torch.Tensor, energy: torch.Tensor, labels: torch.Tensor, choice: list[dict],
          groups: dict[str, Grouping], plain: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The keep mask of ``weight``'s rows (any subset of a layer's rows, ``labels`` theirs): each
    cluster's rows masked with its chosen (alpha, grouping), pooled over the rows given, or the
    plain mask ``plain(weight_rows)`` where the choice says ``fallback``."""
    keep = torch.ones_like(weight, dtype=torch.bool)
    for c in choice:
        rows = (labels == c["cluster"]).to(weight.device)
        if not rows.any():
            continue
        if c.get("fallback"):
            keep[rows] = plain(weight[rows])
        else:
            scores = energy_balanced(weight[rows], energy, c["alpha"])
            keep[rows] = groups[c["grouping"]](scores, labels[rows.cpu()].to(weight.device))
    return keep


def choose(weight: torch.Tensor, energy: torch.Tensor, labels: torch.Tensor, alphas, groups: dict[str, Grouping],
           search: Search, judge: torch.Tensor) -> list[dict]:
    """Error-guided balance on the rows given: every (alpha, grouping) candidate is masked with
    ``energy``, improved by ``search`` and judged by the output energy it removes on ``judge``,
    tr(dW H dW^T); each cluster takes the candidate with the least error on its rows. A search
    may return (keep, g) with g = (W * ~keep) @ judge (the swap search's own residual, when it
    searched on ``judge``): the error is then read from g, without a product of its own."""
    clusters = labels.unique().tolist()
    best = {c: (float("inf"), alphas[0], next(iter(groups))) for c in clusters}
    lab = labels.to(weight.device)
    for alpha in alphas:
        scores = energy_balanced(weight, energy, alpha)
        for name, fn in groups.items():
            found = search(weight, fn(scores, lab))
            keep, g = found if isinstance(found, tuple) else (found, None)
            err = row_output_error(weight, keep, judge, g).cpu()
            for c in clusters:
                e = float(err[labels == c].sum())
                if e < best[c][0]:
                    best[c] = (e, alpha, name)
    return [{"cluster": c, "alpha": a, "grouping": g} for c, (_, a, g) in best.items()]


def fall_back(weight: torch.Tensor, searched: torch.Tensor, plain: torch.Tensor, labels: torch.Tensor,
              choice: list[dict], judge: torch.Tensor) -> None:
    """Marks ``fallback`` on every cluster whose ``searched`` mask does not remove less output
    energy on ``judge`` (the held-out tokens) than the ``plain`` mask, on the rows given."""
    mine = row_output_error(weight, searched, judge).cpu()
    theirs = row_output_error(weight, plain, judge).cpu()
    for c in choice:
        rows = labels == c["cluster"]
        if float(theirs[rows].sum()) <= float(mine[rows].sum()):
            c["fallback"] = "plain mask (held-out tokens)"


def removed_rows(weight: torch.Tensor, new_weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row, the output energy lost on ``gram``'s tokens when ``weight`` becomes ``new_weight * keep``."""
    d = weight.float() - new_weight.float() * keep
    return ((d @ gram.float()) * d).sum(1).cpu()


def _fits(weight, keep, gram, iters, nm, residual=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (weight, keep)}: the ``dit`` mask with its kept weights refitted by least squares
    (:func:`~ditprune.lsq.polish`, ``iters`` conjugate-gradient steps from ``weight * keep``)
    and, for N:M, SparseGPT's own N:M mask and OBS update (float64) refitted the same way: its
    mask, chosen while compensating, often suits a refit better than a mask chosen without one.
    ``residual``: the swap search's (W * ~keep) @ gram, if it has it (one product fewer)."""
    out = {"dit": (polish(weight, weight * keep, keep, gram, iters, residual=residual), keep)}
    if nm is not None:
        w, k, _ = obs_prune(weight, gram, 1 - nm[0] / nm[1], nm, dtype=torch.float64)
        out["sparsegpt"] = (polish(weight, w, k, gram, iters), k)
    return out


def reconstruct(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, iters: int, nm=None,
                held: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(keep mask, updated weight or None, info). The kept weights of ``keep`` are refitted by
    least squares on ``gram`` (see :func:`_fits`; for N:M, SparseGPT's mask and update is the
    other candidate and the one that loses less output energy wins per row, every row keeping
    the same count). With enough tokens a refit can only lower the output energy lost on
    ``gram``'s tokens. With few tokens, ``held`` = (row indices, their mask fitted without the
    held-out tokens, H of the fit tokens, H of the held-out tokens): the candidates, and no
    update at all, are fitted on those rows and fit tokens and judged per layer on the held-out
    tokens alone; the winner is then fitted again on all rows and all tokens. ``residual``:
    (W * ~keep) @ gram if the caller has it (see :func:`ditprune.refine.refine_mask`)."""
    if held is not None:
        rows, keep_rows, fit, judge = held
        w_rows = weight[rows.to(weight.device)]
        trial = {**_fits(w_rows, keep_rows, fit, iters, nm), "none": (w_rows, keep_rows)}
        best = min(trial, key=lambda k: float(removed_rows(w_rows, *trial[k], judge).sum()))
        if best == "none":
            return keep, None, {"reconstruct": "skipped: no gain on held-out tokens"}
        options = _fits(weight, keep, gram, iters, nm, residual)
        pick = torch.full((weight.shape[0],), list(options).index(best))
    else:
        options = _fits(weight, keep, gram, iters, nm, residual)
        pick = (torch.stack([removed_rows(weight, w, k, gram) for w, k in options.values()]).argmin(0)
                if len(options) > 1 else torch.zeros(weight.shape[0], dtype=torch.long))
    names = list(options)
    sel = pick.to(weight.device).unsqueeze(1)
    new_w, new_keep = options[names[0]]
    for i, k in enumerate(names[1:], 1):
        new_w = torch.where(sel == i, options[k][0], new_w)
        new_keep = torch.where(sel == i, options[k][1], new_keep)
    info = {"reconstruct": {k: int((pick == i).sum()) for i, k in enumerate(names) if (pick == i).any()}}
    return new_keep, new_w * new_keep, info
