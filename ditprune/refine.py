"""Error-guided mask search: improve a keep mask by swaps that lower the energy it removes from
the layer's output. Pure functions: tensors in, tensors out.

For output row i with weights w, the mask removes dW = w * (1 - m) and the calibration output
loses e_i = dW H dW^T (H = X X^T / N). With the residual g = H dW (one matmul for the layer):

    reviving a pruned q changes e by  w_q^2 H_qq - 2 w_q g_q
    pruning a kept p changes e by     w_p^2 H_pp + 2 w_p g_p

A *round* takes, in every row, the ``shortlist`` cheapest revivals and the ``shortlist``
cheapest prunings, then makes swaps among them one after another: revive the best candidate,
prune the best candidate given that revival, keep the pair only if their exact joint change is
negative, and carry the residual of the shortlisted weights forward exactly (with the shortlist's
block of H), so the cross terms between the swaps of a round are all counted. After the round, g
is updated exactly for the swaps made (a sparse product). Rows that made no swap drop out; rounds
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


def row_output_error(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per output row, the energy the mask removes from the layer's output on the calibration
    data: ||(W_i - (W*M)_i) X||^2 / N = dW_i H dW_i^T. Summed over rows: tr(dW H dW^T)."""
    dw = weight.float() * (~keep)
    return ((dw @ gram.float()) * dw).sum(1)


def _gather_block(hflat: torch.Tensor, S: torch.Tensor, n: int) -> torch.Tensor:
    """(R, L, L) blocks H[S_r, S_r] for every row's index list S_r (R, L)."""
    return hflat[(S * n).unsqueeze(2) + S.unsqueeze(1)]


def _columns(HS: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(R, L): column idx_r of each row's block."""
    return torch.gather(HS, 2, idx.view(-1, 1, 1).expand(HS.shape[0], HS.shape[1], 1)).squeeze(2)


@torch.no_grad()
def refine_mask(
    weight: torch.Tensor,
    keep: torch.Tensor,
    gram: torch.Tensor,
    rounds: int = 16,
    shortlist: int = 12,
    group: int | None = None,
    min_gain: float = 1e-3,
    chunk: int = 256,
) -> tuple[torch.Tensor, dict]:
    """Swap search (see the module docstring) over blocks of ``chunk`` rows (rows are independent;
    a block's working set stays in cache). Returns (keep mask, {"swaps", "rounds"}), rounds being
    the most any block used."""
    w = weight.float()
    h = gram.float().to(w.device)
    keep = keep.clone()
    if rounds <= 0 or shortlist <= 0:
        return keep, {"swaps": 0, "rounds": 0}
    hflat = h.reshape(-1)
    dh = torch.diagonal(h)
    swaps = used_rounds = 0
    for r0 in range(0, w.shape[0], chunk):
        sl = slice(r0, min(r0 + chunk, w.shape[0]))
        n_sw, n_rd = _refine_rows(w[sl], keep[sl], h, hflat, dh, rounds, shortlist, group, min_gain)
        swaps += n_sw
        used_rounds = max(used_rounds, n_rd)
    return keep, {"swaps": swaps, "rounds": used_rounds}


def _refine_rows(w, keep, h, hflat, dh, rounds, shortlist, group, min_gain) -> tuple[int, int]:
    """Rounds of swaps on a block of rows; ``keep`` (a view) is updated in place."""
    out, n = w.shape
    s = w * w * dh  # w_j^2 H_jj, fixed
    g = (w * ~keep) @ h
    error = (g * (w * ~keep)).sum(1)  # per row
    active = torch.arange(out, device=w.device)
    swaps, done = 0, 0
    for done in range(1, rounds + 1):
        full = len(active) == out
        pick = (lambda t: t) if full else (lambda t: t[active])
        wa, ka, ga, sa = pick(w), pick(keep), pick(g), pick(s)
        if group is None:
            S, moved, delta, gain = _round_unstructured(wa, ka, ga, sa, hflat, n, shortlist)
        else:
            S, moved, delta, gain = _round_groups(wa, ka, ga, sa, h, hflat, n, shortlist, group)
        changed = moved.any(1)
        if not changed.any():
            break
        rc = changed.nonzero().squeeze(1)
        rows = active[rc]
        Sc, uc, dc = S[rc], moved[rc], delta[rc]
        L = S.shape[1] // 2
        flat = keep.view(-1)
        at = rows.unsqueeze(1) * n + Sc
        flat[at[:, :L][uc[:, :L]]] = True  # revived
        flat[at[:, L:][uc[:, L:]]] = False  # pruned
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


def _round_unstructured(wa, ka, ga, sa, hflat, n, shortlist, pairs=16):
    R = wa.shape[0]
    k = min(shortlist, wa.shape[1])
    t = wa * ga
    t.mul_(2)
    qi = torch.where(ka | (wa == 0), _INF, sa - t).topk(k, 1, largest=False).indices  # cheapest revivals
    pi = torch.where(ka, sa + t, _INF).topk(k, 1, largest=False).indices  # cheapest prunings
    del t
    S = torch.cat([qi, pi], 1)
    HS = _gather_block(hflat, S, n)
    wS, gl, sS = wa.gather(1, S), ga.gather(1, S), sa.gather(1, S)
    delta = torch.zeros_like(wS)
    # a row with fewer than k pruned (or kept) weights fills its list with others: never candidates
    used = torch.cat([ka.gather(1, qi) | (wa.gather(1, qi) == 0), ~ka.gather(1, pi)], 1)
    moved = torch.zeros_like(used)
    live = torch.ones(R, dtype=torch.bool, device=wa.device)
    tol = 1e-9 * (wa * ga).abs().sum(1).clamp_min(1e-30)
    rr = torch.arange(R, device=wa.device)
    P = min(pairs, k)
    gain = torch.zeros(R, device=wa.device)
    for _ in range(k):
        rev = (sS[:, :k] - 2 * wS[:, :k] * gl[:, :k]).masked_fill(used[:, :k], _INF)
        pru = (sS[:, k:] + 2 * wS[:, k:] * gl[:, k:]).masked_fill(used[:, k:], _INF)
        rv, a = rev.topk(P, 1, largest=False)  # the P cheapest revivals and prunings right now
        pv, b = pru.topk(P, 1, largest=False)
        hab = torch.gather(HS[:, :k, k:], 1, a.unsqueeze(2).expand(R, P, k)).gather(2, b.unsqueeze(1).expand(R, P, P))
        wa_, wb_ = wS.gather(1, a), wS.gather(1, k + b)
        change_ab = rv.unsqueeze(2) + pv.unsqueeze(1) - 2 * wa_.unsqueeze(2) * wb_.unsqueeze(1) * hab
        change, ij = change_ab.view(R, P * P).min(1)  # the best pair, with its exact cross term
        ok = live & torch.isfinite(change) & (change < -tol)
        if not ok.any():
            break
        qa, pb = a[rr, ij // P], k + b[rr, ij % P]
        dq, dp = -wS[rr, qa] * ok, wS[rr, pb] * ok
        gl = gl + _columns(HS, qa) * dq.unsqueeze(1) + _columns(HS, pb) * dp.unsqueeze(1)
        r = ok.nonzero().squeeze(1)
        delta[r, qa[r]] = dq[r]
        delta[r, pb[r]] = dp[r]
        used[r, qa[r]] = True
        used[r, pb[r]] = True
        moved[r, qa[r]] = True
        moved[r, pb[r]] = True
        gain += torch.where(ok, change, 0.0)
        live &= ok
    return S, moved, delta, gain


def _round_groups(wa, ka, ga, sa, h, hflat, n, shortlist, m):
    """N:M: a move revives q and prunes p inside one group of m inputs. Every group proposes its
    best move (exact pair change); the ``shortlist`` best groups of each row are then taken one
    after another with exact cross terms between the moves."""
    R = wa.shape[0]
    G = n // m
    t = wa * ga
    t.mul_(2)
    rev = torch.where(ka | (wa == 0), _INF, sa - t).view(R, G, m)
    pru = torch.where(ka, sa + t, _INF).view(R, G, m)
    del t
    blocks = h.view(G, m, G, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, m, m): H within each group
    wg = wa.view(R, G, m)
    # only pruned-kept pairs are moves: order each group's slots pruned first (every group of an
    # N:M mask prunes the same count), then score the (m - n) x n pairs with their cross term
    kg = ka.view(R, G, m)
    npr = int((~kg[0, 0]).sum())
    order = kg.to(torch.uint8).argsort(dim=2, stable=True)
    qs, ps = order[..., :npr], order[..., npr:]
    hq = torch.gather(blocks.unsqueeze(0).expand(R, G, m, m), 2, qs.unsqueeze(3).expand(R, G, npr, m))
    hqp = torch.gather(hq, 3, ps.unsqueeze(2).expand(R, G, npr, m - npr))
    pair = (rev.gather(2, qs).unsqueeze(3) + pru.gather(2, ps).unsqueeze(2)
            - 2 * wg.gather(2, qs).unsqueeze(3) * wg.gather(2, ps).unsqueeze(2) * hqp)  # (R, G, q, p)
    best, arg = pair.view(R, G, -1).min(2)
    arg = qs.gather(2, (arg // (m - npr)).unsqueeze(2)).squeeze(2) * m + ps.gather(2, (arg % (m - npr)).unsqueeze(2)).squeeze(2)
    k = min(shortlist, G)
    gv, gi = best.topk(k, 1, largest=False)  # the k groups with the best moves
    ga_ = arg.gather(1, gi)
    qi, pi = gi * m + ga_ // m, gi * m + ga_ % m
    S = torch.cat([qi, pi], 1)
    HS = _gather_block(hflat, S, n)
    wS, gl, sS = wa.gather(1, S), ga.gather(1, S), sa.gather(1, S)
    hqp = HS[:, :k, k:].diagonal(dim1=1, dim2=2)  # H_qp of each move
    delta = torch.zeros_like(wS)
    used = torch.zeros_like(wS, dtype=torch.bool)
    live = torch.ones(R, dtype=torch.bool, device=wa.device)
    tol = 1e-9 * (wa * ga).abs().sum(1).clamp_min(1e-30)
    rr = torch.arange(R, device=wa.device)
    gain = torch.zeros(R, device=wa.device)
    for _ in range(k):
        wq, wp = wS[:, :k], wS[:, k:]
        c = (sS[:, :k] - 2 * wq * gl[:, :k]) + (sS[:, k:] + 2 * wp * gl[:, k:]) - 2 * wq * wp * hqp
        c = c.masked_fill(used[:, :k] | ~torch.isfinite(gv), _INF)
        change, j = c.min(1)
        ok = live & torch.isfinite(change) & (change < -tol)
        if not ok.any():
            break
        dq, dp = -wS[rr, j] * ok, wS[rr, k + j] * ok
        gl = gl + _columns(HS, j) * dq.unsqueeze(1) + _columns(HS, k + j) * dp.unsqueeze(1)
        r = ok.nonzero().squeeze(1)
        delta[r, j[r]] = dq[r]
        delta[r, k + j[r]] = dp[r]
        used[r, j[r]] = True
        used[r, k + j[r]] = True
        gain += torch.where(ok, change, 0.0)
        live &= ok
    return S, used, delta, gain
