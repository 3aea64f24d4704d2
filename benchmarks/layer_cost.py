"""Seconds per Linear at FLUX.1-dev's shapes for every method, and each method's ratio to
SparseGPT (N:M: to SparseGPT at the same pattern): the first section of ``ditprune bench --cost``
alone, with ``dit`` + ``reconstruct=True`` at 2:4 added, timed without the byte counter.

    python benchmarks/layer_cost.py [--repeats 1] [--shapes 0,1,2,3,4] [--device cpu]

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
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
