"""The reference DiTs (a FLUX-layout text-to-image model and a DiT-XL/2-layout class-conditional
model, both tiny, on 16x16 digits), their rectified-flow sampler, and the judge classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import SIDE
from .text import TEXT_DIM, caption, text_encoder

__all__ = ["FLUX_CONFIG", "DIT_CONFIG", "build", "Conditioning", "Denoiser", "sample", "Judge"]

FLUX_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=(8, 12, 12),
)
DIT_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=1, num_layers=4, sample_size=SIDE, patch_size=2,
    num_embeds_ada_norm=10, norm_num_groups=1,
)


def build(kind: str) -> nn.Module:
    from .._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    if kind == "flux":
        return diffusers.FluxTransformer2DModel(**FLUX_CONFIG)
    if kind == "dit":
        return diffusers.DiTTransformer2DModel(**DIT_CONFIG)
    raise ValueError(f"kind must be 'flux' or 'dit', got {kind!r}")


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 16) -> (B, 64, 4): 2x2 patches as tokens, as FLUX packs its latents."""
    b = x.shape[0]
    return x.reshape(b, 1, SIDE // 2, 2, SIDE // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (SIDE // 2) ** 2, 4)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    b = t.shape[0]
    return t.reshape(b, SIDE // 2, SIDE // 2, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, SIDE, SIDE)


@dataclass
class Conditioning:
    digits: torch.Tensor  # (B,) the digit asked for
    tokens: torch.Tensor | None = None  # FLUX: caption token states
    pooled: torch.Tensor | None = None  # FLUX: pooled caption embedding

    @classmethod
    def make(cls, kind: str, digits: torch.Tensor, templates: torch.Tensor | None = None) -> "Conditioning":
        digits = torch.as_tensor(digits, dtype=torch.long)
        if kind == "dit":
            return cls(digits)
        templates = torch.zeros_like(digits) if templates is None else torch.as_tensor(templates)
        tokens, pooled = text_encoder().encode([caption(int(d), int(t)) for d, t in zip(digits, templates)])
        return cls(digits, tokens, pooled)

    def null(self) -> "Conditioning":
        """The unconditional input of classifier-free guidance: the extra class 10 (DiT, whose
        label embedding drops labels in training) or the empty caption (FLUX)."""
        if self.tokens is None:
            return Conditioning(torch.full_like(self.digits, 10))
        tokens, pooled = text_encoder().encode([""])
        n = len(self.digits)
        return Conditioning(self.digits, tokens.expand(n, -1, -1), pooled.expand(n, -1))

    def __getitem__(self, idx) -> "Conditioning":
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        return Conditioning(self.digits[idx], pick(self.tokens), pick(self.pooled))


class Denoiser:
    """Velocity v(x_t, t | condition) of a reference model, with x_t = (1 - t) x_0 + t noise."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.kind = "flux" if type(model).__name__ == "FluxTransformer2DModel" else "dit"

    def inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> dict:
        """The keyword arguments of one model call: what calibration feeds as ``model(**batch)``."""
        dtype = next(self.model.parameters()).dtype
        if self.kind == "dit":
            return dict(hidden_states=x.to(dtype), timestep=t * 1000.0, class_labels=cond.digits)
        side = SIDE // 2
        ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        return dict(
            hidden_states=_pack(x).to(dtype),
            encoder_hidden_states=cond.tokens.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=t.to(dtype),
            img_ids=torch.cat([torch.zeros(side * side, 1), ij.float()], 1),
            txt_ids=torch.zeros(cond.tokens.shape[1], 3),
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.model(**self.inputs(x, t, cond)).sample.float()
        return out if self.kind == "dit" else _unpack(out)


@torch.no_grad()
def sample(
    denoiser: Denoiser, cond: Conditioning, steps: int = 20, seed: int = 0, guidance: float = 1.0,
    record: list | None = None,
) -> torch.Tensor:
    """Euler sampling of the rectified flow from t = 1 (noise) to 0; images in [-1, 1]. With
    ``guidance`` != 1, classifier-free guidance v = v_null + guidance (v_cond - v_null). With
    ``record``, every model call's inputs are appended to it (calibration batches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cond.digits), 1, SIDE, SIDE, generator=g)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    null = cond.null() if guidance != 1.0 else None
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = t.expand(len(x))
        calls = [cond] if null is None else [cond, null]
        if record is not None:
            record.extend(denoiser.inputs(x, tt, c) for c in calls)
        v = [denoiser(x, tt, c) for c in calls]
        velocity = v[0] if null is None else v[1] + guidance * (v[0] - v[1])
        x = x + (t_next - t) * velocity
    return x.clamp(-1, 1)


class Judge(nn.Module):
    """Small CNN digit classifier; ``features`` (64-d) feed the Frechet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (SIDE // 4) ** 2, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
