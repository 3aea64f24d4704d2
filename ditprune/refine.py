"""Error-guided mask search: improve a keep mask by swaps that lower the energy it removes from
the layer's output. Pure functions: tensors in, tensors out.

For output row i with weights w, the mask removes dW = w * (1 - m) and the calibration output
loses e_i = dW H dW^T (H = X X^T / N). With the residual g = H dW (one matmul for the layer):

    reviving a pruned q changes e by  w_q^2 H_qq - 2 w_q g_q
    pruning a kept p changes e by     w_p^2 H_pp + 2 w_p g_p

A *round* takes, in every row, the ``shortlist`` cheapest revivals and the ``shortlist``
cheapest prunings, then makes swaps among them one after another: each the (revival, pruning)
pair of the shortlist whose exact joint change (cross term included) is the most negative, taken
only if it is negative; the residual of the shortlisted weights is carried forward exactly (with
the shortlist's block of H), so the cross terms between the swaps of a round are all counted; a
row's round ends at its first step that would not lower its error. After the round, g is
updated exactly for the swaps made (a sparse product). Rows that made no swap drop out; rounds
stop after ``rounds``; a row also stops once a round lowers its error by less than ``min_gain``
of it (so rows never depend on each other, and the search can run on any block of rows).
Counts per row (and per group of M inputs for N:M, where a swap stays inside its group) never
change, and every accepted swap lowers its row's error, so the layer error only decreases. A
weight that is exactly zero is never revived (keeping a zero would only hide a pruning), so a
re-pruned sparse model ends with exactly the zeros its mask asks for, not more.

This is ours, in the spirit of DSnoT (Zhang et al., ICLR 2024), with exact second-order changes
and many swaps per row per round, so that it stays affordable at FLUX.1-dev's widths.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["row_output_error", "refine_mask"]

_INF = float("inf")
_SLICE = 256  # rows per pass over a round's full-width tensors (see _sliced)


def row_output_error(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """Per output row, the energy the mask removes from the layer's output on the calibration
    data: ||(W_i - (W*M)_i) X||^2 / N = dW_i H dW_i^T. Summed over rows: tr(dW H dW^T).
    ``residual``: dW @ H if the caller has it (the swap search keeps it), instead of the product."""
    dw = weight.float() * (~keep)
    return ((dw @ gram.float() if residual is None else residual) * dw).sum(1)


def _gather_block(hflat: torch.Tensor, S: torch.Tensor, n: int) -> torch.Tensor:
    """(R, L, L) blocks H[S_r, S_r] for every row's index list S_r (R, L)."""
    return hflat[(S * n).unsqueeze(2) + S.unsqueeze(1)]


@torch.no_grad()
def refine_mask(
    weight: torch.Tensor,
    keep: torch.Tensor,
    gram: torch.Tensor,
    rounds: int = 16,
    shortlist: int = 12,
    group: int | None = None,
    min_gain: float = 1e-3,
    chunk: int = 1024,
    residual: bool = False,
) -> tuple[torch.Tensor, dict] | tuple[torch.Tensor, dict, torch.Tensor]:
    """Swap search (see the module docstring) over blocks of ``chunk`` rows (rows are independent:
    a round's passes over full-width tensors go ``_SLICE`` rows at a time, so their working set
    stays in cache, and its sequential swaps, many small operations, run on the whole block; the
    result does not depend on either). Returns (keep mask, {"swaps", "rounds"}), rounds being
    the most any block used, and with ``residual`` the search's g = (W * ~keep) @ gram for the
    returned mask (float32; kept exactly through the swaps, so a least-squares refit of that
    mask can start from it instead of a product of its own)."""
    w = weight.float()
    h = gram.float().to(w.device)
    keep = keep.clone()
    g = torch.empty_like(w) if residual else None
    swaps = used_rounds = 0
    if rounds > 0 and shortlist > 0:
        # N:M: the search runs on slot-major columns, where every tensor of a round is (rows, slot,
        # group) as it lies; the first residual is taken in the layer's own order (the same bits)
        G = w.shape[1] // (group or 1)
        hs = h if group is None else h.view(G, group, G, group).permute(1, 0, 3, 2).contiguous().view(h.shape)
        hflat = hs.reshape(-1)
        dh = torch.diagonal(hs)
        for r0 in range(0, w.shape[0], chunk):
            sl = slice(r0, min(r0 + chunk, w.shape[0]))
            wc, kc = w[sl], keep[sl]
            gc = torch.empty_like(wc) if g is None else g[sl]
            for i in range(0, len(wc), _SLICE):  # a product's bits depend on its rows' count: fixed slices
                torch.mm(wc[i : i + _SLICE] * ~kc[i : i + _SLICE], h, out=gc[i : i + _SLICE])
            if group is not None:
                wc, kc, gc = (_slot_major(x, group) for x in (wc, kc, gc))
            n_sw, n_rd = _refine_rows(wc, kc, gc, hs, hflat, dh, rounds, shortlist, group, min_gain)
            if group is not None:
                _layer_order(keep[sl], kc, group)
                if g is not None:
                    _layer_order(g[sl], gc, group)
            swaps += n_sw
            used_rounds = max(used_rounds, n_rd)
    elif residual:
        torch.mm(w * ~keep, h, out=g)
    info = {"swaps": swaps, "rounds": used_rounds}
    return (keep, info, g) if residual else (keep, info)


def _refine_rows(w, keep, g, h, hflat, dh, rounds, shortlist, group, min_gain) -> tuple[int, int]:
    """Rounds of swaps on a block of rows; ``keep`` and the residual ``g`` = (W * ~keep) @ H are
    updated in place. N:M (``group``): the columns are slot-major (:func:`_slot_major`)."""
    out, n = w.shape
    s = w * w * dh  # w_j^2 H_jj, fixed
    error = row_output_error(w, keep, None, g)
    cross = None if group is None else _group_cross(w, h, group)  # fixed: the weights never change
    pairs = None if group is None else cross.new_empty(min(out, _SLICE) * cross[0].numel())  # one buffer, every round
    # barriers, added to a move's cost: 0 where a weight may be revived (pruned, not an exact zero)
    # or pruned (kept), inf elsewhere; an add is several times cheaper than a boolean select
    bar_rev = torch.zeros_like(w).masked_fill_(keep | (w == 0), _INF)
    bar_pru = torch.zeros_like(w).masked_fill_(~keep, _INF)
    active = torch.arange(out, device=w.device)
    swaps, done = 0, 0
    for done in range(1, rounds + 1):
        pick = (lambda t: t) if len(active) == out else (lambda t: t[active])
        wa, ga, sa, bars = pick(w), pick(g), pick(s), (pick(bar_rev), pick(bar_pru))
        if group is None:
            S, moved, delta, gain = _round_unstructured(wa, ga, sa, bars, hflat, n, shortlist)
        else:
            S, moved, delta, gain = _round_groups(wa, ga, sa, bars, pick(cross), pairs, hflat, n, shortlist, group)
        changed = moved.any(1)
        if not changed.any():
            break
        rc = changed.nonzero().squeeze(1)
        rows = active[rc]
        Sc, uc, dc = S[rc], moved[rc], delta[rc]
        L = S.shape[1] // 2
        at = rows.unsqueeze(1) * n + Sc
        revived, pruned = at[:, :L][uc[:, :L]], at[:, L:][uc[:, L:]]
        keep.view(-1)[revived], keep.view(-1)[pruned] = True, False
        bar_rev.view(-1)[revived], bar_pru.view(-1)[revived] = _INF, 0.0
        bar_pru.view(-1)[pruned] = _INF
        bar_rev.view(-1)[pruned] = torch.where(w.reshape(-1)[pruned] == 0, _INF, 0.0)  # a kept zero stays dead
        swaps += int(uc[:, :L].sum())
        nnz = uc.sum(1)
        crow = torch.cat([nnz.new_zeros(1), nnz.cumsum(0)])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all we use
            warnings.simplefilter("ignore", UserWarning)
            sparse = torch.sparse_csr_tensor(crow, Sc[uc], dc[uc], (len(rc), n), check_invariants=False)
        g.index_add_(0, rows, sparse @ h)
        gain = gain[rc]
        error[rows] += gain
        # a row that made no swap is at a local optimum of this search; one that gained less
        # than min_gain of its error is close to one
        active = rows[-gain > min_gain * error[rows].clamp_min(0)]
        if len(active) == 0:
            break
    return swaps, done


def _move_costs(wa, ga, sa, bars):
    """(revival costs, pruning costs, tolerance) of every weight of the rows: reviving j changes
    the row's error by s_j - 2 w_j g_j, pruning it by s_j + 2 w_j g_j; the barriers make a move
    that is not allowed infinite. A step must lower the row's error by more than the tolerance."""
    t = wa * ga
    tol = 1e-9 * t.abs().sum(1).clamp_min(1e-30)
    t.mul_(2)
    rev = (sa - t).add_(bars[0])
    return rev, t.add_(sa).add_(bars[1]), tol  # s + 2 w g, in t's storage


def _sliced(fn, *rows_first: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn`` on slices of ``_SLICE`` rows of the given tensors, its outputs concatenated."""
    R = rows_first[0].shape[0]
    if R <= _SLICE:
        return fn(*rows_first)
    parts = [fn(*(t[i : i + _SLICE] for t in rows_first)) for i in range(0, R, _SLICE)]
    return tuple(torch.cat(x) for x in zip(*parts))


def _cheapest(wa, ga, sa, bar_rev, bar_pru, k):
    """(cheapest revivals, cheapest prunings, tolerance) of each row."""
    rev, pru, tol = _move_costs(wa, ga, sa, (bar_rev, bar_pru))
    return rev.topk(k, 1, largest=False).indices, pru.topk(k, 1, largest=False).indices, tol


def _round_unstructured(wa, ga, sa, bars, hflat, n, shortlist):
    R = wa.shape[0]
    k = min(shortlist, wa.shape[1])
    qi, pi, tol = _sliced(lambda *t: _cheapest(*t, k), wa, ga, sa, *bars)
    S = torch.cat([qi, pi], 1)
    HS = _gather_block(hflat, S, n)
    wS, gl, sS = wa.gather(1, S), ga.gather(1, S), sa.gather(1, S)
    # a row with fewer than k pruned (or kept) weights fills its list with others: never candidates;
    # inf once a slot is barred or taken
    barred = torch.cat([bars[0].gather(1, qi), bars[1].gather(1, pi)], 1)
    cross = (2 * wS[:, :k]).unsqueeze(2) * wS[:, k:].unsqueeze(1) * HS[:, :k, k:]  # (R, q, p), fixed in a round
    steps = _Steps(wS, HS, tol)
    for _ in range(k):
        rev = (sS[:, :k] - 2 * wS[:, :k] * gl[:, :k]).add_(barred[:, :k])
        pru = (sS[:, k:] + 2 * wS[:, k:] * gl[:, k:]).add_(barred[:, k:])
        change, ij = (rev.unsqueeze(2) + pru.unsqueeze(1) - cross).view(R, k * k).min(1)  # the best pair, exact
        gl = steps.take(change, torch.stack([ij // k, k + ij % k], 1), barred, gl)
        if gl is None:
            break
    return S, steps.moved.bool(), steps.delta, steps.gain


class _Steps:
    """The bookkeeping of a round's sequential swaps over each row's shortlist S (R, L): which
    slots moved, their weight changes ``delta`` (the weight removed: +w pruned, -w revived) and
    the exact gain; a row stops at its first step that does not lower its error by ``tol``."""

    def __init__(self, wS: torch.Tensor, HS: torch.Tensor, tol: torch.Tensor):
        self.wS, self.HT, self.tol = wS, HS.transpose(1, 2), tol  # HT[r, j] = column j of row r's block
        self.delta, self.moved = torch.zeros_like(wS), torch.zeros_like(wS)
        self.live = torch.ones(wS.shape[0], dtype=torch.bool, device=wS.device)
        self.gain = torch.zeros(wS.shape[0], device=wS.device)
        self.sign = torch.tensor([-1.0, 1.0], device=wS.device)  # revive q, prune p

    def take(self, change: torch.Tensor, slots: torch.Tensor, barred: torch.Tensor, gl: torch.Tensor
             ) -> torch.Tensor | None:
        """Makes, in every live row whose ``change`` is below -tol, the swap of its (q, p) ``slots``
        (R, 2), bars both slots and returns the shortlist's residual after it,
        gl + H_S[:, q] d_q + H_S[:, p] d_p; None when no row moves."""
        ok = self.live & (change < -self.tol)  # an inf change (nothing left) is never taken
        if not ok.any():
            return None
        okf = ok.to(self.wS.dtype).unsqueeze(1)
        d = self.wS.gather(1, slots) * self.sign * okf  # zero in rows that do not move
        self.delta.scatter_add_(1, slots, d)
        self.moved.scatter_add_(1, slots, okf.expand(-1, 2))
        barred.scatter_add_(1, slots, torch.where(okf > 0, _INF, 0.0).expand(-1, 2))
        self.gain += torch.where(ok, change, 0.0)
        self.live &= ok
        cols = self.HT.gather(1, slots.unsqueeze(2).expand(-1, -1, self.HT.shape[2]))
        return gl + torch.bmm(d.unsqueeze(1), cols).squeeze(1)


def _slot_major(x: torch.Tensor, m: int) -> torch.Tensor:
    """(R, n) -> (R, n) copy with slot j of every group of m inputs together: column j * (n / m)
    + i is input i * m + j, so a row views as (m, n / m)."""
    return x.view(x.shape[0], -1, m).transpose(1, 2).contiguous().view(x.shape)


def _layer_order(out: torch.Tensor, x: torch.Tensor, m: int) -> None:
    """Writes slot-major ``x`` back into ``out`` in the layer's column order."""
    out.view(out.shape[0], -1, m).copy_(x.view(x.shape[0], m, -1).transpose(1, 2))


def _group_cross(w: torch.Tensor, h: torch.Tensor, m: int) -> torch.Tensor:
    """(R, m * m, G): 2 w_q w_p H_qp for every pair (q, p) of slots inside each of the G groups
    of m inputs (slot-major columns), the cross term of a move that revives q and prunes p
    (fixed through the search)."""
    R, n = w.shape
    G = n // m
    blocks = h.view(m, G, m, G).diagonal(dim1=1, dim2=3).contiguous()  # (m, m, G): H within each group
    wg = w.view(R, m, G)
    return (2 * wg).unsqueeze(2).mul(wg.unsqueeze(1)).mul_(blocks).view(R, m * m, G)


def _best_groups(wa, ga, sa, bar_rev, bar_pru, cross, pairs, m, k):
    """(costs, indices) of each row's k groups with the best moves, each one's best pair (q * m +
    p), and the tolerance: every (q, p) pair of a group with its exact cross term, one not
    (pruned, kept) inf."""
    R, n = wa.shape
    G = n // m
    rev, pru, tol = _move_costs(wa, ga, sa, (bar_rev, bar_pru))
    pair = torch.add(rev.view(R, m, 1, G), pru.view(R, 1, m, G), out=pairs[: R * m * m * G].view(R, m, m, G))
    pair = pair.view(R, m * m, G).sub_(cross)
    gv, gi = pair.amin(1).topk(k, 1, largest=False)
    # each one's best (q, p); argmin over the last, contiguous dim (over dim 1 it ran 4x slower)
    best = pair.gather(2, gi.unsqueeze(1).expand(R, m * m, k)).transpose(1, 2).contiguous().argmin(2)
    return gv, gi, best, tol


def _round_groups(wa, ga, sa, bars, cross, pairs, hflat, n, shortlist, m):
    """N:M on slot-major columns: a move revives q and prunes p inside one group of m inputs
    (``cross``: the pairs' cross terms, :func:`_group_cross`; ``pairs``: a buffer as large for
    ``_SLICE`` rows). Every group proposes its best move (exact pair change); the ``shortlist``
    best groups of each row are then taken one after another with exact cross terms between the
    moves."""
    G = n // m
    k = min(shortlist, G)
    gv, gi, best, tol = _sliced(lambda *t: _best_groups(*t, pairs, m, k), wa, ga, sa, *bars, cross)
    qi, pi = best // m * G + gi, best % m * G + gi  # slot-major columns
    S = torch.cat([qi, pi], 1)
    HS = _gather_block(hflat, S, n)
    wS, gl, sS = wa.gather(1, S), ga.gather(1, S), sa.gather(1, S)
    wq, wp = wS[:, :k], wS[:, k:]
    # the fixed part of each move's change; inf once it is taken (or where a group has no move)
    base = (sS[:, :k] + sS[:, k:] - 2 * wq * wp * HS[:, :k, k:].diagonal(dim1=1, dim2=2))
    base.masked_fill_(~torch.isfinite(gv), _INF)
    steps = _Steps(wS, HS, tol)
    barred = torch.zeros_like(wS)
    for _ in range(k):
        change, j = (base + 2 * (wp * gl[:, k:] - wq * gl[:, :k])).add_(barred[:, :k]).min(1)
        gl = steps.take(change, torch.stack([j, k + j], 1), barred, gl)
        if gl is None:
            break
    return S, steps.moved.bool(), steps.delta, steps.gain
