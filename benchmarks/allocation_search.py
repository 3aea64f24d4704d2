"""How far any allocation within the range could go: a direct search on the measured error,
beside ``auto``'s, on a shipped reference model (a diagnosis, not a method: every step is a
whole prune and a calibration pass).

    python benchmarks/allocation_search.py --model dit --method wanda --sparsities 0.7,0.8 \\
        [--evals 200] [--range 0.2] [--samples 50] [--out benchmarks/results/allocation_search_dit.md]

For each sparsity: ``uniform``; ``auto`` as shipped; then a (1+4) random search that starts
from ``auto``'s allocation and minimises the prune's measured output error on the calibration
batches the prune saw (the quantity ``auto``'s additive model predicts). A step moves
``delta`` x the smaller layer's size of zeros from one layer to another (the budget holds
exactly, both layers stay within ``[s - r, s + r]``), ``delta`` 0.05 halving after 10
generations without gain. The allocation is forced by standing in for
:func:`ditprune.allocation.auto` (gains off, so nothing else is measured); the prune itself is
the shipped code path (block by block, whole rows). Each row prints, as a multiple of
uniform's: the error on the calibration the search sees (``search``), on a second calibration
drawn with another seed (``held-out calibration``: what over-fitting to the 20 batches costs)
and the bench's denoiser error on held-out digits (``evaluation``), with judge accuracy.
The search's figure is what the best allocation within the range reaches on the objective
``auto`` optimises; the gap from it to ``held-out`` and ``evaluation`` is what no
calibration-driven allocation can close on these inputs.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from allocation_diagnosis import calibration_error  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import ditprune.allocating as allocating
    import ditprune.allocation as A
    from ditprune import prune
    from ditprune.evaluation.harness import Comparison, reference_calibration

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", help="flux (flux-layout) or dit (dit-xl-layout)")
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "dit", "dit+rec"])
    p.add_argument("--sparsities", default="0.7,0.8")
    p.add_argument("--range", type=float, default=0.2, help="allocation_range")
    p.add_argument("--evals", type=int, default=200, help="prunes the search may run per sparsity")
    p.add_argument("--samples", type=int, default=50, help="evaluation samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)

    bench = Comparison(args.model, 16, 10, args.samples, 20)
    held_out = reference_calibration(bench.dense, 16, 10, seed=1)
    method, options = ("dit", {"reconstruct": True}) if args.method == "dit+rec" else (args.method, {})
    shipped_auto, forced, seen = A.auto, {}, {}

    def auto(curves, sizes, sparsity, spread, gains=None):
        if "alloc" in forced:
            return list(forced["alloc"]), [0.0] * len(curves)
        alloc, predicted = shipped_auto(curves, sizes, sparsity, spread, gains)
        seen["alloc"], seen["sizes"] = alloc, list(sizes)
        return alloc, predicted

    def allocate(*a, **k):
        out = shipped_allocate(*a, **k)
        seen["names"] = list(out)  # the order of auto's curves
        return out

    A.auto, shipped_allocate, allocating.allocate = auto, allocating.allocate, allocate

    def run(sparsity, allocation, alloc=None):
        forced.clear()
        extra = {} if alloc is None else {"allocation_options": {"gains": "none"}}
        if alloc is not None:
            forced["alloc"] = alloc
        model = copy.deepcopy(bench.dense)
        prune(model, bench.calibration, method=method, sparsity=sparsity, allocation=allocation,
              allocation_range=args.range, progress=False, **options, **extra)
        return model

    lines = [f"{bench.name}, {args.method}, allocation_range {args.range}, search of {args.evals} prunes from "
             f"auto's allocation, {args.samples} evaluation samples", "",
             "| sparsity | allocation | search x uniform | held-out calibration x uniform | evaluation rel. err "
             "| x uniform | judge acc |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rng = random.Random(args.seed)
    for s in (float(x) for x in args.sparsities.split(",")):
        lo, hi = A.bounds(s, args.range)
        rows, base = [], None
        models = {"uniform": run(s, "uniform"), "auto": run(s, "auto")}
        start, sizes, names = seen["alloc"], seen["sizes"], seen["names"]
        best, delta, stall, used = list(start), 0.05, 0, 0
        best_err = calibration_error(bench.dense, models["auto"], bench.calibration)
        while used < args.evals:
            children = []
            for _ in range(4):
                child = list(best)
                for _ in range(100):  # a move that keeps both layers within the range
                    i, j = rng.sample(range(len(child)), 2)
                    z = delta * min(sizes[i], sizes[j])
                    if child[i] + z / sizes[i] <= hi + 1e-9 and child[j] - z / sizes[j] >= lo - 1e-9:
                        child[i] += z / sizes[i]
                        child[j] -= z / sizes[j]
                        break
                children.append(child)
            scored = [(calibration_error(bench.dense, run(s, "auto", c), bench.calibration), c) for c in children]
            used += len(children)
            err, child = min(scored, key=lambda t: t[0])
            if err < best_err:
                best, best_err, stall = child, err, 0
            else:
                stall += 1
                if stall >= 10:
                    delta, stall = delta / 2, 0
        models["searched"] = run(s, "auto", best)
        for label, model in models.items():
            ev = bench.evaluator(model)
            cal, held = (calibration_error(bench.dense, model, batches) for batches in (bench.calibration, held_out))
            base = base or (cal, held, ev["rel_err"])
            rows.append(f"| {s} | {label} | {cal / base[0]:.2f} | {held / base[1]:.2f} | {ev['rel_err']:.4f} "
                        f"[{ev['ci']['rel_err'][0]:.4f}, {ev['ci']['rel_err'][1]:.4f}] | {ev['rel_err'] / base[2]:.2f} "
                        f"| {ev['judge_acc']:.2f} |")
            print(rows[-1], flush=True)
        lines += rows + ["", f"<!-- {s}, layer: auto -> searched sparsity (final delta {delta:.4f})", *(
            f"{n}: {a:.3f} -> {b:.3f} ({b - a:+.3f})" for n, a, b in zip(names, start, best)), "-->", ""]
        print("\n".join(lines[-len(names) - 3:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
