"""How a layer's measured output gain (``ditprune.gains``) depends on the sparsity it is measured
at: ``allocation="auto"``'s gains for Wanda at 50%, 70% and 90% on a shipped reference model,
the same calibration, and the spread of log g(90%) / g(50%) across layers beside the spread of
log g(50%) itself.

    python benchmarks/gains_by_sparsity.py --model dit|flux

A spread of the ratio near zero would mean one gain, measured at the target sparsity, prices
the whole allocation range; ``allocation_options={"gain_sparsities": 2}`` measures the gains at
both ends of the range instead.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics


def main(argv: list[str] | None = None) -> None:
    import ditprune
    import ditprune.allocation as A
    from ditprune.evaluation.harness import reference_calibration
    from ditprune.reference import kind_of, load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", help="flux (flux-layout) or dit (dit-xl-layout)")
    args = p.parse_args(argv)
    dense = load(kind_of(args.model))
    calibration = reference_calibration(dense, 16, 10)
    seen, real = {}, A.auto

    def auto(curves, sizes, sparsity, spread, gains=None):
        seen[sparsity] = gains
        return real(curves, sizes, sparsity, spread, gains)

    A.auto = auto
    points = (0.5, 0.7, 0.9)
    for s in points:
        report = ditprune.prune(copy.deepcopy(dense), calibration, method="wanda", sparsity=s, allocation="auto",
                                progress=False)
    A.auto = real
    names = [r.name for r in report.layers]
    g = {s: seen[s] for s in points}
    ratio = [math.log(b / a) for a, b in zip(g[0.5], g[0.9]) if a > 0 and b > 0]
    level = [math.log(a) for a in g[0.5] if a > 0]
    print(f"{args.model}: Wanda's gains of {len(names)} layers, 4 calibration batches\n")
    print(f"log g(0.9) / g(0.5) across layers: mean {statistics.fmean(ratio):.2f}, sd {statistics.pstdev(ratio):.2f}, "
          f"range {min(ratio):.2f} to {max(ratio):.2f}; sd of log g(0.5): {statistics.pstdev(level):.2f}\n")
    print("| layer | g at 0.5 | g at 0.7 | g at 0.9 |")
    print("|---|---|---|---|")
    for i, n in enumerate(names):
        print(f"| {n} | {g[0.5][i]:.4f} | {g[0.7][i]:.4f} | {g[0.9][i]:.4f} |")


if __name__ == "__main__":
    main()
