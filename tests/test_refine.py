"""The swap search: hand-computed swaps, counts kept, the error only falls, N:M stays valid,
and it never does worse than the mask it starts from."""

import pytest
import torch

from ditprune import granularity as G
from ditprune import saliency
from ditprune.refine import refine_mask, row_output_error


def test_row_output_error_is_the_removed_output_energy():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 10, generator=g), torch.randn(50, 10, generator=g)
    keep = torch.rand(6, 10, generator=g) > 0.5
    gram = x.T @ x / 50
    direct = ((x @ (w * ~keep).T) ** 2).sum(0) / 50
    torch.testing.assert_close(row_output_error(w, keep, gram), direct)


def test_hand_computed_swap():
    # inputs 0 and 1 are strongly correlated (H01 = 0.95) and their weights have opposite signs:
    # pruning both removes little output energy, which per-weight scores cannot see
    w = torch.tensor([[1.0, -0.9, 0.85, 2.0]])
    h = torch.eye(4)
    h[0, 1] = h[1, 0] = 0.95
    start = G.row_mask(saliency.wanda(w, torch.diagonal(h)), 0.5)
    assert start.tolist() == [[True, False, False, True]]  # Wanda prunes -0.9 and 0.85: error 1.5325
    keep, info = refine_mask(w, start, h)
    # revive 0.85 (error -0.7225), prune 1.0 (error +1 - 2 * 0.9 * 0.95): 0.10 in all
    assert keep.tolist() == [[False, False, True, True]] and info["swaps"] == 1
    torch.testing.assert_close(row_output_error(w, keep, h), torch.tensor([1 + 0.81 - 2 * 0.9 * 0.95]))


def test_hand_computed_n_m_swap_stays_in_its_group():
    # 2:4 on 8 inputs; inputs 0 and 2 correlate (0.9) with opposite-sign weights in group one
    w = torch.tensor([[1.0, 0.2, -1.1, 3.0, 1.0, 2.0, 3.0, 4.0]])
    h = torch.eye(8)
    h[0, 2] = h[2, 0] = 0.9
    start = G.nm_mask(w.abs(), 2, 4)  # prunes 0.2 and 1.0 in group one, 1.0 and 2.0 in group two
    assert start.tolist() == [[False, False, True, True, False, False, True, True]]
    keep, info = refine_mask(w, start, h, group=4)
    # in group one: revive 0.2 and prune -1.1 -> pruned {1.0, -1.1}: 1 + 1.21 - 2 * 1.1 * 0.9 = 0.23 < 1.04
    assert keep.tolist() == [[False, True, False, True, False, False, True, True]] and info["swaps"] == 1


@pytest.mark.parametrize("group", [None, 4])
@pytest.mark.parametrize("shortlist", [1, 4, 12])
def test_counts_kept_and_every_row_only_improves(group, shortlist):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(500, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = x.T @ x / 500
    start = G.row_mask(saliency.wanda(w, torch.diagonal(h)), 0.5) if group is None else G.nm_mask(w.abs(), 2, 4)
    keep, info = refine_mask(w, start, h, rounds=16, shortlist=shortlist, group=group, chunk=16)
    assert info["swaps"] > 0
    assert torch.equal(keep.sum(1), start.sum(1))
    if group:
        assert keep.reshape(40, -1, 4).sum(-1).eq(2).all()
    before, after = row_output_error(w, start, h), row_output_error(w, keep, h)
    assert (after <= before + 1e-4).all() and after.sum() < (0.7 if shortlist > 1 else 0.95) * before.sum()


@pytest.mark.parametrize("group", [None, 4])
def test_rows_are_independent_so_chunks_do_not_matter(group):
    """The same mask and residual, to the bit, whatever the block of rows: blocks smaller than a
    round's slices, and a block of 600 rows that its passes take 256 at a time."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(600, 48, generator=g)
    x = torch.randn(300, 48, generator=g) @ torch.randn(48, 48, generator=g)
    h = x.T @ x / 300
    start = G.row_mask(w.abs(), 0.6) if group is None else G.nm_mask(w.abs(), 2, 4)
    a, info, res = refine_mask(w, start, h, group=group, chunk=70, residual=True)
    b, _, res_b = refine_mask(w, start, h, group=group, chunk=1024, residual=True)
    assert info["swaps"] > 0 and torch.equal(a, b) and torch.equal(res, res_b)


def test_zero_rounds_is_the_identity():
    w, h = torch.randn(4, 8), torch.eye(8)
    start = G.row_mask(w.abs(), 0.5)
    keep, info = refine_mask(w, start, h, rounds=0)
    assert torch.equal(keep, start) and info == {"swaps": 0, "rounds": 0}


def test_rows_with_different_counts_do_not_couple():
    """Pooled masks give rows different counts; each row's search must not depend on the others."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 32, generator=g) * torch.logspace(-1, 1, 12).unsqueeze(1)
    x = torch.randn(200, 32, generator=g) @ torch.randn(32, 32, generator=g)
    h = x.T @ x / 200
    start = G.pooled_mask(w.abs(), torch.zeros(12, dtype=torch.long), 0.5)
    counts = (~start).sum(1)
    assert counts.min() < 4 and counts.max() > 28  # some rows prune almost nothing, some almost all
    together, _ = refine_mask(w, start, h, shortlist=8)
    for i in range(12):
        alone, _ = refine_mask(w[i : i + 1], start[i : i + 1], h, shortlist=8)
        assert torch.equal(alone, together[i : i + 1]), i


def test_an_exact_zero_is_never_revived():
    # weight 1 is exactly zero and pruned; pruning the kept 1.0 as well lowers the error (its input
    # correlates with the pruned 0.9's, opposite signs): the old search "revived" the zero to pay
    # for it and dropped the revival, leaving 3 pruned where 2 were asked
    w = torch.tensor([[1.0, 0.0, -0.9, 2.0]])
    h = torch.eye(4)
    h[0, 2] = h[2, 0] = 0.95
    start = torch.tensor([[True, False, False, True]])
    keep, info = refine_mask(w, start, h)
    assert keep.tolist() == [[True, False, False, True]] and info["swaps"] == 0
    # N:M alike: the only pruned slot of each group that may be revived is a zero
    keep, _ = refine_mask(w, torch.tensor([[True, False, True, False]]), h, group=2)
    assert int((~keep).sum()) == 2


@pytest.mark.parametrize("group", [None, 4])
def test_counts_kept_on_weights_with_exact_zeros(group):
    """Re-pruning a pruned model: half the weights are already zero. Every row (every group) keeps
    exactly its count, and never more zeros than the mask asks for."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    w[torch.rand(64, 32, generator=g) < 0.5] = 0.0
    x = torch.randn(200, 32, generator=g) @ torch.randn(32, 32, generator=g)
    h = x.T @ x / 200
    scores = saliency.wanda(w, torch.diagonal(h))
    start = G.nm_mask(scores, 2, 4) if group else G.row_mask(scores, 0.5)
    keep, _ = refine_mask(w, start, h, rounds=8, group=group)
    if group:
        assert (keep.reshape(64, -1, 4).sum(-1) == 2).all()
    else:
        assert (keep.sum(1) == start.sum(1)).all()
    assert int(((w * keep) == 0).sum()) <= int(((w * start) == 0).sum())  # no zero kept in place of a weight


@pytest.mark.parametrize("group,rounds", [(None, 4), (4, 4), (None, 0)])
def test_the_residual_it_returns_is_the_one_of_the_mask_it_returns(group, rounds):
    """``residual=True``: the g = (W * ~keep) @ H the search kept up to date through its swaps
    (what the least-squares refit starts from) equals the product recomputed for the returned
    mask, and the mask is the one the search returns without it."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 64, generator=g)
    x = torch.randn(300, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = x.T @ x / 300
    start = G.row_mask(w.abs(), 0.5) if group is None else G.nm_mask(w.abs(), 2, 4)
    keep, info, res = refine_mask(w, start, h, rounds=rounds, group=group, chunk=32, residual=True)
    assert torch.equal(keep, refine_mask(w, start, h, rounds=rounds, group=group, chunk=32)[0])
    assert (info["swaps"] > 0) == (rounds > 0)
    recomputed = (w.double() * ~keep) @ h.double()
    torch.testing.assert_close(res.double(), recomputed, rtol=0, atol=1e-5 * float(recomputed.abs().max()))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_choose_reads_the_error_from_the_search_residual(nm):
    """The alpha/grouping choice takes each candidate's error from the swap search's residual
    when the search hands one back (plenty of tokens): it chooses what the errors recomputed
    independently, one product per candidate, choose; a residual that lies changes the choice
    (so it is the residual that is read)."""
    from ditprune import ditmask as D

    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=g) * torch.rand(96, 1, generator=g)
    x = (torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)) * torch.rand(64, generator=g).exp()
    h = x.T @ x / 400
    energy = torch.diagonal(h)
    labels = torch.arange(96) % 3
    alphas = (0.3, 0.4, 0.5)
    groups = D.groupings(0.5, nm, "clusters")
    grp = None if nm is None else nm[1]

    def with_residual(wr, keep):
        keep, _, res = refine_mask(wr, keep, h, rounds=2, group=grp, residual=True)
        return keep, res

    def plain(wr, keep):
        return refine_mask(wr, keep, h, rounds=2, group=grp)[0]

    expected = {}
    for alpha in alphas:  # by hand: each candidate's removed energy dW H dW^T, summed per cluster
        scores = saliency.energy_balanced(w, energy, alpha)
        for name, fn in groups.items():
            dw = (w * ~plain(w, fn(scores, labels))).double()
            err = ((dw @ h.double()) * dw).sum(1)
            for c in range(3):
                e = float(err[labels == c].sum())
                if c not in expected or e < expected[c][0]:
                    expected[c] = (e, alpha, name)
    want = [{"cluster": c, "alpha": a, "grouping": n} for c, (_, a, n) in sorted(expected.items())]
    assert D.choose(w, energy, labels, alphas, groups, with_residual, h) == want
    assert D.choose(w, energy, labels, alphas, groups, plain, h) == want
    liar = lambda wr, keep: (lambda k, r: (k, -r))(*with_residual(wr, keep))  # noqa: E731
    assert D.choose(w, energy, labels, alphas, groups, liar, h) != want
