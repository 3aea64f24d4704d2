"""FLUX.1-dev at its real shapes, for the cost benches (:mod:`ditprune.costbench`,
:mod:`ditprune.alloccost`, the deploy and structure benches): the transformer's dimensions,
the real run ``configs/flux_dev.yaml`` makes, synthetic correlated layer statistics, and
shape-true double and single blocks with their inputs (random weights: time and memory do
not depend on the values)."""

from __future__ import annotations

import math

import torch

__all__ = ["FLUX_DEV", "REAL_RUN", "synthetic_stats", "flux_blocks", "block_batches", "is_adaln"]

FLUX_DEV = {"double": 19, "single": 38, "dim": 3072, "heads": 24, "head_dim": 128, "text_tokens": 512,
            "params": 11.90e9}

# The real run this bench accounts for: configs/flux_dev.yaml (64 prompts x 28 steps, batch 4).
REAL_RUN = {"prompts": 64, "steps": 28, "batch": 4, "image_tokens": 1024}


def is_adaln(name: str) -> bool:
    return ".linear" in name and "norm" in name  # norm1.linear, norm1_context.linear, norm.linear




def _basis(d: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rank = min(d, 256)
    basis = (torch.randn(rank, d, generator=g) / rank**0.5).to(device)
    spectrum = torch.logspace(0, -2, rank).to(device)
    scale = torch.exp(torch.randn(d, generator=g)).to(device)  # heavy-tailed channel scales
    return basis, spectrum, scale


def synthetic_stats(d: int, tokens: int | None, seed: int = 0, device="cpu", need_gram: bool = True):
    """:class:`~ditprune.stats.InputStats` of correlated inputs: x = (z * spectrum) @ basis + 0.05 e,
    times per-channel scales. ``tokens=None``: the population covariance itself, counted as a
    million tokens; else that many sampled tokens (the few-token path, with held-out statistics)."""
    from .stats import InputStats

    basis, spectrum, scale = _basis(d, seed, device)
    stats = InputStats("synthetic", d, need_gram, device=device)
    if tokens is None:
        n = 1_000_000
        cov = (basis.T * spectrum.pow(2)) @ basis + 0.05**2 * torch.eye(d, device=device)
        cov = cov * scale.unsqueeze(0) * scale.unsqueeze(1)
        stats.sq_sum = torch.diagonal(cov).clone() * n
        if need_gram:
            stats.gram_sum, stats.held_sum = cov * n, None
        stats.count, stats.weight_sum = n, float(n)
        return stats
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for start in range(0, tokens, 1024):
        k = min(1024, tokens - start)
        z = torch.randn(k, basis.shape[0], generator=g, device=device) * spectrum
        x = (z @ basis + 0.05 * torch.randn(k, d, generator=g, device=device)) * scale
        stats.update(x)
    return stats




def flux_blocks(device="cpu", dtype=torch.float32, dims: dict | None = None):
    """A full-width FLUX.1-dev double block and single block, random weights (``dims``: other
    ``dim``/``heads``/``head_dim``, for tests)."""
    from ._quiet import diffusers as _diffusers

    _diffusers()
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    f = {**FLUX_DEV, **(dims or {})}
    torch.manual_seed(0)
    double = FluxTransformerBlock(f["dim"], f["heads"], f["head_dim"]).to(device, dtype).eval()
    single = FluxSingleTransformerBlock(f["dim"], f["heads"], f["head_dim"]).to(device, dtype).eval()
    return double, single


def block_batches(images: int, image_tokens: int = 1024, calls: int = 2, device="cpu", dtype=torch.float32,
                  seed: int = 0, dims: dict | None = None) -> list[dict]:
    """Block inputs of ``calls`` transformer calls with ``images`` samples each (512x512: 1024
    image tokens; 1024x1024: 4096), correlated like the synthetic layer inputs."""
    from ._quiet import diffusers as _diffusers

    _diffusers()
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    f = {**FLUX_DEV, **(dims or {})}
    basis, spectrum, scale = _basis(f["dim"], seed, device)
    g = torch.Generator(device=device).manual_seed(seed + 2)

    def tokens(n):
        z = torch.randn(images, n, basis.shape[0], generator=g, device=device) * spectrum
        return ((z @ basis + 0.05 * torch.randn(images, n, f["dim"], generator=g, device=device)) * scale).to(dtype)

    side = int(math.isqrt(image_tokens))
    img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(f["text_tokens"], 3), torch.cat([torch.zeros(len(img_ids), 1), img_ids], 1)]).to(device)
    rotary = FluxPosEmbed(theta=10000, axes_dim=[f["head_dim"] // 8, 7 * f["head_dim"] // 16, 7 * f["head_dim"] // 16])(ids)
    return [{"hidden_states": tokens(image_tokens), "encoder_hidden_states": tokens(f["text_tokens"]),
             "temb": torch.randn(images, f["dim"], generator=g, device=device).to(dtype), "image_rotary_emb": rotary}
            for _ in range(calls)]
