"""2:4 semi-structured speed at FLUX.1-dev's shapes, on the GPU this runs on (bf16).

    python benchmarks/gpu_2to4.py [--tokens 4608] [--out gpu_2to4.md]

1. Per shape (the five FLUX.1-dev Linear shapes), one F.linear of ``tokens`` rows: dense vs
   ``to_sparse_semi_structured`` (and float8 + 2:4 where torchao's packing runs).
2. One forward of a shape-true block stack (a double and a single FLUX.1-dev block, random
   weights, magnitude 2:4), dense vs :func:`ditprune.accelerate` (which converts only the
   shapes that gained).

Prints a markdown table and writes it to --out. Needs CUDA; on a machine without it, it says so
and exits 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ditprune.costbench import SHAPES as LAYERS
from ditprune.kernels import cuda_ms as timed

SHAPES = [(out_f, in_f) for _, out_f, in_f, _ in LAYERS]  # FLUX.1-dev's Linear shapes, (out, in)


def two_four(w):
    keep = torch.zeros_like(w, dtype=torch.bool).reshape(w.shape[0], -1, 4)
    keep.scatter_(2, w.abs().reshape(w.shape[0], -1, 4).topk(2, dim=2).indices, True)
    return w * keep.reshape(w.shape)


def float8_2to4(w, x):
    try:  # torchao's float8 + 2:4 packing, where this version and GPU have it
        from torchao.quantization import quantize_
        from torchao.sparsity.sparse_api import Float8DynamicActivationFloat8SemiSparseWeightConfig  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report, do not fail the whole run
        return f"n/a ({type(e).__name__})"
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    try:
        quantize_(lin, Float8DynamicActivationFloat8SemiSparseWeightConfig())
        return f"{timed(lambda: lin(x)):.3f}"
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096 + 512)
    p.add_argument("--out", default="gpu_2to4.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_2to4: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.sparse import to_sparse_semi_structured

    import ditprune
    from ditprune.costbench import block_batches, flux_blocks

    dev, dt = torch.device("cuda"), torch.bfloat16
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {args.tokens} tokens", "",
             "| shape (out x in) | dense ms | 2:4 ms | speedup | float8 + 2:4 ms |", "|---|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        w = two_four(torch.randn(out_f, in_f, device=dev, dtype=dt))
        x = torch.randn(args.tokens, in_f, device=dev, dtype=dt)
        dense = timed(lambda: torch.nn.functional.linear(x, w))
        ws = to_sparse_semi_structured(w)
        sparse = timed(lambda: torch.nn.functional.linear(x, ws))
        lines.append(f"| {out_f}x{in_f} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.2f}x | {float8_2to4(w, x)} |")
    double, single = flux_blocks(dev, dt)
    for block in (double, single):
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = two_four(m.weight.data)
    [batch] = block_batches(1, image_tokens=4096, calls=1, device=dev, dtype=dt)

    def stack():
        with torch.no_grad():
            e, h = double(**batch)
            single(hidden_states=h, encoder_hidden_states=e, temb=batch["temb"], image_rotary_emb=batch["image_rotary_emb"])

    dense_ms = timed(stack, 20)
    report = {n: ditprune.accelerate(b, tokens=args.tokens) for n, b in (("double", double), ("single", single))}
    sparse_ms = timed(stack, 20)
    converted = sum(len(r["converted"]) for r in report.values())
    lines += ["", f"Block stack (double + single, 1024x1024: 4096 image + 512 text tokens): dense {dense_ms:.2f} ms, "
                  f"after ditprune.accelerate {sparse_ms:.2f} ms ({dense_ms / sparse_ms:.2f}x); {converted} Linears "
                  "converted, the rest kept dense because their shape did not gain."]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
