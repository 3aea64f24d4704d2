"""Input statistics of targeted Linear layers, gathered with forward pre-hooks.

Everything accumulates in float32 with an explicit token count, whatever the model dtype
(a bf16 accumulator silently loses the small channels). The Gram matrix X X^T is only kept
for methods that need it (SparseGPT, the ``dit`` method's error-guided balance).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["InputStats", "NonFiniteActivationError", "HookOwner", "observe"]


class NonFiniteActivationError(ValueError):
    """A calibration activation entering a targeted layer was NaN or infinite."""


class InputStats:
    """Running first/second-order statistics of the inputs x (shape (..., in_features)) of one layer.

    ``energy`` is a_j = ||X_j||^2 / N, the mean energy of input channel j over N tokens;
    ``gram`` is X X^T / N (only when ``need_gram``).
    """

    def __init__(self, name: str, in_features: int, need_gram: bool, device=None):
        self.name = name
        self.count = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram_sum = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if need_gram else None
        )

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        sq = x.pow(2).sum(0)
        if not torch.isfinite(sq).all():
            raise NonFiniteActivationError(
                f"non-finite activation (NaN or inf) entering layer '{self.name}' during calibration; "
                "check the calibration inputs and the model's dtype (fp16 overflows are a common cause)"
            )
        self.sq_sum += sq.to(self.sq_sum.device)
        if self.gram_sum is not None:
            self.gram_sum += (x.T @ x).to(self.gram_sum.device)
        self.count += x.shape[0]

    def _checked_count(self) -> int:
        if self.count == 0:
            raise ValueError(
                f"layer '{self.name}' saw no calibration tokens: the calibration iterable was empty "
                "or never reached this layer"
            )
        return self.count

    @property
    def nbytes(self) -> int:
        return self.sq_sum.nbytes + (self.gram_sum.nbytes if self.gram_sum is not None else 0)

    @property
    def energy(self) -> torch.Tensor:
        return self.sq_sum / self._checked_count()

    @property
    def gram(self) -> torch.Tensor:
        if self.gram_sum is None:
            raise RuntimeError(f"layer '{self.name}': the Gram matrix was not gathered (need_gram=False)")
        return self.gram_sum / self._checked_count()


class HookOwner:
    """The one owner of every hook ditprune registers: ``remove()`` takes them all off."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookOwner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def observe(layers: dict[str, nn.Module], need_gram: bool) -> Iterator[dict[str, InputStats]]:
    """Attach a statistics pre-hook to each layer for the duration of the ``with`` block."""
    stats = {
        name: InputStats(name, m.in_features, need_gram, device=_weight(m).device) for name, m in layers.items()
    }
    with HookOwner() as hooks:
        for name, module in layers.items():
            hooks.add(module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0])))
        yield stats


def _weight(module: nn.Module) -> torch.Tensor:
    # The dense parameter, also under a torch.nn.utils.parametrize parametrization.
    p = getattr(module, "parametrizations", None)
    return p.weight.original if p is not None and "weight" in p else module.weight
