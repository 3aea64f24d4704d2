"""Seconds per Linear at FLUX.1-dev's shapes for every method, and each method's ratio to
SparseGPT (N:M: to SparseGPT at the same pattern): the first section of ``ditprune bench --cost``
alone, with ``dit`` + ``reconstruct=True`` at 2:4 added, timed without the byte counter.

    python benchmarks/layer_cost.py [--repeats 1] [--shapes 0,1,2,3,4] [--device cpu]
    python benchmarks/layer_cost.py --curves     # what allocation="auto" adds per layer: its removal curves, beside the prunes

Random weights, correlated synthetic statistics (``ditprune/costbench.py``); best of
``--repeats`` runs, methods interleaved (a method slower than 60 s on a shape is timed once). About
22 minutes on 2 CPU cores with ``--repeats 2`` (the Intel Xeon of 2026-12-06)."""

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
    original = cb.measure
    cb.measure = lambda fn, device, memory=True: original(fn, device, memory=False)  # time only
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


# Linears of each FLUX.1-dev block per SHAPES row (the single block's 9216x3072 adaLN timed as the
# 18432x3072 row: an upper bound for both the prune and its curve)
PER_BLOCK = {"double": {0: 8, 1: 2, 2: 2, 3: 2}, "single": {0: 3, 1: 1, 3: 1, 4: 1}}


def curves(shapes, device: str) -> None:
    """Seconds of ``allocation="auto"``'s removal curves per layer at sparsity 0.7 +- 0.2: Wanda's
    (``curve="wanda"``, the default for methods that do not update weights) and SparseGPT's on 128
    sampled rows (``curve="sparsegpt"``, the default for those that do), timed in the same run
    as the prunes they steer (SparseGPT and ``dit`` with ``reconstruct=True`` at 0.7), and the
    ratio composed over FLUX.1-dev's 19 double and 38 single blocks when every shape is timed.
    With SparseGPT's curves the pass also takes each layer's gain denominator on the Gram matrix
    (:func:`ditprune.allocation.gram_removed`): its own column, and in the SparseGPT curve's
    totals. Not included: the allocation's pass over the calibration and the measured gains."""
    import time

    import torch

    import ditprune.costbench as cb
    from ditprune.allocating import layer_curve
    from ditprune.allocation import gram_removed, removal_curve, sparsegpt_curve
    from ditprune.pruning import make_sparsifier

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    print("| Linear (out x in) | wanda curve s | sparsegpt curve s | Gram denominator s | sparsegpt prune s "
          "| dit reconstruct prune s | curve + denominator / sparsegpt | / dit reconstruct |\n"
          "|---|---|---|---|---|---|---|---|")
    warm = cb.synthetic_stats(64, None, device=device)  # first calls pay one-time costs (imports, thread pools)
    for method, options in (("sparsegpt", {}), ("dit", {"reconstruct": True})):
        sp = make_sparsifier(method, 0.7, None, **options)
        sp.compute_mask(torch.randn(96, 64, device=device), warm, **sp.defaults)
    sparsegpt_curve(torch.randn(96, 64, device=device), warm.gram, 0.5, 0.9)  # (few tokens: fit, judged held out)
    seconds = {}
    for name, out_f, in_f, tokens in shapes:
        stats = cb.synthetic_stats(in_f, tokens, device=device)
        weight = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5).to(device)
        wanda = timed(lambda: removal_curve(weight, stats.energy))
        curve = timed(lambda: layer_curve(weight, stats, "sparsegpt", 0.5, 0.9))
        denominator = timed(lambda: gram_removed(weight, stats.gram, stats.energy, 0.7))
        prunes = []
        for method, options in (("sparsegpt", {}), ("dit", {"reconstruct": True})):
            sp = make_sparsifier(method, 0.7, None, **options)
            prunes.append(timed(lambda: sp.compute_mask(weight, stats, **sp.defaults)))
        seconds[cb.SHAPES.index((name, out_f, in_f, tokens))] = (wanda, curve + denominator, *prunes)
        print(f"| {name} ({out_f}x{in_f}) | {wanda:.2f} | {curve:.1f} | {denominator:.2f} | {prunes[0]:.1f} "
              f"| {prunes[1]:.1f} | {(curve + denominator) / prunes[0]:.2f} | {(curve + denominator) / prunes[1]:.2f} |",
              flush=True)
    if len(seconds) == len(cb.SHAPES):
        total = [sum(cb.FLUX_DEV[kind] * n * seconds[j][k] for kind, rows in PER_BLOCK.items() for j, n in rows.items())
                 for k in range(4)]
        print(f"\nFLUX.1-dev, {sum(cb.FLUX_DEV[k] * sum(r.values()) for k, r in PER_BLOCK.items())} Linears: "
              f"SparseGPT curves with their denominators {total[1] / 3600:.2f} h = {total[1] / total[2]:.0%} of a SparseGPT prune "
              f"({total[2] / 3600:.2f} h), {total[1] / total[3]:.0%} of a dit reconstruct prune ({total[3] / 3600:.2f} h); "
              f"Wanda curves {total[0] / 3600:.2f} h")


if __name__ == "__main__":
    main()
