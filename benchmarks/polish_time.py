"""Seconds of the least-squares refit alone (``ditprune.lsq.polish``, the shipped defaults) at
FLUX.1-dev's shapes, on Wanda's 50% mask of random weights with the cost bench's synthetic
statistics, and the output energy it leaves (so two versions compare on time and result):

    python benchmarks/polish_time.py [--shapes 0,1,3] [--repeats 2]
    PYTHONPATH=/path/to/other/checkout python benchmarks/polish_time.py   # another version

Best of ``--repeats``; prints a markdown table."""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    import ditprune
    import ditprune.costbench as cb
    from ditprune import granularity as G
    from ditprune.lsq import damped, polish
    from ditprune.saliency import wanda

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0,1,3")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(f"`ditprune` from {ditprune.__file__}, {torch.get_num_threads()} threads\n")
    print("| Linear (out x in) | tokens | polish s | energy left |\n|---|---|---|---|")
    for i in args.shapes.split(","):
        name, out_f, in_f, tokens = cb.SHAPES[int(i)]
        stats = cb.synthetic_stats(in_f, tokens)
        weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5
        keep = G.row_mask(wanda(weight, stats.energy), 0.5)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            v = polish(weight, weight * keep, keep, stats.gram)
            best = min(best, time.perf_counter() - start)
        d = weight - v
        left = float(((d @ damped(stats.gram, dtype=torch.float32)) * d).sum())
        print(f"| {name} ({out_f}x{in_f}) | {tokens or 'plenty'} | {best:.2f} | {left:.6f} |", flush=True)


if __name__ == "__main__":
    main()
