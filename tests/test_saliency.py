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


