"""Masks at one bit per weight: packing, and the ``torch.ao`` parametrization that holds them.

``FakeSparsity`` keeps its mask as a full tensor in the weight's dtype: on a bf16 FLUX.1-dev
that is 22 GiB of masks beside 22 GiB of weights. :class:`PackedSparsity` is a ``FakeSparsity``
(``torch.ao`` tools recognise it) whose mask lives packed, eight entries per byte, on the
weight's device: 1/16 of a bf16 weight's bytes. ``forward`` unpacks it for the product (a
transient bool of the weight's shape, one layer at a time; an all-ones mask, as before a layer
is pruned, passes the weight through untouched). Read the mask as ``p.mask`` (a
new bool tensor) and write it with ``p.mask = keep`` (packed in place: the buffer keeps its
identity, as ``torch.ao`` asks).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.pruning import FakeSparsity

__all__ = ["pack", "unpack", "PackedSparsity"]

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack(mask: torch.Tensor) -> torch.Tensor:
    """(ceil(numel / 8),) uint8 of a bool tensor, row-major; bit i of byte k is entry 8k + i
    (numpy's ``packbits(bitorder="little")``), on ``mask``'s device."""
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else (flat != 0).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)


def unpack(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack` packed into ``bits``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    flat = (bits.unsqueeze(1) >> _shifts(bits.device)) & 1
    return flat.reshape(-1)[:numel].view(torch.bool).reshape(shape)


class PackedSparsity(FakeSparsity):
    """``FakeSparsity`` with a packed mask (one bit per weight; see the module docstring).

    The packed buffer is not persistent: checkpoints hold plain weights, and the callback keeps
    the masks in its own state, as ``FakeSparsity`` (whose ``state_dict`` is empty) does."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None):
        nn.Module.__init__(self)
        self.shape = tuple(int(s) for s in shape)
        numel = 1
        for s in self.shape:
            numel *= s
        self.register_buffer("bits", torch.full(((numel + 7) // 8,), 255, dtype=torch.uint8, device=device),
                             persistent=False)
        self.all_kept = True  # an all-ones mask multiplies by nothing: the weight passes through

    @property
    def mask(self) -> torch.Tensor:
        return unpack(self.bits, self.shape)

    @mask.setter
    def mask(self, keep: torch.Tensor) -> None:
        if tuple(keep.shape) != self.shape:
            raise ValueError(f"mask of shape {tuple(keep.shape)} for a weight of shape {self.shape}")
        keep = keep.to(self.bits.device)
        keep = keep if keep.dtype == torch.bool else keep != 0
        self.bits.copy_(pack(keep))
        self.all_kept = bool(keep.all())

    def refresh(self) -> None:
        """After ``bits`` was written directly (e.g. a broadcast from another rank)."""
        self.all_kept = bool(self.mask.all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise AssertionError(f"mask shape {self.shape} must match x shape {tuple(x.shape)}")
        return x if self.all_kept else x * self.mask

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits.numel()} bytes"
