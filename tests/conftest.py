import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*Enum subclass.*")


class TwoLinear(nn.Module):
    """x -> fc1 -> gelu -> fc2; inputs come in as model(x=...)."""

    def __init__(self, d_in=16, d_hidden=32, d_out=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def linear_batches(d_in=16, n=4, tokens=32, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else torch.logspace(-1, 1, d_in)  # channels of very different energy
    return [{"x": torch.randn(2, tokens, d_in, generator=g) * scale} for _ in range(n)]


@pytest.fixture
def two_linear():
    return TwoLinear()
