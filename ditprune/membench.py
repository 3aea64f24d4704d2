"""What a prune holds in memory, measured while the real :func:`ditprune.prune` runs.

Two counters run at once: :class:`ditprune.memory.LiveBytes` (live tensor bytes by kind, the CPU
counterpart of ``torch.cuda.max_memory_allocated``; on a GPU the allocator's own peak is read
as well) and, on the CPU, the process's peak resident set (``VmHWM``, reset before the run),
which also sees what tensors do not: the Python heap, numpy, allocator slack.

``ditprune bench --memory`` runs :func:`run_memory` on a bf16 FLUX-shaped transformer of about
1 GB (width 1536, 4 double + 4 single blocks, random weights) with ``backup=False``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .memory import KINDS, measuring

__all__ = ["flux_shaped", "flux_shaped_batches", "measure_prune", "run_memory"]


def flux_shaped(width: int = 1536, double: int = 4, single: int = 4, dtype=torch.bfloat16, device="cpu",
                seed: int = 0) -> nn.Module:
    """A ``FluxTransformer2DModel`` with FLUX.1's layout (head dim 128, MLP ratio 4, T5/CLIP input
    widths) at ``width``, random weights."""
    from ._quiet import diffusers as _diffusers

    diffusers = _diffusers()
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=width // 128, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    return model.to(device, dtype).eval()


def flux_shaped_batches(model: nn.Module, calls: int = 2, images: int = 1, side: int = 16, text: int = 64,
                        seed: int = 0) -> list[dict]:
    """``calls`` transformer calls of ``images`` samples, ``side`` x ``side`` latent tokens and
    ``text`` text tokens each."""
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    cfg = model.config
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(side * side, 1), ids], 1)

    def r(*s):
        return torch.randn(*s, generator=g).to(p.device, p.dtype)

    return [dict(hidden_states=r(images, side * side, cfg.in_channels),
                 encoder_hidden_states=r(images, text, cfg.joint_attention_dim),
                 pooled_projections=r(images, cfg.pooled_projection_dim),
                 timestep=torch.rand(images, generator=g).to(p.device, p.dtype),
                 img_ids=img_ids.to(p.device, p.dtype), txt_ids=torch.zeros(text, 3, device=p.device, dtype=p.dtype))
            for _ in range(calls)]


def _rss(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux)
        return True
    except OSError:
        return False


def measure_prune(model: nn.Module, run: Callable[[], object]) -> dict:
    """Runs ``run()`` (a prune of ``model``) under both counters. Returns the weights' bytes, the
    peak live tensor bytes and their kinds at that moment, the live bytes left after it, the
    peak resident set it added (CPU; None where Linux's counters are missing) and, on a GPU, the
    allocator's peak."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    base = _rss("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    with measuring(params[0].device, params) as mem:
        run()
    seconds = time.perf_counter() - start
    out = {"weights_bytes": weights, "seconds": seconds, "peak_bytes": mem.peak,
           "peak_by_kind": {k: mem.peak_by_kind.get(k, 0) for k in KINDS}, "left_bytes": mem.live - weights,
           "rss_added_bytes": (_rss("VmHWM") - base) if reset and base is not None else None}
    if mem.cuda_peak is not None:
        out["cuda_peak_added_bytes"] = mem.cuda_peak
    return out


def run_memory(method: str = "dit", width: int = 1536, double: int = 4, single: int = 4, device: str = "cpu",
               backup: bool = False, **options) -> dict:
    """The bar: a bf16 FLUX-shaped transformer pruned block by block at 50% with ``backup``."""
    from .pruning import prune

    model = flux_shaped(width, double, single, device=device)
    batches = flux_shaped_batches(model)
    result = measure_prune(model, lambda: prune(model, batches, method, 0.5, backup=backup, **options))
    result.update(method=method, width=width, blocks=f"{double} double + {single} single", backup=backup)
    return result
