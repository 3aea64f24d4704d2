"""Gains by probes against gains measured layer by layer: ``allocation="auto"``'s gains for Wanda
on a shipped reference model, the same calibration and gain batches, per-layer
(``gains="layers"``: each layer pruned alone, the model's output change) and by probes
(``gains="probes"``: first order, Hutchinson) at a few probe counts. Per sparsity and probe
count: the correlation of the log gains across layers and the mean and spread of
log(probes / per-layer). A spread that shrinks as probes are added is the probes' noise; what
stays is where first order and the measured change part.

    python benchmarks/probe_gains.py --model flux|dit [--sparsities 0.5,0.8] [--probes 16,128]
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
    p.add_argument("--model", default="flux", help="flux (flux-layout) or dit (dit-xl-layout)")
    p.add_argument("--sparsities", default="0.5,0.8")
    p.add_argument("--probes", default="16,128")
    args = p.parse_args(argv)
    dense = load(kind_of(args.model))
    calibration = reference_calibration(dense, 16, 10)
    seen, real = {}, A.auto

    def auto(curves, sizes, sparsity, spread, gains=None):
        seen["gains"] = gains
        return real(curves, sizes, sparsity, spread, gains)

    A.auto = auto

    def gains(s, options):
        ditprune.prune(copy.deepcopy(dense), calibration, method="wanda", sparsity=s, allocation="auto",
                       allocation_options=options, progress=False)
        return [math.log(max(g, 1e-30)) for g in seen["gains"]]

    print(f"{args.model}: Wanda's gains, 4 gain batches; log(probes / per-layer) across layers\n")
    print("| sparsity | probes | corr. of log gains | mean log ratio | sd log ratio | sd log per-layer |")
    print("|---|---|---|---|---|---|")
    for s in map(float, args.sparsities.split(",")):
        layers = gains(s, {"gains": "layers"})
        for k in map(int, args.probes.split(",")):
            probed = gains(s, {"gains": "probes", "probes": k})
            ratio = [a - b for a, b in zip(probed, layers)]
            print(f"| {s} | {k} | {statistics.correlation(layers, probed):.3f} | {statistics.fmean(ratio):+.2f} | "
                  f"{statistics.pstdev(ratio):.2f} | {statistics.pstdev(layers):.2f} |", flush=True)
    A.auto = real


if __name__ == "__main__":
    main()
