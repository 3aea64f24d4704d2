import pytest
import torch

from ditprune import granularity as G
from ditprune import saliency

W = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
A = torch.tensor([4.0, 1.0])


def test_magnitude_and_wanda_hand_computed():
    assert saliency.magnitude(W).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert saliency.wanda(W, A).tolist() == [[2.0, 2.0], [6.0, 4.0]]


def test_ria_hand_computed():
    expected = torch.tensor(
        [[(1 / 4 + 1 / 3) * 2**0.5, (2 / 6 + 2 / 3) * 1.0], [(3 / 4 + 3 / 7) * 2**0.5, (4 / 6 + 4 / 7) * 1.0]]
    )
    torch.testing.assert_close(saliency.ria(W, A), expected)


def test_energy_balanced_hand_computed():
    # E_W = mean(W^2) = 7.5, E_A = mean(a) = 2.5
    torch.testing.assert_close(saliency.energy_balanced(W, A, 0.5), saliency.wanda(W, A) / (7.5 * 2.5) ** 0.5)
    torch.testing.assert_close(saliency.energy_balanced(W, A, 0.0), W**2 / 7.5)
    torch.testing.assert_close(saliency.energy_balanced(W, A, 1.0), (A / 2.5).expand(2, 2))
    with pytest.raises(ValueError, match="alpha"):
        saliency.energy_balanced(W, A, 1.5)


def test_row_output_error_is_the_removed_output_energy():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 10, generator=g), torch.randn(50, 10, generator=g)
    keep = torch.rand(6, 10, generator=g) > 0.5
    gram = x.T @ x / 50
    direct = ((x @ (w * ~keep).T) ** 2).sum(0) / 50
    torch.testing.assert_close(saliency.row_output_error(w, keep, gram), direct)


def test_balanced_mask_never_worse_than_wanda_and_keeps_counts():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        w = torch.randn(24, 32, generator=g) * torch.logspace(-1, 0.5, 24).unsqueeze(1)
        x = torch.randn(400, 32, generator=g) @ torch.randn(32, 32, generator=g) * torch.logspace(-1, 1, 32)
        gram, energy = x.T @ x / 400, (x**2).mean(0)
        labels = G.cluster_rows(G.row_features(w, energy), seed=0)
        fns = {"row": lambda s: G.row_mask(s, 0.5), "pooled": lambda s: G.pooled_mask(s, labels, 0.5)}
        keep, choice = saliency.balanced_mask(w, energy, gram, (0.3, 0.4, 0.5, 0.6), fns, labels)
        wanda_keep = G.row_mask(saliency.wanda(w, energy), 0.5)
        err = saliency.row_output_error(w, keep, gram).sum()
        assert err <= saliency.row_output_error(w, wanda_keep, gram).sum() + 1e-6
        assert (~keep).sum() == 24 * 16
        assert sum(c["rows"] for c in choice) == 24


def test_refine_mask_hand_computed_swap():
    # inputs 0 and 1 are strongly correlated (H01 = 0.95) and their weights have opposite signs:
    # pruning both removes little output energy, which per-weight scores cannot see
    w = torch.tensor([[1.0, -0.9, 0.85, 2.0]])
    h = torch.eye(4)
    h[0, 1] = h[1, 0] = 0.95
    start = G.row_mask(saliency.wanda(w, torch.diagonal(h)), 0.5)
    assert start.tolist() == [[True, False, False, True]]  # Wanda prunes -0.9 and 0.85: error 1.5325
    keep, swaps = saliency.refine_mask(w, start, h)
    assert keep.tolist() == [[False, False, True, True]] and swaps == 1
    torch.testing.assert_close(saliency.row_output_error(w, keep, h), torch.tensor([1 + 0.81 - 2 * 0.9 * 0.95]))


@pytest.mark.parametrize("group", [None, 4])
def test_refine_mask_keeps_counts_and_only_lowers_error(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(500, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = x.T @ x / 500
    start = G.row_mask(saliency.wanda(w, torch.diagonal(h)), 0.5) if group is None else G.nm_mask(w.abs(), 2, 4)
    keep, swaps = saliency.refine_mask(w, start, h, max_swaps=32, group=group)
    assert swaps > 0
    assert torch.equal(keep.sum(1), start.sum(1))
    if group:
        assert keep.reshape(32, -1, 4).sum(-1).eq(2).all()
    before, after = saliency.row_output_error(w, start, h), saliency.row_output_error(w, keep, h)
    assert (after <= before + 1e-5).all() and after.sum() < before.sum()
