"""Seconds per Linear at FLUX.1-dev's shapes for every method, and each method's ratio to
SparseGPT (N:M: to SparseGPT at the same pattern): the first section of ``ditprune bench --cost``
alone, with ``dit`` + ``reconstruct=True`` at 2:4 added, timed without the byte counter.

    python benchmarks/layer_cost.py [--repeats 1] [--shapes 0,1,2,3,4] [--device cpu]
    python benchmarks/layer_cost.py --curves     # what allocation="auto" adds per layer: its removal curves

Random weights, correlated synthetic statistics (``ditprune/costbench.py``); best of
``--repeats`` runs, methods interleaved. About 25 minutes on 2 CPU cores with one repeat."""

from __future__ import annotations

import argparse


def main() -> None:
    import ditprune.costbench as cb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--shapes", default=",".join(str(i) for i in range(len(cb.SHAPES))))
    p.add_argument("--device", default="cpu")
    p.add_argument("--curves", action="store_true", help="time the allocation's removal curves per shape instead")
    args = p.parse_args()
    if args.curves:
        return curves([cb.SHAPES[int(i)] for i in args.shapes.split(",")], args.device)
    methods = list(cb.METHODS) + [("dit reconstruct 2:4", "dit", {"reconstruct": True}, "2:4")]
    shapes = [cb.SHAPES[int(i)] for i in args.shapes.split(",")]
    timed = lambda fn, device, memory=True: cb.measure(fn, device, memory=False)  # noqa: E731 (time only)
    cb.measure, original = timed, cb.measure
    try:
        rows = cb.layer_costs(shapes, methods, args.repeats, args.device, progress=True)
    finally:
        cb.measure = original
    seconds: dict[str, dict[str, float]] = {}
    for r in rows:
        seconds.setdefault(f"{r['shape']} ({r['out']}x{r['in']})", {})[r["method"]] = r["seconds"]
    labels = [m[0] for m in methods]
    print("| Linear (out x in) | " + " | ".join(labels) + " | dit / SparseGPT | dit reconstruct / SparseGPT "
          "| dit 2:4 / SparseGPT 2:4 | dit reconstruct 2:4 / SparseGPT 2:4 |")
    print("|---" * (len(labels) + 5) + "|")
    for shape, s in seconds.items():
        ratios = [s["dit"] / s["sparsegpt"], s["dit reconstruct"] / s["sparsegpt"],
                  s["dit 2:4"] / s["sparsegpt 2:4"], s["dit reconstruct 2:4"] / s["sparsegpt 2:4"]]
        print(f"| {shape} | " + " | ".join(f"{s[m]:.2f}" for m in labels) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |")


def curves(shapes, device: str) -> None:
    """Seconds of ``allocation="auto"``'s removal curve per layer at sparsity 0.7 +- 0.2: Wanda's
    (``curve="wanda"``) and SparseGPT's on 128 sampled rows (``curve="sparsegpt"``, the default
    for methods that update weights). The gains (forwards of the whole model) are not included."""
    import time

    import torch

    from ditprune.allocation import removal_curve, sparsegpt_curve
    from ditprune.costbench import synthetic_stats

    print("| Linear (out x in) | wanda curve s | sparsegpt curve s |\n|---|---|---|")
    for name, out_f, in_f, tokens in shapes:
        stats = synthetic_stats(in_f, tokens, device=device)
        weight = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5).to(device)
        start = time.perf_counter()
        removal_curve(weight, stats.energy)
        wanda = time.perf_counter() - start
        start = time.perf_counter()
        sparsegpt_curve(weight, stats.gram, 0.5, 0.9)
        print(f"| {name} ({out_f}x{in_f}) | {wanda:.2f} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
