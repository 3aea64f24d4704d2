"""What starting the gains' forwards at the measured block saves, measured on the code path:
``ditprune.gains.output_gains`` with per-layer gains on every Linear of the blocks of a
FLUX-layout transformer (diffusers ``FluxTransformer2DModel``, random weights, FLUX.1-dev's
1:2 ratio of double to single blocks), once as shipped and once with every block run (the
skipping disabled), on the same batch: seconds, block forwards (counted on a Linear inside each
block), and whether the gains agree bit for bit.

    python benchmarks/gains_resume.py [--double 3] [--single 6] [--heads 8] [--head-dim 64]
        [--image-tokens 256] [--text-tokens 128] [--batch 1]

About a minute on 2 CPU cores with the defaults. ``ditprune bench --cost`` prices the same
count at FLUX.1-dev's 19 + 38 blocks with the block runs' measured rates.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from ditprune import gains as G
    from ditprune._quiet import diffusers as _diffusers
    from ditprune.granularity import row_mask
    from ditprune.models import blocks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=3)
    p.add_argument("--single", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(0)
    dim = args.heads * args.head_dim
    model = _diffusers().FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=dim,
        pooled_projection_dim=dim, axes_dims_rope=(args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8),
    ).eval()
    g = torch.Generator().manual_seed(1)
    side = int(args.image_tokens**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    batch = dict(hidden_states=torch.randn(args.batch, side * side, 64, generator=g),
                 encoder_hidden_states=torch.randn(args.batch, args.text_tokens, dim, generator=g),
                 pooled_projections=torch.randn(args.batch, dim, generator=g), timestep=torch.full((args.batch,), 0.5),
                 img_ids=torch.cat([torch.zeros(side * side, 1), ids], 1), txt_ids=torch.zeros(args.text_tokens, 3))
    found = blocks(model)
    names = [n for b, _ in found for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(b + ".")]
    for n in names:
        parametrize.register_parametrization(model.get_submodule(n), "weight", nn.Identity())
    energies = {n: torch.rand(model.get_submodule(n).in_features, generator=g) + 0.1 for n in names}
    removed = {n: 0.2 for n in names}
    runs = {b: 0 for b, _ in found}
    probe = {b: next(m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(b + "."))
             for b, _ in found}
    for b, m in probe.items():
        m.register_forward_hook(lambda *a, b=b: runs.__setitem__(b, runs[b] + 1))

    def measure(skip):
        runs.update({b: 0 for b in runs})
        start = time.perf_counter()
        with torch.no_grad():
            out = G.output_gains(model, G.gain_groups(model, names, "layers"), energies, removed,
                                 lambda sc: row_mask(sc, 0.5), [batch], skip=skip)
        return out, time.perf_counter() - start, sum(runs.values())

    resumed, t_resumed, n_resumed = measure(True)
    whole, t_whole, n_whole = measure(False)
    print(f"FLUX-layout, width {dim}, {args.double} double + {args.single} single blocks, "
          f"{args.image_tokens} + {args.text_tokens} tokens, batch {args.batch}: per-layer gains of "
          f"{len(names)} Linears on one batch\n")
    print("| forwards | seconds | block forwards |\n|---|---|---|")
    print(f"| every block | {t_whole:.1f} | {n_whole} |")
    print(f"| from the measured block (shipped) | {t_resumed:.1f} | {n_resumed} |")
    print(f"\nratio {t_resumed / t_whole:.2f} (seconds), {n_resumed / n_whole:.2f} (block forwards); "
          f"gains equal bit for bit: {resumed == whole}")


if __name__ == "__main__":
    main()
