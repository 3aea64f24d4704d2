import pytest
import torch

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




def test_removed_energy_by_hand():
    from ditprune.saliency import removed_energy

    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    keep = torch.tensor([[True, False], [False, True]])
    e = torch.tensor([1.0, 4.0])
    # removed: 2^2*4 (row 0, input 1) + 3^2*1 (row 1, input 0) = 25; total: 1 + 16 + 9 + 4 = 30
    assert removed_energy(w, keep, None, e) == pytest.approx(25 / 30)
    g = torch.tensor([[1.0, 0.5], [0.5, 4.0]])
    new = torch.tensor([[1.5, 0.0], [0.0, -2.0]])  # an update of the kept weights
    d = torch.where(keep, w - new, w)
    expected = torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T)
    assert removed_energy(w, keep, new, e, g) == pytest.approx(float(expected))
    # the diagonal of G is what the energy-only form uses
    assert removed_energy(w, keep, None, e, torch.diag(e)) == pytest.approx(25 / 30)
